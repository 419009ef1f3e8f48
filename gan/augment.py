"""Differentiable augmentation of D's inputs (DiffAugment, Zhao et al. 2020) with an adaptive
strength in the spirit of ADA (Karras et al. 2020).

``loss.diffaug`` names the ops (``color``, ``translation``, ``cutout``: the paper's policy for
small data). Each op is applied to a sample with probability p; every D input, real and fake, in
the D step and the G step, goes through the same ops (the gradient flows through them to G), so
D never sees an un-augmented image and G is not pushed to produce augmented-looking faces.

p is 1 unless ``loss.ada_target`` > 0: then p starts at 0 and follows D's overfitting, measured
as r = E[sign(D(x_real))] (0 for a D that cannot tell, 1 for one sure of every training face):
each step p += sign(r − target) · batch / ``loss.ada_images`` (clamped to [0, 1]). p lives on the
device (no host sync) and in the checkpoint. All randomness comes from the step's generator, so a
step stays replayable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

OPS = ("color", "translation", "cutout")


def _rand(shape, gen: torch.Generator, x: torch.Tensor) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=x.device, dtype=x.dtype)


def color(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    x = x + (_rand((n, 1, 1, 1), gen, x) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand((n, 1, 1, 1), gen, x) * 2) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand((n, 1, 1, 1), gen, x) + 0.5) + mean  # contrast


def translation(x: torch.Tensor, gen: torch.Generator, ratio: float = 0.125) -> torch.Tensor:
    """Shifts by up to ratio·size in each direction, zeros where the image left (as the paper)."""
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = (_rand((n, 1, 1), gen, x) * (2 * sh + 1)).long() - sh
    tx = (_rand((n, 1, 1), gen, x) * (2 * sw + 1)).long() - sw
    gy, gx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    gy = (gy[None] + ty + 1).clamp(0, h + 1)
    gx = (gx[None] + tx + 1).clamp(0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1])
    return padded.permute(0, 2, 3, 1)[torch.arange(n, device=x.device)[:, None, None], gy, gx].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, gen: torch.Generator, ratio: float = 0.5) -> torch.Tensor:
    """Zeroes a square of side ratio·size at a random place (it may cross the border)."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    oy = (_rand((n, 1, 1), gen, x) * (h + (1 - ch % 2))).long()
    ox = (_rand((n, 1, 1), gen, x) * (w + (1 - cw % 2))).long()
    gy, gx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    dy, dx = gy[None] - oy + ch // 2, gx[None] - ox + cw // 2
    inside = (dy >= 0) & (dy < ch) & (dx >= 0) & (dx < cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


_FNS = {"color": color, "translation": translation, "cutout": cutout}


def parse(policy: str) -> tuple[str, ...]:
    ops = tuple(o.strip() for o in policy.split(",") if o.strip())
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise ValueError(f"loss.diffaug: unknown op {bad[0]!r}; expected a comma list of {', '.join(OPS)}")
    return ops


def augment(x: torch.Tensor, ops: tuple[str, ...], p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each op applied to each sample with probability ``p`` (a 0-d tensor)."""
    for op in ops:
        keep = (_rand((x.shape[0], 1, 1, 1), gen, x) < p).to(x.dtype)
        x = keep * _FNS[op](x, gen) + (1 - keep) * x
    return x


class AugmentState:
    """The ops and the probability p (on the device), with ADA's running overfitting measure."""

    INTERVAL = 4  # steps between adjustments, as in ADA

    def __init__(self, ops: tuple[str, ...], target: float, images: int, device):
        self.ops, self.target, self.images = ops, target, images
        self.p = torch.tensor(0.0 if target > 0 else 1.0, device=device)
        self.acc = torch.zeros((), device=device)

    def observe(self, real_logits: torch.Tensor) -> None:
        if self.target > 0:
            self.acc += torch.sign(real_logits.detach().float()).mean()

    def adjust(self, mean, global_batch: int) -> None:
        """Every INTERVAL steps on every rank (``mean`` is Context.mean: the ranks agree on p)."""
        if self.target > 0:
            r = mean(self.acc / self.INTERVAL)
            step = self.INTERVAL * global_batch / self.images
            self.p.copy_((self.p + torch.sign(r - self.target) * step).clamp(0.0, 1.0))
            self.acc.zero_()

    def state_dict(self) -> dict:
        return {"p": self.p.detach().cpu(), "acc": self.acc.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.p.copy_(state["p"])
        self.acc.copy_(state["acc"])
