"""Assembly: from a config to what the training core consumes (gan/inputs.py), for any launcher.

``gan/`` knows no shards and no files; ``evaluation/`` knows no config sections; this module is
where a config meets both: the batch source over the training shards, the FID scorer against the
held-out faces, the health probe on fixed batches of each. ``jobs/`` (Ray), ``benchmarks/`` and
the tests use it alike.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from datasets.loader import BatchSource, loader_workers
from datasets.poisson import PoissonBatches
from datasets.shards import ShardSet
from evaluation.fid import (
    Evaluator,
    build_extractor,
    describe,
    features_of_rows,
    iter_rows,
)
from evaluation.leak import IdentityLeak, verdict
from gan.config import Config
from gan.context import Context
from gan.health import PROBE, Health
from gan.loop import TrainResult, train
from gan.report import LEAK


class NoHeldOut(ValueError):
    """No held-out faces: FID and the audit never fall back to the training faces."""


def real_path(cfg: Config) -> str:
    """Held-out faces for FID: eval.real_path, else the 'val' set beside a '.../train' data.path."""
    if cfg.eval.real_path:
        return cfg.eval.real_path
    head, _, tail = cfg.data.path.rstrip("/").rpartition("/")
    if tail == "train":
        try:
            ShardSet(f"{head}/val")
            return f"{head}/val"
        except ValueError:
            pass
    raise NoHeldOut(f"eval.real_path: no held-out faces for {cfg.data.path} (expected a 'val' set beside a "
                    f".../train data.path); set eval.real_path to a shard set disjoint from the training faces")


def feature_cache(cfg: Config) -> str:
    return f"{cfg.run.storage_path}/feature_cache"


def prepare_evaluation(cfg: Config, device: str = "cpu") -> dict:
    """Before any worker starts: the extractor loads, the held-out set exists, and its features
    are in the cache (so the workers only read them). Returns what the scores mean."""
    real = ShardSet(real_path(cfg))
    extractor = build_extractor(cfg.eval.extractor, cfg.eval.inception_weights).to(device)
    n = min(cfg.eval.num_samples, real.count)
    with tqdm(total=n, desc=f"FID real features ({real.path})", unit="img", leave=False,
              disable=None) as bar:
        features_of_rows(real, n, extractor, torch.device(device), cfg.eval.batch_size, feature_cache(cfg),
                         progress=bar.update)
    return {**describe(extractor), "real_path": real.path, "n_real": n}


class LeakScorer:
    """FID/KID on every rank, then the identity audit (evaluation/leak.py) on rank 0, its numbers
    shared with every rank: the scores the best generator is chosen on, and what the privacy cap
    (eval.max_identity_auc) reads."""

    def __init__(self, fid: Evaluator, leak: IdentityLeak | None, ctx: Context):
        self.fid, self.leak, self.ctx = fid, leak, ctx

    def __call__(self, G: torch.nn.Module) -> dict[str, float]:
        scores, ctx = self.fid(G), self.ctx
        v = torch.zeros(len(LEAK), dtype=torch.float64, device=ctx.device)
        if ctx.rank == 0:
            report = verdict(self.leak(G, ctx.device))
            v = torch.tensor([report[k] for k in LEAK], dtype=torch.float64, device=ctx.device)
        v = ctx.mean(v) * ctx.world_size  # the sum: rank 0's numbers on every rank
        return scores | dict(zip(LEAK, v.tolist()))


def identity_leak(cfg: Config) -> IdentityLeak:
    """The identity audit of the training people against the held-out ones (both embedded once)."""
    return IdentityLeak(cfg.data.path, real_path(cfg), cfg.eval.identity_samples, cfg.train.seed,
                        feature_cache(cfg), processes=max(1, int(cfg.scale.cpus_per_worker)))


def make_scorer(cfg: Config, ctx: Context) -> Evaluator | LeakScorer | None:
    """FID/KID against the held-out faces, and the identity audit at every evaluation when it is
    on (eval.identity_audit; "auto" is settled by the launcher); None when evaluation is off."""
    e = cfg.eval
    if e.every_steps <= 0:
        return None
    extractor = build_extractor(e.extractor, e.inception_weights)
    fid = Evaluator(extractor, ShardSet(real_path(cfg)), e.num_samples, ctx.rank, ctx.world_size, ctx.device,
                    feature_cache(cfg), e.batch_size, e.kid_subset_size, cfg.train.seed)
    if e.identity_audit != "on":
        return fid
    return LeakScorer(fid, identity_leak(cfg) if ctx.rank == 0 else None, ctx)


def make_probe(cfg: Config, ctx: Context) -> Health:
    """The health probe on the first training faces and, when there are any, held-out ones."""
    def first(path: str) -> np.ndarray:
        return np.concatenate(list(iter_rows(ShardSet(path), PROBE)))
    try:
        held = first(real_path(cfg))
    except ValueError:  # no held-out set (training without evaluation): no overfitting gap
        held = None
    return Health(first(cfg.data.path), held, ctx.device)


def open_batches(cfg: Config, ctx: Context, cpus: float | None = None) -> BatchSource | PoissonBatches:
    """This rank's batches, decoded in ``data.loader_workers`` processes (``cpus``: what the
    launcher gave the rank); Poisson-sampled from memory for DP training (privacy.dp_epsilon)."""
    if cfg.privacy.dp_epsilon > 0:
        return PoissonBatches(cfg.data.path, ctx.rank, ctx.world_size, cfg.train.batch_size, cfg.train.seed)
    workers = loader_workers(cfg.data.loader_workers, ctx.device, cpus)
    return BatchSource(cfg.data.path, ctx.rank, ctx.world_size, cfg.train.batch_size // ctx.world_size,
                       cfg.train.seed, cfg.data.shuffle_groups, workers, cfg.perf.prefetch,
                       pin=ctx.device.type == "cuda")


def train_from_config(cfg: Config, ctx: Context, cpus: float | None = None) -> TrainResult:
    """:func:`gan.loop.train` on the inputs the config names: what every launcher runs."""
    return train(cfg, ctx, open_batches(cfg, ctx, cpus), make_scorer(cfg, ctx), make_probe(cfg, ctx))


