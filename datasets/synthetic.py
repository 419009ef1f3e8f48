"""Procedural faces drawn with Pillow: the embedded default data and the test data.

Each face is a pure function of (seed, index), so a set is reproducible and can be drawn in
parallel. Faces vary in head shape, skin tone, eyes (colour, spacing, size), brows, nose,
mouth (smile/neutral/open), hair (style and colour), ears, glasses and background.

    python -m datasets.synthetic --out data/generated64 --count 10000 --size 64
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from datasets.shards import MANIFEST, ShardSet, ShardWriter

SKIN = [(255, 224, 196), (241, 194, 160), (224, 172, 105), (198, 134, 66), (141, 85, 36), (94, 60, 40)]
HAIR = [(20, 15, 10), (60, 40, 25), (110, 75, 40), (170, 130, 70), (225, 200, 140), (150, 150, 150),
        (160, 50, 30)]
IRIS = [(70, 45, 25), (40, 90, 140), (60, 110, 70), (100, 100, 110)]
SCALE = 4  # drawn at 4x and downsampled: antialiased edges without per-shape AA


def _jit(rng: np.random.Generator, rgb, amount: int = 18):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def draw_face(index: int, size: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng([seed, index])
    S = size * SCALE
    u = S / 100.0  # drawing unit: coordinates below are in percent of the canvas
    bg_a, bg_b = rng.integers(30, 230, 3), rng.integers(30, 230, 3)
    grad = np.linspace(0, 1, S)[:, None, None]
    bg = (bg_a * (1 - grad) + bg_b * grad).astype(np.uint8).repeat(S, axis=1)
    img = Image.fromarray(bg, "RGB")
    d = ImageDraw.Draw(img)

    cx = 50 + rng.uniform(-4, 4)
    cy = 54 + rng.uniform(-3, 3)
    fw, fh = rng.uniform(26, 36), rng.uniform(34, 42)  # head half-width/height
    skin = _jit(rng, SKIN[rng.integers(len(SKIN))])
    hair = _jit(rng, HAIR[rng.integers(len(HAIR))], 10)
    style = rng.integers(4)  # 0 short, 1 long, 2 bald, 3 bun

    def box(x0, y0, x1, y1):
        return [x0 * u, y0 * u, x1 * u, y1 * u]

    if style == 1:  # long hair falls behind the head
        d.rounded_rectangle(box(cx - fw - 6, cy - fh - 4, cx + fw + 6, cy + fh + 12), radius=20 * u, fill=hair)
    d.rectangle(box(cx - fw * 0.45, cy + fh * 0.7, cx + fw * 0.45, 100), fill=_jit(rng, skin, 8))  # neck
    for side in (-1, 1):  # ears
        ex = cx + side * fw
        d.ellipse(box(ex - 4, cy - 6, ex + 4, cy + 6), fill=skin)
    d.ellipse(box(cx - fw, cy - fh, cx + fw, cy + fh), fill=skin)
    if style != 2:
        top = cy - fh - rng.uniform(2, 6)
        d.chord(box(cx - fw - 2, top, cx + fw + 2, cy + fh * 0.2), 180, 360, fill=hair)
        if style == 3:
            d.ellipse(box(cx - 9, top - 12, cx + 9, top + 4), fill=hair)

    eye_y = cy - fh * rng.uniform(0.05, 0.2)
    eye_dx, eye_r = fw * rng.uniform(0.35, 0.5), rng.uniform(3.5, 6)
    iris = _jit(rng, IRIS[rng.integers(len(IRIS))], 15)
    brow_tilt = rng.uniform(-3, 3)
    for side in (-1, 1):
        ex = cx + side * eye_dx
        d.ellipse(box(ex - eye_r, eye_y - eye_r * 0.6, ex + eye_r, eye_y + eye_r * 0.6), fill=(245, 245, 245))
        ir = eye_r * 0.5
        d.ellipse(box(ex - ir, eye_y - ir, ex + ir, eye_y + ir), fill=iris)
        d.ellipse(box(ex - ir / 2, eye_y - ir / 2, ex + ir / 2, eye_y + ir / 2), fill=(10, 10, 10))
        by = eye_y - eye_r - rng.uniform(2, 4)
        d.line(box(ex - eye_r, by + side * brow_tilt * 0.3, ex + eye_r, by - side * brow_tilt * 0.3),
               fill=tuple(int(c * 0.8) for c in hair), width=max(1, int(rng.uniform(1.2, 2.5) * u)))

    nose_len = fh * rng.uniform(0.25, 0.4)
    shade = tuple(int(c * 0.8) for c in skin)
    if rng.random() < 0.5:
        d.line(box(cx, eye_y + 2, cx + rng.uniform(-2, 2), eye_y + nose_len), fill=shade, width=max(1, int(u)))
    else:
        nw = rng.uniform(2.5, 5)
        d.polygon([(cx * u, (eye_y + 2) * u), ((cx - nw) * u, (eye_y + nose_len) * u),
                   ((cx + nw) * u, (eye_y + nose_len) * u)], fill=shade)

    my, mw = eye_y + nose_len + fh * rng.uniform(0.2, 0.3), fw * rng.uniform(0.3, 0.5)
    lips = _jit(rng, (170, 70, 70), 25)
    mouth = rng.integers(3)
    if mouth == 0:  # smile
        d.arc(box(cx - mw, my - 6, cx + mw, my + 4), 20, 160, fill=lips, width=max(1, int(1.8 * u)))
    elif mouth == 1:  # neutral
        d.line(box(cx - mw, my, cx + mw, my), fill=lips, width=max(1, int(1.8 * u)))
    else:  # open
        d.ellipse(box(cx - mw * 0.6, my - 2.5, cx + mw * 0.6, my + 3), fill=(90, 20, 30), outline=lips,
                  width=max(1, int(u)))

    if rng.random() < 0.25:  # glasses
        frame = tuple(int(c) for c in rng.integers(0, 80, 3))
        gr = eye_r * 1.7
        for side in (-1, 1):
            ex = cx + side * eye_dx
            d.ellipse(box(ex - gr, eye_y - gr * 0.8, ex + gr, eye_y + gr * 0.8), outline=frame,
                      width=max(1, int(1.2 * u)))
        d.line(box(cx - eye_dx + gr, eye_y, cx + eye_dx - gr, eye_y), fill=frame, width=max(1, int(u)))

    return np.asarray(img.resize((size, size), Image.LANCZOS), dtype=np.uint8)


def _draw_chunk(args: tuple[int, int, int, int]) -> np.ndarray:
    start, stop, size, seed = args
    return np.stack([draw_face(i, size, seed) for i in range(start, stop)])


def write_generated(out: str | Path, count: int, size: int, seed: int = 0, workers: int | None = None,
                    row_group_size: int = 256, start: int = 0) -> dict:
    """Draws faces ``start .. start + count - 1`` into a shard set at ``out`` (in parallel,
    reproducibly; face i depends only on (i, seed), so disjoint ranges are disjoint sets)."""
    workers = workers or os.cpu_count() or 1
    writer = ShardWriter(out, size, row_group_size=row_group_size,
                         extra={"source": "generated", "seed": seed, "start": start})
    chunk = 500
    jobs = [(s, min(s + chunk, start + count), size, seed) for s in range(start, start + count, chunk)]
    with ProcessPoolExecutor(workers) as pool:
        for (start, _, _, _), faces in zip(jobs, pool.map(_draw_chunk, jobs)):
            for j, face in enumerate(faces):
                writer.add(f"gen-{seed}-{start + j:07d}", face)
    return writer.close()


def ensure_generated(out: str | Path, count: int, size: int, seed: int = 0, heldout: int = 0) -> ShardSet:
    """The generated set at ``out``, drawn first if it is not there (or is not what is asked).
    With ``heldout`` > 0 and ``out`` named ``train``, also a ``val`` set beside it: the next
    ``heldout`` faces, none of them a training face."""
    out = Path(out)
    if heldout > 0 and out.name == "train":
        _ensure(out.parent / "val", heldout, size, seed, start=count)
    return _ensure(out, count, size, seed, start=0)


def _ensure(out: Path, count: int, size: int, seed: int, start: int) -> ShardSet:
    if (out / MANIFEST).is_file():
        shards = ShardSet(out)
        m = shards.manifest
        if m.get("source") == "generated" and m["image_size"] == size and m["count"] == count \
                and m.get("seed") == seed and m.get("start", 0) == start:
            return shards
        raise ValueError(f"{out}: holds a different shard set (size {m['image_size']}, count {m['count']}, "
                         f"seed {m.get('seed')}, source {m.get('source')}); point data.path elsewhere or remove it")
    write_generated(out, count, size, seed, start=start)
    return ShardSet(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=10_000)
    p.add_argument("--size", type=int, choices=(64, 128), default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--preview", help="also write an 8x8 PNG grid of the first 64 faces here")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    m = write_generated(a.out, a.count, a.size, a.seed, a.workers)
    dt = time.perf_counter() - t0
    print(f"wrote {m['count']} faces at {a.size}px to {a.out} in {dt:.1f}s ({m['count'] / dt:.0f} faces/s)")
    if a.preview:
        faces = np.stack([draw_face(i, a.size, a.seed) for i in range(64)])
        grid = faces.reshape(8, 8, a.size, a.size, 3).transpose(0, 2, 1, 3, 4).reshape(8 * a.size, 8 * a.size, 3)
        Image.fromarray(grid).save(a.preview)
    return 0


if __name__ == "__main__":
    sys.exit(main())
