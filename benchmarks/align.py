"""The aligner (datasets/align.py) against the CelebA converter's crop, on the same photos.

    python -m benchmarks.align [--n 600] [--template]   # --template: recompute TEMPLATE from all photos

Each sample photo (already aligned by CelebA) is made "wild": scaled by 0.5-3x, rotated by up
to ±20°, placed at a random spot of a larger canvas and saved as JPEG 90. The aligner then finds
the face in the wild photo and crops it. Its error is where the photo's 5 landmarks land in the
aligner's crop against where they sit in the CelebA converter's crop of the original, in pixels
of a 64 px face (and as a fraction of the distance between the eyes). The landmarks are found
once, in the original photo, and carried through the known wild transform, so the error is the
aligner's alone: its detection on the wild photo plus CelebA's own spread around the mean.

Writes ``benchmarks/results/align/align.json`` and ``side-by-side.png`` (per row: the CelebA
crop, the aligner's crop of the wild photo, the wild photo).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from datasets.align import CROP, Aligner
from datasets.celeba import DEFAULT_CROP

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "celeba-sample" / "img_align_celeba.zip"


def photos(zip_path: Path, n: int):
    z = zipfile.ZipFile(zip_path)
    names = sorted(m for m in z.namelist() if m.endswith(".jpg"))
    step = max(1, len(names) // n) if n else 1
    for name in names[::step][:n or None]:
        yield name, np.asarray(Image.open(io.BytesIO(z.read(name))).convert("RGB"))


def celeba_landmarks(aligner: Aligner, photo: np.ndarray) -> np.ndarray | None:
    boxes = aligner.boxes(photo)
    if not boxes:
        return None
    box = max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
    return aligner.landmarks(photo, box)


def make_wild(photo: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """-> (the wild photo, the 2x3 map from the original's pixels to it)."""
    h, w = photo.shape[:2]
    s, angle = rng.uniform(0.5, 3.0), rng.uniform(-20, 20)
    cw, ch = int(w * s * 1.6) + 40, int(h * s * 1.6) + 40
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, s)
    m[:, 2] += [rng.uniform(0.3, 0.7) * cw - w / 2, rng.uniform(0.3, 0.7) * ch - h / 2]
    bg = np.full((ch, cw, 3), rng.integers(40, 220, 3), np.uint8)
    wild = cv2.warpAffine(photo, m, (cw, ch), flags=cv2.INTER_CUBIC, dst=bg, borderMode=cv2.BORDER_TRANSPARENT)
    buf = io.BytesIO()
    Image.fromarray(wild).save(buf, "JPEG", quality=90)
    return np.asarray(Image.open(buf).convert("RGB")), m


def apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


def landmark_error(aligner: Aligner, photo: np.ndarray, rng: np.random.Generator, size: int = 64):
    """(error in px at ``size``, error / eye distance, celeba crop, aligned crop, wild photo), or
    None when a detector misses the face."""
    p = celeba_landmarks(aligner, photo)
    if p is None:
        return None
    wild, m = make_wild(photo, rng)
    faces, _ = aligner(wild)
    if not faces:
        return None
    want = (p - DEFAULT_CROP[:2]) * (size / CROP)
    got = apply(faces[0].matrix, apply(m, p)) * (size / aligner.size)
    err = np.linalg.norm(got - want, axis=1).mean()
    eyes = np.linalg.norm(want[[0, 1]].mean(0) - want[[2, 3]].mean(0))
    x0, y0, x1, y1 = DEFAULT_CROP
    ref = np.asarray(Image.fromarray(photo[y0:y1, x0:x1]).resize((size, size), Image.LANCZOS))
    return float(err), float(err / eyes), ref, faces[0].image, wild


def template(aligner: Aligner, zip_path: Path, n: int) -> tuple[np.ndarray, int, int]:
    pts, miss = [], 0
    for _, photo in photos(zip_path, n):
        p = celeba_landmarks(aligner, photo)
        if p is None:
            miss += 1
            continue
        pts.append((p - DEFAULT_CROP[:2]) / CROP)
    return np.mean(pts, 0), len(pts), miss


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default=str(SAMPLE), help="img_align_celeba.zip")
    p.add_argument("--n", type=int, default=600, help="photos made wild and aligned")
    p.add_argument("--template", action="store_true", help="also recompute TEMPLATE over every photo")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "align"))
    a = p.parse_args(argv)
    if not Path(a.src).is_file():
        print(f"error: --src {a.src}: no such file (the CelebA sample's img_align_celeba.zip)", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    aligner = Aligner(CROP, min_face=20)
    result = {}
    if a.template:
        t0 = time.perf_counter()
        mean, used, miss = template(aligner, Path(a.src), 0)
        result["template"] = {"points": np.round(mean, 4).tolist(), "photos": used, "missed": miss,
                              "seconds": round(time.perf_counter() - t0, 1)}
        print("TEMPLATE =", np.round(mean, 4).tolist())
    rng = np.random.default_rng(0)
    errs, rel, rows, missed = [], [], [], 0
    t0 = time.perf_counter()
    for _, photo in photos(Path(a.src), a.n):
        r = landmark_error(aligner, photo, rng)
        if r is None:
            missed += 1
            continue
        errs.append(r[0])
        rel.append(r[1])
        if len(rows) < 8:
            wild = np.asarray(Image.fromarray(r[4]).resize((64, 64), Image.LANCZOS))
            rows.append(np.concatenate([r[2], r[3] if r[3].shape[0] == 64 else
                                        np.asarray(Image.fromarray(r[3]).resize((64, 64), Image.LANCZOS)), wild], 1))
    e = np.array(errs)
    result |= {"photos": a.n, "aligned": len(errs), "missed": missed, "size": 64,
               "landmark_error_px": {"mean": round(float(e.mean()), 3), "median": round(float(np.median(e)), 3),
                                     "p95": round(float(np.quantile(e, 0.95)), 3)},
               "landmark_error_over_eye_distance": round(float(np.mean(rel)), 4),
               "seconds_per_photo": round((time.perf_counter() - t0) / a.n, 3),
               "reference": "the CelebA converter's crop box (25, 50, 153, 178), Lanczos to 64 px"}
    Image.fromarray(np.concatenate(rows, 0)).resize((64 * 3 * 2, 64 * len(rows) * 2), Image.NEAREST) \
        .save(out / "side-by-side.png")
    (out / "align.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
