"""The real training loop on real shards, beside the step alone, in the same process.

    python -m benchmarks.loop --size 64 --width 0.125 --steps 60          # CPU, a quick look
    python -m benchmarks.loop --size 128 --device cuda                    # GPU (benchmarks/gpu.sh)
    python -m benchmarks.loop --size 128 --device cuda --loader-workers 0 # decode in-process, to compare

Runs ``gan.loop.train`` (LocalContext: the batch source with its loader processes, the step,
EMA/health/metrics as configured, grids at epoch ends; no evaluation, one checkpoint at the
end) for ``--warmup`` + ``--steps`` steps on the CelebA sample's training shards (``--data``,
or ``data/celeba{size}`` converted from the sample), then times the step alone on a batch
already on the device, with the same switches. Prints one JSON line: the loop's img/s over the
timed steps (from its own log windows), the step's img/s, their ratio (the issue's target:
>= 0.9), and the projected minutes of the seed run, 60 epochs over CelebA's 162,770 training
faces, at the loop's rate. Needs only torch, pyarrow and Pillow (no Ray, no MLflow).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time

import torch

from benchmarks.quality import ensure_data
from benchmarks.train_step import SEED_RUN_IMAGES, ProjectStep, _sync
from compose import train_from_config
from datasets.loader import loader_workers
from gan import perf
from gan.config import Config, ConfigError, apply, validate
from gan.context import LocalContext


def loop_config(a, data: str, storage: str) -> Config:
    cfg = Config()
    apply(cfg, {"model.size": a.size, "model.width": a.width, "data.source": "shards", "data.path": data,
                "data.verify_checksums": False, "data.loader_workers": a.loader_workers,
                "train.batch_size": a.batch, "train.epochs": 10**6, "train.max_steps": a.warmup + a.steps,
                "train.log_every": a.window, "train.checkpoint_every": 10**9, "eval.every_steps": 0,
                "scale.num_workers": 1, "run.storage_path": storage, "perf.cuda_graphs": a.cuda_graphs})
    return validate(cfg)


def loop_rate(history: list[tuple[int, dict]], after: int, batch: int) -> float:
    """img/s over the log windows that start at or after step ``after`` (images / time)."""
    windows = [(s, m["img_per_s"]) for s, m in history if "img_per_s" in m]
    starts = [0] + [s for s, _ in windows[:-1]]
    spans = [(s - start, ips) for start, (s, ips) in zip(starts, windows) if start >= after]
    if not spans:
        raise ValueError(f"no log window starts after step {after}: raise --steps or lower --window")
    return sum(n for n, _ in spans) * batch / sum(n * batch / ips for n, ips in spans)


def step_rate(cfg: Config, device: torch.device, steps: int, rounds: int = 3) -> float:
    """The step alone: the same model and switches, the batch already on the device."""
    step = ProjectStep(cfg.model, device, switches=perf.resolve(cfg.perf, device))
    x = torch.randint(0, 256, (cfg.train.batch_size, cfg.model.size, cfg.model.size, 3), dtype=torch.uint8,
                      device=device)
    for _ in range(3):
        step(x)
    times = []
    for _ in range(rounds):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step(x)
        _sync(device)
        times.append((time.perf_counter() - t0) / steps)
    return cfg.train.batch_size / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, choices=(64, 128), default=128)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=600, help="timed steps of the loop")
    p.add_argument("--warmup", type=int, default=50, help="steps before timing (compile, workers starting)")
    p.add_argument("--window", type=int, default=0, help="log window in steps (default: steps / 6)")
    p.add_argument("--loader-workers", type=int, default=-1, help="data.loader_workers (-1: auto)")
    p.add_argument("--cuda-graphs", default="auto", choices=("auto", "on", "off"), help="perf.cuda_graphs")
    p.add_argument("--data", help="a shard root with train/ (default: the converted CelebA sample)")
    a = p.parse_args(argv)
    a.window = a.window or max(1, a.steps // 6)
    a.warmup = -(-a.warmup // a.window) * a.window  # a whole number of windows: timing starts on one
    device = torch.device(a.device)
    try:
        data = ensure_data(a.data, a.size)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = loop_config(a, str(data / "train"), tmp)
            ctx = LocalContext(tmp, device=device, resume=False)
            train_from_config(cfg, ctx)
            loop = loop_rate(ctx.history, a.warmup, a.batch)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    step = step_rate(cfg, device, max(1, min(a.steps, 100)))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(json.dumps({
        "device": device_name, "size": a.size, "width": a.width, "batch": a.batch, "data": str(data / "train"),
        "loader_workers": loader_workers(a.loader_workers, device), "timed_steps": a.steps,
        "loop_img_per_s": round(loop, 1), "step_img_per_s": round(step, 1), "loop_over_step": round(loop / step, 3),
        "seed_run_min": round(SEED_RUN_IMAGES / loop / 60, 1), "switches": perf.resolve(cfg.perf, device),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
