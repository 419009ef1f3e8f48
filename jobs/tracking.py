"""MLflow: where runs go, and the rank-0 writer of metrics, artifacts and the model.

With ``MLFLOW_TRACKING_URI`` unset, runs go to an embedded SQLite store (MLflow 3's
recommended local backend; the file store is deprecated) at ``./mlflow.db`` with artifacts in
``mlartifacts/`` beside it, both resolved to absolute paths on the driver so that Ray workers, whose
working directory differs, write to the same place. Set ``MLFLOW_TRACKING_URI`` to an
``mlflow server`` (``http://host:5000``) when workers run on other nodes.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

RUN_DIR_TAG = "facegan.run_dir"
RUN_NAME_TAG = "facegan.run_name"
MODEL_PATH = "generator"


def resolve_tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    return f"sqlite:///{Path('mlflow.db').resolve()}"


def _experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        # Beside the database, whatever the working directory of whoever creates it.
        location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


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
    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


def end_run(tracking_uri: str, run_id: str, ok: bool | str) -> None:
    """Ends the run; ``ok`` is a bool (FINISHED/FAILED) or an MLflow status such as KILLED."""
    status = ok if isinstance(ok, str) else ("FINISHED" if ok else "FAILED")
    MlflowClient(tracking_uri).set_terminated(run_id, status=status)


class Tracker:
    """Rank 0's writer. Steps already in the run (written before a restart) are not written
    again, so a run resumed from an older checkpoint leaves no duplicate steps in MLflow."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.uri, self.run_id = tracking_uri, run_id
        self.client = MlflowClient(tracking_uri)
        keys = self.client.get_run(run_id).data.metrics
        self.last_step = {k: max(m.step for m in self.client.get_metric_history(run_id, k)) for k in keys}

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        fresh = {k: v for k, v in metrics.items() if step > self.last_step.get(k, -1)}
        if not fresh:
            return
        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in fresh.items()])
        self.last_step.update({k: step for k in fresh})

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

    def log_generator(self, G, model_cfg, step: int | None = None, metrics: dict | None = None,
                      register_as: str = "") -> None:
        log_generator(self.uri, self.run_id, G, model_cfg, register_as)
        tags = {"facegan.generator_step": str(step)} if step is not None else {}
        tags |= {f"facegan.generator_{k}": f"{v:.6g}" for k, v in (metrics or {}).items() if k in ("fid", "kid")}
        self.set_tags(tags)


def log_generator(tracking_uri: str, run_id: str, G, model_cfg, register_as: str = "") -> None:
    """The generator as an MLflow PyTorch model that runs at any batch size.

    MLflow 3 defaults to the pt2 format, which exports the graph traced at the input
    example's batch size; the pickle format keeps the module (and ships ``gan/`` with it via
    ``code_paths``), so the loaded generator takes any number of z's.
    """
    import numpy as np
    import torch
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from gan.models import Generator

    # A fresh module with the trained weights: no compiled forward, device or layout in it.
    clean = Generator(model_cfg)
    clean.load_state_dict({k: v.detach().to("cpu").contiguous() for k, v in G.state_dict().items()})
    G, z_dim = clean.eval(), model_cfg.z_dim
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, z_dim))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, G.size, G.size))]))
    example = (torch.rand(2, z_dim) * 2 - 1).numpy()
    gan_dir = str(Path(__file__).resolve().parents[1] / "gan")
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        mlflow.pytorch.log_model(G, name=MODEL_PATH, serialization_format="pickle", signature=signature,
                                 input_example=example, code_paths=[gan_dir],
                                 registered_model_name=register_as or None,
                                 pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
