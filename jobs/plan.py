"""The one line ``jobs.train`` prints before it starts: what will run, and about how long.

The time comes from training steps measured here, on the driver, with each worker's batch and
threads (a few steps of the real step on random faces): a newcomer who forgot ``--config`` reads
"~60 h" before any worker starts. It leaves out evaluations, checkpoints and DDP's all-reduce,
and on a cluster whose workers have GPUs the driver may have none: then it says so.
"""
from __future__ import annotations

import time

import torch

from gan.config import Config
from gan.models import build
from gan.step import Nets, train_step

BUDGET_S = 1.0  # timed steps stop once this much has been spent (after one warm-up step)


def measure_step(cfg: Config, device: str = "cpu") -> float:
    """Seconds per training step of one worker (its share of the batch, its threads)."""
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))
    try:
        G, D = build(cfg.model)
        G, D = G.to(device), D.to(device)
        betas = (cfg.optim.beta1, cfg.optim.beta2)
        nets = Nets(G, D, D, torch.optim.Adam(G.parameters(), cfg.optim.lr_g, betas=betas),
                    torch.optim.Adam(D.parameters(), cfg.optim.lr_d, betas=betas), cfg.model.z_dim,
                    loss_kind=cfg.loss.kind)
        size, n = cfg.model.size, max(1, cfg.train.batch_size // cfg.scale.num_workers)
        x = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        t0 = time.perf_counter()
        train_step(x, nets=nets, cfg=cfg.loss, gen=gen)  # warm-up: allocations, kernel choice
        if time.perf_counter() - t0 > 2 * BUDGET_S:  # a slow step: the warm-up is measure enough
            return time.perf_counter() - t0
        # The fastest of a few steps: what a step costs this machine, less the moments another
        # process took the cores (the run itself may of course meet them too).
        times, start = [], time.perf_counter()
        while not times or (time.perf_counter() - start < BUDGET_S and len(times) < 20):
            t0 = time.perf_counter()
            train_step(x, nets=nets, cfg=cfg.loss, gen=gen)
            if device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return min(times)
    finally:
        torch.set_num_threads(threads)


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h" if seconds < 48 * 3600 else f"{seconds / 86400:.0f} days"


def plan_line(cfg: Config, preset: str, total_steps: int, faces: int) -> str:
    """``plan: preset … | N steps (…) | workers | ~time`` (one line)."""
    sc, t = cfg.scale, cfg.train
    where = f"{sc.num_workers} {'GPU' if sc.use_gpu else 'CPU'} worker(s) x {sc.cpus_per_worker:g} CPU"
    budget = f"max_steps {t.max_steps}" if t.max_steps and total_steps == t.max_steps else f"{t.epochs} epochs"
    evals = cfg.eval.every_steps > 0 and total_steps // cfg.eval.every_steps + (total_steps % cfg.eval.every_steps > 0)
    what = (f"plan: {('preset ' + preset) if preset else 'defaults (no --config)'} | {cfg.model.size} px, width "
            f"{cfg.model.width:g} | {total_steps:,} steps ({budget} of {faces:,} faces, batch {t.batch_size}) | {where}")
    if sc.use_gpu and not torch.cuda.is_available():
        return f"{what} | time: not estimated (no GPU on this machine to measure a step)"
    per = measure_step(cfg, "cuda" if sc.use_gpu else "cpu")
    extra = f" + {evals} evaluation(s)" if evals else ""
    return f"{what} | ~{duration(per * total_steps)} of steps ({per * 1000:.0f} ms/step measured here){extra}"
