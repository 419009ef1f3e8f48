"""The training loop: runs on every rank, sees the launcher only through a ``Context`` and its
inputs only through the Protocols of gan/inputs.py (``compose.py`` builds them from a config).

Everything the loop changes lives in one :class:`~gan.state.TrainState`; what it hands the
launcher is one typed :class:`~gan.report.Report` per event.
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gan import determinism, perf
from gan.config import Config
from gan.context import Context, unwrap
from gan.graphs import GraphedStep
from gan.health import nonfinite
from gan.images import grid, png_bytes, sample_grid_png
from gan.inputs import Batches, PoissonSampled, Probe, Scorer
from gan.models import sample_z
from gan.privacy import hooks_off
from gan.report import Report
from gan.state import TrainState, step_seed
from gan.step import Nets, train_step, update_ema

FIXED_SAMPLES = 64  # the 8x8 grid


@dataclass
class TrainResult:
    step: int
    generator: nn.Module  # unwrapped; the EMA generator when EMA is on
    discriminator: nn.Module  # unwrapped
    metrics: dict[str, float] = field(default_factory=dict)  # the last log window's
    scores: dict[str, float] = field(default_factory=dict)  # the last evaluation's
    resumed_from: int | None = None
    best: dict[str, Any] | None = None  # {"metric", "value", "step"} of the best evaluated generator
    diverged: str = ""  # why training stopped on a non-finite state (nothing of it was saved)
    epsilon: float | None = None  # D's differential-privacy ε spent (privacy.dp_epsilon > 0), else None
    over_cap: str = ""  # the last evaluation eval.max_identity_auc kept from being published, and why


def total_steps(reader, cfg: Config) -> int:
    """``reader``: anything with ``steps_in_epoch`` (a ShardReader or a batch source)."""
    by_epochs = sum(reader.steps_in_epoch(e) for e in range(cfg.train.epochs))
    return min(by_epochs, cfg.train.max_steps) if cfg.train.max_steps > 0 else by_epochs


class _Meter:
    """Sums detached stats on the device; one host sync per report, not per step. A stat that
    only some steps give (the lazy R1 penalty) is averaged over the steps that gave it."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
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
            self.counts[k] = self.counts.get(k, 0) + 1
        self.n += 1

    def flush(self, ctx: Context, global_batch: int) -> dict[str, float]:
        keys = sorted(self.sums)
        means = ctx.mean(torch.stack([self.sums[k] / self.counts[k] for k in keys])).tolist()
        out = dict(zip(keys, means))
        out["img_per_s"] = self.n * global_batch / max(time.perf_counter() - self.t0, 1e-9)
        self.__init__()
        return out


def train(cfg: Config, ctx: Context, data: Batches, scorer: Scorer | None = None,
          probe: Probe | None = None) -> TrainResult:
    """Trains from the context's checkpoint (or from scratch) to ``train.epochs``/``max_steps``.
    ``scorer``: FID/KID every ``eval.every_steps`` and at the end (None: no evaluation);
    ``probe``: training health every log window (None: none)."""
    t = cfg.train
    with determinism.scope(t.deterministic, t.threads, cfg.scale.cpus_per_worker, ctx.device):
        return _train(cfg, ctx, data, scorer, probe)


def _train(cfg: Config, ctx: Context, data: Batches, scorer: Scorer | None, probe: Probe | None) -> TrainResult:
    if data.image_size != cfg.model.size:
        raise ValueError(f"data.path {cfg.data.path} holds {data.image_size}px faces, model.size is {cfg.model.size}")
    t, s = cfg.train, TrainState(cfg, ctx.device, ctx.world_size)
    total, state = total_steps(data, cfg), ctx.load_checkpoint()
    if cfg.privacy.dp_epsilon > 0:
        if not isinstance(data, PoissonSampled):
            raise ValueError("privacy.dp_epsilon needs Poisson-sampled batches (datasets/poisson.py)")
        s.private(data.count, data.sample_rate, total)
    if state is not None:
        s.load_state_dict(state)
        ctx.report(Report(s.step, resumed_from=s.step))
    resumed_from = saved = s.step if state is not None else None  # saved: the last checkpoint's step
    nets, gen, run_step = _step_function(cfg, ctx, s, data)
    fixed_z = sample_z(FIXED_SAMPLES, cfg.model.z_dim, torch.Generator().manual_seed(t.seed)).to(ctx.device)
    meter, metrics, scores = _Meter(), {}, {}
    s.next_batch(data.steps_in_epoch)
    stream = data.stream(s.epoch, s.batch, t.epochs) if s.step < total and not ctx.should_stop() else ()
    tick = time.perf_counter()
    for at_epoch, at_batch, host in stream:
        if (at_epoch, at_batch) != (s.epoch, s.batch):
            raise RuntimeError(f"batch source gave ({at_epoch}, {at_batch}), the loop is at ({s.epoch}, {s.batch})")
        if s.step == 0:  # what the model is shown, as stored: lets a person check data and crop
            real = _on_rank0(ctx, "real", lambda: png_bytes(grid(host[:FIXED_SAMPLES].numpy())))
            ctx.report(Report(0, artifacts=real))
        gen.manual_seed(step_seed(t.seed, ctx.rank, s.step))
        meter.add(run_step(host.to(ctx.device, non_blocking=True), step=s.step))
        _advance(s, ctx)
        tick = _clock(s, tick)
        if t.max_minutes > 0 and s.step % t.log_every == 0 and _out_of_time(ctx, s):
            total = s.step  # the budget is spent: this step is the last (checkpoint, evaluation, grid)
        log_now, ckpt_now = s.step % t.log_every == 0, s.step % t.checkpoint_every == 0 or s.step == total
        eval_now = scorer is not None and (s.step % cfg.eval.every_steps == 0 or s.step == total)
        if log_now or ckpt_now or eval_now:
            if bad := nonfinite(meter.sums, {"G": s.G, "D": s.D}, ctx.mean):
                return diverged(ctx, s, bad, saved)
            s.settle(ctx.mean)
        new = scorer(s.sampler) if eval_now else {}  # before the checkpoint, so that it carries the best so far
        tick = time.perf_counter() if eval_now else tick  # evaluation is not training time (train.max_minutes)
        publish = s.sampler if new and s.record(new) and ctx.rank == 0 else None
        guard = {"facegan.privacy_guard": s.over_cap["why"]} if new and s.over_cap and s.over_cap["step"] == s.step else {}
        scores = new or scores
        # Scores travel in the same report as the step's checkpoint: a scheduler that acts
        # on a score (PBT) finds the matching checkpoint with it.
        if log_now or ckpt_now:
            metrics = {**meter.flush(ctx, t.batch_size), "epoch": float(s.epoch)}
            if t.max_minutes > 0:  # a measurement, not replayable: only when a budget asks for it
                metrics["train_minutes"] = s.train_seconds / 60
            if s.privacy is not None:
                metrics["dp_epsilon"] = s.privacy.epsilon()
            signs, tags = probe(s.sampler, s.D, fixed_z, metrics, s.step) if probe is not None else ({}, {})
            metrics |= signs
            _say_flags(ctx, tags)
            ctx.report(Report(s.step, metrics, new, s.state_dict if ckpt_now else None, model=publish,
                              tags={**{f"facegan.health.{k}": v for k, v in tags.items()}, **guard}))
            saved = s.step if ckpt_now else saved
        elif new:
            ctx.report(Report(s.step, scores=new, model=publish, tags=guard))
        if s.batch >= data.steps_in_epoch(s.epoch):
            ctx.report(Report(s.step, artifacts=_grid(ctx, s, fixed_z, f"epoch_{s.epoch + 1:03d}")))
            s.epoch, s.batch = s.epoch + 1, 0  # (a checkpoint above says (epoch, end): resume moves on too)
        if s.step >= total or ctx.should_stop():
            break
    said = {"facegan.privacy": s.privacy.describe()} if s.privacy is not None else {}
    ctx.report(Report(s.step, artifacts=_grid(ctx, s, fixed_z, "final"), tags=said))
    ctx.flush()  # the last checkpoint was being written while the final grid was drawn
    return TrainResult(s.step, unwrap(nets.G) if s.ema is None else s.ema, s.D, metrics, scores, resumed_from, s.best,
                       epsilon=s.privacy.epsilon() if s.privacy is not None else None,
                       over_cap=s.over_cap["why"] if s.over_cap else "")


def _step_function(cfg: Config, ctx: Context, s: TrainState, data: Batches):
    """(nets, the step's RNG, the step): DDP-wrapped, compiled or graphed as gan/perf.py says;
    with DP, D is Opacus's (no DDP: its optimizer sums the ranks' noised gradients itself)."""
    perf.compile_models(s.G, s.D, s.perf)
    gen = torch.Generator(device=ctx.device)
    D, opt_d, g_pass = ctx.wrap(s.D), s.opt_d, contextlib.nullcontext
    if s.privacy is not None:
        D, opt_d = s.privacy.wrap(s.D, s.opt_d, data.expected_batch, ctx.world_size, noise=gen)
        g_pass = hooks_off(D)
    nets = Nets(ctx.wrap(s.G), D, s.D, s.opt_g, opt_d, cfg.model.z_dim,
                perf.autocast_factory(s.perf, ctx.device), cfg.loss.kind, s.aug, g_pass)
    run_step = functools.partial(train_step, nets=nets, cfg=cfg.loss, gen=gen)
    if s.perf["cuda_graphs"]:  # captured at the first step, after any resume (gan/graphs.py)
        run_step = GraphedStep(run_step, nets, gen)
    return nets, gen, run_step


def _advance(s: TrainState, ctx: Context) -> None:
    """After a step: the EMA, the position, the augmentation strength."""
    t = s.cfg.train
    if s.ema is not None:
        update_ema(s.ema, s.G, t.ema_decay, s.step)
    s.step, s.batch = s.step + 1, s.batch + 1
    if s.aug is not None and s.step % s.aug.INTERVAL == 0:
        s.aug.adjust(ctx.mean, t.batch_size)


def _clock(s: TrainState, tick: float) -> float:
    now = time.perf_counter()
    s.train_seconds += now - tick
    return now


def _out_of_time(ctx: Context, s: TrainState) -> bool:
    """All ranks agree (one collective, every log window): rank 0's clock decides."""
    spent = torch.tensor([s.train_seconds if ctx.rank == 0 else 0.0], device=ctx.device) * ctx.world_size
    return ctx.mean(spent).item() >= 60 * s.cfg.train.max_minutes


def _on_rank0(ctx: Context, name: str, png) -> dict[str, bytes]:
    return {f"samples/{name}.png": png()} if ctx.rank == 0 else {}


def _grid(ctx: Context, s: TrainState, fixed_z: torch.Tensor, name: str) -> dict[str, bytes]:
    s.settle(ctx.mean)  # every rank: the BN average is a collective
    return _on_rank0(ctx, name, lambda: sample_grid_png(s.sampler, fixed_z))


def _say_flags(ctx: Context, flags: dict[str, str]) -> None:
    if flags and ctx.rank == 0:
        print(f"facegan health: {' | '.join(flags.values())}", flush=True)


def diverged(ctx: Context, s: TrainState, bad: list[str], saved: int | None) -> TrainResult:
    """Stops on a non-finite state without checkpointing, scoring or publishing it: the kept
    checkpoints are all from before (none is rotated out for a NaN one)."""
    where = f"the last good checkpoint is step {saved}" if saved is not None else "no checkpoint was written"
    msg = f"training diverged: non-finite {', '.join(bad)} at step {s.step}; stopped without saving it ({where})"
    if ctx.rank == 0:
        print(f"facegan: {msg}", flush=True)
    ctx.report(Report(s.step, diverged=msg))
    ctx.flush()
    return TrainResult(s.step, s.G, s.D, diverged=msg)
