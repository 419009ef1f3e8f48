"""What differential privacy costs per training step: the DP step (Opacus per-face gradients,
clipping and noise on D, gan/privacy.py) against the same step without DP, same process.

    python -m benchmarks.privacy_step [--width 0.125] [--batch 16] [--device cpu]

Both variants have the D that DP needs (``model.d_norm=none``) and see the same batch. They run
in alternating rounds so that drift hits both alike; the figure is the median round. One JSON line
per variant: ms per step, and the ratio to the plain step.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from gan.config import Config, apply, validate
from gan.privacy import DPTraining, hooks_off
from gan.state import TrainState
from gan.step import Nets, train_step


def _step(dp: bool, a, device: torch.device):
    cfg = validate(apply(Config(), {"model.size": a.size, "model.width": a.width, "model.d_norm": "none",
                                    "train.batch_size": a.batch, "scale.num_workers": 1,
                                    "privacy.dp_epsilon": 10.0 if dp else 0.0}))
    s = TrainState(cfg, device)
    gen = torch.Generator(device=device).manual_seed(0)
    D, opt_d, g_pass = s.D, s.opt_d, contextlib.nullcontext
    if dp:
        privacy = DPTraining(cfg.privacy, 100 * a.batch, 0.01, 10_000)
        D, opt_d = privacy.wrap(s.D, s.opt_d, float(a.batch), 1, noise=gen)
        g_pass = hooks_off(D)
    nets = Nets(s.G, D, s.D, s.opt_g, opt_d, cfg.model.z_dim, g_pass=g_pass)
    x = torch.randint(0, 256, (a.batch, a.size, a.size, 3), dtype=torch.uint8, device=device)
    return lambda: train_step(x, nets, cfg.loss, gen)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, choices=(64, 128), default=64)
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    steps = {"plain": _step(False, a, device), "dp": _step(True, a, device)}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for fn in steps.values():
        fn()  # warm-up
    for _ in range(a.rounds):
        for name, fn in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(a.steps):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) / a.steps * 1e3)
    plain = statistics.median(times["plain"])
    for name, t in times.items():
        print(json.dumps({"variant": name, "ms_per_step": round(statistics.median(t), 1),
                          "vs_plain": round(statistics.median(t) / plain, 2), "size": a.size, "width": a.width,
                          "batch": a.batch, "device": a.device, "threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
