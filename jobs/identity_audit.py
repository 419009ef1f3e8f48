"""The identity-leak audit as run by ``python -m jobs.audit --identity`` (method: evaluation/identity.py).

Embeds the fakes, the training photos and the held-out photos with the face matcher
(evaluation/faceid.py, cached per shard set), calibrates on the labels, and draws the evidence: for
the most reproduced training people, generated faces beside their nearest training photo.
"""
from __future__ import annotations

import io

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch

from datasets.shards import ShardSet
from evaluation import identity as I
from evaluation.faceid import DlibFaceID, embed_shards
from jobs.specs import fake_faces, sample_faces


class NoIdentities(I.IdentityAuditError):
    pass


def labelled(path: str) -> tuple[ShardSet, np.ndarray]:
    shards = ShardSet(path)
    ids = shards.identities()
    if ids is None:
        raise NoIdentities(f"{shards.path}: no identity column; convert CelebA with "
                           f"`python -m datasets.celeba ... --identities identity_CelebA.txt`")
    return shards, ids


@torch.no_grad()
def run_identity_audit(fake: str | torch.nn.Module, train: str, heldout: str, n: int = 1000, seed: int = 0,
                       fpir: float = 0.01, alpha: float = 1e-3, cache: str | None = "runs/feature_cache",
                       device: str = "cpu", processes: int | None = None) -> tuple[dict, bytes]:
    """The report and the evidence picture; checks everything it can before embedding anything."""

    train_set, train_ids = labelled(train)
    held_set, held_ids = labelled(heldout)
    I.check_people(train_ids, held_ids)
    matcher = DlibFaceID(processes)
    dev = torch.device(device)
    blocks = sample_faces(fake, n, seed, 100, dev) if isinstance(fake, torch.nn.Module) else fake_faces(fake, n, seed, 100, dev)
    fake_u8 = np.concatenate(list(blocks))
    fake_v = matcher.embed(fake_u8)
    train_v, held_v = embed_shards(train_set, matcher, cache), embed_shards(held_set, matcher, cache)
    report = I.audit(fake_v, train_v, train_ids, held_v, held_ids, fpir, alpha)
    report |= {"matcher": "dlib-resnet-v1", "matcher_key": matcher.key,
               "fake": fake if isinstance(fake, str) else "generator", "train": train_set.path, "heldout": held_set.path}
    return report, evidence(fake_u8, train_set, train_ids, report)


def evidence(fake_u8: np.ndarray, train_set: ShardSet, train_ids: np.ndarray, report: dict, per: int = 4) -> bytes:
    """One row per top person: up to ``per`` of their matched fakes, each beside its nearest
    training photo, distance underneath (PNG). No matches: the closest fakes overall."""

    matplotlib.use("Agg")

    d, j = report["_nearest_dist"], report["_nearest_idx"]
    rows = []
    for entry in report["top_identities"]:
        mine = np.flatnonzero((train_ids[j] == entry["identity"]) & (d <= report["threshold"]))
        rows.append((f"identity {entry['identity']}: {entry['matches']} matches", mine[np.argsort(d[mine])][:per]))
    if not rows:
        rows = [("no fake within the threshold; the closest ones", np.argsort(d)[:per])]
    fig, axes = plt.subplots(len(rows), 2 * per, figsize=(2 * per * 1.1, len(rows) * 1.45), squeeze=False)
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
    plt.close(fig)
    return buf.getvalue()
