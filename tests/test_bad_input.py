"""Bad input, as a user types it: one line on stderr naming the file or field, exit status 2,
and nothing written. Each command runs as ``python -m jobs.X`` in its own process."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SMOKE = str(ROOT / "configs" / "smoke.toml")


def _run(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def _one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("body, needles", [
    ('[sweep]\nname = "x"\n[space\n"optim.lr_g" = 1', ("bad.toml: not valid TOML", "line 3")),
    ('[sweep]\nname = "x"\n[space]\n"optim.lr_g" = 0.001', ("space.optim.lr_g: expected a table", "0.001")),
    ('space = 3', ("bad.toml: space must be a [space] table",)),
    ('[space]\n"optim.lr_g" = { type = "uniform", low = "a", high = 1 }', ("space.optim.lr_g: low and high must be numbers",)),
    ('[space]\n"optim.lr_g" = { type = "choice", values = 3 }', ("space.optim.lr_g: values must be a non-empty list",)),
])
def test_bad_sweep_file_is_one_line(tmp_path, body, needles):
    sweep = tmp_path / "bad.toml"
    sweep.write_text(body)
    _one_line(_run("jobs.tune", "--config", SMOKE, "--sweep", str(sweep), f"--run.storage_path={tmp_path / 'runs'}"),
              *needles)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("n", ["0", "-3", "many"])
def test_sample_count_is_checked_before_anything_is_written(tmp_path, n):
    out = tmp_path / "faces"
    _one_line(_run("jobs.sample", "--model", str(tmp_path / "nowhere.pt"), "--out", str(out), "--n", n),
              "argument --n", "whole number >= 1")
    assert not out.exists()


def test_bad_model_spec_writes_no_folder(tmp_path):
    out = tmp_path / "faces"
    _one_line(_run("jobs.sample", "--model", str(tmp_path / "nowhere.pt"), "--out", str(out)), "--model")
    assert not out.exists()


@pytest.mark.parametrize("args, needles", [
    (("--config", "configs/nope.toml"), ("configs/nope.toml does not exist",)),
    (("--config", SMOKE, "--train.epochs=many"), ("train.epochs: expected int",)),
    (("--config", SMOKE, "--train.deterministic=perhaps"), ("train.deterministic: expected bool",)),
    (("--config", SMOKE, "--nonsense"), ("expected --section.field=value",)),
])
def test_train_bad_arguments_are_one_line(tmp_path, args, needles):
    _one_line(_run("jobs.train", *args, f"--run.storage_path={tmp_path / 'runs'}",
                   env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}), *needles)
    assert not (tmp_path / "runs").exists()


def test_train_prints_its_plan_before_it_starts(tmp_path):
    """Without --config a newcomer reads the defaults' budget and a time measured on this
    machine before any worker starts; --dry-run stops there (no Ray, no MLflow run)."""
    proc = _run("jobs.train", "--dry-run", "--model.width=0.25", f"--run.storage_path={tmp_path / 'runs'}",
                f"--data.path={tmp_path / 'data' / 'train'}", "--data.generated_count=512",
                "--data.generated_heldout=64", cwd=tmp_path,
                env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    (plan,) = [line for line in proc.stdout.splitlines() if line.startswith("plan: ")]
    # 512 faces in 2 row groups at batch 64 over 2 workers: 8 steps an epoch, the defaults' 60 epochs.
    assert plan.startswith("plan: defaults (no --config) | 64 px, width 0.25 | 480 steps (60 epochs of 512 faces, "
                           "batch 64) | 2 CPU worker(s) x 1 CPU | ~"), plan
    assert "ms/step measured here" in plan
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs" / "default").exists()
