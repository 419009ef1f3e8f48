"""Memorization audit (method: evaluation/memorization.py): do generated faces copy training faces?

    python -m jobs.audit --model SPEC --train SHARDS --heldout SHARDS [--n 1000] [--extractor inception|pixels]
    python -m jobs.audit --run <run_id> [--n 1000]       # SPEC, train and held-out from the run; logged to it
    python -m jobs.audit --identity --model SPEC --train SHARDS --heldout SHARDS [--fpir 0.01]   # people, not photos
    python -m jobs.audit --identity --exclude-training-identities ...   # what the sampling filter keeps

SPEC as in jobs.fid: a shard set, an image folder, ``runs:/…``, ``models:/…`` or a checkpoint.
Every training face is searched. Prints one JSON line (``fraction_memorized``, ``flagged``,
``threshold``, ``heldout_fraction``, ``p_value``, counts); ``--out DIR`` also gets
``summary.json`` and ``closest_pairs.png``; with ``--run`` both are logged to the run
(``audit/``) with the metrics ``audit_fraction_memorized`` and ``audit_flagged``. Exit status 1
when flagged, 2 on an error (one line): held-out faces that share rows with the training set, a
run without a held-out set, an unreadable SPEC.

``--identity`` audits people instead of photos (evaluation/identity.py, jobs/identity_audit.py): it
needs shard sets with an identity column, held-out people disjoint from the training people
(at least 10) and the privacy extra (``pip install -e ".[privacy]"``). Its JSON line holds
``identity_auc``, ``identity_match_rate``, ``heldout_match_rate``, ``threshold``, ``fpir``,
``tpir``, ``top_identities`` and ``flagged``; ``--out`` gets ``identity_summary.json`` and
``identity_evidence.png``; ``--run`` logs them (``audit/``) with the metrics ``identity_auc``
and ``identity_match_rate``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from mlflow.tracking import MlflowClient

from compose import feature_cache, real_path
from datasets.shards import ShardError, ShardSet
from evaluation import memorization as A
from evaluation.faceid import FaceIDError
from evaluation.fid import build_extractor, features_of_rows
from evaluation.inception import ExtractorError
from gan.config import Config, ConfigError, apply, flatten
from gan.images import png_bytes
from jobs.cli import SPEC, Parser
from jobs.identity_audit import run_identity_audit
from jobs.specs import SpecError, fake_faces, sample_faces
from jobs.tracking import Tracker, resolve_tracking_uri

SPACES = ("inception", "pixels")


@torch.no_grad()
def run_audit(fake: str | torch.nn.Module, train: str, heldout: str, n: int = 1000, space: str = "inception",
              weights: str = "", percentile: float = 1.0, seed: int = 0, device: str = "cpu",
              cache: str | None = "runs/feature_cache", batch: int = 100) -> tuple[dict, bytes]:
    """The report and the closest-pairs picture. ``fake`` is a SPEC or a generator module."""
    train_set, held_set = ShardSet(train), ShardSet(heldout)
    A.check_disjoint(set(train_set.ids()), held_set.ids(), f"{heldout} vs {train}")
    dev = torch.device(device)
    ext = build_extractor(space, weights).to(dev)
    if isinstance(fake, torch.nn.Module):
        blocks = sample_faces(fake, n, seed, batch, dev)
    else:
        blocks = fake_faces(fake, n, seed, batch, dev)
    gen_u8 = np.concatenate(list(blocks))
    gen_f = torch.cat([ext(torch.from_numpy(np.ascontiguousarray(b)).permute(0, 3, 1, 2).to(dev)).float().cpu()
                       for b in np.array_split(gen_u8, max(1, len(gen_u8) // batch))])
    train_f = features_of_rows(train_set, train_set.count, ext, dev, batch, cache)
    held_f = features_of_rows(held_set, held_set.count, ext, dev, batch, cache)
    report = A.audit(gen_f, train_f.to(dev), held_f, percentile)
    report |= {"space": space, "fake": fake if isinstance(fake, str) else "generator", "train": train_set.path,
               "heldout": held_set.path}
    return report, png_bytes(A.closest_pairs(gen_u8, train_set.rows_at, report))


def log_audit(tracker, report: dict, picture: bytes, step: int | None = None) -> None:
    tracker.log_artifacts({"audit/summary.json": json.dumps(A.public(report), indent=2).encode(),
                           "audit/closest_pairs.png": picture})
    tracker.log_metrics(step or 0, {"audit_fraction_memorized": report["fraction_memorized"],
                                    "audit_flagged": float(report["flagged"])})


def log_identity_audit(tracker, report: dict, picture: bytes, step: int, metrics: bool = True) -> None:
    """``metrics=False``: the run's evaluation at ``step`` already charted the same numbers."""
    tracker.log_artifacts({"audit/identity_summary.json": json.dumps(A.public(report), indent=2).encode(),
                           "audit/identity_evidence.png": picture})
    if metrics:
        tracker.log_metrics(step, {"identity_auc": report["identity_auc"],
                                   "identity_match_rate": report["identity_match_rate"]})


def run_config(params: dict[str, str]) -> Config:
    """A run's config from its MLflow params. Sweep children also hold derived params
    (optim.lr_ratio, ...) that are not config fields: only the config's own keys are read."""
    known = set(flatten(Config()))
    return apply(Config(), {k: v for k, v in params.items() if k in known})


def main(argv: list[str] | None = None) -> int:
    p = Parser("jobs.audit", __doc__, renamed={"--fake": "--model", "--space": "--extractor", "--samples": "--n"})
    p.add_argument("--run", help="MLflow run id: fills --model, --train and --heldout, and logs the audit")
    p.model(f"the faces to audit: {SPEC}, a shard set or an image folder (default with --run: its generator)",
            required=False)
    p.add_argument("--train", help="the training faces: a shard set (default with --run: its data.path)")
    p.add_argument("--heldout", help="held-out faces: a shard set (default with --run: its held-out set)")
    p.n(1000, "generated faces to audit")
    p.add_argument("--extractor", choices=SPACES, default=None, help="feature space (default: the run's, or inception)")
    p.add_argument("--percentile", type=float, default=1.0, help="the held-out distance percentile that calls a copy")
    p.seed()
    p.add_argument("--out", help="also write summary.json and closest_pairs.png here")
    p.add_argument("--cache", default=None, help="feature cache (default: the run's, or runs/feature_cache)")
    p.device()
    p.add_argument("--identity", action="store_true", help="the identity-leak audit (people, not photos)")
    p.add_argument("--fpir", type=float, default=0.01, help="--identity: the calibrated false-positive identification rate")
    p.add_argument("--processes", type=int, default=None, help="--identity: face-matcher processes (default: one per core)")
    p.exclusion()
    a = p.parse_args(argv)
    tracker = None
    try:
        fake, train, heldout, space, cache, weights = a.model, a.train, a.heldout, a.extractor, a.cache, ""
        if a.run:
            uri = resolve_tracking_uri()
            try:
                cfg = run_config(MlflowClient(uri).get_run(a.run).data.params)
            except Exception as e:  # unknown run id, unreachable server
                raise SpecError(f"--run {a.run}: {str(e).splitlines()[0]}") from None
            fake = fake or f"runs:/{a.run}/generator"
            train, heldout = train or cfg.data.path, heldout or real_path(cfg)
            # The run's extractor, if it is one of ours: never a module named by a run's params.
            space = space or (cfg.eval.extractor if cfg.eval.extractor in SPACES else "inception")
            cache, weights = cache or feature_cache(cfg), cfg.eval.inception_weights
            tracker = Tracker(uri, a.run)
        if not (fake and train and heldout):
            raise SpecError("give --run, or all of --model, --train and --heldout")
        if a.identity:
            report, picture = run_identity_audit(fake, train, heldout, a.n, a.seed, a.fpir, cache=cache or "runs/feature_cache",
                                                 device=a.device, processes=a.processes,
                                                 exclude_fpir=a.filter_fpir if a.exclude_training_identities else None)
        elif a.exclude_training_identities:
            raise SpecError("--exclude-training-identities filters people: use it with --identity")
        else:
            report, picture = run_audit(fake, train, heldout, a.n, space or "inception", weights, a.percentile,
                                        a.seed, a.device, cache or "runs/feature_cache")
    except (ShardError, SpecError, ExtractorError, ConfigError, A.AuditError, ValueError, FaceIDError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = ("identity_summary.json", "identity_evidence.png") if a.identity else ("summary.json", "closest_pairs.png")
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / names[0]).write_text(json.dumps(A.public(report), indent=2))
        (out / names[1]).write_bytes(picture)
    if tracker is not None:
        step = max(tracker.last_step.values(), default=0) + 1
        if a.identity:
            log_identity_audit(tracker, report, picture, step)
        else:
            log_audit(tracker, report, picture, step=step)
    print(json.dumps(A.public(report)))
    return 1 if report["flagged"] else 0


if __name__ == "__main__":
    sys.exit(main())
