"""Is this face from facegan? Reads the provenance mark (evaluation/watermark.py).

    python -m jobs.verify face.png faces/ more/*.jpg

One line per image: the file, ``marked`` or ``unmarked``, the payload (the source id: the
first 4 hex digits of the run that made it, its ``facegan.watermark`` tag) and the confidence
(0: the bits are a coin toss, 1: certain); a file that is not a readable image gets
``unreadable`` and the reason. Then a summary line. Exit status: 0 when every image is marked,
1 when some are not, 2 when a path or file could not be read. Folders are read one level deep
(PNG, JPEG, WebP, BMP, TIFF). An image is read whole (shrunk to 64 px); when that finds no mark,
a grid of faces (``jobs.sample``'s ``grid.png``) is read face by face (marked when most are), and
another larger image has each face in it found and aligned (datasets/align.py, the privacy
extra) and read on its own: a photo with a repaired face pasted back in (``jobs.repair``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from datasets.align import Aligner
from evaluation.watermark import SIZE, Watermark, resized
from jobs.cli import Parser, write_json

SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def files_of(paths: list[str]) -> tuple[list[Path], list[str]]:
    found, missing = [], []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            missing.append(str(p))
    return found, missing


def load(path: Path) -> np.ndarray:
    im = Image.open(path)
    im.load()
    return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


_ALIGNER = []


def tiles(img: np.ndarray, pad: int = 2) -> np.ndarray | None:
    """The faces of a grid as gan/images.py draws it (S px tiles, ``pad`` px white borders), or None."""
    h, w = img.shape[:2]
    for size in (64, 128):
        step = size + pad
        if (h - pad) % step or (w - pad) % step or (h - pad) // step * ((w - pad) // step) < 2:
            continue
        cells = [img[pad + r * step: pad + r * step + size, pad + c * step: pad + c * step + size]
                 for r in range((h - pad) // step) for c in range((w - pad) // step)]
        cells = [c for c in cells if c.min() < 255]  # the grid's empty places are white
        if (img[:pad] == 255).all() and cells:
            return np.stack(cells)
    return None


def faces_in(img: np.ndarray) -> list:
    """The faces of a larger photo, aligned to the 64 px crop (needs the privacy extra; [] without it)."""
    if max(img.shape[:2]) <= 2 * SIZE:
        return []
    if not _ALIGNER:
        try:
            _ALIGNER.append(Aligner(SIZE, min_face=24))
        except Exception:  # dlib or its models missing: whole-image reading only
            _ALIGNER.append(None)
    return _ALIGNER[0](img)[0] if _ALIGNER[0] is not None else []


def main(argv: list[str] | None = None) -> int:
    p = Parser("jobs.verify", __doc__)
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--json", metavar="FILE", help="also write every reading to this JSON file")
    a = p.parse_args(argv)
    files, missing = files_of(a.images)
    for m in missing:
        print(f"{m}  unreadable  no such file or folder")
    wm = Watermark()
    rows, counts = [], {"marked": 0, "unmarked": 0, "unreadable": len(missing)}
    for f in files:
        try:
            img = load(f)
        except Exception as e:  # Pillow raises many types for bad files; all mean "unreadable"
            counts["unreadable"] += 1
            reason = f"not a readable image ({type(e).__name__})"
            rows.append({"file": str(f), "status": "unreadable", "reason": reason})
            print(f"{f}  unreadable  {reason}")
            continue
        r, where = wm.read(resized(img[None], SIZE))[0], ""
        if not r.marked and (cells := tiles(img)) is not None:  # a sample grid (jobs.sample's grid.png)
            readings = wm.read(resized(cells, SIZE))
            ids = [x.source_id for x in readings if x.marked]
            if ids and max(map(ids.count, ids)) * 2 > len(cells):
                best = max(set(ids), key=ids.count)
                r = next(x for x in readings if x.source_id == best)
                where = f"  ({ids.count(best)} of {len(cells)} faces of a grid)"
        elif not r.marked and (found := faces_in(img)):  # a photo with a marked face in it (jobs.repair's photos/)
            readings = wm.read(np.stack([f.image for f in found]))
            k = max(range(len(found)), key=lambda i: (readings[i].marked, readings[i].confidence))
            if readings[k].marked:
                r, where = readings[k], f"  (face at {found[k].box[0]},{found[k].box[1]})"
        status = "marked" if r.marked else "unmarked"
        counts[status] += 1
        rows.append({"file": str(f), "status": status, "source_id": r.source_id, "confidence": round(r.confidence, 3),
                     "mirrored": r.flipped})
        print(f"{f}  {status}  {r.source_id or '-'}  confidence {r.confidence:.2f}" + ("  (mirrored)" if r.flipped else "")
              + where)
    sources = sorted({r["source_id"] for r in rows if r.get("source_id")})
    total = len(files) + len(missing)
    print(f"{total} image(s): {counts['marked']} marked" + (f" (source {', '.join(sources)})" if sources else "")
          + f", {counts['unmarked']} unmarked, {counts['unreadable']} unreadable")
    if a.json:
        write_json(Path(a.json), {"counts": counts, "images": rows})
    if counts["unreadable"]:
        return 2
    return 0 if counts["unmarked"] == 0 and total else 1


if __name__ == "__main__":
    sys.exit(main())
