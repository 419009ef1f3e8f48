"""FID and KID of any faces against a held-out shard set, with the standard FID Inception.

    python -m jobs.fid --real data/celeba64/val --model runs:/<run_id>/generator [--n 1000]
    python -m jobs.fid --real data/celeba64/val --model data/celeba64/test        # real vs real: the floor
    python -m jobs.fid --real SHARDS --model models:/facegan@champion | CHECKPOINT | IMAGE_FOLDER

Prints one JSON line: ``fid``, ``kid`` (and ``kid_std`` over 20 subsets), ``n_real``,
``n_fake``, the extractor's sha1 and the protocol (evaluation/inception.py). ``--n`` fakes are scored
(a generator is sampled on the evaluation's latents for ``--seed``, as in training, so the
logged FID of a run is reproduced with the run's eval.num_samples and train.seed) against the
first min(n, size) real faces, or ``--n-real``. Real-side features are cached under ``--cache``
keyed by the shard manifest, the extractor's hash, the protocol, the count and the library
versions. FID is biased upward at small n: compare figures only at equal n_real and n_fake.
Errors are one line, exit status 2.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from datasets.shards import ShardError, ShardSet
from evaluation.fid import (
    EXTRACTORS,
    build_extractor,
    describe,
    features_of_rows,
    score_features,
)
from evaluation.inception import ExtractorError
from jobs.cli import SPEC, Parser
from jobs.specs import SpecError, fake_faces, kind_of


@torch.no_grad()
def features_of_spec(spec: str, n: int, extractor, device, seed: int, batch: int, cache: str) -> torch.Tensor:
    if kind_of(spec) == "shards":  # a shard set's features are cached like the real side's
        return features_of_rows(ShardSet(spec), n, extractor, device, batch, cache)
    feats = []
    for block in fake_faces(spec, n, seed, batch, device):
        x = torch.from_numpy(np.ascontiguousarray(block)).permute(0, 3, 1, 2)
        feats += [extractor(part.to(device)).float().cpu() for part in x.split(batch)]
    return torch.cat(feats)


def compute(real: str, fake: str, n: int, n_real: int = 0, extractor: str = "inception", weights: str = "",
            seed: int = 0, batch: int = 100, cache: str = "runs/feature_cache", device: str = "cpu") -> dict:
    t0 = time.perf_counter()
    dev = torch.device(device)
    ext = build_extractor(extractor, weights).to(dev)
    real_set = ShardSet(real)
    real_f = features_of_rows(real_set, n_real or n, ext, dev, batch, cache)
    fake_f = features_of_spec(fake, n, ext, dev, seed, batch, cache)
    if len(fake_f) < 2 or len(real_f) < 2:
        raise SpecError(f"need at least 2 faces on each side, got {len(real_f)} real and {len(fake_f)} fake")
    scores = score_features(real_f, fake_f)
    return {**scores, "n_real": len(real_f), "n_fake": len(fake_f), **describe(ext), "real": real_set.path,
            "fake": fake, "seed": seed, "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = Parser("jobs.fid", __doc__, renamed={"--fake": "--model"})
    p.add_argument("--real", required=True, help="held-out real faces: a shard set")
    p.model(f"the faces to score: {SPEC}, a shard set or an image folder")
    p.n(1000, "faces to score (at least 2)")
    p.add_argument("--n-real", type=int, default=0, help="real faces (0: min(--n, all))")
    p.add_argument("--extractor", choices=EXTRACTORS, default="inception", help="feature space")
    p.add_argument("--weights", default="", help="another TorchScript FID Inception file")
    p.seed()
    p.batch()
    p.add_argument("--cache", default="runs/feature_cache", help="where the real side's features are cached")
    p.device()
    a = p.parse_args(argv)
    if a.n < 2:
        print("error: --n must be >= 2", file=sys.stderr)
        return 2
    try:
        out = compute(a.real, a.model, a.n, a.n_real, a.extractor, a.weights, a.seed, a.batch, a.cache, a.device)
    except (ShardError, SpecError, ExtractorError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
