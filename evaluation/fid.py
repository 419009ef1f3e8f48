"""FID and KID (torchmetrics) of a generator against held-out real faces.

Every rank generates its share of ``eval.num_samples`` and feeds its share of the real
features; torchmetrics all-reduces/gathers the metric states over ``torch.distributed`` in
``compute()``, so the figure is that of all samples together. The latents are drawn once from
one seeded generator and split over the ranks, so the same (seed, num_samples) scores the same
faces on 1 or N workers, and ``python -m jobs.fid`` on the logged generator reproduces the
logged FID.

Feature extractors (``eval.extractor``):
- ``inception``: the standard FID InceptionV3 and protocol of evaluation/inception.py (offline).
- ``pixels``: images area-downsampled to 16x16 RGB (768-d). Not comparable to published FIDs;
  for unit tests and quick looks.

Real-side features are cached under ``cache_dir`` keyed by everything that determines them:
the shard set's manifest (every shard's sha256), the extractor's file hash and protocol, the
count, and the torch version. A changed weights file or dataset never reuses stale features.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datasets.shards import ShardSet
from evaluation import cache
from evaluation.inception import PROTOCOL, ExtractorError, InceptionFID
from gan.models import sample_z

EXTRACTORS = ("inception", "pixels")
# KID keeps every feature row by design (it needs them for its subsets); at eval sizes that is
# a few MB, so torchmetrics' "large memory footprint" warning is noise here.
warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")


class Pixels(nn.Module):
    num_features = 768
    key = "pixels16"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x.float() / 255.0, 16).flatten(1)


def build_extractor(name: str, weights: str = "") -> nn.Module:
    """The feature extractor, or :class:`ExtractorError` saying what is missing."""
    if name == "pixels":
        return Pixels()
    if name == "inception":
        return InceptionFID(weights)
    raise ExtractorError(f"eval.extractor: expected one of {', '.join(EXTRACTORS)}, got {name!r}")


def extractor_key(extractor: nn.Module) -> str:
    if isinstance(extractor, InceptionFID):
        return f"inception:{extractor.sha1}:{PROTOCOL}"
    return getattr(extractor, "key", type(extractor).__name__)


def describe(extractor: nn.Module) -> dict:
    """What an evaluation's numbers mean: logged with them and printed by jobs.fid."""
    if isinstance(extractor, InceptionFID):
        return {"extractor": "inception", "extractor_sha1": extractor.sha1, "protocol": PROTOCOL}
    return {"extractor": extractor_key(extractor), "protocol": "pixels16 (not comparable to published FID)"}


class Features(nn.Module):
    """What torchmetrics sees: images (4-D) go through the extractor; feature rows (2-D, from
    the real-side cache) pass straight through, so cached statistics need no second pass."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor = extractor
        self.num_features = int(extractor.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.dim() == 2 else self.extractor(x).float()


def to_uint8_nchw(images: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] -> uint8, quantised as saved images would be."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def latent_seed(seed: int) -> int:
    return seed * 7919 + 17


def eval_latents(num_samples: int, z_dim: int, seed: int) -> torch.Tensor:
    """The evaluation's latents: the same for every world size (ranks take [rank::world])."""
    return sample_z(num_samples, z_dim, torch.Generator().manual_seed(latent_seed(seed)))


def manifest_digest(shards: ShardSet) -> str:
    m = shards.manifest
    return hashlib.sha256(json.dumps([[s["sha256"] for s in m["shards"]], m["count"], m["image_size"],
                                      m.get("encoding")]).encode()).hexdigest()


def iter_rows(shards: ShardSet, n: int):
    """The first ``n`` faces of a shard set in stored order, as uint8 NHWC blocks."""
    seen = 0
    for rg in shards.row_groups:
        if seen >= n:
            return
        part = shards.read(rg)[: n - seen]
        seen += len(part)
        yield part


@torch.no_grad()
def features_of_rows(shards: ShardSet, n: int, extractor: nn.Module, device, batch: int = 100,
                     cache_dir: str | Path | None = None, progress=None) -> torch.Tensor:
    """Features of the first ``n`` faces of ``shards`` (cached in ``cache_dir`` when given)."""
    n = min(n, shards.count)
    name = None
    if cache_dir is not None:
        import torchmetrics  # not on the GPU benchmark machines, which train without scoring

        key = hashlib.sha256(json.dumps([manifest_digest(shards), extractor_key(extractor), n,
                                         torch.__version__, torchmetrics.__version__]).encode()).hexdigest()[:24]
        name = f"features-{key}.pt"
        if (cached := cache.load_tensor(cache_dir, name)) is not None:
            return cached
    feats = []
    for block in iter_rows(shards, n):
        x = torch.from_numpy(np.ascontiguousarray(block)).permute(0, 3, 1, 2)
        for part in x.split(batch):
            feats.append(extractor(part.to(device)).float().cpu())
            if progress is not None:
                progress(len(part))
    out = torch.cat(feats)
    if name is not None:
        cache.save_tensor(cache_dir, name, out)  # complete or absent, local or object storage
    return out


class Evaluator:
    def __init__(self, extractor: nn.Module, real: ShardSet, num_samples: int, rank: int, world: int,
                 device: torch.device, cache_dir: str | Path | None, batch_size: int = 100,
                 kid_subset_size: int = 1000, seed: int = 0):
        from torchmetrics.image.fid import FrechetInceptionDistance  # see features_of_rows
        from torchmetrics.image.kid import KernelInceptionDistance

        self.rank, self.world, self.device, self.batch = rank, world, device, batch_size
        self.num_samples, self.seed = num_samples, seed
        self.info = describe(extractor)
        self.features = Features(extractor.to(device)).eval()
        self.n_real = min(num_samples, real.count)
        self.fid = FrechetInceptionDistance(self.features, reset_real_features=False).to(device)
        self.kid = KernelInceptionDistance(self.features, reset_real_features=False, subsets=20,
                                           subset_size=min(kid_subset_size, self.n_real, num_samples)).to(device)
        real_feats = features_of_rows(real, self.n_real, extractor, device, batch_size, cache_dir)
        for chunk in real_feats[rank::world].to(device).split(1000):
            self.fid.update(chunk, real=True)
            self.kid.update(chunk, real=True)

    @torch.no_grad()
    def __call__(self, G: nn.Module) -> dict[str, float]:
        """FID and KID of ``G`` in eval mode on the fixed latents; every rank must call it."""
        was = G.training
        G.eval()
        z = eval_latents(self.num_samples, G.z_dim, self.seed)[self.rank::self.world]
        try:
            return self.score_faces(to_uint8_nchw(G(part.to(self.device))) for part in z.split(self.batch))
        finally:
            G.train(was)

    @torch.no_grad()
    def score_faces(self, blocks: Iterable[torch.Tensor]) -> dict[str, float]:
        """FID and KID of faces given as uint8 NCHW blocks (this rank's share of them)."""
        for block in blocks:
            # Features once, handed to both metrics as rows: given images, FID and KID would
            # each run the extractor (twice the Inception cost).
            feats = self.features(block.to(self.device))
            self.fid.update(feats, real=False)
            self.kid.update(feats, real=False)
        out = {"fid": float(self.fid.compute()), "kid": float(self.kid.compute()[0])}
        self.fid.reset()
        self.kid.reset()
        return out


@torch.no_grad()
def score_features(real: torch.Tensor, fake: torch.Tensor, kid_subset_size: int = 1000) -> dict[str, float]:
    """FID and KID (mean, std) of two feature sets, in one process (jobs.fid)."""
    from torchmetrics.image.fid import FrechetInceptionDistance  # see features_of_rows
    from torchmetrics.image.kid import KernelInceptionDistance

    ident = Features(Pixels())  # feature rows (2-D) pass straight through Features
    ident.num_features = real.shape[1]
    fid = FrechetInceptionDistance(ident, reset_real_features=False)
    kid = KernelInceptionDistance(ident, subsets=20, subset_size=min(kid_subset_size, len(real), len(fake)))
    for feats, is_real in ((real, True), (fake, False)):
        for chunk in feats.split(1000):
            fid.update(chunk, real=is_real)
            kid.update(chunk, real=is_real)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}
