"""A generator becomes an MLflow model in a child process, never on a thread of a training one.

MLflow's pt2 format runs ``torch.export``, which traces by patching ``nn.Module.__call__`` and
setting ``torch.compiler.is_exporting()`` for the *whole process*: a forward pass that another
thread runs meanwhile is captured by the tracer or refused (DDP: "Non-recursive
torch.compiler.disable is not supported with torch.export"). So the tracking thread only moves
bytes: :func:`publish` writes the weights to a temporary file and hands its path to

    python -m jobs.publish --serve

a child process that builds a fresh generator, exports and logs it (and registers it), and
answers with one line. The child stays up for the next new best: its imports (torch, MLflow,
torch.export) cost ~6 s of CPU, paid once per process rather than once per publication, and
:func:`warm` starts it early, while training runs, so the first publication does not wait for
them. Training pays for the copy of the weights to the host (milliseconds); the export's
seconds are spent in the child (``benchmarks/export.py`` measures both). The child ends with
:func:`shutdown`, or when its parent is gone (its stdin closes).

A refusal that MLflow will repeat (its ``error_code``) comes back as :class:`PublishError` with
that code, so the tracking thread drops it; anything else (an unreachable server, a child that
died) is retried, by a fresh child.
"""
from __future__ import annotations

import atexit
import dataclasses
import importlib
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models.signature import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Schema, TensorSpec

from evaluation.watermark import source_id_of
from gan.config import ModelConfig
from gan.models import generator
from jobs import marked_model
from jobs.cli import Parser

MODEL_PATH = "generator"
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900  # a child that hangs (a server that accepts but never answers) is replaced, the record retried


class PublishError(RuntimeError):
    def __init__(self, message: str, error_code: str | None = None):
        super().__init__(message)
        self.error_code = error_code  # MLflow's, when the server refused the request


class _Child:
    """``python -m jobs.publish --serve``: request paths in on its stdin, one JSON answer a line out."""

    def __init__(self):
        # The child finds this checkout's packages wherever the worker's working directory is.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.log = tempfile.TemporaryFile()  # its stderr: MLflow's warnings, and what killed it
        self.proc = subprocess.Popen([sys.executable, "-m", "jobs.publish", "--serve"], env=env, bufsize=0,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)

    def ask(self, request: Path, timeout: float) -> dict:
        try:
            self.proc.stdin.write(f"{request}\n".encode())
            self.proc.stdin.flush()
        except OSError:
            raise PublishError(self._died()) from None
        fd, line, deadline = self.proc.stdout.fileno(), b"", time.monotonic() + timeout
        while not line.endswith(b"\n"):
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                self.close(0)
                raise PublishError(f"publishing the generator took over {timeout:.0f} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise PublishError(self._died())
            line += chunk
        return json.loads(line)

    def _died(self) -> str:
        self.proc.wait()
        self.log.seek(0)
        lines = self.log.read().decode(errors="replace").strip().splitlines()
        return f"the publishing process exited {self.proc.returncode}: {(lines or ['(no output)'])[-1][:300]}"

    def close(self, wait: float = 10.0) -> None:
        try:
            self.proc.stdin.close()  # end of requests: it exits
            self.proc.wait(wait)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.log.close()


_lock = threading.Lock()
_child: _Child | None = None


def warm() -> None:
    """Starts the publishing process now (it imports while training runs); returns at once."""
    global _child
    with _lock:
        if _child is None or _child.proc.poll() is not None:
            _child = _Child()


def shutdown() -> None:
    """Ends the publishing process, if one is up (a later :func:`publish` starts another)."""
    global _child
    with _lock:
        if _child is not None:
            _child.close()
            _child = None


atexit.register(shutdown)


def publish(tracking_uri: str, run_id: str, state: dict[str, torch.Tensor], model_cfg: ModelConfig | dict,
            register_as: str = "", description: str = "", timeout: float = TIMEOUT_S) -> None:
    """Logs the generator with weights ``state`` (host tensors) as the run's model, through the
    publishing process; returns when it is in MLflow, raises :class:`PublishError` otherwise."""
    global _child
    model = dataclasses.asdict(model_cfg) if isinstance(model_cfg, ModelConfig) else dict(model_cfg)
    with tempfile.TemporaryDirectory(prefix="facegan-publish-") as tmp:
        request = Path(tmp) / "request.pt"
        torch.save({"state": state, "model": model, "tracking_uri": tracking_uri, "run_id": run_id,
                    "register_as": register_as, "description": description}, request)
        with _lock:
            if _child is None or _child.proc.poll() is not None:
                _child = _Child()
            try:
                answer = _child.ask(request, timeout)
            except PublishError:
                _child.close(0)
                _child = None  # the next publication starts a fresh one
                raise
    if not answer["ok"]:
        raise PublishError(answer["message"], answer.get("error_code"))


def log_generator(tracking_uri: str, run_id: str, G, model_cfg: ModelConfig, register_as: str = "",
                  description: str = "") -> None:
    """The generator as an MLflow PyTorch model that runs at any batch size, exported in this
    process: call it only where no other thread runs torch modules (a child of :func:`publish`,
    or a tool that is not training).

    Saved in MLflow's pt2 format (``torch.export``): a traced graph that loads without
    unpickling anything, so opening a model from a shared tracking server runs no code from it.
    The signature's batch dimension is -1, which MLflow 3.17 exports as dynamic: the loaded
    graph takes any number of z's, 1 included (tested), in eval mode (BN running statistics).
    """

    # A fresh module with the trained weights: no compiled forward, device or layout in it.
    clean = generator(model_cfg)
    clean.load_state_dict({k: v.detach().to("cpu").contiguous() for k, v in G.state_dict().items()})
    G, z_dim = clean.eval(), model_cfg.z_dim
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, z_dim))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, G.size, G.size))]))
    example = (torch.rand(2, z_dim) * 2 - 1).numpy()
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        info = mlflow.pytorch.log_model(G, name=MODEL_PATH, serialization_format="pt2", signature=signature,
                                        input_example=example,
                                        registered_model_name=register_as or None,
                                        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
        # Beside it, the marked model: uint8 faces carrying the provenance mark (jobs/marked_model.py)
        with tempfile.TemporaryDirectory() as tmp:
            marked_model.save_data(Path(tmp) / "data", G, model_cfg, source_id_of(run_id))
            faces = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, z_dim))]),
                                   outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, G.size, G.size, 3))]))
            mlflow.pyfunc.log_model(name=marked_model.NAME, loader_module="jobs.marked_model",
                                    data_path=str(Path(tmp) / "data"), signature=faces,
                                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "facegan"])
    if register_as and info.registered_model_version is not None:
        # Each new best becomes the champion: models:/<name>@champion is always the best so far.
        client = MlflowClient(tracking_uri)
        version = str(info.registered_model_version)
        client.update_registered_model(register_as, description=(
            f"facegan DCGAN generator, {G.size} px: z ~ U(-1, 1) of shape (n, {z_dim}) in, images "
            f"(n, 3, {G.size}, {G.size}) in [-1, 1] out. Alias 'champion': the best FID so far. "
            f"Provenance: this raw tensor model is unmarked; the run's `faces` model (uint8 images out) and "
            f"faces made with `python -m jobs.sample` or `jobs.repair` carry an invisible mark whose payload "
            f"is the run's source id (its facegan.watermark tag, here {source_id_of(run_id)}); "
            f"`python -m jobs.verify IMAGE` reads it."))
        client.update_model_version(register_as, version, description=description or "")
        client.set_registered_model_alias(register_as, "champion", version)


def _handle(path: str) -> dict:
    req = torch.load(path, weights_only=True)
    cfg = ModelConfig(**req["model"])
    G = generator(cfg)
    G.load_state_dict(req["state"])
    try:
        log_generator(req["tracking_uri"], req["run_id"], G, cfg, req["register_as"], req["description"])
    except Exception as e:  # noqa: BLE001 - the parent decides: MLflow's refusals are final, the rest retried
        return {"ok": False, "message": str(e).splitlines()[0][:500] if str(e) else type(e).__name__,
                "error_code": getattr(e, "error_code", None)}
    return {"ok": True}


def serve() -> int:
    """The publishing process: one request path a line on stdin, one JSON answer a line on
    stdout (anything else this process prints goes to stderr); ends when stdin closes."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    torch.set_num_threads(1)  # beside training: one core's worth, and only for seconds
    importlib.import_module("torch.export")  # imported now, while nothing waits for it
    for line in sys.stdin:
        if line.strip():
            answers.write(json.dumps(_handle(line.strip())) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = Parser("jobs.publish", "The publishing process that jobs.publish.publish starts (see this module's docstring); "
                               "not a command to run by hand.")
    p.add_argument("--serve", action="store_true", help="read request paths on stdin, answer each on stdout")
    a = p.parse_args(argv)
    if not a.serve:
        p.error("this is the publishing process that training starts: python -m jobs.publish --serve")
    return serve()


if __name__ == "__main__":
    sys.exit(main())
