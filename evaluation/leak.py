"""A generator's identity leak, end to end: the method of evaluation/identity.py on faces a
generator draws, against one labelled training set and one labelled held-out set.

:class:`IdentityLeak` embeds both sets once (evaluation/faceid.py, cached per shard set) and
calibrates the match threshold once; after that each audit costs only the fakes' embeddings,
which is what lets a run audit at every evaluation (docs/privacy.md has the timings). The same
object is the sampling-time filter: :meth:`IdentityLeak.near_training` says which faces are
within the threshold of a training person's photo.
"""
from __future__ import annotations

import numpy as np
import torch

from datasets.shards import ShardSet
from evaluation import identity as I
from evaluation.faceid import DlibFaceID, embed_shards
from evaluation.fid import eval_latents, latent_seed, to_uint8_nchw
from gan.models import sample_z


class NoIdentities(I.IdentityAuditError):
    """A shard set without the identity column."""


def labelled(path: str | ShardSet) -> tuple[ShardSet, np.ndarray]:
    shards = path if isinstance(path, ShardSet) else ShardSet(path)
    ids = shards.identities()
    if ids is None:
        raise NoIdentities(f"{shards.path}: no identity column; convert CelebA with "
                           f"`python -m datasets.celeba ... --identities identity_CelebA.txt`")
    return shards, ids


@torch.no_grad()
def draw(G: torch.nn.Module, n: int, seed: int, device="cpu", batch: int = 100) -> np.ndarray:
    """``n`` faces (uint8 NHWC) from the evaluation's latents for ``seed``; G in eval mode."""
    was_training = G.training
    G.eval()
    try:
        return np.concatenate([to_uint8_nchw(G(z.to(device))).permute(0, 2, 3, 1).cpu().numpy()
                               for z in eval_latents(n, G.z_dim, seed).split(batch)])
    finally:
        G.train(was_training)


class IdentityLeak:
    """``leak(G)`` -> the audit report of ``n`` faces G draws (evaluation/identity.py's keys)."""

    def __init__(self, train: str | ShardSet, heldout: str | ShardSet, n: int = 500, seed: int = 0,
                 cache_dir: str | None = None, processes: int | None = None, fpir: float = 0.01,
                 alpha: float = 1e-3):
        self.train, self.train_ids = labelled(train)
        self.held, self.held_ids = labelled(heldout)
        I.check_people(self.train_ids, self.held_ids)  # before anything is embedded
        self.matcher = DlibFaceID(processes)
        self.n, self.seed, self.fpir, self.alpha = n, seed, fpir, alpha
        self.train_v = embed_shards(self.train, self.matcher, cache_dir)
        self.held_v = embed_shards(self.held, self.matcher, cache_dir)
        self.calibration = I.calibrate(self.train_v, self.held_v, self.held_ids, fpir)
        self._held_d = I.nearest(self.held_v, self.train_v)[0]  # each stranger's nearest training photo

    @property
    def threshold(self) -> float:
        return self.calibration["threshold"]

    def audit_faces(self, faces: np.ndarray, vectors: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
        """(report, the faces' vectors) for faces given as uint8 NHWC (``vectors``: already embedded)."""
        fake_v = self.matcher.embed(faces) if vectors is None else vectors
        report = I.audit(fake_v, self.train_v, self.train_ids, self.held_v, self.held_ids, self.fpir, self.alpha)
        return report | {"matcher": "dlib-resnet-v1", "matcher_key": self.matcher.key,
                         "train": self.train.path, "heldout": self.held.path}, fake_v

    def __call__(self, G: torch.nn.Module, device="cpu") -> dict:
        return self.audit_faces(draw(G, self.n, self.seed, device))[0]

    def threshold_at(self, fpir: float) -> float:
        """The distance within which a fraction ``fpir`` of held-out people's photos find a
        training photo (the audit's threshold at its own fpir)."""
        return float(np.quantile(self._held_d, fpir))

    def near_training(self, faces: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """(which faces are within ``threshold`` of some training photo, the faces' vectors)."""
        v = self.matcher.embed(faces)
        return I.nearest(v, self.train_v)[0] <= threshold, v


@torch.no_grad()
def draw_excluding(G: torch.nn.Module, leak: IdentityLeak, n: int, seed: int, fpir: float = 0.05,
                   device="cpu", batch: int = 100, max_factor: int = 20) -> tuple[np.ndarray, dict, np.ndarray]:
    """``n`` faces none of which is within the threshold (at ``fpir``) of a training person's
    photo: faces are drawn along the evaluation's latent sequence for ``seed``, those near a
    training person dropped, and more drawn until ``n`` are kept (at most ``max_factor * n``
    drawn: a generator that draws its training people that often is refused by name). Returns
    (the kept faces, what was drawn and dropped, the kept faces' vectors)."""
    threshold, kept, vecs, drawn = leak.threshold_at(fpir), [], [], 0
    gen = torch.Generator().manual_seed(latent_seed(seed))  # the sequence eval_latents(n, ., seed) starts
    was_training = G.training
    G.eval()
    try:
        while sum(len(k) for k in kept) < n:
            if drawn >= max_factor * n:
                raise I.IdentityAuditError(
                    f"drew {drawn} faces and kept {sum(len(k) for k in kept)}: this generator draws its training "
                    f"people too often for the filter (fpir {fpir:g}) to be of use")
            faces = to_uint8_nchw(G(sample_z(batch, G.z_dim, gen).to(device))).permute(0, 2, 3, 1).cpu().numpy()
            drawn += len(faces)
            near, v = leak.near_training(faces, threshold)
            kept.append(faces[~near])
            vecs.append(v[~near])
    finally:
        G.train(was_training)
    stats = {"drawn": drawn, "dropped": drawn - sum(len(k) for k in kept), "kept": n, "threshold": threshold,
             "fpir": fpir}
    return np.concatenate(kept)[:n], stats, np.concatenate(vecs)[:n]


def verdict(report: dict) -> dict[str, float]:
    """The report's numbers that travel with a run's scores (no arrays, no evidence)."""
    return {k: float(report[k]) for k in ("identity_auc", "identity_match_rate", "heldout_match_rate")}
