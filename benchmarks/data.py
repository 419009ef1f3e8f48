"""Shard read + decode speed per encoding, and the cores needed to feed a GPU.

    python -m benchmarks.data --size 128 [--src ../shared/data/celeba-sample/img_align_celeba.zip]
        [--target-img-s 5400]

Converts the first N faces of a CelebA zip (or procedural faces when no --src is given) into
a shard set per encoding in a temporary folder, then times reading + decoding every row group
on one core. Prints one JSON line per encoding: bytes per image on disk, decode img/s per
core, and cores needed for --target-img-s (default: the seed run's 40%-MFU target on one
H100-class GPU). Needs only pyarrow, pillow and numpy.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
import zipfile

import numpy as np
from PIL import Image

from datasets.celeba import DEFAULT_CROP
from datasets.shards import ENCODINGS, ShardSet, ShardWriter
from datasets.synthetic import draw_face


def _faces(src: str | None, n: int, size: int) -> list[np.ndarray]:
    if src is None:
        return [draw_face(i, size) for i in range(n)]
    z = zipfile.ZipFile(src)
    names = sorted(i.filename for i in z.infolist() if i.filename.endswith(".jpg"))[:n]
    out = []
    for name in names:
        im = Image.open(io.BytesIO(z.read(name))).convert("RGB").crop(DEFAULT_CROP)
        out.append(np.asarray(im.resize((size, size), Image.LANCZOS) if size != 128 else im))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, choices=(64, 128), default=128)
    p.add_argument("--src", default=None, help="img_align_celeba.zip (default: procedural faces)")
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--target-img-s", type=float, default=5400.0)
    p.add_argument("--encodings", default=",".join(ENCODINGS))
    a = p.parse_args(argv)
    faces = _faces(a.src, a.n, a.size)
    with tempfile.TemporaryDirectory() as tmp:
        for enc in a.encodings.split(","):
            out = os.path.join(tmp, enc)
            w = ShardWriter(out, a.size, enc, rows_per_shard=1024, row_group_size=256)
            t0 = time.perf_counter()
            for i, f in enumerate(faces):
                w.add(str(i), f)
            w.close()
            enc_s = time.perf_counter() - t0
            nbytes = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".parquet"))
            shards = ShardSet(out)
            t0 = time.perf_counter()
            rows = sum(len(shards.read(rg)) for rg in shards.row_groups)
            dec = rows / (time.perf_counter() - t0)
            print(json.dumps({
                "encoding": enc, "size": a.size, "source": "celeba" if a.src else "generated", "images": rows,
                "bytes_per_image": round(nbytes / rows), "raw_bytes_per_image": a.size * a.size * 3,
                "decode_img_per_s_per_core": round(dec), "encode_img_per_s_per_core": round(rows / enc_s),
                "cores_for_target": round(a.target_img_s / dec, 2), "target_img_per_s": a.target_img_s,
            }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
