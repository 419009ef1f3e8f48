import json
import subprocess

import pytest

from gan.config import Config, ConfigError, flatten, from_flat, load, validate
from tests.conftest import ROOT


def test_presets_load_and_validate():
    for preset in sorted((ROOT / "configs").glob("*.toml")):
        validate(load(preset))


def test_cli_overrides_are_typed():
    cfg = load(ROOT / "configs" / "smoke.toml", ["--train.batch_size=32", "--optim.lr_d=1e-4",
                                                 "--scale.use_gpu=true", "--run.name=x"])
    assert cfg.train.batch_size == 32 and cfg.optim.lr_d == 1e-4
    assert cfg.scale.use_gpu is True and cfg.run.name == "x"


def test_flatten_round_trips():
    cfg = load(ROOT / "configs" / "seed128.toml")
    flat = flatten(cfg)
    assert flat["optim.lr_d"] == 4e-5 and flat["model.size"] == 128
    assert from_flat(flat) == cfg


@pytest.mark.parametrize("override, needle", [
    ("--train.nope=1", "unknown config key 'train.nope'"),
    ("--nosection.x=1", "unknown config key 'nosection.x'"),
    ("--train.batch_size=abc", "train.batch_size: expected int, got 'abc'"),
    ("--scale.use_gpu=maybe", "scale.use_gpu: expected bool"),
])
def test_bad_keys_and_types_name_the_field(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load(ROOT / "configs" / "smoke.toml", [override])


def test_wrong_type_in_toml_names_file_and_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nbatch_size = "sixty-four"\n')
    with pytest.raises(ConfigError, match=r"bad.toml: train.batch_size: expected int"):
        load(bad)


@pytest.mark.parametrize("overrides, needle", [
    (["--model.size=96"], "model.size: must be 64 or 128, got 96"),
    (["--scale.num_workers=2", "--train.batch_size=63"], "train.batch_size: 63 is not divisible by scale.num_workers=2"),
    (["--loss.real_label_lo=0.95", "--loss.real_label_hi=0.9"], "need 0 <= lo <= hi <= 1"),
    (["--optim.lr_d=0"], "optim.lr_d: must be > 0"),
    (["--scale.worker_resources=trainer"], "scale.worker_resources: must be name=amount"),
    (["--scale.worker_resources=trainer=0"], "scale.worker_resources: must be name=amount"),
    (["--scale.worker_resources=CPU=1"], "scale.worker_resources: must be name=amount"),
])
def test_validation_errors(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(load(ROOT / "configs" / "smoke.toml", overrides))


@pytest.fixture
def train_cli(tmp_path, monkeypatch, capsys):
    """``python -m jobs.train ARGS`` in ``tmp_path``, run in this process (the CLI in its own
    process, as a user types it, is tests/test_bad_input.py's): (exit status, stdout, stderr).
    ``env``: variables set for the call."""
    import ray

    from jobs import train as train_job

    def run(*args, env=None):
        monkeypatch.chdir(tmp_path)
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        capsys.readouterr()
        was = ray.is_initialized()
        try:
            rc = train_job.main(list(args))
        except SystemExit as e:  # argparse
            rc = e.code
        out, err = capsys.readouterr()
        assert ray.is_initialized() == was, "a refused run started Ray"
        return subprocess.CompletedProcess(args, rc, out, err)
    return run


@pytest.mark.parametrize("args, tracking, needle", [
    ([], "http://127.0.0.1:5000", "run.storage_path: 'runs' is relative"),
    (["--run.storage_path=/shared/runs"], "http://127.0.0.1:5000", "data.path: 'data/generated64/train' is relative"),
    (["--run.storage_path=/shared/runs", "--data.path=/shared/faces/train"], "", "MLFLOW_TRACKING_URI: unset"),
    (["--run.storage_path=/shared/runs", "--data.path=/shared/faces/train"], "sqlite:///mlflow.db", "is relative"),
])
def test_relative_locations_are_refused_under_ray_job_submit(tmp_path, train_cli, args, tracking, needle):
    """Ray runs a submitted driver in a temporary copy of --working-dir (and says so in this
    variable): relative locations would be lost with it."""
    job = json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123456789abcdef.zip"}})
    env = {"RAY_JOB_CONFIG_JSON_ENV_VAR": job, "MLFLOW_TRACKING_URI": tracking}
    proc = train_cli("--config", str(ROOT / "configs" / "smoke.toml"), *args, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert "ray job submit" in lines[0] and not (tmp_path / "runs").exists()


def test_unreachable_tracking_server_is_one_line_in_seconds(tmp_path, train_cli):
    """Nothing listens at the tracking URI: exit 2 with one line, before any face is drawn
    (MLflow's own retries used to take ~4 minutes and end in chained tracebacks)."""
    from tests.conftest import _free_port

    uri = f"http://127.0.0.1:{_free_port()}"
    proc = train_cli("--config", str(ROOT / "configs" / "smoke.toml"), env={"MLFLOW_TRACKING_URI": uri})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: MLFLOW_TRACKING_URI: {uri} is not reachable within 5 s")
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, needle", [
    (["--scale.num_workers=2", "--train.batch_size=63"], "train.batch_size: 63 is not divisible by scale.num_workers=2"),
    (["--model.size=96"], "model.size: must be 64 or 128"),
    (["--train.bogus=1"], "unknown config key 'train.bogus'"),
    (["--data.source=shards", "--data.path=nowhere"], "nowhere does not exist"),
    (["--train.epochs=0"], "train.epochs: must be >= 1"),
    (["--train.batch_size=1024", "--data.generated_count=1000"], "train.batch_size 1024 exceeds the 1000 faces"),
])
def test_train_cli_fails_fast_before_ray(tmp_path, train_cli, args, needle):
    proc = train_cli("--config", str(ROOT / "configs" / "smoke.toml"), *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
    # Nothing was started or written: no Ray session, no MLflow store, no run directory.
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()
    assert "Ray" not in proc.stdout + proc.stderr


def test_train_cli_names_an_unwritable_storage_and_a_different_generated_set(tmp_path, train_cli):
    (tmp_path / "afile").write_text("")
    proc = train_cli("--config", str(ROOT / "configs" / "smoke.toml"),
                     f"--run.storage_path={tmp_path / 'afile' / 'runs'}")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: run.storage_path: {tmp_path / 'afile' / 'runs'} is not writable (Not a directory)"]
    # Generated faces already at data.path but drawn with another count: named, not redrawn.
    from datasets.synthetic import ensure_generated

    ensure_generated(tmp_path / "gen", 500, 64)
    proc = train_cli("--config", str(ROOT / "configs" / "smoke.toml"), "--data.generated_count=600",
                     "--data.generated_heldout=0", f"--data.path={tmp_path / 'gen'}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "data.generated_count/data.path" in lines[0]
    assert "holds a different shard set" in lines[0] and "count 500" in lines[0]


def test_empty_shard_directory_is_an_error(tmp_path, train_cli):
    (tmp_path / "empty").mkdir()
    proc = train_cli("--config", str(ROOT / "configs" / "smoke.toml"),
                     "--data.source=shards", f"--data.path={tmp_path / 'empty'}")
    assert proc.returncode == 2
    assert "manifest.json: missing" in proc.stderr and str(tmp_path / "empty") in proc.stderr


def test_default_config_is_the_seed():
    c = Config()
    assert (c.optim.lr_d, c.optim.lr_g, c.optim.beta1) == (4e-5, 2e-4, 0.5)
    assert (c.loss.real_label_lo, c.loss.real_label_hi, c.loss.noise_sigma_max) == (0.9, 1.0, 0.1)
    assert (c.train.batch_size, c.train.epochs, c.model.z_dim, c.model.bn_eps) == (64, 60, 100, 5e-5)
