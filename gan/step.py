"""One training step: the D update, then the G update, on one local batch."""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from gan.augment import AugmentState, augment
from gan.config import LossConfig
from gan.losses import d_hinge, d_loss, g_hinge, g_loss, r1
from gan.models import sample_z


@dataclass
class Nets:
    """The step's view of the models: ``G``/``D`` may be DDP-wrapped, ``D_raw`` never is."""

    G: nn.Module
    D: nn.Module
    D_raw: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    z_dim: int
    # Wraps the forward passes (bf16 autocast, see gan/perf.py); losses are taken in fp32.
    autocast: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext)
    loss_kind: str = "seed"  # loss.kind
    aug: AugmentState | None = None  # differentiable augmentation of D's inputs (gan/augment.py)
    # Wraps G's pass through D: DP turns D's per-face gradient hooks off there (gan/privacy.py).
    g_pass: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext)

    def d_in(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        return x if self.aug is None else augment(x, self.aug.ops, self.aug.p, gen)


def to_unit_range(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1] (the permute leaves a channels-last layout)."""
    return images_u8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def augment_real(x: torch.Tensor, cfg: LossConfig, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Random horizontal flips, then (the seed's loss only) instance noise ε ~ N(0, σ²) with
    σ ~ U(0, σ_max) per step."""
    n = x.shape[0]
    flip = torch.rand(n, generator=gen, device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if cfg.kind != "seed":
        return x, {}
    sigma = torch.rand((), generator=gen, device=x.device) * cfg.noise_sigma_max
    x = x + sigma * torch.randn(x.shape, generator=gen, device=x.device)
    return x, {"noise_sigma": sigma}


def real_labels(n: int, cfg: LossConfig, gen: torch.Generator, device) -> torch.Tensor:
    """Per-sample smoothed real labels y ~ U(lo, hi) (the seed's loss); hard 1s otherwise."""
    if cfg.kind != "seed":
        return torch.ones(n, device=device)
    lo, hi = cfg.real_label_lo, cfg.real_label_hi
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)


def grad_norm(params) -> torch.Tensor:
    """The global L2 norm of the gradients, on the device (no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())


def d_step(x: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor, nets: Nets,
           gen: torch.Generator | None = None, r1_weight: float = 0.0) -> dict:
    """Updates D only: ``fake`` is detached, so no gradient reaches G. ``r1_weight`` > 0 adds
    that times R1 on the real pass (gan/losses.py)."""
    # Real and fake go through D in two passes, as in the seed (BN statistics per pass); the
    # DDP wrapper has broadcast_buffers=False, so the second pass does not trip autograd.
    nets.opt_d.zero_grad(set_to_none=True)
    real_in = nets.d_in(x, gen)
    if r1_weight > 0:  # R1 differentiates D at the very input it saw (augmented, as in StyleGAN2-ADA)
        real_in = real_in.detach().requires_grad_(True)
    with nets.autocast():
        real_logits, fake_logits = nets.D(real_in), nets.D(nets.d_in(fake.detach(), gen))
    if nets.loss_kind == "hinge":
        loss, stats = d_hinge(real_logits.float(), fake_logits.float())
    else:
        loss, stats = d_loss(real_logits.float(), fake_logits.float(), labels)
    if r1_weight > 0:
        penalty, r1_stats = r1(real_logits.float(), real_in)
        loss, stats = loss + r1_weight * penalty, {**stats, **r1_stats}
    if nets.aug is not None:
        nets.aug.observe(real_logits)
        stats["aug_p"] = nets.aug.p.detach().clone()
    loss.backward()
    stats["d_grad_norm"] = grad_norm(nets.D.parameters())
    nets.opt_d.step()
    return stats


def noised(fake: torch.Tensor, cfg: LossConfig, stats: dict, gen: torch.Generator) -> torch.Tensor:
    """``fake`` with the step's instance noise when ``loss.noise_on = "both"``."""
    if cfg.kind != "seed" or cfg.noise_on != "both":
        return fake
    return fake + stats["noise_sigma"] * torch.randn(fake.shape, generator=gen, device=fake.device)


def g_step(fake: torch.Tensor, nets: Nets, gen: torch.Generator | None = None) -> dict:
    """Updates G only. D's gradients are not wanted, so the pass goes through the unwrapped D
    (nothing to all-reduce) and ``inputs=`` keeps autograd from computing D's weight grads."""
    nets.opt_g.zero_grad(set_to_none=True)
    with nets.g_pass():
        with nets.autocast():
            logits = nets.D_raw(nets.d_in(fake, gen))  # augmented too: the gradient flows through it
        loss, stats = (g_hinge if nets.loss_kind == "hinge" else g_loss)(logits.float())
        loss.backward(inputs=list(nets.G.parameters()))
    stats["g_grad_norm"] = grad_norm(nets.G.parameters())
    nets.opt_g.step()
    return stats


def train_step(images_u8: torch.Tensor, nets: Nets, cfg: LossConfig,
               gen: torch.Generator, step: int = 0) -> dict[str, torch.Tensor]:
    """D update then G update on one batch of uint8 NHWC images. Returns detached stats; all
    randomness comes from ``gen``, so a step can be replayed exactly. ``step``: the global
    step, for the lazy R1 schedule (every ``cfg.r1_every`` steps, weighted by it)."""
    x, aug_stats = augment_real(to_unit_range(images_u8), cfg, gen)
    labels = real_labels(x.shape[0], cfg, gen, x.device)
    with nets.autocast():
        fake = nets.G(sample_z(x.shape[0], nets.z_dim, gen, x.device))
    lazy_r1 = cfg.r1_gamma / 2 * cfg.r1_every if cfg.r1_gamma > 0 and step % cfg.r1_every == 0 else 0.0
    stats = d_step(x, noised(fake, cfg, aug_stats, gen), labels, nets, gen, lazy_r1)
    stats.update(g_step(noised(fake, cfg, aug_stats, gen), nets, gen))
    return {**stats, **aug_stats, "label_min": labels.min().detach(), "label_max": labels.max().detach()}


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int | None = None) -> None:
    """EMA of the generator's weights, with TensorFlow's warm-up when ``step`` is given: the
    decay is min(decay, (1 + step) / (10 + step)), so a short run averages over its recent
    steps rather than over weights from early training, which average to no face at all
    (0.999 without warm-up gave FID 335 against the raw generator's 147 in 1,420 steps). Its BN
    statistics are recomputed for its own weights when it is used (gan/bn.py)."""
    if step is not None:
        decay = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
