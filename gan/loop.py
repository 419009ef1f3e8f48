"""The training loop: runs on every rank, sees the launcher only through a ``Context``.

It is handed what it consumes, a batch source (datasets/loader.py) and an evaluator (or None);
:func:`open_inputs` builds both from the config for a launcher.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from datasets.loader import BatchSource, loader_workers
from datasets.shards import ShardSet
from gan import bn, determinism, perf
from gan.augment import AugmentState, parse
from gan.config import Config, flatten
from gan.checkpoint import FORMAT_VERSION
from gan.context import Context, unwrap
from gan.evaluate import Evaluator, build_extractor, iter_rows
from gan.graphs import GraphedStep
from gan.health import PROBE, Health, nonfinite
from gan.images import grid, png_bytes, sample_grid_png
from gan.models import build, sample_z
from gan.step import Nets, train_step, update_ema

FIXED_SAMPLES = 64  # the 8x8 grid


@dataclass
class TrainResult:
    step: int
    generator: nn.Module  # unwrapped; the EMA generator when EMA is on
    discriminator: nn.Module  # unwrapped
    metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None
    best: dict[str, Any] | None = None  # {"metric", "value", "step"} of the best evaluated generator
    diverged: str = ""  # why training stopped on a non-finite state (nothing of it was saved)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The step's RNG is re-seeded from (seed, rank, step): a resumed run draws exactly the
    noise, labels and flips the uninterrupted run would have, with no generator state to carry."""
    digest = hashlib.blake2b(f"{seed}/{rank}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


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
    from tqdm import tqdm

    from gan.evaluate import describe, features_of_rows

    real = ShardSet(real_path(cfg))
    extractor = build_extractor(cfg.eval.extractor, cfg.eval.inception_weights).to(device)
    n = min(cfg.eval.num_samples, real.count)
    with tqdm(total=n, desc=f"FID real features ({real.path})", unit="img", leave=False,
              disable=None) as bar:
        features_of_rows(real, n, extractor, torch.device(device), cfg.eval.batch_size, feature_cache(cfg),
                         progress=bar.update)
    return {**describe(extractor), "real_path": real.path, "n_real": n}


def make_evaluator(cfg: Config, ctx: Context) -> Evaluator | None:
    e = cfg.eval
    if e.every_steps <= 0:
        return None
    extractor = build_extractor(e.extractor, e.inception_weights)
    return Evaluator(extractor, ShardSet(real_path(cfg)), e.num_samples, ctx.rank, ctx.world_size, ctx.device,
                     feature_cache(cfg), e.batch_size, e.kid_subset_size, cfg.train.seed)


def open_inputs(cfg: Config, ctx: Context, cpus: float | None = None) -> tuple[BatchSource, Evaluator | None]:
    """What :func:`train` consumes, for this rank: its batches (decoded in
    ``data.loader_workers`` processes; ``cpus`` is what the launcher gave the rank) and the
    evaluator (None without evaluation)."""
    workers = loader_workers(cfg.data.loader_workers, ctx.device, cpus)
    data = BatchSource(cfg.data.path, ctx.rank, ctx.world_size, cfg.train.batch_size // ctx.world_size,
                       cfg.train.seed, cfg.data.shuffle_groups, workers, cfg.perf.prefetch,
                       pin=ctx.device.type == "cuda")
    return data, make_evaluator(cfg, ctx)


def train_local(cfg: Config, ctx: Context) -> "TrainResult":
    """:func:`train` on the inputs :func:`open_inputs` builds (tests, benchmarks)."""
    return train(cfg, ctx, *open_inputs(cfg, ctx))


def make_health(cfg: Config, shards: ShardSet, ctx: Context) -> Health:
    def first(s: ShardSet):
        return np.concatenate(list(iter_rows(s, PROBE)))
    try:
        held = first(ShardSet(real_path(cfg)))
    except ValueError:  # no held-out set (training without evaluation): no overfitting gap
        held = None
    return Health(first(shards), held, ctx.device)


def total_steps(reader, cfg: Config) -> int:
    """``reader``: anything with ``steps_in_epoch`` (a ShardReader or a BatchSource)."""
    by_epochs = sum(reader.steps_in_epoch(e) for e in range(cfg.train.epochs))
    return min(by_epochs, cfg.train.max_steps) if cfg.train.max_steps > 0 else by_epochs


class _Meter:
    """Sums detached stats on the device; one host sync per report, not per step."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0
        self.t0 = time.perf_counter()

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for k, v in stats.items():
            if k in ("label_min", "label_max"):
                continue
            if k in self.sums:
                self.sums[k].add_(v)  # in place: no allocation per stat per step
            else:
                self.sums[k] = v.detach().float().clone()
        self.n += 1

    def flush(self, ctx: Context, global_batch: int) -> dict[str, float]:
        keys = sorted(self.sums)
        means = ctx.mean(torch.stack([self.sums[k] for k in keys]) / max(self.n, 1)).tolist()
        out = dict(zip(keys, means))
        out["img_per_s"] = self.n * global_batch / max(time.perf_counter() - self.t0, 1e-9)
        self.__init__()
        return out


def train(cfg: Config, ctx: Context, data: BatchSource, evaluator: Evaluator | None = None) -> TrainResult:
    t = cfg.train
    with determinism.scope(t.deterministic, t.threads, cfg.scale.cpus_per_worker, ctx.device):
        return _train(cfg, ctx, data, evaluator)


def _train(cfg: Config, ctx: Context, data: BatchSource, evaluator: Evaluator | None) -> TrainResult:
    t = cfg.train
    if data.image_size != cfg.model.size:
        raise ValueError(f"data.path {cfg.data.path} holds {data.image_size}px faces, "
                         f"model.size is {cfg.model.size}")
    total = total_steps(data, cfg)

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    G, D = build(cfg.model)
    G, D = G.to(ctx.device), D.to(ctx.device)
    on = determinism.restrict(perf.resolve(cfg.perf, ctx.device, ctx.world_size, bool(cfg.loss.diffaug)),
                              t.deterministic)
    perf.set_layout(G, D, on)
    betas = (cfg.optim.beta1, cfg.optim.beta2)
    opt_g = perf.adam(G.parameters(), cfg.optim.lr_g, betas, on)
    opt_d = perf.adam(D.parameters(), cfg.optim.lr_d, betas, on)

    step, epoch, batch, resumed_from, best, state = 0, 0, 0, None, None, ctx.load_checkpoint()
    if state is not None:
        step, epoch, batch, best = load_into(state, G, D, opt_g, opt_d, cfg)
        resumed_from = step
    # After the load: an EMA turned on at resume (or across a PBT exploit) starts from the
    # trained weights, not from the random initial ones.
    ema = None
    if t.ema_decay > 0:
        ema = copy.deepcopy(G).requires_grad_(False)
        if state is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
    sampler = ema if ema is not None else G
    settled = -1

    def settle() -> None:
        """Before anything is sampled, scored, checkpointed or published (gan/bn.py)."""
        nonlocal settled
        if settled == step:
            return
        if ema is not None:
            bn.recalibrate(ema, cfg.model.z_dim, step_seed(t.seed, -1, step))
        for net in {id(m): m for m in (G, D, sampler)}.values():
            bn.average_buffers(net, ctx.mean)
        settled = step

    def capture() -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION, "step": step, "data": {"epoch": epoch, "batch": batch},
            "G": G.state_dict(), "D": D.state_dict(),
            "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "best": best,
            "aug": aug.state_dict() if aug is not None else None,
            "rng": {"torch_cpu": torch.get_rng_state(), "step_seed": "blake2b(seed/rank/step)"},
            "config": flatten(cfg),
        }

    lc = cfg.loss
    aug = AugmentState(parse(lc.diffaug), lc.ada_target, lc.ada_images, ctx.device) if lc.diffaug else None
    if aug is not None and state is not None and state.get("aug") is not None:
        aug.load_state_dict(state["aug"])
    perf.compile_models(G, D, on)
    nets = Nets(ctx.wrap(G), ctx.wrap(D), D, opt_g, opt_d, cfg.model.z_dim, perf.autocast_factory(on, ctx.device),
                lc.kind, aug)
    fixed_z = sample_z(FIXED_SAMPLES, cfg.model.z_dim, torch.Generator().manual_seed(t.seed)).to(ctx.device)
    gen = torch.Generator(device=ctx.device)
    run_step = functools.partial(train_step, nets=nets, cfg=cfg.loss, gen=gen)
    if on["cuda_graphs"]:  # captured at the first step, after any resume (gan/graphs.py)
        run_step = GraphedStep(run_step, nets, gen)
    meter, metrics = _Meter(), {}
    health = make_health(cfg, data.shards, ctx)

    def evaluate() -> tuple[dict[str, float], nn.Module | None]:
        """Scores, and the generator to publish when they are the best so far (rank 0)."""
        nonlocal best
        scores = evaluator(sampler)
        value = scores[cfg.eval.metric]
        improved = best is None or value < best["value"]
        if improved:
            best = {"metric": cfg.eval.metric, "value": value, "step": step}
        return scores, sampler if improved and ctx.rank == 0 else None

    if resumed_from is not None:
        ctx.report(step, {"resumed_from_step": float(step)})
    saved = resumed_from  # the last checkpoint's step: all checkpoints hold finite weights

    def grid_artifact(name: str) -> dict[str, bytes] | None:
        settle()
        return {f"samples/{name}.png": sample_grid_png(sampler, fixed_z)} if ctx.rank == 0 else None

    while epoch < t.epochs and batch >= data.steps_in_epoch(epoch):  # a checkpoint at an epoch's end
        epoch, batch = epoch + 1, 0
    stream = data.stream(epoch, batch, t.epochs) if step < total and not ctx.should_stop() else ()
    for at_epoch, at_batch, host in stream:
        if (at_epoch, at_batch) != (epoch, batch):
            raise RuntimeError(f"batch source gave ({at_epoch}, {at_batch}), the loop is at ({epoch}, {batch})")
        if step == 0:  # what the model is shown, as stored: lets a person check data and crop
            real = {"samples/real.png": png_bytes(grid(host[:FIXED_SAMPLES].numpy()))} if ctx.rank == 0 else None
            ctx.report(step, {}, artifacts=real)
        x = host.to(ctx.device, non_blocking=True)
        gen.manual_seed(step_seed(t.seed, ctx.rank, step))
        meter.add(run_step(x))
        if ema is not None:
            update_ema(ema, G, t.ema_decay, step)
        step, batch = step + 1, batch + 1
        if aug is not None and step % aug.INTERVAL == 0:
            aug.adjust(ctx.mean, t.batch_size)
        log_now, ckpt_now = step % t.log_every == 0, step % t.checkpoint_every == 0 or step == total
        eval_now = evaluator is not None and (step % cfg.eval.every_steps == 0 or step == total)
        if log_now or ckpt_now or eval_now or step == total:
            if bad := nonfinite(meter.sums, {"G": G, "D": D}, ctx.mean):
                return diverged(ctx, step, bad, saved, G, D)
            settle()
        scores, publish, tags = {}, None, {}
        if eval_now:
            scores, publish = evaluate()  # before the checkpoint, so that it carries the best so far
        # Scores travel in the same report as the step's checkpoint: a scheduler that acts
        # on a score (PBT) finds the matching checkpoint with it.
        if log_now or ckpt_now or step == total:
            metrics = {**meter.flush(ctx, t.batch_size), "epoch": float(epoch)}
            signs, flags = health(sampler, D, fixed_z, metrics, step)
            metrics |= {**signs, **scores}
            tags = {f"facegan.health.{k}": v for k, v in flags.items()}
            if flags and ctx.rank == 0:
                print(f"facegan health: {' | '.join(flags.values())}", flush=True)
            ctx.report(step, metrics, checkpoint=capture if ckpt_now else None, model=publish, tags=tags)
            saved = step if ckpt_now else saved
        elif scores:
            ctx.report(step, scores, model=publish)
        if batch >= data.steps_in_epoch(epoch):
            ctx.report(step, {}, artifacts=grid_artifact(f"epoch_{epoch + 1:03d}"))
            epoch, batch = epoch + 1, 0  # (a checkpoint above says (epoch, end): resume moves on too)
        if step >= total or ctx.should_stop():
            break
    ctx.report(step, {}, artifacts=grid_artifact("final"))
    ctx.flush()  # the last checkpoint was being written while the final grid was drawn
    return TrainResult(step, unwrap(nets.G) if ema is None else ema, D, metrics, resumed_from, best)


def diverged(ctx: Context, step: int, bad: list[str], saved: int | None, G, D) -> TrainResult:
    """Stops on a non-finite state without checkpointing, scoring or publishing it: the kept
    checkpoints are all from before (none is rotated out for a NaN one)."""
    where = f"the last good checkpoint is step {saved}" if saved is not None else "no checkpoint was written"
    msg = f"training diverged: non-finite {', '.join(bad)} at step {step}; stopped without saving it ({where})"
    if ctx.rank == 0:
        print(f"facegan: {msg}", flush=True)
    ctx.report(step, {"diverged_at_step": float(step)}, tags={"facegan.failed_reason": msg})
    ctx.flush()
    return TrainResult(step, G, D, {}, diverged=msg)


def load_into(state: dict, G, D, opt_g, opt_d, cfg: Config) -> tuple[int, int, int, dict | None]:
    """Restores a checkpoint; returns (step, epoch, batch, best)."""
    G.load_state_dict(state["G"])
    D.load_state_dict(state["D"])
    opt_g.load_state_dict(state["opt_g"])
    opt_d.load_state_dict(state["opt_d"])
    # The config, not the checkpoint, says the LRs: a PBT exploit changes them on restart.
    for opt, lr in ((opt_g, cfg.optim.lr_g), (opt_d, cfg.optim.lr_d)):
        for group in opt.param_groups:
            group["lr"], group["betas"] = lr, (cfg.optim.beta1, cfg.optim.beta2)
    torch.set_rng_state(state["rng"]["torch_cpu"])
    return state["step"], state["data"]["epoch"], state["data"]["batch"], state.get("best")
