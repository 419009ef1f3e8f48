"""Tracking that never blocks training: rank 0's MLflow writes go through a background thread.

Training hands each write (metrics, tags, images, artifacts, a new best generator) to a
:class:`BackgroundTracker`, which returns at once. A writer thread sends them, in order, through
the ordinary :class:`jobs.tracking.Tracker` with short timeouts (MLflow's HTTP retries off, 10 s
a request). While the server is unreachable the writer keeps the oldest record and retries with
back-off; records past a bounded memory buffer (``MEMORY``) are spilled, in order, to the run's
spool directory (``<run dir>/tracking_spool``, one file per record, written under a temporary
name and renamed). When the server returns, everything is sent in order. At the end of training
the writer finishes what it is sending and gives a server that is still unreachable ``grace``
more seconds; what is unsent then stays in the spool and ``python -m jobs.sync <run dir>``
sends it later. Metric steps already in the run are skipped
(Tracker), so a record sent twice duplicates nothing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections import deque
from pathlib import Path

import torch

from gan.checkpoint import to_host
from jobs import publish
from jobs.tracking import Tracker, end_run

SPOOL = "tracking_spool"
MEMORY = int(os.environ.get("FACEGAN_TRACKING_MEMORY", "64"))  # records in memory before spilling to disk
# A dead server must cost the writer seconds, not MLflow's default ~4 minutes of retries.
FAST_FAIL = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST", "PERMISSION_DENIED"}


def fail_fast() -> None:
    os.environ.update(FAST_FAIL)


def permanent(e: BaseException) -> bool:
    """A refusal the server will repeat (a bad request), as opposed to an outage."""
    return getattr(e, "error_code", None) in PERMANENT


class Spool:
    """Records on disk, oldest first; written by several processes (names sort by time), with
    ``run.json`` saying which MLflow run they belong to."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self._seq = 0

    def claim(self, tracking_uri: str, run_id: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".run.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"tracking_uri": tracking_uri, "run_id": run_id}))
        os.replace(tmp, self.dir / "run.json")

    def owner(self) -> tuple[str, str]:
        meta = json.loads((self.dir / "run.json").read_text())
        return meta["tracking_uri"], meta["run_id"]

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("*.rec")) if self.dir.is_dir() else []

    def key(self) -> str:
        """A record's place in the order, taken when it is made (kept if it is spilled later)."""
        self._seq += 1
        return f"{time.time_ns():020d}-{os.getpid()}-{self._seq:06d}"

    def write(self, record: dict, key: str | None = None) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{key or self.key()}.rec"
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(record, tmp)
        os.replace(tmp, path)
        return path

    @staticmethod
    def read(path: Path) -> dict:
        return torch.load(path, weights_only=True)  # our own records: tensors, numbers, strings, bytes


def send(tracker, record: dict) -> None:
    """Applies one record through a Tracker (or anything with its methods)."""
    kind, args = record["kind"], record["args"]
    if kind == "metrics":
        tracker.log_metrics(*args)
    elif kind == "tags":
        tracker.set_tags(args)
    elif kind == "images":
        tracker.log_images(*args)
    elif kind == "artifacts":
        tracker.log_artifacts(args)
    elif kind == "generator":  # weights only: the export runs in a child process (jobs/publish.py)
        state, model, step, scores, register_as = args
        tracker.publish_generator(state, model, step=step, scores=scores, register_as=register_as)
    elif kind == "end":
        end_run(tracker.uri, tracker.run_id, args)
    else:
        raise ValueError(f"unknown tracking record kind {kind!r}")


class BackgroundTracker:
    """Tracker's interface for rank 0; every call returns at once (see the module docstring)."""

    def __init__(self, tracking_uri: str, run_id: str, spool_dir: str | Path, memory: int = MEMORY):
        fail_fast()
        self.uri, self.run_id = tracking_uri, run_id
        self.spool = Spool(spool_dir)
        self.spool.claim(tracking_uri, run_id)
        self.deadline = float("inf")
        self.memory: deque[tuple[str, dict]] = deque()
        self.limit, self.spilling = memory, False
        self.lock, self.wake = threading.Lock(), threading.Event()
        self.stopping = False
        self.outage_since: float | None = None
        self._tracker = None
        self.thread = threading.Thread(target=self._run, name="mlflow-writer", daemon=True)
        self.thread.start()

    # -- the Tracker interface (training thread) --
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if metrics:
            self._put("metrics", (step, {k: float(v) for k, v in metrics.items()}))

    def set_tags(self, tags: dict[str, str]) -> None:
        if tags:
            self._put("tags", {k: str(v) for k, v in tags.items()})

    def log_images(self, step: int, artifacts: dict[str, bytes]) -> None:
        self._put("images", (step, dict(artifacts)))

    def log_artifacts(self, artifacts: dict[str, bytes]) -> None:
        self._put("artifacts", dict(artifacts))

    def log_generator(self, G, model_cfg, step=None, scores=None, register_as: str = "") -> None:
        self.log_generator_state(to_host(G.state_dict()), model_cfg, step, scores, register_as)

    def log_generator_state(self, state: dict, model_cfg, step=None, scores=None, register_as: str = "") -> None:
        """:meth:`log_generator` for weights already copied to the host."""
        scores = {k: float(v) for k, v in (scores or {}).items()}
        self._put("generator", (state, dataclasses.asdict(model_cfg), step, scores, register_as))

    def _put(self, kind: str, args) -> None:
        record = {"kind": kind, "args": args}
        with self.lock:
            key = self.spool.key()
            if self.spilling or len(self.memory) >= self.limit:
                self.spilling = True  # until the spool is drained: keeps the order
                self.spool.write(record, key)
            else:
                self.memory.append((key, record))
        self.wake.set()

    # -- the writer thread --
    def _next(self) -> tuple[dict, Path | None] | None:
        with self.lock:
            if self.memory:
                return self.memory[0][1], None
            files = self.spool.files()
            if files:
                return Spool.read(files[0]), files[0]
            self.spilling = False
            return None

    def _done(self, path: Path | None) -> None:
        with self.lock:
            if path is None:
                self.memory.popleft()
            else:
                path.unlink(missing_ok=True)

    def _run(self) -> None:
        backoff = 0.5
        while True:
            item = self._next()
            if item is None:
                if self.stopping:
                    return
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            record, path = item
            try:
                if self._tracker is None:
                    self._tracker = Tracker(self.uri, self.run_id)
                send(self._tracker, record)
            except Exception as e:  # noqa: BLE001 - the writer must outlive any failure
                if permanent(e):
                    print(f"facegan: tracking refused a {record['kind']} record, dropped: {str(e)[:200]}", flush=True)
                    self._done(path)
                    continue
                # The request may have landed before the connection broke: a fresh Tracker
                # re-reads the steps the server has, so the resend duplicates no metric step.
                self._tracker = None
                if self.outage_since is None:
                    self.outage_since = time.monotonic()
                    print(f"facegan: tracking server {self.uri} unreachable; training goes on, records are "
                          f"kept and sent when it returns ({str(e).splitlines()[0][:160]})", flush=True)
                if self.stopping and self.deadline <= time.monotonic():
                    return
                time.sleep(min(backoff, max(0.0, self.deadline - time.monotonic()) if self.stopping else backoff))
                backoff = min(backoff * 2, 15.0)
                continue
            if self.outage_since is not None:
                print(f"facegan: tracking server back after {time.monotonic() - self.outage_since:.0f} s; "
                      f"sending what was kept", flush=True)
                self.outage_since = None
            backoff = 0.5
            self._done(path)

    def close(self, grace: float = 30.0) -> int:
        """Waits for the writer to send what is left, giving an unreachable server ``grace``
        seconds more, then spills the rest to the spool. Returns the number of records left
        unsent (0: MLflow has everything)."""
        self.deadline = time.monotonic() + grace  # binds only while sends fail: slow but working is waited for
        self.stopping = True
        self.wake.set()
        self.thread.join()
        publish.shutdown()  # the publishing process, if one was started: nothing is left to publish
        with self.lock:
            while self.memory:  # under the keys they were made with: before the records spilled later
                self.spool.write(*reversed(self.memory.popleft()))
            return len(self.spool.files())


def spool_of(run_dir: str | Path) -> Spool:
    return Spool(Path(run_dir) / SPOOL)


def spooled_tags(run_dir: str | Path) -> dict[str, str]:
    """The tags waiting in a run's spool (what the driver reads when the server is away)."""
    tags: dict[str, str] = {}
    for path in spool_of(run_dir).files():
        record = Spool.read(path)
        if record["kind"] == "tags":
            tags |= record["args"]
    return tags


def replay(run_dir: str | Path, tracking_uri: str | None = None) -> tuple[int, str, str]:
    """Sends a run's spooled records in order (``python -m jobs.sync``); each record's file is
    removed once sent. Returns (records sent, tracking URI, run id)."""

    spool = spool_of(run_dir)
    files = spool.files()
    if not files:
        return 0, "", ""
    uri, run_id = spool.owner()
    uri = tracking_uri or uri
    tracker = Tracker(uri, run_id)
    for path in files:
        send(tracker, Spool.read(path))
        path.unlink()
    return len(files), uri, run_id
