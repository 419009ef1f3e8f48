"""Ordinary photos (a folder, a zip or an object-store prefix) -> aligned faces in shards.

    python -m datasets.faces --src photos/ --out data/myfaces --size 64 \\
        [--faces largest|all] [--detector hog|cnn] [--min-face 40] [--val-fraction 0.1] \\
        [--near-duplicate 4] [--workers N]
    python -m datasets.faces --src s3://bucket/photos --out s3://bucket/faces64 --size 64

Each photo is decoded (EXIF orientation applied, any mode to RGB), its faces found and aligned
by datasets/align.py to the CelebA converter's crop (so a model sees the same geometry from
either converter), and each kept face encoded into ``OUT/train/`` (and ``OUT/val/`` with
``--val-fraction``: a stable hash of the file name decides; photos of one person under several
names can land on both sides). Writes ``OUT/summary.json`` and ``OUT/rejected.jsonl`` (every
photo or face left out, with the reason). Every input file ends in exactly one of the summary's
``photos`` outcomes, and their sum is ``inputs``:

- ``kept``: at least one face stored;
- ``no_face``: the detector found none; ``faces_too_small``: only faces narrower than
  ``--min-face`` px;
- ``near_duplicate``: each of its faces looks like a face already kept (``thumbnail``: cosine of
  16 px grey signatures >= ``--near-duplicate``): the same photo at another size or encoding, or
  frames of one pose. 0 turns the check off;
- ``unreadable``: not decodable (truncated, empty, not an image inside); ``not_image``: a file
  without an image extension.

With ``--faces largest`` (the default) a photo gives its largest face and the others are counted
in ``faces.extra_dropped``; with ``all`` every face is kept (ids ``<stem>``, ``<stem>_1``, ...).

Like the CelebA converter: one process per core, a progress bar, and a rerun after an
interruption keeps every finished shard (its footer records what it was made from; the
near-duplicate check reads its faces back) and redoes the rest; manifests are written last.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
import zipfile
from collections import Counter
from multiprocessing import get_context
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageOps
from pyarrow.fs import FileSelector, FileType
from tqdm import tqdm

from datasets.align import DETECTORS, TEMPLATE, AlignError, Aligner
from datasets.celeba import _drop_stale_shards, _finished
from datasets.shards import ENCODINGS, MANIFEST, ShardError, ShardWriter, decode, encode, ensure_dir, is_file, \
    is_uri, open_fs, sha256_file, shard_name, write_bytes

IMAGE_EXT = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
OUTCOMES = ("kept", "no_face", "faces_too_small", "near_duplicate", "unreadable", "not_image")
CHUNK = 16  # photos per worker task
Image.MAX_IMAGE_PIXELS = 120_000_000  # larger than any camera; above it Pillow calls it a bomb


class Source:
    """A folder, a zip or an object-store prefix, read file by file."""

    def __init__(self, src: str):
        self.src, self.zip, self.fs = src, None, None
        if is_uri(src):
            self.fs, self.root = open_fs(src)
            if self.fs.get_file_info(self.root).type == FileType.NotFound and not self._listing():
                raise ShardError(f"--src {src}: no such prefix (or nothing under it)")
        elif Path(src).is_file():
            try:
                self.zip = zipfile.ZipFile(src)
            except zipfile.BadZipFile:
                raise ShardError(f"--src {src}: not a zip file (expected a folder, a zip or s3://bucket/prefix)") from None
        elif not Path(src).is_dir():
            raise ShardError(f"--src {src}: no such file or folder")

    def _listing(self) -> list[str]:
        infos = self.fs.get_file_info(FileSelector(self.root, recursive=True, allow_not_found=True))
        return sorted(i.path[len(self.root) + 1:] for i in infos if i.type == FileType.File)

    def members(self) -> list[str]:
        if self.fs is not None:
            return self._listing()
        if self.zip is not None:
            return sorted(i.filename for i in self.zip.infolist() if not i.is_dir())
        root = Path(self.src)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def read(self, name: str) -> bytes:
        if self.fs is not None:
            with self.fs.open_input_stream(f"{self.root}/{name}") as f:
                return f.read()
        return self.zip.read(name) if self.zip is not None else (Path(self.src) / name).read_bytes()


def thumbnail(face: np.ndarray) -> np.ndarray:
    """The near-duplicate signature: a 16x16 grey thumbnail (box filter), mean removed, unit length.
    Two faces whose signatures' cosine is at least ``--near-duplicate`` count as one. Measured
    (python -m benchmarks.align's wild copies; the sample's 64 px faces): the same photo aligned
    from two copies at other scales, angles and places scores >= 0.97 in 87% of cases (>= 0.95 in
    95%); of 3,000 CelebA faces 3.3% have a twin >= 0.97, frames of one pose from one shoot. Hashes
    do worse on aligned faces, which share their layout: a 64-bit difference hash puts 6% of
    different people within 4 bits of each other."""
    g = np.asarray(Image.fromarray(face).convert("L").resize((16, 16), Image.BOX), np.float32).ravel()
    g -= g.mean()
    return g / max(float(np.linalg.norm(g)), 1e-6)


def read_photo(data: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    im.load()
    return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


_SOURCE: Source | None = None
_ALIGNER: Aligner | None = None


def _init_worker(src: str, size: int, detector: str, min_face: int) -> None:
    global _SOURCE, _ALIGNER
    _SOURCE, _ALIGNER = Source(src), Aligner(size, detector, min_face)


def look(name: str, data: bytes, opts: dict) -> dict:
    """One photo -> {"name", "outcome" (before the near-duplicate check), faces: [(blob, signature)], ...}."""
    out = {"name": name, "faces": [], "extra": 0, "small": 0, "outside": 0}
    if PurePosixPath(name).suffix.lower() not in IMAGE_EXT:
        return out | {"outcome": "not_image", "reason": "not an image file (extension)"}
    try:
        photo = read_photo(data)
    except Exception as e:  # Pillow raises many types for bad files; all mean "unreadable"
        return out | {"outcome": "unreadable", "reason": f"unreadable image: {type(e).__name__}: {str(e)[:120]}"}
    found, small = _ALIGNER(photo)
    keep = found if opts["faces"] == "all" else found[:1]
    out |= {"extra": len(found) - len(keep), "small": small, "outside": sum(f.outside > 0.1 for f in keep),
            "faces": [_stored(f.image, opts) for f in keep]}
    if keep:
        return out | {"outcome": "kept"}
    if small:
        return out | {"outcome": "faces_too_small", "reason": f"{small} face(s) narrower than --min-face {opts['min_face']} px"}
    return out | {"outcome": "no_face", "reason": "no face found"}


def _stored(face: np.ndarray, opts: dict) -> tuple[bytes, np.ndarray]:
    """The encoded face and the signature of what a reader will decode (a rerun recomputes it from the shard)."""
    blob = encode(face, opts["encoding"], opts["quality"])
    return blob, thumbnail(decode(blob))


def _work(task: tuple) -> tuple:
    key, names, opts = task
    return key, [look(n, _SOURCE.read(n), opts) for n in names]


class NearDuplicates:
    """Kept faces' signatures; ``seen(v)`` -> the id of a kept face at cosine >= ``threshold``, else None."""

    def __init__(self, threshold: float):
        self.threshold, self.vectors, self.ids = threshold, np.zeros((0, 256), np.float32), []

    def add(self, ids: list[str], vectors) -> None:
        self.vectors = np.concatenate([self.vectors, np.asarray(vectors, np.float32).reshape(-1, 256)])
        self.ids += ids

    def seen(self, v: np.ndarray) -> str | None:
        if self.threshold <= 0 or not len(self.vectors):
            return None
        c = self.vectors @ v
        i = int(c.argmax())
        return self.ids[i] if c[i] >= self.threshold else None


def split_of(name: str, val_fraction: float) -> str:
    h = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big") / 2**64
    return "val" if h < val_fraction else "train"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="a folder, a zip or s3://bucket/prefix of photos")
    p.add_argument("--out", required=True, help="a folder or s3://bucket/prefix")
    p.add_argument("--size", type=int, choices=(64, 128), required=True)
    p.add_argument("--faces", choices=("largest", "all"), default="largest", help="faces kept per photo")
    p.add_argument("--detector", choices=DETECTORS, default="hog",
                   help="dlib's HOG detector (fast, frontal faces) or its CNN (slower, more poses)")
    p.add_argument("--min-face", type=int, default=40, help="narrower faces (detector box, px) are left out")
    p.add_argument("--near-duplicate", type=float, default=0.97,
                   help="signature cosine at which a face counts as a near-duplicate of a kept one (0: off)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="photos that go to OUT/val (by name hash)")
    p.add_argument("--encoding", choices=ENCODINGS, default="jpeg")
    p.add_argument("--quality", type=int, default=95)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rows-per-shard", type=int, default=2048, help="input photos per shard")
    p.add_argument("--row-group-size", type=int, default=256)
    a = p.parse_args(argv)
    if not 0 <= a.val_fraction < 1:
        p.error(f"--val-fraction {a.val_fraction}: expected a fraction in [0, 1)")
    if a.min_face < 1 or a.workers < 1 or not 0 <= a.near_duplicate <= 1:
        p.error("--min-face and --workers must be >= 1, --near-duplicate in [0, 1]")
    return a


def convert(a) -> dict:
    source = Source(a.src)
    Aligner(a.size, a.detector, a.min_face)  # the models are there before any worker starts
    fs, root = open_fs(a.out)
    ensure_dir(fs, root)
    opts = {"size": a.size, "encoding": a.encoding, "quality": a.quality, "faces": a.faces, "detector": a.detector,
            "min_face": a.min_face, "near_duplicate": a.near_duplicate, "template": TEMPLATE.round(4).tolist()}
    members = source.members()
    splits = {"train": [], "val": []}
    for m in members:
        splits[split_of(m, a.val_fraction)].append(m)
    writers, order, tasks, done = {}, [], [], {}
    for split, names in splits.items():
        if not names:
            continue
        w = writers[split] = ShardWriter(f"{a.out}/{split}", a.size, a.encoding, a.rows_per_shard, a.row_group_size)
        if is_file(fs, f"{w.path}/{MANIFEST}"):
            fs.delete_file(f"{w.path}/{MANIFEST}")  # the set is unfinished again until the end
        for i in range(0, len(names), a.rows_per_shard):
            chunk, key = names[i:i + a.rows_per_shard], (split, i // a.rows_per_shard)
            meta = {**opts, "inputs": len(chunk), "first": chunk[0], "last": chunk[-1]}
            order.append((key, meta))
            got = _finished(fs, f"{w.path}/{shard_name(key[1])}", meta)
            if got is not None:
                done[key] = got
                w.entries[key[1]] = {"file": shard_name(key[1]), "rows": got["rows"],
                                     "sha256": sha256_file(fs, f"{w.path}/{shard_name(key[1])}")}
                continue
            tasks += [(key, chunk[j:j + CHUNK], opts) for j in range(0, len(chunk), CHUNK)]
    todo = sum(len(t[1]) for t in tasks)
    left = Counter(t[0] for t in tasks)
    near, outcomes, faces, rejected, results = NearDuplicates(a.near_duplicate), Counter(), Counter(), [], {}
    t0, at = time.perf_counter(), 0

    def settle(upto: int) -> None:
        """Shards in order: a finished one's signatures go in, a computed one is deduplicated and written."""
        nonlocal at
        while at < min(upto, len(order)):
            key, meta = order[at]
            if key in done:
                got = done[key]
                near.add(got["ids"], _signatures(writers[key[0]], key[1]))
            elif left[key] == 0 and key in results:
                got = _finish_shard(writers[key[0]], key[1], meta, results.pop(key), near)
            else:
                return
            outcomes.update(got["outcomes"])
            faces.update(got["face_counts"])
            rejected.extend(got["rejected"])
            at += 1

    ctx = get_context("spawn")  # dlib does not survive a fork well
    with ctx.Pool(a.workers, initializer=_init_worker, initargs=(a.src, a.size, a.detector, a.min_face)) as pool, \
            tqdm(total=todo, unit="photo", desc="aligning", disable=todo == 0) as bar:
        for key, looked in pool.imap(_work, tasks):
            results.setdefault(key, []).extend(looked)
            left[key] -= 1
            bar.update(len(looked))
            settle(len(order))
    settle(len(order))
    elapsed = time.perf_counter() - t0
    counts = {s: sum(e["rows"] for e in w.entries.values()) for s, w in writers.items()}
    for split, w in writers.items():
        _drop_stale_shards(fs, w.path, len(w.entries))
        w.close({"split": split, "source": "faces", "aligner": opts})
    photos = {k: outcomes.get(k, 0) for k in OUTCOMES}
    summary = {"inputs": len(members), "photos": photos, "kept_faces": sum(counts.values()), "counts": counts,
               "faces": {"extra_dropped": faces["extra"], "too_small": faces["small"],
                         "near_duplicate": faces["near"], "partly_outside": faces["outside"]},
               "shards_skipped": len(done), "seconds": round(elapsed, 2),
               "photos_per_s": round(todo / elapsed, 1) if elapsed and todo else None, "aligner": opts}
    assert sum(photos.values()) == len(members), (photos, len(members))
    write_bytes(fs, f"{root}/rejected.jsonl", "".join(json.dumps(r) + "\n" for r in rejected).encode())
    write_bytes(fs, f"{root}/summary.json", json.dumps(summary, indent=2).encode())
    return summary


def _finish_shard(w: ShardWriter, idx: int, meta: dict, looked: list[dict], near: NearDuplicates) -> dict:
    ids, blobs, rejected, outcomes, faces = [], [], [], Counter(), Counter()
    for r in looked:
        stem, kept = PurePosixPath(r["name"]).stem, 0
        for k, (blob, h) in enumerate(r["faces"]):
            face_id = stem if k == 0 else f"{stem}_{k}"
            twin = near.seen(h)
            if twin is not None:
                faces["near"] += 1
                rejected.append({"name": r["name"], "face": k, "reason": f"near-duplicate of {twin}"})
                continue
            near.add([face_id], [h])
            ids.append(face_id)
            blobs.append(blob)
            kept += 1
        outcome = r["outcome"] if r["outcome"] != "kept" or kept else "near_duplicate"
        outcomes[outcome] += 1
        faces.update({"extra": r["extra"], "small": r["small"], "outside": r["outside"]})
        if outcome not in ("kept", "near_duplicate"):
            rejected.append({"name": r["name"], "reason": r["reason"]})
        if r["extra"] and r["outcome"] == "kept":
            rejected.append({"name": r["name"], "reason": f"{r['extra']} smaller face(s) left out (--faces largest)"})
    got = {"rows": len(ids), "ids": ids, "rejected": rejected, "outcomes": dict(outcomes),
           "face_counts": dict(faces)}
    w.write_shard(idx, ids, blobs, {**meta, **got})
    return got


def _signatures(w: ShardWriter, idx: int) -> np.ndarray:
    """The signatures of a finished shard's faces, from the faces it stores."""
    table = pq.read_table(w.fs.open_input_file(f"{w.path}/{shard_name(idx)}"), columns=["image"])
    return np.array([thumbnail(decode(b.as_py())) for b in table.column("image")], np.float32).reshape(-1, 256)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        s = convert(a)
    except (ShardError, AlignError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    p = s["photos"]
    print(f"{s['kept_faces']} faces from {p['kept']} of {s['inputs']} files ({s['counts']}); "
          f"no face {p['no_face']}, faces too small {p['faces_too_small']}, near-duplicates {p['near_duplicate']}, "
          f"unreadable {p['unreadable']}, not images {p['not_image']}; extra faces left out "
          f"{s['faces']['extra_dropped']} (see {a.out}/summary.json, rejected.jsonl); {s['photos_per_s']} photos/s")
    if s["kept_faces"] == 0:
        print(f"error: no face kept from {a.src}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
