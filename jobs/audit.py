"""Memorization audit of a run's generator (method: gan/audit.py), logged to the run.

    python -m jobs.audit --run <run_id> [--samples 1000] [--percentile 1] [--max-train 20000]

Reads the run's config from its MLflow params, its generator from ``runs:/<id>/generator``,
the training faces from ``data.path`` and held-out faces as evaluation does. Logs
``audit/summary.json`` and ``audit/closest_pairs.png``, and the metrics
``audit_fraction_closer`` and ``audit_flagged``; prints the summary. Exit status 1 when flagged.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from datasets.shards import ShardSet
from gan import audit as A
from gan.config import Config, apply
from gan.evaluate import Pixels, build_extractor
from gan.images import png_bytes, to_uint8
from gan.loop import real_path
from gan.models import sample_z


@torch.no_grad()
def run_audit(cfg: Config, G: torch.nn.Module, samples: int, percentile: float = 1.0,
              max_train: int = 20_000, seed: int = 0) -> tuple[dict, bytes]:
    extractor = build_extractor(cfg.eval.extractor, cfg.eval.inception_weights) or Pixels()
    extractor.eval()
    train_u8 = A.faces(ShardSet(cfg.data.path), max_train)
    held_u8 = A.faces(ShardSet(real_path(cfg)), max(samples, 100))
    G = G.eval().cpu()
    gen_u8 = to_uint8(G(sample_z(samples, G.z_dim, torch.Generator().manual_seed(seed))))
    report = A.audit(A.features_of(extractor, gen_u8), A.features_of(extractor, train_u8),
                     A.features_of(extractor, held_u8), percentile)
    report["feature_space"] = cfg.eval.extractor if not isinstance(extractor, Pixels) else "pixels"
    return report, png_bytes(A.closest_pairs(gen_u8, train_u8, report))


def log_audit(tracker, report: dict, picture: bytes, step: int | None = None) -> None:
    tracker.log_artifacts({"audit/summary.json": json.dumps(A.public(report), indent=2).encode(),
                           "audit/closest_pairs.png": picture})
    tracker.log_metrics(step or 0, {"audit_fraction_closer": report["fraction_closer"],
                                    "audit_flagged": float(report["flagged"])})


def main(argv: list[str] | None = None) -> int:
    import mlflow
    from mlflow.tracking import MlflowClient

    from jobs.tracking import Tracker, resolve_tracking_uri

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="MLflow run id")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--percentile", type=float, default=1.0)
    p.add_argument("--max-train", type=int, default=20_000)
    a = p.parse_args(argv)
    uri = resolve_tracking_uri()
    params = MlflowClient(uri).get_run(a.run).data.params
    cfg = apply(Config(), params)
    mlflow.set_tracking_uri(uri)
    G = mlflow.pytorch.load_model(f"runs:/{a.run}/generator", map_location="cpu")
    report, picture = run_audit(cfg, G, a.samples, a.percentile, a.max_train)
    tracker = Tracker(uri, a.run)
    log_audit(tracker, report, picture, step=max(tracker.last_step.values(), default=0) + 1)
    print(json.dumps(A.public(report), indent=2))
    return 1 if report["flagged"] else 0


if __name__ == "__main__":
    sys.exit(main())
