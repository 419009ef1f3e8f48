"""Memorization audit: are generated faces closer to training faces than real faces are?

Feature space: the evaluation extractor's features (InceptionV3 pool features when available,
else the 16x16 'pixels' space of gan/evaluate.py), compared by Euclidean distance. For M
generated faces we take each one's nearest training face; for held-out real faces (never
trained on) the same. A generator that only generalises should put about p% of its samples
below the p-th percentile of the held-out distances; a generator that copies training faces
puts far more there. ``flagged`` is set when the fraction exceeds ``flag_ratio`` times p%
(and p% + 1 point, so tiny M does not flag on noise).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from datasets.shards import ShardSet
from gan.images import grid


@torch.no_grad()
def features_of(extractor: nn.Module, images_u8_nhwc: np.ndarray, batch: int = 256) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images_u8_nhwc)).permute(0, 3, 1, 2)
    return torch.cat([extractor(part).float() for part in x.split(batch)])


def faces(shards: ShardSet, limit: int) -> np.ndarray:
    out, seen = [], 0
    for rg in shards.row_groups:
        part = shards.read(rg)[: limit - seen]
        out.append(part)
        seen += len(part)
        if seen >= limit:
            break
    return np.concatenate(out)


def nearest(query: torch.Tensor, ref: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    dists, idx = [], []
    for q in query.split(chunk):
        d = torch.cdist(q.double(), ref.double())
        m = d.min(dim=1)
        dists.append(m.values)
        idx.append(m.indices)
    return torch.cat(dists), torch.cat(idx)


def audit(gen_feats: torch.Tensor, train_feats: torch.Tensor, heldout_feats: torch.Tensor,
          percentile: float = 1.0, flag_ratio: float = 3.0) -> dict:
    d_gen, idx = nearest(gen_feats, train_feats)
    d_real, _ = nearest(heldout_feats, train_feats)
    threshold = float(torch.quantile(d_real, percentile / 100.0))
    fraction = float((d_gen < threshold).double().mean())
    expected = percentile / 100.0
    return {
        "samples": len(gen_feats), "train_faces": len(train_feats), "heldout_faces": len(heldout_feats),
        "percentile": percentile, "threshold": threshold, "fraction_closer": fraction,
        "expected_fraction": expected, "flagged": fraction > max(flag_ratio * expected, expected + 0.01),
        "gen_nearest_median": float(d_gen.median()), "heldout_nearest_median": float(d_real.median()),
        "_nearest_dist": d_gen, "_nearest_idx": idx,
    }


def closest_pairs(gen_u8: np.ndarray, train_u8: np.ndarray, report: dict, k: int = 8):
    """Top row: the k generated faces closest to a training face; bottom row: that face."""
    order = torch.argsort(report["_nearest_dist"])[:k].tolist()
    pairs = [gen_u8[i] for i in order] + [train_u8[int(report["_nearest_idx"][i])] for i in order]
    return grid(np.stack(pairs), nrow=len(order))


def public(report: dict) -> dict:
    return {k: v for k, v in report.items() if not k.startswith("_")}
