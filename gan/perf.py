"""Speed switches for the training path, each a ``perf.*`` config field: "auto" (on for CUDA,
off elsewhere: the fastest safe default on a GPU, and no surprises on a laptop), "on", "off".

- ``bf16``: autocast G and D forwards to bfloat16; losses, optimizer and weights stay fp32.
- ``channels_last``: NHWC weights and activations (the tensor cores' native conv layout).
- ``compile``: ``torch.compile`` of G's and D's forwards (in place, so DDP, the unwrapped D
  of the G step and state_dict keys are unaffected).
- ``fused_adam``: one fused kernel for each Adam update instead of a loop of small ones.
- ``tf32``: TF32 for any fp32 matmul/conv that remains.
- ``cuda_graphs``: the whole step replayed from one CUDA graph (gan/graphs.py); auto is on for
  a single CUDA process without diffaug, ``on`` where it cannot be is a one-line error. The
  first step checks the graph against the eager step on the machine at hand (gan/graphs.py).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from gan import graphs

SWITCHES = ("bf16", "channels_last", "compile", "fused_adam", "tf32", "cuda_graphs")
CHOICES = ("auto", "on", "off")


def enabled(setting: str, device: torch.device) -> bool:
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def resolve(perf, device: torch.device, world_size: int = 1, augmenting: bool = False) -> dict[str, bool]:
    """The switches as they apply on ``device`` (for a job of ``world_size`` processes)."""

    on = {name: enabled(getattr(perf, name), device) for name in SWITCHES}
    return on | {"cuda_graphs": graphs.resolve(perf.cuda_graphs, device, world_size, augmenting)}


def set_layout(G: nn.Module, D: nn.Module, on: dict[str, bool]) -> None:
    """Before the optimizers and EMA exist, so their state is born in the same layout."""
    if on["channels_last"]:
        G.to(memory_format=torch.channels_last)
        D.to(memory_format=torch.channels_last)
    if on["tf32"]:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def compile_models(G: nn.Module, D: nn.Module, on: dict[str, bool]) -> None:
    if on["compile"]:
        G.compile()
        D.compile()


def adam(params, lr: float, betas: tuple[float, float], on: dict[str, bool]) -> torch.optim.Adam:
    # capturable: the step count stays on the device, so a CUDA graph can replay the update
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=True if on["fused_adam"] else None,
                            capturable=on.get("cuda_graphs", False))


def autocast_factory(on: dict[str, bool], device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if on["bf16"]:  # no weight-cast cache under a CUDA graph (the docs' advice for capture)
        cache = not on.get("cuda_graphs", False)
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext
