"""What the training loop consumes: one rank's batches, decoded off the thread that trains.

A :class:`BatchSource` is built by the launcher (jobs/train.py, benchmarks, tests) and handed
to ``gan.loop.train``; the loop asks it for ``steps_in_epoch(epoch)`` and a ``stream`` of
``(epoch, batch, images)`` from a position, so it never builds shard readers itself.

``workers`` says where decoding happens:

- ``0``: in the training process, a prefetch thread running ahead of the step (for CPU runs,
  whose cores are busy training anyway, and for tests).
- ``N > 0``: N loader processes (a torch ``DataLoader`` over an ``IterableDataset``). Batch i of
  the stream is decoded, whole, by process i % N, and the DataLoader hands the processes' output
  back round-robin, so the order is exactly the single-process order: the same rows, batches
  and resumable positions as :meth:`ShardReader.iter_epoch` (``ShardReader.plan`` is that order
  as row indices). Decoding in threads of the training process competed with the thread that
  launches kernels (a GPU step ran at 40% of its speed when fed that way); processes do not.

A shard that fails while a loader process reads it is a :class:`ShardError` in the training
process naming the file, the row group and the row, not a worker traceback.
"""
from __future__ import annotations

import math
import os
import queue
import threading
from functools import lru_cache
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datasets.shards import ShardError, ShardReader, ShardSet

T = TypeVar("T")

MAX_AUTO_WORKERS = 8


def loader_workers(requested: int, device: torch.device, cpus: float | None = None) -> int:
    """``requested`` >= 0 is taken as it is. Auto (-1): none on a CPU device (its cores train);
    on an accelerator, every CPU this rank has but the one that launches kernels, at most 8.
    ``cpus``: what the launcher gave this rank (Ray's ``scale.cpus_per_worker``); by default
    the CPUs this process may run on."""
    if requested >= 0:
        return requested
    if device.type == "cpu":
        return 0
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_AUTO_WORKERS, int(cpus) - 1))


def positions(reader: ShardReader, epoch: int, batch: int, stop_epoch: int) -> Iterator[tuple[int, int]]:
    """(epoch, batch) from a position up to the end of epoch ``stop_epoch`` - 1."""
    for e in range(epoch, stop_epoch):
        yield from ((e, b) for b in range(batch if e == epoch else 0, reader.steps_in_epoch(e)))


class _Batches(IterableDataset):
    """Runs in each loader process: its own ShardSet (opened there: nothing with open files
    crosses the process boundary), every n-th batch of the stream, decoded whole."""

    def __init__(self, uri: str, args: tuple, epoch: int, batch: int, stop_epoch: int):
        self.uri, self.args, self.start, self.stop_epoch = uri, args, (epoch, batch), stop_epoch

    def __iter__(self):
        info = get_worker_info()
        k, n = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            shards = ShardSet(self.uri)
            reader = ShardReader(shards, *self.args)
            plan = lru_cache(maxsize=2)(reader.plan)
            for i, (e, b) in enumerate(positions(reader, *self.start, self.stop_epoch)):
                if i % n == k:
                    yield e, b, torch.from_numpy(shards.take(plan(e)[b]))
        except ShardError as err:  # handed over as a message: raised as one line by the consumer
            yield -1, -1, str(err)


class BatchSource:
    """Rank ``rank`` of ``world``'s batches of ``batch_size`` uint8 NHWC faces."""

    def __init__(self, uri: str, rank: int = 0, world: int = 1, batch_size: int = 64, seed: int = 0,
                 shuffle_groups: int = 4, workers: int = 0, prefetch: int = 4, pin: bool = False):
        self.uri = str(uri)
        self.shards = ShardSet(self.uri)
        self.reader = ShardReader(self.shards, rank, world, batch_size, seed, shuffle_groups)
        self.args = (rank, world, batch_size, seed, shuffle_groups)
        self.workers, self.prefetch, self.pin = workers, prefetch, pin
        self.image_size = self.shards.image_size
        self._steps = lru_cache(maxsize=None)(self.reader.steps_in_epoch)

    def steps_in_epoch(self, epoch: int) -> int:
        return self._steps(epoch)

    def stream(self, epoch: int, batch: int, stop_epoch: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(epoch, batch, images)`` from the position (epoch, batch) to the end of epoch
        ``stop_epoch`` - 1; images are a uint8 (B, H, W, 3) CPU tensor, page-locked when ``pin``."""
        if self.workers == 0:
            yield from self._in_process(epoch, batch, stop_epoch)
            return
        ds = _Batches(self.uri, self.args, epoch, batch, stop_epoch)
        loader = DataLoader(ds, batch_size=None, num_workers=self.workers, pin_memory=self.pin,
                            prefetch_factor=max(2, math.ceil(self.prefetch / self.workers)))
        expected = positions(self.reader, epoch, batch, stop_epoch)
        for e, b, images in loader:
            if isinstance(images, str):
                raise ShardError(images)
            if (e, b) != next(expected):  # the round-robin order is what makes resume exact
                raise RuntimeError(f"loader processes delivered batch ({e}, {b}) out of order")
            yield e, b, images

    def _in_process(self, epoch: int, batch: int, stop_epoch: int):
        for e in range(epoch, stop_epoch):
            start = batch if e == epoch else 0

            def to_tensor(item, pin=self.pin):  # in the prefetch thread: page-locked for async copies
                b, images = item
                x = torch.from_numpy(images)
                return b, x.pin_memory() if pin else x
            items = enumerate(self.reader.iter_epoch(e, start), start)
            for b, x in prefetch(items, self.prefetch, to_tensor):
                yield e, b, x


def prefetch(iterable: Iterable[T], depth: int, fn: Callable[[T], Any] = lambda x: x) -> Iterator[Any]:
    """Runs ``iterable`` (and ``fn`` on each item) ``depth`` items ahead in a thread, so that
    reading and decoding overlap the training step. Order is kept; errors are re-raised here."""
    if depth <= 0:
        yield from map(fn, iterable)
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def run():
        try:
            for item in iterable:
                out = fn(item)
                while not stop.is_set():
                    try:
                        q.put(out, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    t = threading.Thread(target=run, daemon=True, name="prefetch")
    t.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
