"""Face repair on held-out people: latent search (jobs.repair) against OpenCV's inpainting.

    python -m benchmarks.repair --model runs/repair64/faces64-seed0.pt [--n 100] [--masks centre,lower,eyes]

Faces: the first ``--n`` of the CelebA sample's validation and test people (never trained on),
at the model's size. For each mask kind, each method fills the hole:

- ``latent+blend``: jobs.repair's latent search (gan/inpaint.py), Poisson-blended (OpenCV seamlessClone);
- ``latent``: the same generated pixels pasted into the hole, no blending;
- ``telea``, ``navier-stokes``: OpenCV's ``cv2.inpaint`` (radius 5), the classic baselines;
- ``masked``: the hole left grey (the floor).

Per face: PSNR and SSIM inside the hole against the original (torchmetrics; SSIM is its map
averaged over the hole's pixels), the identity distance between the repaired face and the
original (dlib's face matcher, evaluation/faceid.py: cosine distance of unit vectors) and
whether it is under the same-person threshold (calibrated on the held-out people: the distance
within which 1% of pairs of different people fall, FMR 1%), and seconds per face. Appends a row
per (mask, method) to ``--jsonl`` and writes a sheet per mask under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from datasets.shards import ShardSet
from evaluation.faceid import DlibFaceID, embed_shards
from gan.images import grid
from gan.inpaint import SearchConfig, named_mask
from jobs.repair import load_pair, masked_view, repair

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("latent+blend", "latent", "telea", "navier-stokes", "masked")


def heldout(data: Path, n: int, cache: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    faces, ids, vecs = [], [], []
    matcher = DlibFaceID()
    for split in ("val", "test"):
        s = ShardSet(data / split)
        faces.append(np.concatenate([s.read(rg) for rg in s.row_groups]))
        ids.append(s.identities())
        vecs.append(embed_shards(s, matcher, cache))
    faces, ids, vecs = np.concatenate(faces), np.concatenate(ids), np.concatenate(vecs)
    pick = np.linspace(0, len(faces) - 1, n).round().astype(int)  # spread over the people
    return faces, ids, vecs, pick


def same_person_threshold(vecs: np.ndarray, ids: np.ndarray, fmr: float = 0.01) -> float:
    d = 1 - vecs @ vecs.T
    other = ids[:, None] != ids[None, :]
    return float(np.quantile(d[other], fmr))


def hole_scores(out: np.ndarray, ref: np.ndarray, holes: np.ndarray) -> tuple[list[float], list[float]]:
    o = torch.from_numpy(out).permute(0, 3, 1, 2).float()
    r = torch.from_numpy(ref).permute(0, 3, 1, 2).float()
    _, ssim_map = structural_similarity_index_measure(o, r, data_range=255.0, reduction="none", return_full_image=True)
    psnr, ssim = [], []
    for i, h in enumerate(torch.from_numpy(holes)):
        hh = h.expand(3, -1, -1)
        psnr.append(float(peak_signal_noise_ratio(o[i][hh], r[i][hh], data_range=255.0)))
        ssim.append(float(ssim_map[i][hh].mean()))
    return psnr, ssim


def opencv(faces: np.ndarray, holes: np.ndarray, flag: int) -> np.ndarray:
    return np.stack([cv2.inpaint(f, h.astype(np.uint8) * 255, 5, flag) for f, h in zip(faces, holes)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a training checkpoint (G and D), as jobs.repair takes")
    p.add_argument("--data", default=str(ROOT / "data" / "celeba64"), help="shards with val/ and test/ (identities)")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--masks", default="centre,lower,eyes")
    p.add_argument("--steps", type=int, default=SearchConfig.steps)
    p.add_argument("--restarts", type=int, default=1)
    p.add_argument("--lam", type=float, default=SearchConfig.lam)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache", default=str(ROOT / "runs" / "feature_cache"), help="face-vector cache")
    p.add_argument("--jsonl", default=str(ROOT / "benchmarks" / "results" / "repair.jsonl"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "repair"))
    a = p.parse_args(argv)
    pair = load_pair(a.model)
    t0 = time.perf_counter()
    faces_all, ids_all, all_v, pick = heldout(Path(a.data), a.n, a.cache)
    if faces_all.shape[1] != pair.size:
        print(f"error: --data {a.data}: {faces_all.shape[1]} px faces, the model makes {pair.size} px", file=sys.stderr)
        return 2
    faces = faces_all[pick]
    matcher = DlibFaceID()
    threshold = same_person_threshold(all_v, ids_all)
    ref_v = all_v[pick]
    print(f"same-person threshold {threshold:.4f} (FMR 1% over {len(faces_all)} held-out faces, "
          f"{time.perf_counter() - t0:.0f} s)", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = SearchConfig(steps=a.steps, lam=a.lam, restarts=a.restarts)
    for kind in a.masks.split(","):
        holes = np.stack([named_mask(kind, pair.size, seed=i).numpy() for i in range(len(faces))])
        results, seconds = {}, {}
        t = time.perf_counter()
        results["latent+blend"], generated, _ = repair(pair, faces, holes, cfg, 0, a.device)
        seconds["latent+blend"] = seconds["latent"] = (time.perf_counter() - t) / len(faces)
        results["latent"] = np.where(holes[..., None], generated, faces)
        for name, flag in (("telea", cv2.INPAINT_TELEA), ("navier-stokes", cv2.INPAINT_NS)):
            t = time.perf_counter()
            results[name] = opencv(faces, holes, flag)
            seconds[name] = (time.perf_counter() - t) / len(faces)
        results["masked"], seconds["masked"] = np.stack([masked_view(f, h) for f, h in zip(faces, holes)]), 0.0
        for name in METHODS:
            psnr, ssim = hole_scores(results[name], faces, holes)
            v = matcher.embed(results[name])
            dist = 1 - (v * ref_v).sum(1)
            row = {"mask": kind, "method": name, "n": len(faces), "hole": round(float(holes.mean()), 4),
                   "psnr_hole": round(float(np.mean(psnr)), 2), "ssim_hole": round(float(np.mean(ssim)), 4),
                   "identity_distance": round(float(dist.mean()), 4),
                   "same_person_rate": round(float((dist <= threshold).mean()), 3),
                   "seconds_per_face": round(seconds[name], 4), "threshold": round(threshold, 4),
                   "model": a.model, "steps": a.steps, "restarts": a.restarts, "lam": a.lam, "device": a.device}
            print(json.dumps(row), flush=True)
            with open(a.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
        rows = [np.stack([faces[i], results["masked"][i], results["telea"][i], results["navier-stokes"][i],
                          generated[i], results["latent+blend"][i]]) for i in range(min(8, len(faces)))]
        grid(np.concatenate(rows), nrow=6).resize((6 * 66 * 2, len(rows) * 66 * 2), Image.NEAREST) \
            .save(out / f"{kind}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
