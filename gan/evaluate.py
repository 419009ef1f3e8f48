"""FID and KID (torchmetrics) of a generator against held-out real faces.

Every rank generates its share of ``eval.num_samples`` and feeds its share of the real
features; torchmetrics all-reduces/gathers the metric states over ``torch.distributed`` in
``compute()``, so the figure is that of all samples together. Real features are computed once
per (dataset, extractor, count) and cached under ``run.storage_path/feature_cache``.

Feature extractors (``eval.extractor``):
- ``inception``: the standard InceptionV3 pool features (2048-d) through torchmetrics and
  torch-fidelity. Weights come from ``eval.inception_weights`` or ``FACEGAN_INCEPTION_WEIGHTS``
  (a local file, for offline clusters), else the library downloads them. Missing library or
  weights: one warning, and training goes on without FID.
- ``pixels``: images area-downsampled to 16x16 RGB (768-d). Not comparable to published FIDs;
  for laptops, tests and the memorization audit's fallback.
- ``package.module:factory``: any callable returning an ``nn.Module`` with ``num_features``
  that maps uint8 NCHW images to features.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from datasets.shards import ShardSet
from gan.models import sample_z

_warned: set[str] = set()


def warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)


class Pixels(nn.Module):
    num_features = 768

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x.float() / 255.0, 16).flatten(1)


class Features(nn.Module):
    """What torchmetrics sees: images (4-D) go through the extractor; feature rows (2-D, from
    the real-side cache) pass straight through, so cached statistics need no second pass."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor = extractor
        self.num_features = int(extractor.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.dim() == 2 else self.extractor(x).float()


def build_extractor(name: str, weights: str = "") -> nn.Module | None:
    if name == "pixels":
        return Pixels()
    if name == "inception":
        weights = weights or os.environ.get("FACEGAN_INCEPTION_WEIGHTS", "")
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3

            net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                     feature_extractor_weights_path=weights or None)
        except Exception as e:  # ImportError (no torch-fidelity), no network, bad file
            warn_once(f"FID/KID disabled: no InceptionV3 ({type(e).__name__}: {e}). Install torch-fidelity, "
                      f"and on offline machines set eval.inception_weights or FACEGAN_INCEPTION_WEIGHTS "
                      f"to the weights file (pt_inception-2015-12-05-6726825d.pth).")
            return None
        net.num_features = 2048
        return net
    module, _, attr = name.partition(":")
    if not attr:
        raise ValueError(f"eval.extractor: expected inception, pixels or module:factory, got {name!r}")
    return getattr(importlib.import_module(module), attr)()


def _to_uint8_nchw(images: torch.Tensor) -> torch.Tensor:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class Evaluator:
    def __init__(self, extractor: nn.Module, real: ShardSet, num_samples: int, rank: int, world: int,
                 device: torch.device, cache_dir: str | Path, extractor_id: str, batch_size: int = 100,
                 kid_subset_size: int = 1000, seed: int = 0):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        self.rank, self.world, self.device, self.batch = rank, world, device, batch_size
        self.features = Features(extractor).to(device).eval()
        n_real = min(num_samples, real.count)
        self.n_fake = num_samples // world + (rank < num_samples % world)
        self.fid = FrechetInceptionDistance(self.features, reset_real_features=False).to(device)
        self.kid = KernelInceptionDistance(self.features, reset_real_features=False, subsets=20,
                                           subset_size=min(kid_subset_size, n_real, num_samples)).to(device)
        real_feats = self._real_features(real, n_real, cache_dir, extractor_id)[rank::world].to(device)
        for chunk in real_feats.split(1000):
            self.fid.update(chunk, real=True)
            self.kid.update(chunk, real=True)
        self.seed = seed

    @torch.no_grad()
    def _real_features(self, real: ShardSet, n: int, cache_dir, extractor_id: str) -> torch.Tensor:
        key = hashlib.sha256(json.dumps([[s["sha256"] for s in real.manifest["shards"]], extractor_id, n])
                             .encode()).hexdigest()[:20]
        path = Path(cache_dir) / f"real-{key}.pt"
        if path.is_file():
            return torch.load(path, weights_only=True)
        feats, seen = [], 0
        for rg in real.row_groups:
            imgs = torch.from_numpy(real.read(rg)[: n - seen]).permute(0, 3, 1, 2).contiguous()
            for part in imgs.split(self.batch):
                feats.append(self.features(part.to(self.device)).cpu())
            seen += len(imgs)
            if seen >= n:
                break
        out = torch.cat(feats)
        if self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            torch.save(out, tmp)
            os.replace(tmp, path)
        return out

    @torch.no_grad()
    def __call__(self, G: nn.Module) -> dict[str, float]:
        """FID and KID of ``G`` (eval mode, fixed noise per rank, so scores are comparable
        across steps); every rank must call it."""
        was = G.training
        G.eval()
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 7919 + self.rank)
        left = self.n_fake
        while left > 0:
            n = min(self.batch, left)
            imgs = _to_uint8_nchw(G(sample_z(n, G.z_dim, gen, self.device)))
            self.fid.update(imgs, real=False)
            self.kid.update(imgs, real=False)
            left -= n
        G.train(was)
        out = {"fid": float(self.fid.compute()), "kid": float(self.kid.compute()[0])}
        self.fid.reset()
        self.kid.reset()
        return out
