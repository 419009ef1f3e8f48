"""A sweep trial: the Tune function trainable that runs one Ray Train run, and :class:`Relay`,
which hands that run's reports to Tune.

Why a relay of our own rather than Ray 2.60's ``ray.tune.integration.ray_train.TuneReportCallback``:
that callback passes rank 0's raw dict and, for a checkpoint, only its path as a metric. Tune's
schedulers need more: PBT exploits a trial by restoring another one's ``Checkpoint`` object
(``tune.get_checkpoint()`` in the restarted trial), and ASHA/PBT want the sweep's metric in every
result, while an evaluation happens every ``eval.every_steps`` only. So the relay carries each
report's summary (gan/report.py) and its Checkpoint through a one-slot Ray queue to the trial's
thread, which keeps the latest scores, turns a divergence into the worst score and then a failed
trial, and holds the final result back until the Train run has ended (ASHA stops a trial at
``max_t``, which would cut off the final audits).
"""
from __future__ import annotations

import hashlib
import math
import queue as queue_mod
import threading

from mlflow.tracking import MlflowClient
from ray import tune
from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Queue

from gan.config import flatten
from gan.report import Report
from jobs.sweep import trial_config
from jobs.tracking import end_run, start_run
from jobs.train import Plan, build_trainer, total_steps_of


class Relay(UserCallback):
    """Ray Train's controller calls ``after_report`` (in its own process) with every worker's
    report; :meth:`forward` runs in the trial while the Train run goes on."""

    def __init__(self, metric: str, last_step: int):
        self.queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
        self.metric, self.last_step = metric, last_step

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put((metrics[0], checkpoint))  # the Checkpoint with its filesystem, not a path

    def forward(self, running: threading.Thread, failed) -> str:
        """Hands Tune every scored report until ``running`` (the Train run) ends, the final one
        unless ``failed()``; returns why training diverged, or ""."""
        scores, held, diverged = {}, None, ""
        while running.is_alive() or not self.queue.empty():
            try:
                summary, checkpoint = self.queue.get(timeout=1)
            except queue_mod.Empty:
                continue
            r = Report.from_summary(summary)
            if r.diverged:  # the worst score for the scheduler, then a failed trial
                diverged = r.diverged
                tune.report({"step": r.step, self.metric: math.inf})
                continue
            if r.audits and held is not None:  # the final audits (identity_auc: a sweep's privacy cap)
                held = ({**held[0], **r.audits}, held[1])
                continue
            scores |= r.scores
            if self.metric not in scores or not (r.logged() or checkpoint):
                continue
            result = {**r.metrics, **scores, "step": r.step}
            if r.step >= self.last_step and running.is_alive():
                held = (result, checkpoint)  # handed over once the run has ended (ASHA's max_t)
                continue
            tune.report(result, checkpoint=checkpoint)
        if held is not None and not failed():
            tune.report(held[0], checkpoint=held[1])
        return diverged


def trainable(config: dict) -> None:
    """One trial: a Ray Train run whose reports (and checkpoints) are handed to Tune."""
    hp = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg = trial_config(config["_base"], hp)
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    donor = tune.get_checkpoint()
    # A restart from a checkpoint (PBT exploit, sweep restore) is a new Train run: deterministic
    # name, no timestamps, and it starts from that checkpoint instead of its own storage.
    run_name = trial_id if donor is None else f"{trial_id}-from-{hashlib.sha256(donor.path.encode()).hexdigest()[:8]}"
    cfg.run.name = run_name
    params = {**hp, "optim.lr_d": cfg.optim.lr_d, "loss.real_label_hi": cfg.loss.real_label_hi}
    run_id = start_run(config["_uri"], cfg.run.experiment, ctx.get_trial_name(),
                       f"{config['_sweep_dir']}/{trial_id}", {**flatten(cfg), **params}, resume=True,
                       parent_run_id=config["_parent"])
    for k, v in (config.get("_evaluation") or {}).items():  # what the trial's FID means, as on a jobs.train run
        MlflowClient(config["_uri"]).set_tag(run_id, f"facegan.fid_{k}", str(v))
    relay = Relay(config["_metric"], total_steps_of(cfg))
    plan = Plan(cfg, run_name, config["_train_storage"], resume=False)
    trainer = build_trainer(plan, config["_uri"], run_id, extra={"init_checkpoint": donor, "hp": params},
                            callbacks=[relay])
    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # re-raised in the trial
            outcome["error"] = e

    running = threading.Thread(target=fit, daemon=True)
    running.start()
    diverged = relay.forward(running, failed=lambda: "error" in outcome)
    end_run(config["_uri"], run_id, "error" not in outcome and not diverged)
    if "error" in outcome:
        raise outcome["error"]
    if diverged:
        raise RuntimeError(f"trial {trial_id}: {diverged}")
