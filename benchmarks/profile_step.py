"""What still limits the step on a GPU: kernel time against wall time, and the kernels that
take it (torch.profiler).

    python -m benchmarks.profile_step --size 128 --batch 64     # benchmarks/gpu.sh runs this

For each variant, one JSON line: wall ms per step, GPU kernel ms per step, their ratio (busy:
below ~0.9 the step waits on the host, launch overhead; near 1 only faster kernels help), and the
top kernels by GPU time with their share. Needs only torch.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.train_step import VARIANTS, tf32_flags
from gan.config import ModelConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, choices=(64, 128), default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--variants", default="project+all,project+all-graphs")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: profile_step needs a CUDA device", file=sys.stderr)
        return 2
    dev, cfg = torch.device("cuda"), ModelConfig(size=a.size)
    images = torch.randint(0, 256, (a.batch, a.size, a.size, 3), dtype=torch.uint8).pin_memory()
    for name in a.variants.split(","):
        step = VARIANTS[name](cfg, dev)
        with tf32_flags(*step.tf32):
            for _ in range(5):
                step(images)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    step(images)
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t0) / a.steps
        kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
        total = sum(e.self_device_time_total for e in kernels) / 1e3 / a.steps  # ms per step
        top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:a.top]
        print(json.dumps({
            "variant": name, "device": torch.cuda.get_device_name(dev), "size": a.size, "batch": a.batch,
            "wall_ms": round(wall * 1e3, 2), "kernel_ms": round(total, 2), "busy": round(total / (wall * 1e3), 3),
            "top": [{"kernel": e.key[:100], "ms": round(e.self_device_time_total / 1e3 / a.steps, 3),
                     "share": round(e.self_device_time_total / 1e3 / a.steps / max(total, 1e-9), 3),
                     "calls": e.count // a.steps} for e in top],
        }), flush=True)
        del step
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
