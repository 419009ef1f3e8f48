"""The training core's Context on a Ray Train worker: checkpoints through Ray Train, tracking
through MLflow from rank 0 only."""
from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

import pyarrow.fs as pafs
import ray.train
import ray.train.torch
from ray.train import CheckpointUploadMode

from gan.checkpoint import CheckpointError, load_state, save_state, to_host
from gan.context import CHECKPOINT_FILE, TorchDistributedContext
from gan.report import Report
from jobs.tracking import Tracker

ASYNC = CheckpointUploadMode.ASYNC


class RayTrainContext(TorchDistributedContext):
    def __init__(self, tracker: Tracker | None, model_cfg=None, register_as: str = "",
                 init_checkpoint=None, hp: dict | None = None, publish: str = "each_best"):
        super().__init__(ray.train.torch.get_device())
        self.model_cfg, self.register_as, self.publish = model_cfg, register_as, publish
        self.best_model: tuple | None = None  # (host weights, step, scores) under publish = "end"
        # Where to start when this Train run has no checkpoint of its own (a Tune trial
        # restarted from a donor's or its own earlier checkpoint): a ray.train.Checkpoint.
        self.init_checkpoint = init_checkpoint
        self.pending: threading.Event | None = None  # rank 0's checkpoint upload in flight
        self.ckpt_suffix = ""  # set when a resume skipped damaged checkpoints (load_checkpoint)
        # TorchTrainer has set up the process group; these agree with torch.distributed.
        ctx = ray.train.get_context()
        assert self.rank == ctx.get_world_rank() and self.world_size == ctx.get_world_size()
        self.tracker = tracker if self.rank == 0 else None
        self.hp = hp or {}  # a sweep trial's current hyper-parameters (logged by load_checkpoint)

    def load_checkpoint(self):
        state = self._load_checkpoint()
        if self.tracker is not None and self.hp:
            # A trial's hyper-parameters as tags, and as points at the step this run starts
            # from, so that a PBT schedule reads off a chart.
            self.tracker.set_tags({f"hp.{k}": f"{v:.6g}" if isinstance(v, float) else str(v) for k, v in self.hp.items()})
            self.tracker.log_metrics(state["step"] if state is not None else 0,
                                     {f"hp.{k}": float(v) for k, v in self.hp.items() if isinstance(v, (int, float))})
        return state

    def _load_checkpoint(self):
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

    def report(self, report: Report) -> None:
        if self.tracker is not None:
            self._track(report)
        # Ray carries the report's summary (plain values) to its controller: the progress
        # bar and the Tune relay read it back with Report.from_summary.
        if report.checkpoint is None:
            if report.logged() or report.resumed_from is not None or report.diverged:  # alike on every rank
                ray.train.report(report.summary(), checkpoint_upload_mode=ASYNC)
            return
        # Every rank reports; only rank 0 hands over a checkpoint (the state is replicated).
        # The state is copied to the host here; serialising and uploading it happen on Ray's
        # checkpoint thread (ASYNC), which also registers it, in report order, once it is in
        # storage. Every report is ASYNC: a SYNC one would wait behind the upload.
        ckpt, upload_fn = None, None
        if self.rank == 0:
            self.flush()  # one checkpoint in flight: host memory holds at most two states
            state, tmp = to_host(report.checkpoint()), Path(tempfile.mkdtemp(prefix="facegan-ckpt-"))
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
        ray.train.report(report.summary(), checkpoint=ckpt, checkpoint_upload_mode=ASYNC,
                         checkpoint_upload_fn=upload_fn,
                         checkpoint_dir_name=f"checkpoint_{report.step:09d}{self.ckpt_suffix}")

    def report_audits(self, step: int, audits: dict[str, float]) -> None:
        """The final audits' verdicts, to Ray (a sweep's privacy cap reads them from Tune's
        results, not back from MLflow). Every rank calls it, rank 0 with the verdicts."""
        ray.train.report(Report(step, audits=audits if self.rank == 0 else {}).summary(),
                         checkpoint_upload_mode=ASYNC)

    def _track(self, r: Report) -> None:
        """Rank 0's MLflow record of a report: a resume is a point on the ``resumed_from_step``
        chart, a divergence the run's ``facegan.failed_reason`` tag."""
        tags = {**r.tags, **({"facegan.failed_reason": r.diverged} if r.diverged else {})}
        if tags:
            self.tracker.set_tags(tags)
        logged = {**r.logged(), **({"resumed_from_step": float(r.resumed_from)} if r.resumed_from is not None else {})}
        if logged:
            self.tracker.log_metrics(r.step, logged)
        if r.artifacts:
            self.tracker.log_artifacts(r.artifacts)
            self.tracker.log_images(r.step, r.artifacts)
        if r.model is not None and self.publish == "end":  # a host copy until the last step
            self.best_model = (to_host(r.model.state_dict()), r.step, dict(r.scores))
        elif r.model is not None:
            self.tracker.log_generator(r.model, self.model_cfg, step=r.step, scores=r.scores,
                                       register_as=self.register_as)

    def publish_best(self, result) -> None:
        """eval.publish = "end": the best generator kept by :meth:`report` becomes the run's model.
        A run resumed after its best evaluation no longer holds those weights: it publishes its
        final generator (the ``facegan.generator_step`` tag says which step that is)."""
        if self.tracker is not None and self.publish == "end" and result.best is not None:
            if self.best_model is None:
                self.tracker.log_generator(result.generator, self.model_cfg, step=result.step,
                                           register_as=self.register_as)
            else:
                state, step, scores = self.best_model
                self.tracker.log_generator_state(state, self.model_cfg, step=step, scores=scores,
                                                 register_as=self.register_as)
        self.best_model = None

    def flush(self) -> None:
        """Waits for this rank's checkpoint upload (a failed one is raised by Ray itself, from
        its checkpoint thread; Ray also waits for that thread when the training function ends)."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None


def _older(ckpt) -> list:
    """The run's earlier checkpoints, newest first, on the checkpoint's own filesystem (local
    or object storage): the names carry the zero-padded step (``checkpoint_000000120``)."""

    parent, name = ckpt.path.rstrip("/").rsplit("/", 1)
    infos = ckpt.filesystem.get_file_info(pafs.FileSelector(parent))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory
                   and i.base_name.startswith("checkpoint_") and i.base_name < name)
    return [ray.train.Checkpoint(f"{parent}/{n}", filesystem=ckpt.filesystem) for n in reversed(names)]
