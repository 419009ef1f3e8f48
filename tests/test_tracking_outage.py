"""A tracking outage never stops training (jobs/spool.py): a real 2-worker run on a local Ray,
tracked by a real `mlflow server` on 127.0.0.1 that the test kills (SIGKILL, its whole process
group) once training has written its first checkpoint. Either the server comes back while the
run trains, and rank 0 sends what it kept by itself, or it never does, and the run still ends
at its target step with everything in the spool for `jobs.sync`. Both end with every metric step
in MLflow exactly once, the grids and the model."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from jobs import sync
from jobs import train as train_job
from jobs.spool import spool_of
from tests.conftest import _free_port, start_mlflow_server
from tests.test_ray_train import _args, _steps

STEPS, LOG = 60, 4


@pytest.fixture(scope="module")
def spill_env():
    """Set before the module's Ray starts, so that its workers inherit it: a memory buffer of
    4 records, so that an outage spills to the spool on disk."""
    os.environ["FACEGAN_TRACKING_MEMORY"] = "4"
    yield
    os.environ.pop("FACEGAN_TRACKING_MEMORY", None)


pytestmark = pytest.mark.usefixtures("spill_env", "ray_local")


def _kill_when(run_dir: Path, step: int, proc, killed: list, timeout: float = 300) -> None:
    """SIGKILL the server's process group once the run has a checkpoint at ``step`` or later
    (and before its last); ``killed`` gets the checkpoint steps there were then."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(p.name.split("_")[1][:9]) for p in run_dir.glob("checkpoint_0*")]
        if any(s >= step for s in steps):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            killed.append(max(steps))
            return
        time.sleep(0.05)


def _run(faces, tmp_path, name: str, *extra):
    return train_job.main(_args(faces, tmp_path / "runs", name, STEPS, f"--train.log_every={LOG}",
                                "--train.epochs=10", *extra))


def _assert_complete(uri: str, run_id: str):
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    # Reports at every log step and every checkpoint step (10): each step once, none missing.
    want = sorted(set(range(LOG, STEPS + 1, LOG)) | set(range(10, STEPS + 1, 10)))
    for key in ("d_loss", "g_loss", "img_per_s"):
        assert sorted(_steps(client, run_id, key)) == want, key
    images = {a.path.split("/")[-1].split("+timestamp")[0] for a in client.list_artifacts(run_id, "images")}
    assert {"real+step+0", f"samples+step+{STEPS}"} <= images, images
    assert {a.path for a in client.list_artifacts(run_id, "samples")} >= {"samples/final.png", "samples/real.png"}
    mlflow.set_tracking_uri(uri)  # runs:/ resolves through the global URI, which other tests set
    G = mlflow.pytorch.load_model(f"runs:/{run_id}/generator")
    assert run.data.tags["facegan.generator_step"] == str(STEPS)
    assert torch.isfinite(G(torch.zeros(1, 100))).all()


@pytest.fixture
def server(tmp_path, monkeypatch):
    port, store = _free_port(), tmp_path / "server"
    store.mkdir()
    procs = [start_mlflow_server(store, port)]
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    yield uri, store, port, procs
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=30)


def test_server_killed_mid_run_and_back_while_training(faces64, tmp_path, server, capsys):
    uri, store, port, procs = server
    run_dir = tmp_path / "runs" / "outage"

    killed: list = []

    def outage():
        _kill_when(run_dir, 10, procs[0], killed)
        time.sleep(5)  # down while steps, grids and checkpoints go on
        procs.append(start_mlflow_server(store, port))
    killer = threading.Thread(target=outage, daemon=True)
    killer.start()
    # A long grace: rank 0 sends what it kept itself once the server is back, whether that is
    # before the last step or while it waits at the end.
    assert _run(faces64, tmp_path, "outage", "--run.tracking_grace_s=120") == 0
    killer.join(timeout=60)
    assert killed and killed[0] < STEPS  # the server died mid-run
    out = capsys.readouterr().out
    run_id = out.split("run_id: ")[1].split()[0]
    assert spool_of(run_dir).files() == []  # nothing left for jobs.sync
    _assert_complete(uri, run_id)


@pytest.mark.extended  # the outage's first scenario, server back mid-run, is in the default tier
def test_server_killed_mid_run_and_never_back(faces64, tmp_path, server, capsys):
    uri, store, port, procs = server
    run_dir = tmp_path / "runs" / "gone"
    killed: list = []
    killer = threading.Thread(target=_kill_when, args=(run_dir, 10, procs[0], killed), daemon=True)
    killer.start()
    assert _run(faces64, tmp_path, "gone", "--run.tracking_grace_s=2") == 0  # trained to the end all the same
    killer.join(timeout=60)
    assert killed and killed[0] < STEPS
    captured = capsys.readouterr()
    run_id = captured.out.split("run_id: ")[1].split()[0]
    assert f"python -m jobs.sync {run_dir}" in captured.err and "FINISHED status" in captured.err
    assert (sorted(run_dir.glob("checkpoint_0*"))[-1].name == f"checkpoint_{STEPS:09d}")
    assert len(spool_of(run_dir).files()) > 4  # spilled past the memory buffer, the end included
    assert sync.main([str(run_dir)]) == 1  # still away: the records stay
    procs.append(start_mlflow_server(store, port))  # the same store comes back
    assert sync.main([str(run_dir)]) == 0 and spool_of(run_dir).files() == []
    _assert_complete(uri, run_id)
