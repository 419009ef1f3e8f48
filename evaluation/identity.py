"""Identity-leak audit: do generated faces show the people the generator was trained on?

Image-space audits (evaluation/memorization.py) catch copies of training photos; a GAN can also draw new
photos of a training person (Webster et al. 2021, "This Person (Probably) Exists"). With a face
matcher (evaluation/faceid.py: unit vectors, Euclidean distance) and the identity labels of the
training and held-out sets (people never trained on):

- **Calibration** (``calibrate``): every held-out photo is searched against the training
  gallery; the threshold is the distance below which a fraction ``fpir`` (default 1%) of them
  "find" someone: the false-positive identification rate of a search, not of a pair (a gallery
  of many people is matched by chance far more often than one face). The true-positive
  identification rate at that threshold is measured within the held-out people: half of each
  one's photos as a gallery, the rest searched (right person, within the threshold).
- **Membership** (``identity_auc``): each person's score is the mean, over their photos, of the
  distance to the nearest generated face (negated: closer = more leaked). A mean, so that the
  score does not depend on how many photos a person has. ROC AUC of training people against
  held-out people: 0.5 = no leak, 1 = every training person recognisable among the fakes.
- **Matches**: ``identity_match_rate`` is the fraction of fakes within the threshold of some
  training photo; the chance level is ``fpir`` (held-out real photos do that by construction),
  and ``heldout_match_rate`` is the same search against the held-out gallery.
- **flagged**: a leak beyond chance by either of two one-sided tests at ``alpha`` (0.001): an
  exact binomial test of the matches against ``fpir``, or a Mann-Whitney U test that training
  people score higher than held-out people (the AUC's own test).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from evaluation.memorization import nearest as _nearest

MIN_HELDOUT_IDENTITIES = 10


class IdentityAuditError(ValueError):
    """The identity audit cannot be trusted as asked (shared people, too few held-out people)."""


def nearest(query: np.ndarray, gallery: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each query row's nearest gallery row (Euclidean distance, index): the image-space
    audit's chunked search (evaluation/memorization.py), on face vectors."""
    d, idx = _nearest(torch.from_numpy(np.ascontiguousarray(query)), torch.from_numpy(np.ascontiguousarray(gallery)))
    return d.numpy(), idx.numpy()


def check_people(train_ids: np.ndarray, held_ids: np.ndarray) -> None:
    shared = set(train_ids.tolist()) & set(held_ids.tolist())
    if shared:
        raise IdentityAuditError(f"{len(shared)} people are in both the training and the held-out set "
                                 f"(e.g. identity {min(shared)}); the audit needs held-out people never trained on")
    n = len(set(held_ids.tolist()))
    if n < MIN_HELDOUT_IDENTITIES:
        raise IdentityAuditError(f"the identity audit needs at least {MIN_HELDOUT_IDENTITIES} held-out people, got {n}")


def calibrate(train_v: np.ndarray, held_v: np.ndarray, held_ids: np.ndarray, fpir: float = 0.01) -> dict:
    d_held, _ = nearest(held_v, train_v)
    threshold = float(np.quantile(d_held, fpir))
    gallery, search = [], []
    for person in np.unique(held_ids):
        rows = np.flatnonzero(held_ids == person)
        gallery += rows[0::2].tolist()
        search += rows[1::2].tolist()
    d, j = nearest(held_v[search], held_v[gallery])
    hit = (held_ids[gallery][j] == held_ids[search]) & (d <= threshold)
    return {"threshold": threshold, "fpir": float((d_held <= threshold).mean()), "fpir_target": fpir,
            "tpir": float(hit.mean()), "n_calibration_searches": len(d_held)}


def identity_scores(fake_v: np.ndarray, photos_v: np.ndarray, ids: np.ndarray) -> dict[int, float]:
    d, _ = nearest(photos_v, fake_v)
    return {int(p): -float(d[ids == p].mean()) for p in np.unique(ids)}


def audit(fake_v: np.ndarray, train_v: np.ndarray, train_ids: np.ndarray, held_v: np.ndarray,
          held_ids: np.ndarray, fpir: float = 0.01, alpha: float = 1e-3, top: int = 5) -> dict:
    from scipy.stats import binom, mannwhitneyu  # deferred: see DEFERRED in tests/test_imports.py

    check_people(train_ids, held_ids)
    cal = calibrate(train_v, held_v, held_ids, fpir)
    t = cal["threshold"]
    s_train, s_held = identity_scores(fake_v, train_v, train_ids), identity_scores(fake_v, held_v, held_ids)
    u = mannwhitneyu(list(s_train.values()), list(s_held.values()), alternative="greater")
    auc = float(u.statistic) / (len(s_train) * len(s_held))
    d_fake, j = nearest(fake_v, train_v)
    d_fake_held, _ = nearest(fake_v, held_v)
    matched = d_fake <= t
    n_match = int(matched.sum())
    p_match = float(binom.sf(n_match - 1, len(fake_v), cal["fpir"])) if n_match else 1.0
    counts = Counter(train_ids[j[matched]].tolist())
    return {
        "identity_auc": auc, "identity_auc_p_value": float(u.pvalue),
        "identity_match_rate": n_match / len(fake_v), "heldout_match_rate": float((d_fake_held <= t).mean()),
        "match_p_value": p_match, **cal, "alpha": alpha,
        "flagged": bool(min(p_match, float(u.pvalue)) < alpha),
        "test": "one-sided exact binomial (matches vs fpir) or one-sided Mann-Whitney U (training vs "
                "held-out people's scores), either below alpha",
        "n_fake": len(fake_v), "n_train_identities": len(s_train), "n_heldout_identities": len(s_held),
        "n_train_photos": len(train_v), "n_heldout_photos": len(held_v),
        "top_identities": [{"identity": int(p), "matches": c} for p, c in counts.most_common(top)],
        "_nearest_dist": d_fake, "_nearest_idx": j,
    }
