"""The training core's Context on a Ray Train worker: checkpoints through Ray Train, tracking
through MLflow from rank 0 only."""
from __future__ import annotations

import tempfile
from pathlib import Path

import ray.train
import ray.train.torch

from gan.checkpoint import load_state, save_state
from gan.context import CHECKPOINT_FILE, TorchDistributedContext
from jobs.tracking import Tracker


class RayTrainContext(TorchDistributedContext):
    def __init__(self, tracker: Tracker | None, model_cfg=None, register_as: str = "",
                 init_checkpoint: str | None = None, hp: dict | None = None):
        super().__init__(ray.train.torch.get_device())
        self.model_cfg, self.register_as = model_cfg, register_as
        # Where to start when this Train run has no checkpoint of its own (a Tune trial
        # restarted from a donor's or its own earlier checkpoint).
        self.init_checkpoint = init_checkpoint
        self.last_scores: dict[str, float] = {}
        # TorchTrainer has set up the process group; these agree with torch.distributed.
        ctx = ray.train.get_context()
        assert self.rank == ctx.get_world_rank() and self.world_size == ctx.get_world_size()
        self.tracker = tracker if self.rank == 0 else None
        # A sweep trial's current hyper-parameters: as tags, and in the metric history with the
        # first report, at the step this run starts from, so a PBT schedule reads off a chart.
        hp = hp or {}
        self.hp_metrics = {f"hp.{k}": float(v) for k, v in hp.items() if isinstance(v, (int, float))}
        if self.tracker is not None and hp:
            self.tracker.set_tags({f"hp.{k}": f"{v:.6g}" if isinstance(v, float) else str(v) for k, v in hp.items()})

    def load_checkpoint(self):
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return load_state(Path(self.init_checkpoint) / CHECKPOINT_FILE) if self.init_checkpoint else None
        with ckpt.as_directory() as d:
            return load_state(Path(d) / CHECKPOINT_FILE)

    def report(self, step, metrics, checkpoint=None, artifacts=None, model=None, tags=None) -> None:
        if self.tracker is not None:
            if tags:
                self.tracker.set_tags(tags)
            self.tracker.log_metrics(step, {**metrics, **self.hp_metrics})
            self.hp_metrics = {}
            if artifacts:
                self.tracker.log_artifacts(artifacts)
            if model is not None:
                self.tracker.log_generator(model, self.model_cfg, step=step, metrics=metrics,
                                           register_as=self.register_as)
        self.last_scores |= {k: v for k, v in metrics.items() if k in ("fid", "kid")}
        # Schedulers read the latest quality with every report; MLflow gets each score once.
        metrics = {**metrics, **self.last_scores}
        if checkpoint is None:
            if metrics:
                ray.train.report({**metrics, "step": step})
            return
        # Every rank reports; only rank 0 hands over a checkpoint (the state is replicated).
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if self.rank == 0:
                save_state(checkpoint(), Path(tmp) / CHECKPOINT_FILE)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**metrics, "step": step}, checkpoint=ckpt,
                             checkpoint_dir_name=f"checkpoint_{step:09d}")
