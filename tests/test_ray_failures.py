"""Runs that fail well, on a real local Ray with a real MLflow store: divergence, damaged
checkpoints, Ctrl+C."""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from gan.context import CHECKPOINT_FILE
from jobs import train as train_job
from tests.test_ray_train import _args, _last_checkpoint, _steps

pytestmark = pytest.mark.usefixtures("ray_local")


def test_diverged_run_fails_by_step_and_keeps_its_last_good_checkpoint(faces64, tmp_path, mlflow_store,
                                                                        root_cwd, capsys):
    runs = tmp_path / "runs"
    assert train_job.main(_args(faces64, runs, "nan", 10)) == 0
    good = _last_checkpoint(runs / "nan")
    capsys.readouterr()
    # Resumed with absurd learning rates: NaN within the first window after the resume.
    rc = train_job.main(_args(faces64, runs, "nan", 30, "--resume", "--optim.lr_d=1e30", "--optim.lr_g=1e30"))
    err = capsys.readouterr().err
    assert rc == 1 and "non-finite" in err and "at step 15" in err and "last good checkpoint is step 10" in err
    kept = _last_checkpoint(runs / "nan")
    assert kept["step"] == 10 and all(torch.equal(good["G"][k], kept["G"][k]) for k in good["G"])
    client = MlflowClient(mlflow_store)
    run = client.search_runs([client.get_experiment_by_name("facegan-smoke").experiment_id],
                             filter_string="attributes.run_name = 'nan'")[0]
    assert run.info.status == "FAILED" and "at step 15" in run.data.tags["facegan.failed_reason"]
    assert max(_steps(client, run.info.run_id)) == 10  # the NaN window was never logged as losses
    # Only the first attempt's generator (step 10) is published; nothing NaN.
    logged = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert sorted(m.name for m in logged) == ["faces", "generator"]  # one publish: the generator, the marked faces
    assert run.data.tags["facegan.generator_step"] == "10"


@pytest.mark.extended  # damaged files by name: test_loop; resuming through Ray: test_ray_train
def test_damaged_latest_checkpoint_resumes_from_the_one_before(faces64, tmp_path, mlflow_store, root_cwd, capsys):
    runs = tmp_path / "runs"
    assert train_job.main(_args(faces64, runs, "dmg", 20)) == 0
    latest = runs / "dmg" / "checkpoint_000000020" / CHECKPOINT_FILE
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # a copy cut short
    assert train_job.main(_args(faces64, runs, "dmg", 30, "--resume")) == 0
    client = MlflowClient(mlflow_store)
    run = client.search_runs([client.get_experiment_by_name("facegan-smoke").experiment_id],
                             filter_string="attributes.run_name = 'dmg'")[0]
    skipped = run.data.tags["facegan.skipped_checkpoints"]
    assert skipped.startswith(f"skipping checkpoint {latest.parent}: {latest}: damaged"), skipped
    assert [m.value for m in client.get_metric_history(run.info.run_id, "resumed_from_step")] == [10.0]
    steps = _steps(client, run.info.run_id)
    assert sorted(set(steps)) == [5, 10, 15, 20, 25, 30] and len(steps) == 6  # steps 15, 20 not logged twice
    assert run.info.status == "FINISHED" and _last_checkpoint(runs / "dmg")["step"] == 30
    # Every checkpoint damaged: the resume fails naming them, and the FINISHED run stays FINISHED.
    for ck in (runs / "dmg").glob("checkpoint_0*/" + CHECKPOINT_FILE):
        ck.write_bytes(b"not a checkpoint")
    assert train_job.main(_args(faces64, runs, "dmg", 40, "--resume")) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert re.match(r"error: worker \d: no intact checkpoint in .*/dmg$", last) and "Traceback" not in err, err
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_ctrl_c_kills_the_run_and_says_how_to_resume(faces64, tmp_path, mlflow_store, ray_local):
    import os
    import signal
    import subprocess

    runs = tmp_path / "runs"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.train", *_args(faces64, runs, "ctrlc", 10_000,
                             "--train.epochs=100")], cwd=Path(__file__).resolve().parents[1], env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        snapshot = runs / "ctrlc" / "checkpoint_manager_snapshot.json"
        while time.time() < deadline and proc.poll() is None:
            if snapshot.is_file() and "checkpoint_0" in snapshot.read_text():
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted; run ctrlc is KILLED" in err and "--run.name=ctrlc --resume" in err
    # The driver's one progress bar (jobs/progress.py): named after the run, counting steps of the total.
    assert re.search(r"ctrlc: +\d+%\|.*\| \d+/\d+ ", err), err[-2000:]
    client = MlflowClient(mlflow_store)
    run = client.search_runs([client.get_experiment_by_name("facegan-smoke").experiment_id],
                             filter_string="attributes.run_name = 'ctrlc'")[0]
    assert run.info.status == "KILLED"
