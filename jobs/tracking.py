"""MLflow: where runs go, and the rank-0 writer of metrics, artifacts and the model.

With ``MLFLOW_TRACKING_URI`` unset, runs go to an embedded SQLite store (MLflow 3's
recommended local backend; the file store is deprecated) at ``./mlflow.db`` with artifacts in
``mlartifacts/`` beside it, both resolved to absolute paths on the driver so that Ray workers, whose
working directory differs, write to the same place. Set ``MLFLOW_TRACKING_URI`` to an
``mlflow server`` (``http://host:5000``) when workers run on other nodes.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.environment_variables import MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient
from PIL import Image

from datasets.shards import ShardSet
from evaluation.fid import manifest_digest
from evaluation.watermark import source_id_of
from gan.config import ConfigError
from jobs.publish import publish

RUN_DIR_TAG = "facegan.run_dir"
RUN_NAME_TAG = "facegan.run_name"
WATERMARK_TAG = "facegan.watermark"


def resolve_tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    return f"sqlite:///{Path('mlflow.db').resolve()}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Before anything starts: the tracking URI answers within ``timeout`` seconds, or a
    one-line ConfigError (an unreachable server used to cost ~4 minutes of MLflow's retries
    and a chain of tracebacks)."""

    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
                r.read()
        except urllib.error.HTTPError as e:
            raise ConfigError(f"MLFLOW_TRACKING_URI: {uri}/health answered HTTP {e.code}; is it an mlflow server?") from None
        except (OSError, urllib.error.URLError) as e:
            why = getattr(e, "reason", None) or e
            raise ConfigError(f"MLFLOW_TRACKING_URI: {uri} is not reachable within {timeout:g} s ({why}); start "
                              f"the server (infra/local.sh) or unset MLFLOW_TRACKING_URI for ./mlflow.db") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not os.access(folder, os.W_OK):
            raise ConfigError(f"MLFLOW_TRACKING_URI: {folder} (the SQLite store's folder) is not writable")


def _experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if "mlflow.experimentKind" not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, "mlflow.experimentKind", "custom_model_development")
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        # Beside the database, whatever the working directory of whoever creates it.
        location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    # Model training, so the UI opens the experiment on runs and charts, not in GenAI mode.
    return client.create_experiment(name, artifact_location=location,
                                    tags={"mlflow.experimentKind": "custom_model_development"})


def source_tags(entry_point: str) -> dict[str, str]:
    """What the UI shows as the run's source: the entry point and, in a git checkout, the commit."""

    tags = {"mlflow.source.name": entry_point, "mlflow.source.type": "JOB"}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                                capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
    except OSError:  # no git on this machine
        pass
    return tags


def log_dataset(tracking_uri: str, run_id: str, path: str, context: str) -> None:
    """A shard set as one of the run's inputs ("Datasets" in the UI): its location, the
    manifest's digest, split and count (the same digest that keys the FID caches)."""

    shards = ShardSet(path)
    name = f"{Path(path).parent.name}/{Path(path).name}"
    ds = MetaDataset(resolve_dataset_source(str(path)), name=name, digest=manifest_digest(shards)[:16])
    e = ds._to_mlflow_entity()
    profile = json.dumps({"faces": shards.count, "image_size": shards.image_size,
                          "source": shards.manifest.get("source", "")})
    entity = Dataset(e.name, e.digest, e.source_type, e.source, schema=e.schema, profile=profile)
    MlflowClient(tracking_uri).log_inputs(run_id, [DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])])


def find_run(tracking_uri: str, experiment: str, run_dir: str):
    """The MLflow run that records ``run_dir``, or None."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    found = exp and client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir}'",
                                       max_results=1)
    return found[0] if found else None


def start_run(tracking_uri: str, experiment: str, run_name: str, run_dir: str, params: dict,
              resume: bool, parent_run_id: str | None = None) -> str:
    """Creates the run (params logged once) or, on resume, finds the one for ``run_dir``."""
    client = MlflowClient(tracking_uri)
    exp_id = _experiment_id(client, experiment, tracking_uri)
    if resume:
        found = find_run(tracking_uri, experiment, run_dir)
        if found:
            client.update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id
    tags = {RUN_DIR_TAG: run_dir, RUN_NAME_TAG: run_name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id  # shows as nested under the sweep in the UI
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    # The payload of the provenance mark on every face made from this run (jobs.sample, jobs.repair)
    client.set_tag(run.info.run_id, WATERMARK_TAG, source_id_of(run.info.run_id))
    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


def end_run(tracking_uri: str, run_id: str, ok: bool | str) -> None:
    """Ends the run; ``ok`` is a bool (FINISHED/FAILED) or an MLflow status such as KILLED."""
    status = ok if isinstance(ok, str) else ("FINISHED" if ok else "FAILED")
    MlflowClient(tracking_uri).set_terminated(run_id, status=status)


def system_metrics(tracking_uri: str, run_id: str):
    """MLflow's system metrics (CPU, memory, disk, network; GPU utilisation and memory where a
    GPU and pynvml exist) of this node, every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds
    (default 10), as ``system/*`` metrics of the run. Started by rank 0 only: other nodes are
    not sampled (only rank 0 writes tracking)."""

    monitor = SystemMetricsMonitor(run_id, sampling_interval=MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.get() or 10,
                                   tracking_uri=tracking_uri)
    monitor.start()
    return monitor


class Tracker:
    """Rank 0's writer. Metric steps already in the run (written before a restart, or sent
    again after a connection broke mid-request) are not written again, so MLflow holds each
    step of each metric once."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.uri, self.run_id = tracking_uri, run_id
        self.client = MlflowClient(tracking_uri)
        keys = self.client.get_run(run_id).data.metrics
        self.logged = {k: {m.step for m in self.client.get_metric_history(run_id, k)} for k in keys}

    @property
    def last_step(self) -> dict[str, int]:
        return {k: max(steps) for k, steps in self.logged.items() if steps}

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        fresh = {k: v for k, v in metrics.items() if step not in self.logged.get(k, ())}
        if not fresh:
            return
        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in fresh.items()])
        for k in fresh:
            self.logged.setdefault(k, set()).add(step)

    def log_images(self, step: int, artifacts: dict[str, bytes]) -> None:
        """Sample grids as MLflow images by step: the UI shows them on a step slider beside the
        charts (``samples/real.png`` under the key ``real``, every other grid under ``samples``)."""

        for rel, data in artifacts.items():
            if rel.startswith("samples/") and rel.endswith(".png"):
                key = "real" if rel == "samples/real.png" else "samples"
                self.client.log_image(self.run_id, Image.open(io.BytesIO(data)), key=key, step=step,
                                      synchronous=True)

    def log_artifacts(self, artifacts: dict[str, bytes]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for rel, data in artifacts.items():
                path = Path(tmp) / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                parent = str(Path(rel).parent)
                self.client.log_artifact(self.run_id, str(path), None if parent == "." else parent)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def publish_generator(self, state: dict, model_cfg, step: int | None = None, scores: dict | None = None,
                          register_as: str = "") -> None:
        """A generator's weights (host tensors) as the run's model: exported in a child process
        (jobs/publish.py), so that no thread of this process traces a module."""
        what = f"step {step}" + "".join(f", {k} {v:.4g}" for k, v in scores.items())
        publish(self.uri, self.run_id, state, model_cfg, register_as, description=f"run {self.run_id}, {what}")
        tags = {"facegan.generator_step": str(step)} if step is not None else {}
        tags |= {f"facegan.generator_{k}": f"{v:.6g}" for k, v in scores.items()}
        self.set_tags(tags)
