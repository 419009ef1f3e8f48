"""Training-step speed: the project's step vs. a textbook eager DCGAN step, same process.

    python -m benchmarks.train_step --size 64 --batch 64            # CPU
    python -m benchmarks.train_step --size 128 --batch 64 --device cuda

Prints one JSON line per variant: img/s, step ms, FLOPs per image counted for that variant
(torch.utils.flop_counter, on an uncompiled copy), MFU against a matmul peak measured in this
run (bf16 on CUDA, fp32 on CPU), peak memory of that variant alone (CUDA; on CPU the process's
RSS), and the projected hours of the 60-epoch seed run (60 x 162,770 faces, CelebA's train
split) at that rate. Variants run in alternating rounds of ``--steps`` steps (50 on CUDA) so
that drift (thermal, other load) hits all of them alike; the figure is the median round.

The reference is what a competent user writes: the textbook eager fp32 DCGAN iteration fed by a
DataLoader-style pipeline, so the batch is already on the device and the normalisation, flips,
noise and labels are made there; no host sync per step; PyTorch's default TF32 settings, which
each variant's flags are set back to before it runs (the ``tf32`` switch changes them globally).
Needs only torch (no Ray, no MLflow), so it runs on a bare GPU box.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from gan import perf
from gan.config import LossConfig, ModelConfig
from gan.graphs import GraphedStep
from gan.models import build
from gan.step import Nets, train_step

# The reference run: 60 epochs over CelebA's official train split. seed_run_h is its projected
# time at this rate (meaningful at --size 128 --width 1, the seed's setting).
CELEBA_TRAIN = 162_770
SEED_RUN_IMAGES = 60 * CELEBA_TRAIN
DEFAULT_TF32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # at import


@contextlib.contextmanager
def tf32_flags(matmul: bool, cudnn: bool):
    """A variant runs under its own TF32 flags, whatever the one before it set."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device) -> tuple[float, str]:
    """Measured dense matmul FLOP/s: the denominator of MFU."""
    dtype, n = (torch.bfloat16, 8192) if device.type == "cuda" else (torch.float32, 2048)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps, t0 = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0), str(dtype).replace("torch.", "")


class ReferenceStep:
    """The textbook eager fp32 DCGAN iteration (PyTorch DCGAN example style: separate real and
    fake backward passes, D's weight grads computed in the G step too) on a batch already on the
    device, its preprocessing there too, and no host sync per step."""

    tf32 = DEFAULT_TF32

    def __init__(self, cfg: ModelConfig, device: torch.device, seed: int = 0):
        torch.manual_seed(seed)
        self.G, self.D = (m.to(device) for m in build(cfg))
        self.opt_g = torch.optim.Adam(self.G.parameters(), 2e-4, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.D.parameters(), 4e-5, betas=(0.5, 0.999))
        self.z_dim, self.device = cfg.z_dim, device

    def __call__(self, images_u8: torch.Tensor) -> None:
        d = self.device
        x = images_u8.to(d, non_blocking=True).permute(0, 3, 1, 2).float() / 127.5 - 1
        n = x.shape[0]
        flip = torch.rand(n, device=d) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        x = x + 0.05 * torch.randn_like(x)
        y_real = 0.9 + 0.1 * torch.rand(n, device=d)
        self.D.zero_grad()
        err_real = F.binary_cross_entropy_with_logits(self.D(x), y_real)
        err_real.backward()
        fake = self.G(torch.rand(n, self.z_dim, device=d) * 2 - 1)
        err_fake = F.binary_cross_entropy_with_logits(self.D(fake.detach()), torch.zeros(n, device=d))
        err_fake.backward()
        self.opt_d.step()
        self.G.zero_grad()
        err_g = F.binary_cross_entropy_with_logits(self.D(fake), torch.ones(n, device=d))
        err_g.backward()
        self.opt_g.step()


class ProjectStep:
    """gan.step.train_step as the training loop calls it, with the given perf switches."""

    def __init__(self, cfg: ModelConfig, device: torch.device, seed: int = 0, switches: dict | None = None):
        torch.manual_seed(seed)
        G, D = (m.to(device) for m in build(cfg))
        on = {name: False for name in perf.SWITCHES} | (switches or {})
        on["cuda_graphs"] = on["cuda_graphs"] and device.type == "cuda"
        self.tf32 = (True, True) if on["tf32"] else DEFAULT_TF32
        with tf32_flags(*DEFAULT_TF32):  # set_layout sets them globally; __call__ applies them per variant
            perf.set_layout(G, D, on)
        opt_g, opt_d = perf.adam(G.parameters(), 2e-4, (0.5, 0.999), on), perf.adam(D.parameters(), 4e-5, (0.5, 0.999), on)
        perf.compile_models(G, D, on)
        self.nets = Nets(G, D, D, opt_g, opt_d, cfg.z_dim, perf.autocast_factory(on, device))
        self.gen = torch.Generator(device=device)
        self.device, self.step = device, 0
        self.run = functools.partial(train_step, nets=self.nets, cfg=LossConfig(), gen=self.gen)
        if on["cuda_graphs"]:
            self.run = GraphedStep(self.run, self.nets, self.gen)

    def __call__(self, images_u8: torch.Tensor) -> dict:
        self.gen.manual_seed(self.step)
        self.step += 1
        return self.run(images_u8.to(self.device, non_blocking=True))


def _project(**switches):
    def make(cfg, device, count_flops=False):  # counted eager: FlopCounterMode sees eager ops
        on = switches | ({"compile": False, "cuda_graphs": False} if count_flops else {})
        return ProjectStep(cfg, device, switches=on)
    return make


# The project's step with every switch off, each one on by itself, then all of them on.
VARIANTS = {"eager_fp32_reference": ReferenceStep, "project_step": _project()}
VARIANTS |= {f"project+{name}": _project(**{name: True}) for name in perf.SWITCHES}
VARIANTS["project+all"] = _project(**{name: True for name in perf.SWITCHES})
# Every switch but the graph: the step as it was before perf.cuda_graphs, to compare with it.
VARIANTS["project+all-graphs"] = _project(**{name: name != "cuda_graphs" for name in perf.SWITCHES})
CPU_DEFAULT = ["eager_fp32_reference", "project_step", "project+channels_last", "project+bf16"]


def count_flops_per_image(make, cfg: ModelConfig, device: torch.device, batch: int) -> float:
    """One iteration of this variant, counted (a separate instance: the timed one is untouched)."""
    step = make(cfg, device, count_flops=True) if make is not ReferenceStep else ReferenceStep(cfg, device)
    images = torch.randint(0, 256, (batch, cfg.size, cfg.size, 3), dtype=torch.uint8)
    with tf32_flags(*step.tf32), FlopCounterMode(display=False) as counter:
        step(images)
    return counter.get_total_flops() / batch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, choices=(64, 128), default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0 = the seed)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=0, help="timed steps per round (default: 50 on CUDA, 3 on CPU)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default=None,
                   help=f"comma-separated, from: {', '.join(VARIANTS)} (default: all on CUDA, "
                        f"{', '.join(CPU_DEFAULT)} on CPU)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    a.steps = a.steps or (50 if device.type == "cuda" else 3)
    cfg = ModelConfig(size=a.size, width=a.width)
    peak, peak_dtype = matmul_peak(device)
    names = a.variants.split(",") if a.variants else (list(VARIANTS) if device.type == "cuda" else CPU_DEFAULT)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    flops = {n: count_flops_per_image(VARIANTS[n], cfg, device, min(a.batch, 8)) for n in names}
    images = torch.randint(0, 256, (a.batch, a.size, a.size, 3), dtype=torch.uint8)
    if device.type == "cuda":
        images = images.pin_memory()
    steps, mem, times = {}, {}, {n: [] for n in names}
    for n in names:  # built and warmed up one at a time: each variant's own peak memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        steps[n] = VARIANTS[n](cfg, device)
        with tf32_flags(*steps[n].tf32):
            for _ in range(a.warmup):
                steps[n](images)
        _sync(device)
        mem[n] = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    for _ in range(a.rounds):
        for n in names:
            with tf32_flags(*steps[n].tf32):
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    steps[n](images)
                _sync(device)
            times[n].append((time.perf_counter() - t0) / a.steps)
    ref = statistics.median(times[names[0]])
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    for n in names:
        sec = statistics.median(times[n])
        ips = a.batch / sec
        print(json.dumps({
            "variant": n, "device": device_name, "threads": torch.get_num_threads(), "size": a.size,
            "batch": a.batch, "width": a.width, "img_per_s": round(ips, 2), "step_ms": round(sec * 1e3, 2),
            "speedup_vs_reference": round(ref / sec, 3), "model_gflop_per_img": round(flops[n] / 1e9, 3),
            "mfu": round(flops[n] * ips / peak, 4), "peak_tflops": round(peak / 1e12, 3), "peak_dtype": peak_dtype,
            "peak_mem_mb": round(mem[n], 1),
            "peak_mem_kind": "cuda_allocated" if device.type == "cuda" else "process_rss",
            "steps_per_round": a.steps,
            # whether the graph was really replayed (a failed capture runs eagerly and says why)
            "cuda_graph": getattr(getattr(steps[n], "run", None), "graph", None) is not None
            and not getattr(steps[n].run, "error", ""),
            "graph_error": getattr(getattr(steps[n], "run", None), "error", ""),
            "seed_run_h": round(SEED_RUN_IMAGES / ips / 3600, 2),
        }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
