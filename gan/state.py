"""Everything the training loop changes, in one object with ``state_dict()``/``load_state_dict()``:
the two nets and their optimizers, the generator EMA, the augmentation strength, the position in
the data (step, epoch, batch) and the best evaluation so far. A checkpoint is its state dict."""
from __future__ import annotations

import copy
import hashlib
from typing import Any, Callable

import torch

from gan import bn, determinism, perf
from gan.augment import AugmentState, parse
from gan.checkpoint import FORMAT_VERSION
from gan.config import Config, flatten
from gan.models import build
from gan.privacy import DPTraining

# What DP-SGD's per-face hooks and variable Poisson batch sizes rule out (gan/privacy.py).
DP_EAGER = {"compile": False, "cuda_graphs": False, "bf16": False, "channels_last": False}


def step_seed(seed: int, rank: int, step: int) -> int:
    """The step's RNG is re-seeded from (seed, rank, step): a resumed run draws exactly the
    noise, labels and flips the uninterrupted run would have, with no generator state to carry."""
    digest = hashlib.blake2b(f"{seed}/{rank}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class TrainState:
    def __init__(self, cfg: Config, device: torch.device, world_size: int = 1):
        t, lc = cfg.train, cfg.loss
        self.cfg = cfg
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        G, D = build(cfg.model)
        self.G, self.D = G.to(device), D.to(device)
        self.perf = determinism.restrict(perf.resolve(cfg.perf, device, world_size, bool(lc.diffaug) or lc.r1_gamma > 0),
                                         t.deterministic)
        if cfg.privacy.dp_epsilon > 0:
            self.perf |= DP_EAGER
        perf.set_layout(self.G, self.D, self.perf)  # before the optimizers and EMA exist
        betas = (cfg.optim.beta1, cfg.optim.beta2)
        self.opt_g = perf.adam(self.G.parameters(), cfg.optim.lr_g, betas, self.perf)
        self.opt_d = perf.adam(self.D.parameters(), cfg.optim.lr_d, betas, self.perf)
        self.aug = AugmentState(parse(lc.diffaug), lc.ada_target, lc.ada_images, device) if lc.diffaug else None
        self.ema = copy.deepcopy(self.G).requires_grad_(False) if t.ema_decay > 0 else None
        self.step, self.epoch, self.batch = 0, 0, 0
        self.train_seconds = 0.0  # training wall time so far, evaluation excluded (train.max_minutes)
        self.best: dict[str, Any] | None = None  # {"metric", "value", "step"} of the best evaluated generator
        # The last evaluation the privacy cap kept from being the best: {"step", "why"} (eval.max_identity_auc)
        self.over_cap: dict[str, Any] | None = None
        self._settled = -1
        self.privacy: DPTraining | None = None  # D's DP accounting (privacy.dp_epsilon > 0), see private()

    def private(self, n: int, sample_rate: float, steps: int) -> DPTraining:
        """Turns on DP for D: σ for the target ε over ``steps`` Poisson steps at ``sample_rate``
        of ``n`` faces. Before a checkpoint is loaded (it continues the accountant)."""
        self.privacy = DPTraining(self.cfg.privacy, n, sample_rate, steps)
        return self.privacy

    @property
    def sampler(self) -> torch.nn.Module:
        """What is sampled, scored and published: the EMA generator when there is one."""
        return self.ema if self.ema is not None else self.G

    def settle(self, mean: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """BN statistics fit for sampling (gan/bn.py), once per step, before anything is
        sampled, scored, checkpointed or published. ``mean``: over the ranks."""
        if self._settled == self.step:
            return
        if self.ema is not None:
            bn.recalibrate(self.ema, self.cfg.model.z_dim, step_seed(self.cfg.train.seed, -1, self.step))
        for net in {id(m): m for m in (self.G, self.D, self.sampler)}.values():
            bn.average_buffers(net, mean)
        self._settled = self.step

    def record(self, scores: dict[str, float]) -> bool:
        """Keeps the best evaluation under the privacy cap; True when ``scores`` is a new best.
        A generator over ``eval.max_identity_auc`` (or with no identity score to compare) never
        is: it is not published, and ``over_cap`` says why."""
        metric, cap = self.cfg.eval.metric, self.cfg.eval.max_identity_auc
        if cap < 1 and not scores.get("identity_auc", float("inf")) <= cap:
            auc = scores.get("identity_auc", float("nan"))
            self.over_cap = {"step": self.step, "why": f"step {self.step}: identity_auc {auc:.3f} is over "
                             f"eval.max_identity_auc {cap:g}; that generator ({metric} {scores[metric]:.4g}) was not "
                             f"published"}
            return False
        if self.best is not None and scores[metric] >= self.best["value"]:
            return False
        self.best = {"metric": metric, "value": scores[metric], "step": self.step}
        return True

    def next_batch(self, steps_in_epoch: Callable[[int], int]) -> None:
        """Moves past an epoch whose batches are all done (a checkpoint at an epoch's end)."""
        while self.epoch < self.cfg.train.epochs and self.batch >= steps_in_epoch(self.epoch):
            self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION, "step": self.step, "data": {"epoch": self.epoch, "batch": self.batch},
            # (only under a time budget: a timing would make replayable runs' checkpoints differ)
            **({"train_seconds": self.train_seconds} if self.cfg.train.max_minutes > 0 else {}),
            "G": self.G.state_dict(), "D": self.D.state_dict(),
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None, "best": self.best,
            "over_cap": self.over_cap,
            "aug": self.aug.state_dict() if self.aug is not None else None,
            "privacy": self.privacy.state_dict() if self.privacy is not None else None,
            "rng": {"torch_cpu": torch.get_rng_state(), "step_seed": "blake2b(seed/rank/step)"},
            "config": flatten(self.cfg),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        cfg = self.cfg
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        # The config, not the checkpoint, says the LRs: a PBT exploit changes them on restart.
        for opt, lr in ((self.opt_g, cfg.optim.lr_g), (self.opt_d, cfg.optim.lr_d)):
            for group in opt.param_groups:
                group["lr"], group["betas"] = lr, (cfg.optim.beta1, cfg.optim.beta2)
        if self.ema is not None:
            # An EMA turned on at resume (or across a PBT exploit) starts from the trained
            # weights, not from the random initial ones.
            self.ema.load_state_dict(state["ema"] if state.get("ema") is not None else self.G.state_dict())
        if self.aug is not None and state.get("aug") is not None:
            self.aug.load_state_dict(state["aug"])
        if self.privacy is not None:
            self.privacy.load_state_dict(state.get("privacy"))
        torch.set_rng_state(state["rng"]["torch_cpu"])
        self.step, self.epoch, self.batch = state["step"], state["data"]["epoch"], state["data"]["batch"]
        self.best, self.over_cap = state.get("best"), state.get("over_cap")
        self.train_seconds = float(state.get("train_seconds", 0.0))
