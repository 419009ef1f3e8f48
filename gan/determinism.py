"""Replayable runs (``train.deterministic = true``): one config, one seed, one machine, the same bits.

What the loop already makes repeatable, with or without the switch: initial weights from
``train.seed``; every step's noise, labels and flips from a generator re-seeded per
(seed, rank, step); the batch order a function of (seed, epoch), delivered in order by the
loader processes (the loop checks each batch's position). What the switch adds:

- PyTorch's deterministic algorithms (``torch.use_deterministic_algorithms``): an op without a
  deterministic variant raises instead of running; on CUDA also cuDNN's deterministic
  convolutions without autotuning, and cuBLAS's fixed workspace (``CUBLAS_WORKSPACE_CONFIG``,
  set here when the process has not set it and before CUDA starts);
- a fixed intra-op thread count: ``train.threads``, else the worker's ``scale.cpus_per_worker``.
  The thread count decides how a reduction is split, so 1 and 2 threads give different (each
  repeatable) numbers: without this a run launched another way (Ray, a test, a notebook) would
  pick another default;
- no ``torch.compile`` (its autotuning picks kernels by timing).

Where it cannot hold: across machines, CPU instruction sets or library versions (other kernels);
with several workers the gradients are all-reduced, and whether that sum's order is fixed is
the backend's (gloo sums two ranks exactly; NCCL's ring order over more ranks is not promised);
GPU ops that have no deterministic variant raise. Timing metrics (``img_per_s``, MLflow's
``system/*``) are measurements, not results, and differ from run to run.

What it costs is measured by ``python -m benchmarks.determinism`` (results in
``benchmarks/results/``).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch


def threads(cfg_threads: int, cpus_per_worker: float) -> int:
    return cfg_threads if cfg_threads > 0 else max(1, int(cpus_per_worker))


@contextlib.contextmanager
def scope(on: bool, cfg_threads: int, cpus_per_worker: float, device: torch.device) -> Iterator[None]:
    """Around the whole of a run; restores the process's settings after it (tests run many)."""
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if on:
        torch.set_num_threads(threads(cfg_threads, cpus_per_worker))
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        torch.use_deterministic_algorithms(True)
    elif cfg_threads > 0:
        torch.set_num_threads(cfg_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def restrict(on: dict[str, bool], deterministic: bool) -> dict[str, bool]:
    """The perf switches a run keeps (gan/perf.py): a deterministic one compiles nothing."""
    return on | {"compile": False} if deterministic else on
