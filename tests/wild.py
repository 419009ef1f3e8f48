"""A folder of 50 ordinary photos made from the CelebA sample (tests/test_faces.py, the repair
tests): 30 single faces at other sizes, angles and places, 5 photos with two people side by side,
3 near-duplicates (a kept photo again at another size), 5 photos without a face, 4 broken image
files and 3 files that are not images."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.align import make_wild

EXPECTED = {"kept": 35, "no_face": 5, "faces_too_small": 0, "near_duplicate": 3, "unreadable": 4, "not_image": 3}


def sample_photos(zip_path: Path, n: int, start: int = 0) -> list[tuple[str, np.ndarray]]:
    z = zipfile.ZipFile(zip_path)
    names = sorted(m for m in z.namelist() if m.endswith(".jpg"))[start:start + n]
    return [(Path(m).stem, np.asarray(Image.open(io.BytesIO(z.read(m))).convert("RGB"))) for m in names]


def save(path: Path, img: np.ndarray, fmt: str = "JPEG") -> None:
    Image.fromarray(img).save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def build(out: Path, zip_path: Path) -> dict[str, np.ndarray]:
    """Writes the folder; returns the 30 single-face originals by file stem."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    photos = sample_photos(zip_path, 40, start=3000)
    singles = {}
    for i, (stem, photo) in enumerate(photos[:30]):
        wild, _ = make_wild(photo, rng)
        save(out / f"single_{stem}.{'png' if i % 5 == 0 else 'jpg'}", wild, "PNG" if i % 5 == 0 else "JPEG")
        singles[stem] = photo
    for i in range(5):  # two people: one larger than the other
        (_, a), (_, b) = photos[30 + 2 * i], photos[31 + 2 * i]
        b = np.asarray(Image.fromarray(b).resize((134, 164)))
        canvas = np.full((240, 340, 3), 128, np.uint8)
        canvas[10:228, 10:188], canvas[40:204, 200:334] = a, b
        save(out / f"pair_{i}.jpg", canvas)
    for i, (stem, photo) in enumerate(photos[:3]):  # the same photo again, larger and re-encoded
        save(out / f"again_{stem}.jpg", np.asarray(Image.fromarray(photo).resize((267, 327), Image.BICUBIC)))
    for i in range(5):  # no face: gradients, noise, a smooth "landscape"
        y, x = np.mgrid[0:200, 0:300]
        img = np.stack([(x + 40 * i) % 256, (y * 2) % 256, np.full_like(x, 60 * i % 256)], -1).astype(np.uint8)
        if i % 2:
            img = rng.integers(0, 256, (180, 240, 3), dtype=np.uint8)
        save(out / f"scene_{i}.jpg", img)
    good = (out / f"single_{photos[1][0]}.jpg").read_bytes()
    (out / "broken_truncated.jpg").write_bytes(good[: len(good) // 3])
    (out / "broken_empty.jpg").write_bytes(b"")
    (out / "broken_text.png").write_text("not a picture\n")
    (out / "broken_random.jpeg").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (out / "notes.txt").write_text("holiday photos\n")
    (out / "index.html").write_text("<html></html>\n")
    (out / "thumbs.db").write_bytes(b"\x00" * 64)
    return singles
