"""The training core's Context on a Ray Train worker: checkpoints through Ray Train, tracking
through MLflow from rank 0 only."""
from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

import ray.train
import ray.train.torch
from ray.train import CheckpointUploadMode

from gan.checkpoint import CheckpointError, load_state, save_state, to_host
from gan.context import CHECKPOINT_FILE, TorchDistributedContext
from jobs.tracking import Tracker

ASYNC = CheckpointUploadMode.ASYNC


class RayTrainContext(TorchDistributedContext):
    def __init__(self, tracker: Tracker | None, model_cfg=None, register_as: str = "",
                 init_checkpoint=None, hp: dict | None = None):
        super().__init__(ray.train.torch.get_device())
        self.model_cfg, self.register_as = model_cfg, register_as
        # Where to start when this Train run has no checkpoint of its own (a Tune trial
        # restarted from a donor's or its own earlier checkpoint): a ray.train.Checkpoint.
        self.init_checkpoint = init_checkpoint
        self.last_scores: dict[str, float] = {}
        self.pending: threading.Event | None = None  # rank 0's checkpoint upload in flight
        self.ckpt_suffix = ""  # set when a resume skipped damaged checkpoints (load_checkpoint)
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
            if self.init_checkpoint is None:
                return None
            # Through the Checkpoint's own filesystem: a donor in object storage works as a local one.
            with self.init_checkpoint.as_directory() as d:
                return load_state(Path(d) / CHECKPOINT_FILE)
        # The latest first; a damaged one is named and the one before it used, so a corrupt
        # file costs the steps since the previous checkpoint, not the run.
        skipped = []
        for c in [ckpt, *_older(ckpt)]:
            try:
                with c.as_directory() as d:
                    state = load_state(Path(d) / CHECKPOINT_FILE)
            except CheckpointError as e:
                skipped.append(f"skipping checkpoint {c.path}: {e}")
                if self.rank == 0:
                    print(f"facegan: {skipped[-1]}", flush=True)
                continue
            if skipped:
                # The steps after this one get checkpointed again: under new names, since Ray
                # still lists the damaged directories and deletes them when they rotate out.
                self.ckpt_suffix = f"_from_{state['step']:09d}"
                if self.tracker is not None:  # in the run's page, not only in a worker log
                    self.tracker.set_tags({"facegan.skipped_checkpoints": " | ".join(skipped)})
            return state
        raise CheckpointError(f"no intact checkpoint in {ckpt.path.rsplit('/', 1)[0]}")

    def report(self, step, metrics, checkpoint=None, artifacts=None, model=None, tags=None) -> None:
        if self.tracker is not None:
            if tags:
                self.tracker.set_tags(tags)
            self.tracker.log_metrics(step, {**metrics, **self.hp_metrics})
            self.hp_metrics = {}
            if artifacts:
                self.tracker.log_artifacts(artifacts)
                self.tracker.log_images(step, artifacts)
            if model is not None:
                self.tracker.log_generator(model, self.model_cfg, step=step, metrics=metrics,
                                           register_as=self.register_as)
        self.last_scores |= {k: v for k, v in metrics.items() if k in ("fid", "kid")}
        # Schedulers read the latest quality with every report; MLflow gets each score once.
        metrics = {**metrics, **self.last_scores}
        if checkpoint is None:
            if metrics:
                ray.train.report({**metrics, "step": step}, checkpoint_upload_mode=ASYNC)
            return
        # Every rank reports; only rank 0 hands over a checkpoint (the state is replicated).
        # The state is copied to the host here; serialising and uploading it happen on Ray's
        # checkpoint thread (ASYNC), which also registers it, in report order, once it is in
        # storage. Every report is ASYNC: a SYNC one would wait behind the upload.
        ckpt, upload_fn = None, None
        if self.rank == 0:
            self.flush()  # one checkpoint in flight: host memory holds at most two states
            state, tmp = to_host(checkpoint()), Path(tempfile.mkdtemp(prefix="facegan-ckpt-"))
            storage, done = ray.train.get_context().get_storage(), threading.Event()
            self.pending = done

            def upload(c: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
                try:
                    save_state(state, tmp / CHECKPOINT_FILE)
                    return storage.persist_current_checkpoint(c, name)  # what Ray does without upload_fn
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)  # on success Ray deletes it after upload
                    raise
                finally:
                    done.set()

            ckpt, upload_fn = ray.train.Checkpoint.from_directory(str(tmp)), upload
        ray.train.report({**metrics, "step": step}, checkpoint=ckpt, checkpoint_upload_mode=ASYNC,
                         checkpoint_upload_fn=upload_fn,
                         checkpoint_dir_name=f"checkpoint_{step:09d}{self.ckpt_suffix}")

    def flush(self) -> None:
        """Waits for this rank's checkpoint upload (a failed one is raised by Ray itself, from
        its checkpoint thread; Ray also waits for that thread when the training function ends)."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None


def _older(ckpt) -> list:
    """The run's earlier checkpoints, newest first, on the checkpoint's own filesystem (local
    or object storage): the names carry the zero-padded step (``checkpoint_000000120``)."""
    import pyarrow.fs as pafs

    parent, name = ckpt.path.rstrip("/").rsplit("/", 1)
    infos = ckpt.filesystem.get_file_info(pafs.FileSelector(parent))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory
                   and i.base_name.startswith("checkpoint_") and i.base_name < name)
    return [ray.train.Checkpoint(f"{parent}/{n}", filesystem=ckpt.filesystem) for n in reversed(names)]
