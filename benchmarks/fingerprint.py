"""The learned fingerprint (Yu et al. 2021): does a generator trained on marked faces draw marked faces?

    python -m benchmarks.fingerprint --make                      # data/celeba64-fp: every training face marked
    python -m benchmarks.quality --variants faces64 --data data/celeba64-fp --keep runs/fp --jsonl runs/fp/q.jsonl
    python -m benchmarks.fingerprint --read runs/fp/faces64-seed0.pt   # the generator's faces, read

``--make`` marks every face of the sample's 64 px training split with one payload (the
provenance mark, evaluation/watermark.py) and copies the validation split, so that the quality
protocol trains on it unchanged. ``--read`` draws ``--n`` faces on the evaluation's latents and
reads them: bit accuracy against the payload, and how many are detected with it. If the
generator reproduces the mark, even its raw tensor output is marked, whoever samples it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from datasets.shards import ShardSet, ShardWriter
from evaluation.watermark import Watermark, message_of
from jobs.repair import load_pair
from jobs.specs import sample_faces

ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = "f1f1"


def make(src: Path, out: Path) -> None:
    wm, s = Watermark(), ShardSet(src / "train")
    w = ShardWriter(out / "train", s.image_size, "png", rows_per_shard=2048, row_group_size=256)
    for rg in s.row_groups:
        faces = s.read(rg)
        for i, face in zip(range(len(faces)), wm.mark(faces, PAYLOAD)):
            w.add(f"{rg.file}-{rg.index}-{i}", face)
    w.close({"fingerprint": PAYLOAD})
    shutil.copytree(src / "val", out / "val", dirs_exist_ok=True)
    print(f"marked {s.count} training faces with {PAYLOAD} into {out}")


def read(spec: str, n: int) -> dict:
    G = load_pair(spec).G
    faces = np.concatenate(list(sample_faces(G, n, 0, 100, "cpu")))
    wm = Watermark()
    probs = wm.bits(faces)
    acc = float(((probs > 0.5) == message_of(PAYLOAD)).mean())
    found = np.mean([r.marked and r.source_id == PAYLOAD for r in wm.read(faces)])
    return {"model": spec, "payload": PAYLOAD, "n": n, "bit_accuracy": round(acc, 4), "detected": round(float(found), 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--make", action="store_true")
    p.add_argument("--read", metavar="CHECKPOINT")
    p.add_argument("--src", default=str(ROOT / "data" / "celeba64"))
    p.add_argument("--out", default=str(ROOT / "data" / "celeba64-fp"))
    p.add_argument("--n", type=int, default=500)
    a = p.parse_args(argv)
    if a.make:
        make(Path(a.src), Path(a.out))
    if a.read:
        print(json.dumps(read(a.read, a.n)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
