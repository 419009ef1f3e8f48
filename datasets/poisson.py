"""Poisson-sampled batches, for differentially private training (gan/privacy.py).

DP-SGD's accounting assumes each face joins each step's batch independently with probability
q = batch / N (the sampled Gaussian mechanism), so a batch's size varies around its mean. Opacus's
``UniformWithReplacementSampler`` draws the rows; each rank samples its own share of the faces
(rows ``rank::world``) at the same q, so that the union over the ranks is one Poisson batch of
the whole set. A rank's share is decoded into memory once (64 px: 12 KB a face).

Resumable like the shuffled reader: an epoch's draws come from a generator seeded by (seed,
rank, epoch), and a resume at (epoch, batch) replays the epoch's draws up to ``batch``.
"""
from __future__ import annotations

import hashlib
from typing import Iterator

import numpy as np
import torch

from datasets.shards import ShardSet


def _seed(seed: int, rank: int, epoch: int) -> int:
    digest = hashlib.blake2b(f"poisson/{seed}/{rank}/{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class PoissonBatches:
    """This rank's Poisson batches over the shard set at ``path`` (``batch_size``: the global mean)."""

    def __init__(self, path: str, rank: int, world: int, batch_size: int, seed: int = 0):
        shards = ShardSet(path)
        self.count, self.image_size = shards.count, shards.image_size
        if batch_size > self.count:
            raise ValueError(f"{shards.path}: {self.count} faces, fewer than train.batch_size={batch_size}")
        self.faces = shards.rows_at(list(range(rank, self.count, world)))
        self.rank, self.seed = rank, seed
        self.sample_rate = batch_size / self.count  # q: every face's chance to be in a step's batch
        self.expected_batch = self.sample_rate * len(self.faces)  # this rank's mean batch
        self.steps = self.count // batch_size  # an epoch: N / batch steps, as the shuffled reader

    def steps_in_epoch(self, epoch: int) -> int:
        return self.steps

    def stream(self, epoch: int, batch: int, stop_epoch: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        # The privacy extra, imported when a DP run draws, not by every process that imports the
        # loop (gan/privacy.py says in one line when it is missing).
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        for e in range(epoch, stop_epoch):
            gen = torch.Generator().manual_seed(_seed(self.seed, self.rank, e))
            sampler = UniformWithReplacementSampler(num_samples=len(self.faces), sample_rate=self.sample_rate,
                                                    generator=gen, steps=self.steps)
            for b, rows in enumerate(sampler):
                if e == epoch and b < batch:
                    continue  # drawn, not decoded: a resume sees the draws the whole run would have
                yield e, b, torch.from_numpy(self.faces[np.asarray(rows, dtype=np.int64)])
