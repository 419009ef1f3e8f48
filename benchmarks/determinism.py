"""What ``train.deterministic`` costs a training step, beside the same step without it.

    python -m benchmarks.determinism [--preset configs/smoke.toml] [--out benchmarks/results/determinism.jsonl]

Both ways run the real step (one worker's share of the batch, its threads) in this process,
alternating, three rounds; the fastest of each is kept. On a GPU (``--device cuda``) the
deterministic variant also turns cuDNN autotuning off, which is where it costs most.
"""
from __future__ import annotations

import json
import sys

import torch

from gan import determinism
from gan.config import load
from jobs.cli import Parser
from jobs.plan import measure_step


def main(argv: list[str] | None = None) -> int:
    p = Parser("benchmarks.determinism", __doc__)
    p.add_argument("--preset", default="configs/smoke.toml", help="the config whose step is timed")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="", help="append the row to this JSONL file")
    a = p.parse_args(argv)
    cfg = load(a.preset)
    device = torch.device(a.device)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(3):
        for on in (False, True):
            with determinism.scope(on, cfg.train.threads, cfg.scale.cpus_per_worker, device):
                times[on].append(measure_step(cfg, a.device))
    row = {"preset": a.preset, "device": a.device, "batch_per_worker": cfg.train.batch_size // cfg.scale.num_workers,
           "threads": determinism.threads(cfg.train.threads, cfg.scale.cpus_per_worker),
           "step_ms": round(min(times[False]) * 1000, 1), "deterministic_step_ms": round(min(times[True]) * 1000, 1)}
    row["cost"] = f"{row['deterministic_step_ms'] / row['step_ms'] - 1:+.1%}"
    print(json.dumps(row))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
