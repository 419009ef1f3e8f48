"""The identity-leak audit as run by ``python -m jobs.audit --identity`` (method: evaluation/identity.py).

Embeds the fakes, the training photos and the held-out photos with the face matcher
(evaluation/faceid.py, cached per shard set), calibrates on the labels, and draws the evidence: for
the most reproduced training people, generated faces beside their nearest training photo.
"""
from __future__ import annotations

import io

import numpy as np
import torch

from datasets.shards import ShardSet
from evaluation.leak import IdentityLeak, draw, draw_excluding
from jobs.specs import fake_faces, kind_of, load_generator

GENERATORS = ("model", "checkpoint")  # specs that can draw more faces (jobs/specs.py)


@torch.no_grad()
def run_identity_audit(fake: str | torch.nn.Module, train: str, heldout: str, n: int = 1000, seed: int = 0,
                       fpir: float = 0.01, alpha: float = 1e-3, cache: str | None = "runs/feature_cache",
                       device: str = "cpu", processes: int | None = None,
                       exclude_fpir: float | None = None) -> tuple[dict, bytes]:
    """The report and the evidence picture; checks everything it can before embedding any fake.
    ``exclude_fpir``: audit what the sampling-time filter keeps (evaluation/leak.py's
    ``draw_excluding``; for faces that are not a generator's, the filter can only drop)."""

    leak = IdentityLeak(train, heldout, n, seed, cache, processes, fpir, alpha)
    dev = torch.device(device)
    G = fake if isinstance(fake, torch.nn.Module) else load_generator(fake) if kind_of(fake) in GENERATORS else None
    filtered, vectors = None, None
    if exclude_fpir is not None and G is not None:
        fake_u8, filtered, vectors = draw_excluding(G.to(dev), leak, n, seed, exclude_fpir, dev)
    elif G is not None:
        fake_u8 = draw(G.to(dev), n, seed, dev)
    else:
        fake_u8 = np.concatenate(list(fake_faces(fake, n, seed, 100, dev)))
        if exclude_fpir is not None:
            near, vectors = leak.near_training(fake_u8, leak.threshold_at(exclude_fpir))
            filtered = {"drawn": len(fake_u8), "dropped": int(near.sum()), "kept": int((~near).sum()),
                        "threshold": leak.threshold_at(exclude_fpir), "fpir": exclude_fpir}
            fake_u8, vectors = fake_u8[~near], vectors[~near]
    report, _ = leak.audit_faces(fake_u8, vectors)
    report["fake"] = fake if isinstance(fake, str) else "generator"
    if filtered is not None:
        report["filter"] = filtered
    return report, evidence(fake_u8, leak.train, leak.train_ids, report)


def evidence(fake_u8: np.ndarray, train_set: ShardSet, train_ids: np.ndarray, report: dict, per: int = 4) -> bytes:
    """One row per top person: up to ``per`` of their matched fakes, each beside its nearest
    training photo, distance underneath (PNG). No matches: the closest fakes overall."""
    from matplotlib.figure import Figure  # deferred: see DEFERRED in tests/test_imports.py

    d, j = report["_nearest_dist"], report["_nearest_idx"]
    rows = []
    for entry in report["top_identities"]:
        mine = np.flatnonzero((train_ids[j] == entry["identity"]) & (d <= report["threshold"]))
        rows.append((f"identity {entry['identity']}: {entry['matches']} matches", mine[np.argsort(d[mine])][:per]))
    if not rows:
        rows = [("no fake within the threshold; the closest ones", np.argsort(d)[:per])]
    fig = Figure(figsize=(2 * per * 1.1, len(rows) * 1.45))  # no pyplot: no global state
    axes = fig.subplots(len(rows), 2 * per, squeeze=False)
    for r, (title, picks) in enumerate(rows):
        axes[r][0].set_title(title, loc="left", fontsize=8)
        real = train_set.rows_at([int(j[i]) for i in picks]) if len(picks) else []
        for c in range(per):
            for k, img in enumerate((fake_u8[picks[c]], real[c]) if c < len(picks) else ()):
                axes[r][2 * c + k].imshow(img)
                axes[r][2 * c + k].set_xlabel(f"fake, d={d[picks[c]]:.3f}" if k == 0 else "nearest train", fontsize=6)
        for ax in axes[r]:
            ax.set_xticks([]), ax.set_yticks([])
            ax.spines[:].set_visible(False)
    fig.suptitle(f"threshold {report['threshold']:.3f} (fpir {report['fpir']:.1%}); identity_auc "
                 f"{report['identity_auc']:.2f}; match rate {report['identity_match_rate']:.1%}", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()
