"""CelebA (official zip or folder) -> training-ready shard sets, one per official split.

    python -m datasets.celeba --src img_align_celeba.zip --partition list_eval_partition.txt \\
        --out data/celeba128 --size 128 [--encoding jpeg] [--workers N] \
        [--identities identity_CelebA.txt]   # an int `identity` column: who is in each photo
        [--train-people K]   # the training split keeps its first K people only (val/test whole)
    python -m datasets.celeba ... --out s3://bucket/celeba128   # AWS_ENDPOINT_URL_S3 for others

Streams from the zip (nothing is extracted), one process per core. Writes
``OUT/{train,val,test}/`` (shards + manifest.json), ``OUT/rejected.jsonl`` (every input not
converted, with the reason) and ``OUT/summary.json``.

Face crop: aligned CelebA photos are 178x218 with the face centred by the alignment; the
default box (25, 50, 153, 178) is the 128x128 square that holds the whole face, chin included,
so 128 px output needs no resampling and 64 px is an antialiased (Lanczos) downscale.
``--crop x0,y0,x1,y1`` overrides it. Policies for odd inputs:
- grayscale, CMYK, palette, PNG: converted to RGB;
- another size with the same aspect ratio (within 2%): resized to 178x218 first, then cropped
  (``--unexpected-size reject`` turns this off); another aspect ratio: rejected;
- unreadable, truncated, empty, non-image files, names missing from the partition file (or,
  with ``--identities``, from the identity file) and repeated file names: rejected (kept out of
  the shards, listed in rejected.jsonl). A name listed twice in either file is an error.
Names are matched to the partition file by stem, so PNG copies of CelebA match too.
``--train-people K`` (with ``--identities``) keeps, in the training split, every photo of the K
training people with the lowest identity numbers and no one else: a small private set of few
people with many photos each, where a generator is most likely to learn who they are (the
identity-leak stress protocol, docs/privacy.md). The held-out splits stay whole.
The exit status is 1 only when the rejected fraction exceeds ``--max-rejected``.

Rerunning after an interruption keeps every finished shard (its footer records what it was
made from) and redoes the rest; the manifests are written last, so a set is never seen half
written.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import zipfile
from collections import Counter
from multiprocessing import Pool
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from pyarrow.fs import FileSelector
from tqdm import tqdm

from datasets.shards import (
    ENCODINGS,
    MANIFEST,
    META_KEY,
    ShardError,
    ShardWriter,
    encode,
    ensure_dir,
    is_file,
    open_fs,
    sha256_file,
    shard_name,
    write_bytes,
)

EXPECTED = (178, 218)
DEFAULT_CROP = (25, 50, 153, 178)
IMAGE_EXT = {".jpg", ".jpeg", ".png"}
SPLITS = {"0": "train", "1": "val", "2": "test"}
CHUNK = 128  # images per worker task


class Source:
    """The official zip or an extracted folder, read member by member."""

    def __init__(self, src: str):
        self.src = Path(src)
        self.zip = None
        if self.src.is_file():
            try:
                self.zip = zipfile.ZipFile(self.src)
            except zipfile.BadZipFile:
                raise ShardError(f"--src {src}: not a zip file (expected img_align_celeba.zip or a folder)")
        elif not self.src.is_dir():
            raise ShardError(f"--src {src}: no such file or folder")

    def members(self) -> list[str]:
        if self.zip is not None:  # archive order: of repeated names, the first one stored wins
            return [i.filename for i in self.zip.infolist() if not i.is_dir()]
        return sorted(p.relative_to(self.src).as_posix() for p in self.src.rglob("*") if p.is_file())

    def read(self, name: str) -> bytes:
        return self.zip.read(name) if self.zip is not None else (self.src / name).read_bytes()


def _read_listing(path: str, flag: str, expected: str, value) -> dict:
    """``stem -> value(second field)`` from a CelebA listing (CRLF or LF); a malformed line or
    a name listed twice is an error naming the file and line."""
    out, line_of = {}, {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ShardError(f"{flag} {path}: {e.strerror}") from None
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        v = value(parts[1]) if len(parts) == 2 else None
        if v is None:
            raise ShardError(f"{path}:{no}: expected '{expected}', got {line.strip()!r}")
        stem = PurePosixPath(parts[0]).stem
        if stem in out:
            raise ShardError(f"{path}:{no}: {parts[0]} is listed twice (first at line {line_of[stem]})")
        out[stem], line_of[stem] = v, no
    if not out:
        raise ShardError(f"{path}: no entries")
    return out


def read_partition(path: str) -> dict[str, str]:
    """``stem -> split`` from list_eval_partition.txt."""
    return _read_listing(path, "--partition", "<file name> <0|1|2>", SPLITS.get)


def read_identities(path: str) -> dict[str, int]:
    """``stem -> identity`` from identity_CelebA.txt."""
    return _read_listing(path, "--identities", "<file name> <identity number>",
                         lambda v: int(v) if v.isdigit() else None)


def plan(members: list[str], partition: dict[str, str], identities: dict[str, int] | None = None,
         train_people: int = 0) -> tuple[dict[str, list[str]], list[dict]]:
    """Which member goes to which split, and which are rejected before decoding (``train_people``
    > 0: the training split keeps the photos of its first that many people, by identity number)."""
    splits: dict[str, list[str]] = {s: [] for s in SPLITS.values()}
    rejected, first_seen = [], {}
    for m in members:
        p = PurePosixPath(m)
        if p.suffix.lower() not in IMAGE_EXT:
            rejected.append({"name": m, "reason": "not an image file (extension)"})
        elif p.stem in first_seen:
            rejected.append({"name": m, "reason": f"duplicate file name (kept {first_seen[p.stem]})"})
        elif p.stem not in partition:
            first_seen[p.stem] = m
            rejected.append({"name": m, "reason": "not in the partition file"})
        elif identities is not None and p.stem not in identities:
            first_seen[p.stem] = m
            rejected.append({"name": m, "reason": "not in the identity file"})
        else:
            first_seen[p.stem] = m
            splits[partition[p.stem]].append(m)
    if train_people > 0 and identities is not None:
        train = splits[SPLITS["0"]]
        keep = set(sorted({identities[PurePosixPath(m).stem] for m in train})[:train_people])
        splits[SPLITS["0"]] = [m for m in train if identities[PurePosixPath(m).stem] in keep]
    return splits, rejected


def convert_image(data: bytes, opts: dict) -> tuple[bytes | None, str | None, str | None]:
    """-> (encoded face, rejection reason, note)."""
    if not data:
        return None, "empty file", None
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as e:  # Pillow raises many types for bad files; all mean "unreadable"
        return None, f"unreadable image: {type(e).__name__}: {e}", None
    note = None
    if im.mode != "RGB":
        note = f"converted from {im.mode}"
        im = im.convert("RGB")
    if im.size != EXPECTED:
        w, h = im.size
        same_aspect = abs((w / h) / (EXPECTED[0] / EXPECTED[1]) - 1) <= 0.02
        if opts["unexpected_size"] == "reject" or not same_aspect:
            return None, f"unexpected size {w}x{h} (expected {EXPECTED[0]}x{EXPECTED[1]})", note
        im = im.resize(EXPECTED, Image.LANCZOS)
        note = f"resized from {w}x{h}"
    face = im.crop(tuple(opts["crop"]))
    if face.size != (opts["size"], opts["size"]):
        face = face.resize((opts["size"], opts["size"]), Image.LANCZOS)
    return encode(np.asarray(face), opts["encoding"], opts["quality"]), None, note


_SOURCE: Source | None = None


def _init_worker(src: str) -> None:
    global _SOURCE
    _SOURCE = Source(src)


def _work(task: tuple) -> tuple:
    key, names, opts = task
    ids, blobs, rejected, notes = [], [], [], 0
    for name in names:
        blob, reason, note = convert_image(_SOURCE.read(name), opts)
        if blob is None:
            rejected.append({"name": name, "reason": reason})
        else:
            ids.append(PurePosixPath(name).stem)
            blobs.append(blob)
            notes += note is not None
    return key, len(names), ids, blobs, rejected, notes


def _finished(fs, path: str, meta: dict) -> dict | None:
    """The footer of a finished shard made from exactly ``meta``, else None."""
    if not is_file(fs, path):
        return None
    try:
        schema = pq.read_schema(fs.open_input_file(path))
        got = json.loads(schema.metadata[META_KEY])
    except Exception:  # unreadable or foreign: redo it
        return None
    return got if all(got.get(k) == v for k, v in meta.items()) else None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="img_align_celeba.zip or a folder of images")
    p.add_argument("--partition", required=True, help="list_eval_partition.txt")
    p.add_argument("--identities", help="identity_CelebA.txt: store who is in each photo (the identity audit)")
    p.add_argument("--train-people", type=int, default=0,
                   help="keep only the first K training people (by identity number), all their photos; needs --identities")
    p.add_argument("--out", required=True, help="a folder or s3://bucket/prefix")
    p.add_argument("--size", type=int, choices=(64, 128), required=True)
    p.add_argument("--encoding", choices=ENCODINGS, default="jpeg")
    p.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality")
    p.add_argument("--crop", default=",".join(map(str, DEFAULT_CROP)), help="x0,y0,x1,y1 in the 178x218 photo")
    p.add_argument("--unexpected-size", choices=("resize", "reject"), default="resize")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rows-per-shard", type=int, default=2048)
    p.add_argument("--row-group-size", type=int, default=256)
    p.add_argument("--max-rejected", type=float, default=0.01, help="fraction of inputs; above it, exit 1")
    a = p.parse_args(argv)
    try:
        crop = tuple(int(v) for v in a.crop.split(","))
    except ValueError:
        crop = ()
    if len(crop) != 4 or not (0 <= crop[0] < crop[2] <= EXPECTED[0] and 0 <= crop[1] < crop[3] <= EXPECTED[1]):
        p.error(f"--crop {a.crop!r}: expected x0,y0,x1,y1 inside {EXPECTED[0]}x{EXPECTED[1]}")
    if a.crop and crop[2] - crop[0] != crop[3] - crop[1]:
        p.error(f"--crop {a.crop!r}: the box must be square")
    a.crop = list(crop)
    if a.train_people < 0 or (a.train_people and not a.identities):
        p.error(f"--train-people {a.train_people}: expected a count >= 1 together with --identities")
    return a


def convert(a) -> dict:
    source = Source(a.src)
    partition = read_partition(a.partition)
    identities = read_identities(a.identities) if a.identities else None
    ident_sha = sha256_file(*open_fs(a.identities)) if a.identities else None
    fs, root = open_fs(a.out)
    ensure_dir(fs, root)
    opts = {"size": a.size, "encoding": a.encoding, "quality": a.quality, "crop": a.crop,
            "unexpected_size": a.unexpected_size}
    members = source.members()
    splits, rejected = plan(members, partition, identities, a.train_people)
    writers, tasks, pending, skipped = {}, [], {}, 0
    for split, names in splits.items():
        if not names:
            continue
        w = writers[split] = ShardWriter(f"{a.out}/{split}", a.size, a.encoding, a.rows_per_shard, a.row_group_size)
        if is_file(fs, f"{w.path}/{MANIFEST}"):
            fs.delete_file(f"{w.path}/{MANIFEST}")  # the set is unfinished again until the end
        for i in range(0, len(names), a.rows_per_shard):
            chunk, idx = names[i:i + a.rows_per_shard], i // a.rows_per_shard
            # The identity file's digest is part of what a shard was made from: a shard written
            # without (or with other) identities is redone on a rerun.
            meta = {**opts, "identities": ident_sha, "inputs": len(chunk), "first": chunk[0], "last": chunk[-1]}
            got = _finished(fs, f"{w.path}/{shard_name(idx)}", meta)
            if got is not None:
                w.entries[idx] = {"file": shard_name(idx), "rows": got["rows"],
                                  "sha256": sha256_file(fs, f"{w.path}/{shard_name(idx)}")}
                rejected += got["rejected"]
                skipped += 1
                continue
            parts = [chunk[j:j + CHUNK] for j in range(0, len(chunk), CHUNK)]
            pending[(split, idx)] = {"meta": meta, "left": len(parts), "ids": [], "blobs": [], "rejected": []}
            tasks += [((split, idx), part, opts) for part in parts]
    todo = sum(len(t[1]) for t in tasks)
    t0, notes = time.perf_counter(), 0
    with Pool(a.workers, initializer=_init_worker, initargs=(a.src,)) as pool, \
            tqdm(total=todo, unit="img", desc="converting", disable=todo == 0) as bar:
        for key, n, ids, blobs, rej, nn in pool.imap(_work, tasks):
            acc = pending[key]
            acc["ids"] += ids
            acc["blobs"] += blobs
            acc["rejected"] += rej
            acc["left"] -= 1
            notes += nn
            bar.update(n)
            if acc["left"] == 0:  # tasks come back in order: this shard is complete
                split, idx = key
                meta = {**acc["meta"], "rows": len(acc["ids"]), "rejected": acc["rejected"]}
                who = [identities[i] for i in acc["ids"]] if identities is not None else None
                writers[split].write_shard(idx, acc["ids"], acc["blobs"], meta, who)
                rejected += acc["rejected"]
                del pending[key]
    elapsed = time.perf_counter() - t0
    src_sha = sha256_file(*open_fs(a.src)) if Path(a.src).is_file() else None
    counts = {s: sum(e["rows"] for e in w.entries.values()) for s, w in writers.items()}
    extra = {"source": "celeba", "counts": counts, "crop_box": a.crop, "quality": a.quality,
             "unexpected_size": a.unexpected_size,
             "source_files": {Path(a.src).name: src_sha, Path(a.partition).name: sha256_file(*open_fs(a.partition))}}
    if identities is not None:
        extra["source_files"][Path(a.identities).name] = ident_sha
        extra["identity_counts"] = _identity_counts(splits, identities, rejected)
    for split, w in writers.items():
        _drop_stale_shards(fs, w.path, len(w.entries))
        w.close({"split": split, **extra})
    summary = {"inputs": len(members), "converted": sum(counts.values()), "counts": counts,
               **({"identity_counts": extra["identity_counts"]} if identities is not None else {}),
               "rejected": len(rejected), "notes": notes, "shards_skipped": skipped,
               "seconds": round(elapsed, 2), "images_per_s": round(todo / elapsed, 1) if elapsed and todo else None,
               "rejected_fraction": len(rejected) / max(len(members), 1)}
    write_bytes(fs, f"{root}/rejected.jsonl", "".join(json.dumps(r) + "\n" for r in rejected).encode())
    write_bytes(fs, f"{root}/summary.json", json.dumps(summary, indent=2).encode())
    return summary


def _identity_counts(splits: dict[str, list[str]], identities: dict[str, int], rejected: list[dict]) -> dict:
    """Per split: how many people and how many photos each (of the converted photos)."""
    dropped = {r["name"] for r in rejected}
    out = {}
    for split, names in splits.items():
        per = Counter(identities[PurePosixPath(n).stem] for n in names if n not in dropped)
        if per:
            out[split] = {"identities": len(per), "photos_min": min(per.values()), "photos_max": max(per.values())}
    return out


def _drop_stale_shards(fs, path: str, n: int) -> None:
    """Shards past the new count (an earlier run with smaller shards) would confuse a reader."""

    for info in fs.get_file_info(FileSelector(path)):
        name = info.base_name
        if name.startswith("part-") and name.endswith(".parquet") and int(name[5:10]) >= n:
            fs.delete_file(info.path)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        s = convert(a)
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"converted {s['converted']} of {s['inputs']} inputs ({s['counts']}); rejected {s['rejected']} "
          f"(see {a.out}/rejected.jsonl); {s['shards_skipped']} finished shards kept; "
          f"{s['images_per_s']} img/s")
    if s["rejected_fraction"] > a.max_rejected:
        print(f"error: {s['rejected_fraction']:.2%} of inputs rejected, above --max-rejected "
              f"{a.max_rejected:.2%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
