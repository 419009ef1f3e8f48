"""Parquet shards of square RGB faces: an offline writer and a plain-pyarrow reader.

A shard set is a directory holding ``part-NNNNN.parquet`` files and ``manifest.json``. Each row
is one face (``id``, ``image``); with the ``raw`` encoding ``image`` is ``fixed_size_binary``
holding H*W*3 uint8 bytes (HWC), so a row group decodes with one ``np.frombuffer``.

The reader's unit of distribution is the row group: every epoch the row groups are permuted
(seeded), rank r of w takes every w-th, so the ranks' shares are disjoint and together
complete; rows are then shuffled within windows of a few row groups. All of it follows from
(seed, epoch, rank) and the row counts, so a position (epoch, batch) resumes exactly without
re-reading what came before.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT = "facegan-shards/1"
MANIFEST = "manifest.json"


class ShardError(ValueError):
    """A shard set that cannot be read as it is; the message names the path."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Writes faces to shards; each file appears under its final name only when complete."""

    def __init__(self, out_dir: str | Path, image_size: int, rows_per_shard: int = 8192,
                 row_group_size: int = 256, extra: dict | None = None):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.size = image_size
        self.rows_per_shard = rows_per_shard
        self.row_group_size = row_group_size
        self.extra = extra or {}
        self._nbytes = image_size * image_size * 3
        self._schema = pa.schema([("id", pa.string()), ("image", pa.binary(self._nbytes))])
        self._ids: list[str] = []
        self._images: list[bytes] = []
        self._shards: list[dict] = []

    def add(self, face_id: str, image: np.ndarray) -> None:
        if image.shape != (self.size, self.size, 3) or image.dtype != np.uint8:
            raise ShardError(f"{face_id}: expected uint8 array of shape {(self.size, self.size, 3)}, "
                             f"got {image.dtype} {image.shape}")
        self._ids.append(face_id)
        self._images.append(image.tobytes())
        if len(self._ids) >= self.rows_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._ids:
            return
        name = f"part-{len(self._shards):05d}.parquet"
        table = pa.table({"id": pa.array(self._ids, pa.string()),
                          "image": pa.array(self._images, pa.binary(self._nbytes))},
                         schema=self._schema)
        final = self.out / name
        tmp = self.out / f".{name}.tmp"
        # Already-compressed pixels gain little from zstd; raw uint8 faces gain ~2x.
        pq.write_table(table, tmp, row_group_size=self.row_group_size, compression="zstd")
        os.replace(tmp, final)
        self._shards.append({"file": name, "rows": len(self._ids), "sha256": sha256_file(final)})
        self._ids, self._images = [], []

    def close(self) -> dict:
        self._flush()
        manifest = {
            "format": FORMAT,
            "image_size": self.size,
            "channels": 3,
            "encoding": "raw",
            "count": sum(s["rows"] for s in self._shards),
            "row_group_size": self.row_group_size,
            "shards": self._shards,
            **self.extra,
        }
        # The manifest goes last: a directory without one is an unfinished set.
        _atomic_write_bytes(self.out / MANIFEST, json.dumps(manifest, indent=2).encode())
        return manifest


@dataclass(frozen=True)
class RowGroup:
    file: int
    index: int
    rows: int


class ShardSet:
    """An opened shard set: manifest checked against the files' own Parquet metadata."""

    def __init__(self, path: str | Path, verify_checksums: bool = False):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not self.path.is_dir():
            raise ShardError(f"shard directory {self.path} does not exist")
        if not mpath.is_file():
            raise ShardError(f"{mpath}: missing; {self.path} is not a finished shard set "
                             f"(write one with `python -m datasets.synthetic` or `datasets.celeba`)")
        try:
            self.manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise ShardError(f"{mpath}: not valid JSON ({e})") from None
        if self.manifest.get("format") != FORMAT:
            raise ShardError(f"{mpath}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        if not self.manifest.get("shards") or self.manifest.get("count", 0) <= 0:
            raise ShardError(f"{mpath}: the shard set is empty")
        self.image_size = int(self.manifest["image_size"])
        self.files: list[pq.ParquetFile] = []
        self.row_groups: list[RowGroup] = []
        for fi, entry in enumerate(self.manifest["shards"]):
            fpath = self.path / entry["file"]
            if not fpath.is_file():
                raise ShardError(f"{fpath}: listed in the manifest but missing")
            if verify_checksums and sha256_file(fpath) != entry["sha256"]:
                raise ShardError(f"{fpath}: sha256 differs from the manifest (altered or truncated)")
            try:
                pf = pq.ParquetFile(fpath)
            except (pa.ArrowInvalid, OSError) as e:
                raise ShardError(f"{fpath}: not a readable Parquet file ({e})") from None
            if pf.metadata.num_rows != entry["rows"]:
                raise ShardError(f"{fpath}: {pf.metadata.num_rows} rows, manifest says {entry['rows']}")
            self.files.append(pf)
            md = pf.metadata
            self.row_groups += [RowGroup(fi, i, md.row_group(i).num_rows) for i in range(md.num_row_groups)]
        self.count = sum(rg.rows for rg in self.row_groups)

    def read(self, rg: RowGroup) -> np.ndarray:
        """One row group as uint8 (rows, H, W, 3)."""
        col = self.files[rg.file].read_row_group(rg.index, columns=["image"]).column("image")
        arr = col.combine_chunks()
        n, nbytes = len(arr), self.image_size * self.image_size * 3
        data = np.frombuffer(arr.buffers()[1], dtype=np.uint8, count=n * nbytes, offset=arr.offset * nbytes)
        return data.reshape(n, self.image_size, self.image_size, 3)


class ShardReader:
    """Rank ``rank`` of ``world``'s batches: disjoint, complete shares; resumable positions."""

    def __init__(self, shards: ShardSet, rank: int, world: int, batch_size: int, seed: int = 0,
                 shuffle_groups: int = 4):
        if len(shards.row_groups) < world:
            raise ShardError(f"{shards.path}: {len(shards.row_groups)} row groups for {world} workers; "
                             f"rewrite it with a smaller row_group_size")
        self.shards, self.rank, self.world = shards, rank, world
        self.batch_size, self.seed, self.window = batch_size, seed, shuffle_groups
        if self.steps_in_epoch(0) < 1:
            raise ShardError(f"{shards.path}: {shards.count} faces give worker {rank} of {world} "
                             f"less than one batch of {batch_size}")

    def share(self, epoch: int, rank: int | None = None) -> list[RowGroup]:
        rank = self.rank if rank is None else rank
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards.row_groups))
        return [self.shards.row_groups[i] for i in order[rank::self.world]]

    def steps_in_epoch(self, epoch: int) -> int:
        # Every rank must take the same number of steps, or DDP's collectives hang.
        return min(sum(g.rows for g in self.share(epoch, r)) for r in range(self.world)) // self.batch_size

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[np.ndarray]:
        groups, bs = self.share(epoch), self.batch_size
        steps = self.steps_in_epoch(epoch)
        skip, emitted, offset = start_batch * bs, start_batch, 0
        pending = np.empty((0, self.shards.image_size, self.shards.image_size, 3), np.uint8)
        for w in range(0, len(groups), self.window):
            if emitted >= steps:
                return
            window = groups[w:w + self.window]
            rows = sum(g.rows for g in window)
            if offset + rows <= skip:  # wholly before the resume point: never read
                offset += rows
                continue
            data = np.concatenate([self.shards.read(g) for g in window])
            perm = np.random.default_rng([self.seed, epoch, self.rank, w]).permutation(rows)
            data = data[perm[max(skip - offset, 0):]]
            offset += rows
            pending = np.concatenate([pending, data]) if len(pending) else data
            while len(pending) >= bs and emitted < steps:
                yield pending[:bs]
                pending = pending[bs:]
                emitted += 1
