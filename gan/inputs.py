"""What :func:`gan.loop.train` consumes, as Protocols: the core names the shape of its inputs and
never where they come from (``compose.py`` builds them from shards, ``tests/`` from tensors)."""
from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

import torch
from torch import nn


class Batches(Protocol):
    """A rank's training batches: uint8 NHWC host tensors, in a resumable order."""

    image_size: int

    def steps_in_epoch(self, epoch: int) -> int: ...

    def stream(self, epoch: int, batch: int, stop_epoch: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(epoch, batch, images) from position (epoch, batch) to the end of ``stop_epoch`` - 1."""


@runtime_checkable
class PoissonSampled(Batches, Protocol):
    """Batches in which every face is drawn independently with probability ``sample_rate``
    (what differentially private training accounts for, gan/privacy.py)."""

    count: int  # faces in the whole training set
    sample_rate: float
    expected_batch: float  # this rank's mean batch size


class Scorer(Protocol):
    """Scores a generator (FID/KID: lower is better). Called by every rank at the same steps."""

    def __call__(self, generator: nn.Module) -> dict[str, float]: ...


class Probe(Protocol):
    """Training health for one log window (gan/health.py): (metrics, newly raised flags)."""

    def __call__(self, G: nn.Module, D: nn.Module, z: torch.Tensor, window: dict[str, float],
                 step: int) -> tuple[dict[str, float], dict[str, str]]: ...
