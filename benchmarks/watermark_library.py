"""The library mark at facegan's sizes: ``invisible-watermark``'s DWT-DCT-SVD on 64 px faces.

    pip install invisible-watermark==0.2.0 && python -m benchmarks.watermark_library

The library refuses images under 256x256, so the face is enlarged to 256 px (bicubic), marked
with 32 bits, and shrunk back to its size (area); reading enlarges it to 256 px again (and tries
the mirror image). The same faces and distortions as ``benchmarks.watermark``'s table (100
validation faces of the CelebA sample). Writes
``benchmarks/results/watermark/invisible-watermark.json``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks.watermark import DISTORTIONS, all_faces

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    try:
        from imwatermark import WatermarkDecoder, WatermarkEncoder
    except ImportError:
        print("error: needs invisible-watermark (pip install invisible-watermark==0.2.0)", file=sys.stderr)
        return 2
    faces = all_faces(ROOT / "data" / "celeba64" / "val")[:100]
    bits = np.random.default_rng(0).integers(0, 2, 32).tolist()
    rgb_bgr = cv2.COLOR_RGB2BGR

    def mark(f):
        up = cv2.resize(cv2.cvtColor(f, rgb_bgr), (256, 256), interpolation=cv2.INTER_CUBIC)
        e = WatermarkEncoder()
        e.set_watermark("bits", bits)
        return cv2.cvtColor(cv2.resize(e.encode(up, "dwtDctSvd"), f.shape[1::-1], interpolation=cv2.INTER_AREA),
                            cv2.COLOR_BGR2RGB)

    def read(img):
        up = cv2.resize(cv2.cvtColor(np.ascontiguousarray(img), rgb_bgr), (256, 256), interpolation=cv2.INTER_CUBIC)
        return np.array(WatermarkDecoder("bits", 32).decode(up, "dwtDctSvd"))

    try:
        mark_at_64 = WatermarkEncoder()
        mark_at_64.set_watermark("bits", bits)
        mark_at_64.encode(cv2.cvtColor(faces[0], rgb_bgr), "dwtDctSvd")
        at_64 = "accepted"
    except RuntimeError as e:
        at_64 = str(e)
    t = time.perf_counter()
    marked = [mark(f) for f in faces]
    res = {"method": "invisible-watermark 0.2.0 dwtDctSvd, 32 bits, marked at 256 px and shrunk to 64",
           "at_64_px": at_64, "seconds_per_face": round((time.perf_counter() - t) / len(faces), 4),
           "psnr_db": round(float(np.mean([10 * np.log10(255 ** 2 / np.mean((m.astype(float) - f) ** 2))
                                           for m, f in zip(marked, faces)])), 2), "rows": []}
    rng = np.random.default_rng(0)
    for name, fn in DISTORTIONS.items():
        acc = []
        for m in marked:
            d = fn(m, rng)
            acc.append(max((read(d) == bits).mean(), (read(d[:, ::-1]) == bits).mean()))
        acc = np.array(acc)
        res["rows"].append({"distortion": name, "bit_accuracy": round(float(acc.mean()), 4),
                            "all_32_bits": round(float((acc == 1).mean()), 4), "n": len(acc)})
    out = ROOT / "benchmarks" / "results" / "watermark"
    out.mkdir(parents=True, exist_ok=True)
    (out / "invisible-watermark.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
