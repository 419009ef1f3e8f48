"""Is the CUDA-graphed step (perf.cuda_graphs, gan/graphs.py) the eager step? Needs a GPU.

    python -m benchmarks.graph_check --size 128      # first thing benchmarks/gpu.sh runs

Three checks, one JSON line each, from the same initial weights and the same batches:
- ``fp32``: graphed vs eager, fp32 with TF32 off, no compile: the same kernels fed the same
  random numbers, so the weights after ``--steps`` steps should agree to float rounding;
- ``resume``: a graphed run stopped halfway, its state loaded into a fresh graphed step (captured
  after the load, as the loop does) and run on: against the straight graphed run;
- ``all``: every switch with the graph vs every switch without it (bf16 and compile: agreement
  to bf16 rounding, reported, not judged).
``max_rel`` is max |a - b| / max |b| over every parameter and buffer of G and D.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from benchmarks.train_step import ProjectStep, tf32_flags
from gan import perf
from gan.config import ModelConfig


def max_rel(a: ProjectStep, b: ProjectStep) -> float:
    worst = 0.0
    for ma, mb in ((a.nets.G, b.nets.G), (a.nets.D_raw, b.nets.D_raw)):
        for (name, ta), tb in zip(ma.state_dict().items(), mb.state_dict().values()):
            ta, tb = ta.float(), tb.float()
            worst = max(worst, ((ta - tb).abs().max() / tb.abs().max().clamp_min(1e-12)).item())
    return worst


def run(step: ProjectStep, batches: list[torch.Tensor], start: int = 0) -> list[float]:
    step.step = start
    return [step(x)["d_loss"].item() for x in batches[start:]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, choices=(64, 128), default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: graph_check needs a CUDA device", file=sys.stderr)
        return 2
    dev, cfg = torch.device("cuda"), ModelConfig(size=a.size)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (a.batch, a.size, a.size, 3), dtype=torch.uint8, generator=gen).to(dev)
               for _ in range(a.steps)]
    plain = {name: False for name in perf.SWITCHES}
    with tf32_flags(False, False):
        eager, graphed = ProjectStep(cfg, dev, switches=plain), ProjectStep(cfg, dev, switches=plain | {"cuda_graphs": True})
        loss_e, loss_g = run(eager, batches), run(graphed, batches)
        print(json.dumps({"check": "fp32", "steps": a.steps, "graphed": graphed.run.graph is not None and not graphed.run.error,
                          "error": graphed.run.error, "first_step_gap": graphed.run.checked_gap, "max_rel": max_rel(graphed, eager),
                          "d_loss_eager": loss_e[-1], "d_loss_graphed": loss_g[-1]}), flush=True)
        half = a.steps // 2
        first = ProjectStep(cfg, dev, switches=plain | {"cuda_graphs": True})
        run(first, batches[:half])
        resumed = ProjectStep(cfg, dev, switches=plain | {"cuda_graphs": True})
        for mine, theirs in ((resumed.nets.G, first.nets.G), (resumed.nets.D_raw, first.nets.D_raw),
                             (resumed.nets.opt_g, first.nets.opt_g), (resumed.nets.opt_d, first.nets.opt_d)):
            mine.load_state_dict(theirs.state_dict())
        run(resumed, batches, start=half)
        print(json.dumps({"check": "resume", "at": half, "max_rel": max_rel(resumed, graphed)}), flush=True)
    every = {name: True for name in perf.SWITCHES}
    with tf32_flags(True, True):
        a_, b_ = ProjectStep(cfg, dev, switches=every), ProjectStep(cfg, dev, switches=every | {"cuda_graphs": False})
        run(a_, batches), run(b_, batches)
        print(json.dumps({"check": "all", "steps": a.steps, "graphed": a_.run.graph is not None and not a_.run.error,
                          "error": a_.run.error, "first_step_gap": a_.run.checked_gap, "max_rel": max_rel(a_, b_)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
