"""What runs on every Ray Train worker of a ``jobs.train`` run (or a sweep trial): the training
core on the Ray context (gan/loop.py through compose.py), then, on rank 0, the run's final
generator and audits. Tracking goes through rank 0's background writer (jobs/spool.py)."""
from __future__ import annotations

import logging
from pathlib import Path

import ray.train

from compose import feature_cache, real_path, train_from_config
from gan.config import Config, from_flat
from jobs import publish
from jobs.audit import log_audit, log_identity_audit, run_audit
from jobs.identity_audit import run_identity_audit
from jobs.ray_context import RayTrainContext
from jobs.spool import BackgroundTracker
from jobs.tracking import system_metrics

try:  # Ray internals (see _quiet_reports): if they move, the lines come back, nothing breaks
    from ray.train.v2._internal.execution import context as _ray_report_log
except ImportError:
    _ray_report_log = None


def _quiet_reports() -> None:
    """Ray Train logs every report of every worker at INFO ("Reporting training result N: ..."),
    one long line per worker per log step on the driver's console, beside the progress bar that
    says the same in one line. Its logger is named after its file (Ray internals: if they move,
    the lines come back, nothing breaks)."""
    if _ray_report_log is not None:
        logging.getLogger(_ray_report_log.__file__).setLevel(logging.WARNING)


def train_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""

    _quiet_reports()
    cfg = from_flat(loop_config["config"])
    rank0 = ray.train.get_context().get_world_rank() == 0
    # Rank 0's tracking never blocks training: a background writer, spilling to the run's spool
    # while the server is unreachable (jobs/spool.py).
    tracker = BackgroundTracker(loop_config["tracking_uri"], loop_config["run_id"], loop_config["spool"]) \
        if rank0 else None
    if rank0:
        publish.warm()  # the publishing process imports while training starts (jobs/publish.py)
    try:
        _train_and_publish(cfg, loop_config, tracker)
    finally:
        if tracker is not None:
            left = tracker.close(cfg.run.tracking_grace_s)
            if left:
                print(f"facegan: {left} tracking record(s) could not be sent to {tracker.uri}; they are kept in "
                      f"{loop_config['spool']}: python -m jobs.sync {Path(loop_config['spool']).parent}", flush=True)


def _train_and_publish(cfg: Config, loop_config: dict, tracker) -> None:
    monitor = None
    if tracker is not None:
        try:
            monitor = system_metrics(loop_config["tracking_uri"], loop_config["run_id"])
        except Exception as e:  # noqa: BLE001 - a sampler that cannot start must not stop training
            print(f"facegan: no system metrics this run ({str(e).splitlines()[0][:160]})", flush=True)
    ctx = RayTrainContext(tracker, cfg.model, cfg.eval.register_as, loop_config.get("init_checkpoint"),
                          loop_config.get("hp"), publish=cfg.eval.publish)
    try:
        result = train_from_config(cfg, ctx, cpus=cfg.scale.cpus_per_worker)
    finally:
        if monitor is not None:
            monitor.finish()
    if result.diverged:  # nothing to publish or audit; the driver fails the run
        if tracker is not None:
            tracker.set_tags({"facegan.final_step": str(result.step)})
        return
    ctx.publish_best(result)  # eval.publish = "end"
    if tracker is not None:
        if result.best is None:  # no evaluation, or none under the privacy cap: the final generator is the model
            # Over eval.max_identity_auc: logged with the run, never registered nor made champion.
            tracker.log_generator(result.generator, cfg.model, step=result.step,
                                  register_as="" if result.over_cap else cfg.eval.register_as)
        else:
            tracker.set_tags({"facegan.best_step": str(result.best["step"]),
                              f"facegan.best_{result.best['metric']}": f"{result.best['value']:.6g}"})
        tracker.set_tags({"facegan.final_step": str(result.step)})
        if cfg.eval.audit_samples > 0:
            report, picture = run_audit(result.generator, cfg.data.path, real_path(cfg), cfg.eval.audit_samples,
                                        cfg.eval.extractor, cfg.eval.inception_weights, seed=cfg.train.seed,
                                        device=str(ctx.device), cache=feature_cache(cfg))
            log_audit(tracker, report, picture, step=result.step)
    if cfg.eval.identity_audit == "on" and result.best is not None:  # alike on every rank
        verdict = {}
        if tracker is not None:
            report, picture = run_identity_audit(result.generator, cfg.data.path, real_path(cfg), cfg.eval.identity_samples,
                                                 seed=cfg.train.seed, cache=feature_cache(cfg), device=str(ctx.device))
            # The last evaluation audited the same generator with the same faces (compose.LeakScorer).
            log_identity_audit(tracker, report, picture, step=result.step, metrics="identity_auc" not in result.scores)
            verdict = {k: float(report[k]) for k in ("identity_auc", "identity_match_rate")}
        ctx.report_audits(result.step, verdict)
