"""Differentially private training of D with Opacus: (ε, δ)-DP for the people in the training set.

Only D sees real faces; G learns from D's gradients alone, so G, its EMA and every face sampled
from them inherit D's guarantee by post-processing. D's step is DP-SGD (Abadi et al. 2016) as
Opacus implements it: per-face gradients (``GradSampleModule``), each clipped to
``privacy.dp_max_grad_norm``, their sum noised with N(0, σ²C²) (``DPOptimizer``; under DDP
``DistributedDPOptimizer``: rank 0 adds the noise, the ranks sum), on Poisson-sampled batches
(datasets/poisson.py). σ is set from the target ``privacy.dp_epsilon`` for the run's whole
length (Opacus's ``get_noise_multiplier``), and Opacus's RDP accountant counts what each step
spends: the ``dp_epsilon`` metric, the checkpoint's ``privacy`` entry, the run's description.

D's real and fake passes are two forward passes of the same batch size; Opacus sums each pair's
per-sample gradients before clipping (its own DCGAN example does the same), so a real face's
whole influence on a step is bounded by C. G's step runs through D with the hooks off: no
per-sample gradients are wanted there.

What the guarantee does not cover: numbers computed on real faces and logged as they are (D's
loss and outputs, the health probe on the first training faces, the step-0 grid of training
faces). They stay in the run's tracking server; publish the generator, not the run.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch import nn

from gan.config import PrivacyConfig

# Opacus's per-sample hooks on D's first layer fire for the real pass, whose input needs no
# gradient: expected, and said once per step otherwise.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")

ACCOUNTANT = "rdp"


class PrivacyError(ValueError):
    """DP training cannot run as configured (no Opacus, a D that has no per-face gradients)."""


class DPTraining:
    """σ for the target ε, the accountant, and D wrapped for DP-SGD.

    ``n``: the training faces; ``sample_rate``: each face's chance to be in a step's batch;
    ``steps``: the run's total D steps (what the target ε is spent over)."""

    def __init__(self, cfg: PrivacyConfig, n: int, sample_rate: float, steps: int):
        # The privacy extra, imported by the runs that use it, not by every process that imports
        # the training loop (each Ray worker, each CLI: a tiny run's workers start ~0.6 s sooner).
        try:
            from opacus.accountants import RDPAccountant
            from opacus.accountants.utils import get_noise_multiplier
        except ImportError:
            raise PrivacyError('privacy.dp_epsilon needs Opacus: pip install -e ".[privacy]"') from None
        self.target, self.max_grad_norm = cfg.dp_epsilon, cfg.dp_max_grad_norm
        self.delta = cfg.dp_delta if cfg.dp_delta > 0 else 1.0 / n
        self.n, self.sample_rate, self.steps = n, sample_rate, steps
        self.noise_multiplier = get_noise_multiplier(target_epsilon=self.target, target_delta=self.delta,
                                                     sample_rate=sample_rate, steps=steps, accountant=ACCOUNTANT)
        self.accountant = RDPAccountant()

    def wrap(self, D: nn.Module, opt_d: torch.optim.Optimizer, expected_batch: float, world_size: int,
             noise: torch.Generator | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
        """(D with per-sample gradient hooks, the DP optimizer around ``opt_d``). ``D`` itself is
        keeps its parameters and state dict (the hooks sit on its layers); ``expected_batch``: this
        rank's mean batch; ``noise``: the generator the noise is drawn from (the step's, so that
        a resumed run draws the noise the uninterrupted one would have)."""
        from opacus import GradSampleModule
        from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
        from opacus.validators import ModuleValidator

        errors = ModuleValidator.validate(D, strict=False)
        if errors:
            raise PrivacyError(f"privacy.dp_epsilon: D has no per-face gradients ({errors[0]}); "
                               f"set model.d_norm=none")
        gsm = GradSampleModule(D)
        cls = DistributedDPOptimizer if world_size > 1 else DPOptimizer
        opt = cls(opt_d, noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
                  expected_batch_size=expected_batch, loss_reduction="mean", generator=noise)
        opt.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        return gsm, opt

    def epsilon(self) -> float:
        """ε spent so far at ``delta`` (0 before the first step)."""
        if not self.accountant.history:
            return 0.0
        with warnings.catch_warnings():  # "optimal order is the largest alpha": a looser, still valid bound
            warnings.simplefilter("ignore")
            return float(self.accountant.get_epsilon(self.delta))

    def describe(self) -> str:
        return (f"D trained with differential privacy (Opacus DP-SGD, RDP accountant): ε = {self.epsilon():.4g} "
                f"spent of the target {self.target:g}, δ = {self.delta:.3g}; noise multiplier σ = "
                f"{self.noise_multiplier:.4g}, per-face clipping C = {self.max_grad_norm:g}, Poisson sampling "
                f"rate q = {self.sample_rate:.4g} over {self.n} faces, {self.steps} steps planned. G and its "
                f"samples inherit the guarantee (post-processing); logged losses on real faces do not.")

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict(), "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "delta": self.delta, "max_grad_norm": self.max_grad_norm,
                "steps": self.steps, "n": self.n}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continues the accountant. A checkpoint from a run without DP (or with other noise) is
        refused: its earlier steps were not private, and ε would not count them."""
        if state is None:
            raise PrivacyError("the checkpoint is from a run without privacy.dp_epsilon; its steps were not "
                               "private, so a DP run cannot continue it")
        if abs(state["noise_multiplier"] - self.noise_multiplier) > 1e-9 or state["sample_rate"] != self.sample_rate:
            raise PrivacyError(f"the checkpoint's DP noise (σ {state['noise_multiplier']:.4g}, q "
                               f"{state['sample_rate']:.4g}) differs from this config's (σ {self.noise_multiplier:.4g}, "
                               f"q {self.sample_rate:.4g}): resume with the same privacy and train settings")
        self.accountant.load_state_dict(state["accountant"])


def hooks_off(gsm: nn.Module):
    """A context in which D's forward records nothing for per-sample gradients (G's step)."""
    @contextlib.contextmanager
    def off():
        gsm.disable_hooks()
        try:
            yield
        finally:
            gsm.enable_hooks()
    return off
