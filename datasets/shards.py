"""Parquet shards of square RGB faces: an offline writer and a plain-pyarrow reader.

A shard set is a directory (local, or on object storage through pyarrow's filesystems) holding
``part-NNNNN.parquet`` files and ``manifest.json``. Each row is one face (``id``, ``image``).
With the ``raw`` encoding ``image`` is ``fixed_size_binary`` holding H*W*3 uint8 bytes (HWC),
so a row group decodes with one ``np.frombuffer``; ``jpeg``/``png``/``webp`` hold encoded files.

The reader's unit of distribution is the row group: every epoch the row groups are permuted
(seeded), rank r of w takes every w-th, so the ranks' shares are disjoint and together
complete; rows are then shuffled within windows of a few row groups. All of it follows from
(seed, epoch, rank) and the row counts, so a position (epoch, batch) resumes exactly without
re-reading what came before.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

FORMAT = "facegan-shards/1"
MANIFEST = "manifest.json"
ENCODINGS = ("raw", "jpeg", "png", "webp")
META_KEY = b"facegan"  # Parquet footer key: what a shard was written from (for resume)


class ShardError(ValueError):
    """A shard set that cannot be read as it is; the message names the path."""


def is_uri(path: str | Path) -> bool:
    """Object storage or another pyarrow filesystem (``s3://...``), not a local path."""
    return "://" in str(path)


def open_fs(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for a local path or a URI (``s3://bucket/prefix``).

    For S3-compatible servers other than AWS, set ``AWS_ENDPOINT_URL_S3`` (or append
    ``?endpoint_override=host:port&scheme=http`` to the URI)."""
    text = str(uri)
    if not is_uri(text):
        return pafs.LocalFileSystem(), str(Path(text).resolve())
    if text.startswith("s3://") and "endpoint_override" not in text and os.environ.get("AWS_ENDPOINT_URL_S3"):
        endpoint = os.environ["AWS_ENDPOINT_URL_S3"]
        scheme, _, host = endpoint.partition("://")
        text += ("&" if "?" in text else "?") + f"endpoint_override={host}&scheme={scheme}"
    fs, path = pafs.FileSystem.from_uri(text)
    return fs, path.rstrip("/")


def display(fs: pafs.FileSystem, path: str) -> str:
    return path if isinstance(fs, pafs.LocalFileSystem) else f"{fs.type_name}://{path}"


def ensure_dir(fs: pafs.FileSystem, path: str) -> None:
    # Object stores have no directories; create_dir there would leave a marker object.
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(path, recursive=True)


def is_file(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Complete or absent: a local file is renamed into place; an object store's PUT is
    already all-or-nothing."""
    if isinstance(fs, pafs.LocalFileSystem):
        head, _, name = path.rpartition("/")
        tmp = f"{head}/.{name}.tmp"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def sha256_file(fs: pafs.FileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


class ShardWriter:
    """Writes faces to shards. Shards can be written by index (the converter, which resumes by
    skipping finished ones) or streamed with ``add``; the manifest goes last, so a directory
    without one is an unfinished set."""

    def __init__(self, out: str | Path, image_size: int, encoding: str = "raw", rows_per_shard: int = 8192,
                 row_group_size: int = 256, extra: dict | None = None):
        if encoding not in ENCODINGS:
            raise ShardError(f"encoding {encoding!r}: expected one of {', '.join(ENCODINGS)}")
        self.fs, self.path = open_fs(out)
        ensure_dir(self.fs, self.path)
        self.size, self.encoding = image_size, encoding
        self.rows_per_shard, self.row_group_size = rows_per_shard, row_group_size
        self.extra = extra or {}
        nbytes = image_size * image_size * 3
        image_type = pa.binary(nbytes) if encoding == "raw" else pa.binary()
        self._schema = pa.schema([("id", pa.string()), ("image", image_type)])
        self._ids: list[str] = []
        self._blobs: list[bytes] = []
        self.entries: dict[int, dict] = {}

    def add(self, face_id: str, image: np.ndarray) -> None:
        if image.shape != (self.size, self.size, 3) or image.dtype != np.uint8:
            raise ShardError(f"{face_id}: expected uint8 array of shape {(self.size, self.size, 3)}, "
                             f"got {image.dtype} {image.shape}")
        self._ids.append(face_id)
        self._blobs.append(encode(image, self.encoding))
        if len(self._ids) >= self.rows_per_shard:
            self._flush()

    def _flush(self) -> None:
        if self._ids:
            self.write_shard(len(self.entries), self._ids, self._blobs)
            self._ids, self._blobs = [], []

    def write_shard(self, index: int, ids: list[str], blobs: list[bytes], meta: dict | None = None,
                    identities: list[int] | None = None) -> dict:
        """One complete shard of already-encoded images; ``meta`` goes into its footer;
        ``identities`` (the person in each photo, CelebA's identity file) adds an int32 column."""
        schema = self._schema if identities is None else self._schema.append(pa.field("identity", pa.int32()))
        columns = {"id": pa.array(ids, pa.string()), "image": pa.array(blobs, self._schema.field("image").type)}
        if identities is not None:
            columns["identity"] = pa.array(identities, pa.int32())
        table = pa.table(columns, schema=schema.with_metadata({META_KEY: json.dumps(meta or {})}))
        sink = pa.BufferOutputStream()
        # Raw pixels gain ~2x from zstd; encoded images gain nothing, so skip the work.
        pq.write_table(table, sink, row_group_size=self.row_group_size,
                       compression="zstd" if self.encoding == "raw" else "none")
        data = sink.getvalue().to_pybytes()
        write_bytes(self.fs, f"{self.path}/{shard_name(index)}", data)
        entry = {"file": shard_name(index), "rows": len(ids), "sha256": hashlib.sha256(data).hexdigest()}
        self.entries[index] = entry
        return entry

    def close(self, extra: dict | None = None) -> dict:
        self._flush()
        shards = [self.entries[i] for i in sorted(self.entries)]
        manifest = {
            "format": FORMAT, "image_size": self.size, "channels": 3, "encoding": self.encoding,
            "count": sum(s["rows"] for s in shards), "row_group_size": self.row_group_size,
            "shards": shards, **self.extra, **(extra or {}),
        }
        write_bytes(self.fs, f"{self.path}/{MANIFEST}", json.dumps(manifest, indent=2).encode())
        return manifest


def encode(image: np.ndarray, encoding: str, quality: int = 95) -> bytes:
    if encoding == "raw":
        return image.tobytes()
    buf = io.BytesIO()
    fmt = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[encoding]
    opts = {"quality": quality} if encoding in ("jpeg", "webp") else {"compress_level": 6}
    Image.fromarray(image).save(buf, format=fmt, **opts)
    return buf.getvalue()


def decode(blob: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(blob)) as im:
        return np.asarray(im.convert("RGB"))


@dataclass(frozen=True)
class RowGroup:
    file: int
    index: int
    rows: int


class ShardSet:
    """An opened shard set: manifest checked against the files' own Parquet metadata, and
    (``verify_checksums``) against every file's sha256, so that a truncated or altered shard
    fails here, by name, rather than mid-training."""

    def __init__(self, uri: str | Path, verify_checksums: bool = False):
        self.fs, root = open_fs(uri)
        self.path = display(self.fs, root)
        info = self.fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise ShardError(f"shard directory {self.path} does not exist")
        mpath = f"{root}/{MANIFEST}"
        if not is_file(self.fs, mpath):
            raise ShardError(f"{display(self.fs, mpath)}: missing; {self.path} is not a finished shard set "
                             f"(write one with `python -m datasets.synthetic` or `python -m datasets.celeba`)")
        try:
            with self.fs.open_input_stream(mpath) as f:
                self.manifest = json.loads(f.read())
        except json.JSONDecodeError as e:
            raise ShardError(f"{display(self.fs, mpath)}: not valid JSON ({e})") from None
        if self.manifest.get("format") != FORMAT:
            raise ShardError(f"{display(self.fs, mpath)}: format {self.manifest.get('format')!r}, "
                             f"expected {FORMAT!r}")
        if not self.manifest.get("shards") or self.manifest.get("count", 0) <= 0:
            raise ShardError(f"{display(self.fs, mpath)}: the shard set is empty")
        self.image_size = int(self.manifest["image_size"])
        self.encoding = self.manifest.get("encoding", "raw")
        self.files: list[pq.ParquetFile] = []
        self.file_paths: list[str] = []
        self.row_groups: list[RowGroup] = []
        for fi, entry in enumerate(self.manifest["shards"]):
            fpath = f"{root}/{entry['file']}"
            shown = display(self.fs, fpath)
            if not is_file(self.fs, fpath):
                raise ShardError(f"{shown}: listed in the manifest but missing")
            if verify_checksums and sha256_file(self.fs, fpath) != entry["sha256"]:
                raise ShardError(f"{shown}: sha256 differs from the manifest (truncated or altered)")
            try:
                pf = pq.ParquetFile(self.fs.open_input_file(fpath))
            except (pa.ArrowInvalid, OSError) as e:
                raise ShardError(f"{shown}: not a readable Parquet file ({e})") from None
            if pf.metadata.num_rows != entry["rows"]:
                raise ShardError(f"{shown}: {pf.metadata.num_rows} rows, manifest says {entry['rows']}")
            self.files.append(pf)
            self.file_paths.append(shown)
            md = pf.metadata
            self.row_groups += [RowGroup(fi, i, md.row_group(i).num_rows) for i in range(md.num_row_groups)]
        self.count = sum(rg.rows for rg in self.row_groups)
        # Stored-order position of each row group's first row (and the total, last).
        self.starts = np.cumsum([0] + [rg.rows for rg in self.row_groups])
        self._columns: dict[int, pa.Array] = {}

    _decoder: ThreadPoolExecutor | None = None

    def _pool(self) -> ThreadPoolExecutor:
        if self._decoder is None:
            self._decoder = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="decode")
        return self._decoder

    def read(self, rg: RowGroup) -> np.ndarray:
        """One row group as uint8 (rows, H, W, 3)."""
        arr = self.files[rg.file].read_row_group(rg.index, columns=["image"]).column("image").combine_chunks()
        size = self.image_size
        if self.encoding != "raw":
            # Pillow releases the GIL while decoding: threads scale across cores.
            try:
                return np.stack(list(self._pool().map(decode, arr.to_pylist())))
            except (OSError, ValueError) as e:
                raise ShardError(f"{self.file_paths[rg.file]}: row group {rg.index}: "
                                 f"not a decodable image ({e})") from None
        n, nbytes = len(arr), size * size * 3
        data = np.frombuffer(arr.buffers()[1], dtype=np.uint8, count=n * nbytes, offset=arr.offset * nbytes)
        return data.reshape(n, size, size, 3)


    def _column(self, g: int) -> pa.Array:
        """Row group ``g``'s encoded image column; the last few are kept (a batch draws from the
        few row groups of one shuffle window)."""
        if g not in self._columns:
            rg = self.row_groups[g]
            try:
                table = self.files[rg.file].read_row_group(rg.index, columns=["image"])
            except (pa.ArrowException, OSError) as e:
                raise ShardError(f"{self.file_paths[rg.file]}: row group {rg.index} unreadable ({e})") from None
            if len(self._columns) >= 16:
                self._columns.pop(next(iter(self._columns)))
            self._columns[g] = table.column("image").combine_chunks()
        return self._columns[g]

    def take(self, indices: np.ndarray) -> np.ndarray:
        """The faces at these stored-order positions (uint8 NHWC), decoding only those rows:
        what a loader process does for one batch."""
        indices = np.asarray(indices, dtype=np.int64)
        size = self.image_size
        out = np.empty((len(indices), size, size, 3), np.uint8)
        groups = np.searchsorted(self.starts, indices, side="right") - 1
        for g in np.unique(groups):
            sel = np.nonzero(groups == g)[0]
            rows = indices[sel] - self.starts[g]
            col = self._column(int(g))
            if self.encoding == "raw":
                n, nbytes = len(col), size * size * 3
                data = np.frombuffer(col.buffers()[1], np.uint8, count=n * nbytes, offset=col.offset * nbytes)
                out[sel] = data.reshape(n, size, size, 3)[rows]
                continue
            for i, r in zip(sel, rows):
                try:
                    out[i] = decode(col[int(r)].as_py())
                except (OSError, ValueError) as e:
                    rg = self.row_groups[g]
                    raise ShardError(f"{self.file_paths[rg.file]}: row group {rg.index}, row {r}: "
                                     f"not a decodable image ({e})") from None
        return out

    def ids(self) -> list[str]:
        """Every row's id, in stored order (row group by row group)."""
        return [i for pf in self.files for i in pf.read(columns=["id"]).column("id").to_pylist()]

    def identities(self) -> np.ndarray | None:
        """Every row's identity (int), in stored order; None when the set has no such column
        (procedural faces, or CelebA converted without ``--identities``)."""
        if any("identity" not in pf.schema_arrow.names for pf in self.files):
            return None
        return np.concatenate([pf.read(columns=["identity"]).column("identity").to_numpy() for pf in self.files])

    def rows_at(self, indices: list[int]) -> np.ndarray:
        """The faces at these stored-order positions (uint8 NHWC)."""
        starts = self.starts
        cache: dict[int, np.ndarray] = {}
        out = []
        for i in indices:
            g = int(np.searchsorted(starts, i, side="right")) - 1
            if g not in cache:
                cache[g] = self.read(self.row_groups[g])
            out.append(cache[g][i - starts[g]])
        return np.stack(out)


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

    def plan(self, epoch: int) -> np.ndarray:
        """The epoch's batches as stored-order row positions, shape (steps, batch): exactly the
        rows and order of :meth:`iter_epoch` (same windows, same seeded permutations), as
        indices, so that loader processes can each decode whole batches of them."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards.row_groups))
        mine, starts = order[self.rank::self.world], self.shards.starts
        seq = []
        for w in range(0, len(mine), self.window):
            rows = np.concatenate([np.arange(starts[g], starts[g + 1]) for g in mine[w:w + self.window]])
            seq.append(rows[np.random.default_rng([self.seed, epoch, self.rank, w]).permutation(len(rows))])
        steps = self.steps_in_epoch(epoch)
        return np.concatenate(seq)[:steps * self.batch_size].reshape(steps, self.batch_size)

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
