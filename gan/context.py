"""The seam between the pure training core and whatever launches it.

The loop sees only a :class:`Context`: rank, world size, device, ``wrap`` (DDP, in this one
place), ``load_checkpoint``, ``report`` (a typed :class:`~gan.report.Report`) and ``should_stop``.
Launchers implement it: :class:`LocalContext` here (tests, benchmarks, single-process runs),
and the Ray Train context in ``jobs/``.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from gan.checkpoint import BackgroundWriter, load_state, save_state, to_host
from gan.report import Report

CHECKPOINT_FILE = "checkpoint.pt"


class Context(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def wrap(self, module: nn.Module) -> nn.Module: ...

    def load_checkpoint(self) -> dict[str, Any] | None: ...

    def report(self, report: Report) -> None:
        """Called by every rank at the same steps. The report's ``checkpoint`` is a function so
        that only the rank that writes pays for building the state; its state is taken before
        ``report`` returns, writing it may go on in the background (see ``flush``)."""

    def flush(self) -> None:
        """Returns once every checkpoint handed to ``report`` is written, or raises the error
        that stopped one. The loop calls it before it returns."""

    def should_stop(self) -> bool:
        """Must agree across ranks, or the ranks' collectives fall out of step."""

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over ranks (identity on one process)."""


def unwrap(module: nn.Module) -> nn.Module:
    """The one place that undoes :meth:`Context.wrap`."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


class TorchDistributedContext:
    """Rank, device and DDP wrapping from an initialised ``torch.distributed`` process group."""

    def __init__(self, device: torch.device | str | None = None):
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._stop = False

    def wrap(self, module: nn.Module) -> nn.Module:
        module = module.to(self.device)
        if not self.distributed or self.world_size == 1:
            return module
        # broadcast_buffers=False: D runs two forward passes (real, fake) before one backward;
        # re-broadcasting BN buffers in place before the second pass breaks autograd. Each rank
        # keeps its own BN running stats instead (only used for eval-mode sampling), and the loop
        # averages them over the ranks before it samples, scores or saves (gan/bn.py).
        ids = [self.device.index] if self.device.type == "cuda" else None
        with warnings.catch_warnings():
            # torch 2.13 suggests forward_sync_buffers, which still syncs at init; we want
            # exactly broadcast_buffers=False's behaviour, as its own warning allows.
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            return nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        if not self.distributed or self.world_size == 1:
            return values
        values = values.clone()
        dist.all_reduce(values)
        return values / self.world_size

    def flush(self) -> None:
        pass

    def request_stop(self) -> None:
        self._stop = True

    def should_stop(self) -> bool:
        return self._stop


class LocalContext(TorchDistributedContext):
    """Checkpoints and artifacts in a local directory; every report's summary kept in ``reports``,
    the charted values (metrics and scores) in ``history``."""

    def __init__(self, out_dir: str | Path, device: torch.device | str | None = None, resume: bool = True):
        super().__init__(device)
        self.out = Path(out_dir)
        self.resume = resume
        self.history: list[tuple[int, dict[str, float]]] = []
        self.reports: list[Report] = []  # summaries: no checkpoint, artifacts or model
        self.checkpoint_steps: list[int] = []
        self.best_steps: list[int] = []
        self.tags: dict[str, str] = {}
        self.writer = BackgroundWriter()

    def flush(self) -> None:
        self.writer.wait()

    def load_checkpoint(self) -> dict[str, Any] | None:
        self.flush()
        path = self.out / CHECKPOINT_FILE
        return load_state(path) if self.resume and path.is_file() else None

    def report(self, report: Report) -> None:
        step = report.step
        self.reports.append(Report.from_summary(report.summary()))
        if report.logged():
            self.history.append((step, report.logged()))
        if self.rank != 0:
            return
        self.tags |= report.tags
        if report.diverged:
            self.tags["facegan.failed_reason"] = report.diverged
        if report.model is not None:
            save_state({"step": step, "G": report.model.state_dict(), "format": 1}, self.out / "best_generator.pt")
            self.best_steps.append(step)
        if report.checkpoint is not None:
            state = to_host(report.checkpoint())  # now, on this thread; serialising and writing in the background
            self.writer.submit(lambda: save_state(state, self.out / CHECKPOINT_FILE))
            self.checkpoint_steps.append(step)
        for rel, data in report.artifacts.items():
            path = self.out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
