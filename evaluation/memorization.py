"""Memorization audit: are generated faces closer to training faces than unseen real faces are?

Feature space: the standard FID Inception's pool features (``inception``, default) or the 16x16
``pixels`` space of evaluation/fid.py, compared by Euclidean distance. Every training face is
searched (features computed in chunks on the run's device, cached like FID's real side).

Calibration: the held-out faces (never trained on, and checked to share no row with the
training set) are split in two halves. The first half's nearest-training-face distances give
the threshold, their ``percentile``-th percentile: a generator that only generalises puts about
``percentile``% of its samples below it. The second half is scored like the samples and reported
as ``heldout_fraction`` (the chance level, measured). ``fraction_memorized`` is the samples'
fraction below the threshold; ``flagged`` is a one-sided exact binomial test of that fraction
against the chance level ``percentile``% at significance ``alpha`` (default 0.001), so that a
few unlucky samples do not flag and a copying generator does.
"""
from __future__ import annotations

import numpy as np
import torch

from gan.images import grid


class AuditError(ValueError):
    """The audit cannot be trusted as asked (e.g. held-out faces that are training faces)."""


def nearest(query: torch.Tensor, ref: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query row's nearest ``ref`` row: distances and indices, chunked over both sides so that
    any number of training faces fits (float64 on the CPU, float32 on a GPU)."""
    dtype = torch.float64 if ref.device.type == "cpu" else torch.float32
    ref = ref.to(dtype)
    dists, idx = [], []
    for q in query.to(ref.device, dtype).split(chunk):
        best_d = torch.full((len(q),), float("inf"), dtype=dtype, device=ref.device)
        best_i = torch.zeros(len(q), dtype=torch.long, device=ref.device)
        for start in range(0, len(ref), 16384):
            d = torch.cdist(q, ref[start:start + 16384])
            m = d.min(dim=1)
            better = m.values < best_d
            best_d = torch.where(better, m.values, best_d)
            best_i = torch.where(better, m.indices + start, best_i)
        dists.append(best_d.cpu())
        idx.append(best_i.cpu())
    return torch.cat(dists), torch.cat(idx)


def check_disjoint(train_ids: set[str], heldout_ids: list[str], where: str) -> None:
    shared = train_ids.intersection(heldout_ids)
    if shared:
        raise AuditError(f"{where}: {len(shared)} held-out rows are training rows (e.g. {sorted(shared)[0]!r}); "
                         f"the audit needs held-out faces disjoint from the training set")


def audit(gen_feats: torch.Tensor, train_feats: torch.Tensor, heldout_feats: torch.Tensor,
          percentile: float = 1.0, alpha: float = 1e-3) -> dict:
    from scipy.stats import binom  # deferred: see DEFERRED in tests/test_imports.py

    if len(heldout_feats) < 20:
        raise AuditError(f"the audit needs at least 20 held-out faces, got {len(heldout_feats)}")
    d_gen, idx = nearest(gen_feats, train_feats)
    d_held, _ = nearest(heldout_feats, train_feats)
    if bool((d_held <= 1e-6 * d_held.median()).any()):
        n = int((d_held <= 1e-6 * d_held.median()).sum())
        raise AuditError(f"{n} held-out faces are identical to training faces; the audit needs held-out "
                         f"faces disjoint from the training set")
    calib, check = d_held[0::2], d_held[1::2]
    threshold = float(torch.quantile(calib, percentile / 100.0))
    below = int((d_gen < threshold).sum())
    p = percentile / 100.0
    p_value = float(binom.sf(below - 1, len(d_gen), p))  # P(X >= below) under chance
    return {
        "n_fake": len(gen_feats), "n_train": len(train_feats), "n_heldout": len(heldout_feats),
        "percentile": percentile, "threshold": threshold,
        "fraction_memorized": below / len(d_gen), "expected_fraction": p,
        "heldout_fraction": float((check < threshold).double().mean()),
        "p_value": p_value, "alpha": alpha, "flagged": p_value < alpha,
        "gen_nearest_median": float(d_gen.median()), "heldout_nearest_median": float(d_held.median()),
        "_nearest_dist": d_gen, "_nearest_idx": idx,
    }


def closest_pairs(gen_u8: np.ndarray, train_u8_at, report: dict, k: int = 8):
    """Top row: the k generated faces closest to a training face; bottom row: that face.
    ``train_u8_at(indices)`` returns those training faces (uint8 NHWC)."""
    order = torch.argsort(report["_nearest_dist"])[:k].tolist()
    nearest_train = train_u8_at([int(report["_nearest_idx"][i]) for i in order])
    pairs = [gen_u8[i] for i in order] + list(nearest_train)
    return grid(np.stack(pairs), nrow=len(order))


def public(report: dict) -> dict:
    return {k: v for k, v in report.items() if not k.startswith("_")}
