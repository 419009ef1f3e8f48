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
    def __init__(self, tracker: Tracker | None, model_cfg=None, register_as: str = ""):
        super().__init__(ray.train.torch.get_device())
        self.model_cfg, self.register_as = model_cfg, register_as
        # TorchTrainer has set up the process group; these agree with torch.distributed.
        ctx = ray.train.get_context()
        assert self.rank == ctx.get_world_rank() and self.world_size == ctx.get_world_size()
        self.tracker = tracker if self.rank == 0 else None

    def load_checkpoint(self):
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return load_state(Path(d) / CHECKPOINT_FILE)

    def report(self, step, metrics, checkpoint=None, artifacts=None, model=None) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics(step, metrics)
            if artifacts:
                self.tracker.log_artifacts(artifacts)
            if model is not None:
                self.tracker.log_generator(model, self.model_cfg, step=step, metrics=metrics,
                                           register_as=self.register_as)
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
