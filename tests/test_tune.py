"""Ray Tune sweeps: sweep-file validation and the refusals that happen before any trial.

Multi-trial sweeps (ASHA stopping early, PBT exploiting, resume) ran by hand but are not
tested here yet: on the in-process 2-CPU Ray a 4-trial ASHA sweep left one trial waiting for
resources that the stopped trials never returned (see the README's Sweeps section)."""
from __future__ import annotations

import pytest

from gan.config import ConfigError
from jobs import tune as tune_job
from tests.conftest import ROOT

SPACE = '''
[space]
"optim.lr_g" = { type = "loguniform", low = 5e-5, high = 1e-3 }
"optim.lr_ratio" = { type = "loguniform", low = 0.1, high = 4.0 }
"loss.real_label_lo" = { type = "uniform", low = 0.7, high = 1.0 }
"loss.real_label_hi_frac" = { type = "uniform", low = 0.0, high = 1.0 }
'''


def _sweep(tmp_path, name, body, space=SPACE) -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(f'[sweep]\nname = "{name}"\n{body}\n{space}')
    return str(path)


def _args(faces, storage, sweep, steps=24, *extra):
    return ["--config", str(ROOT / "configs" / "smoke.toml"), "--sweep", sweep, "--data.source=shards",
            f"--data.path={faces}", "--model.width=0.0625", "--train.batch_size=16", f"--train.max_steps={steps}",
            "--train.log_every=4", "--eval.every_steps=4", "--eval.extractor=pixels", "--eval.num_samples=64",
            "--scale.num_workers=1", "--scale.cpus_per_worker=0.5", f"--run.storage_path={storage}", *extra]


@pytest.mark.parametrize("space, needle", [
    ('[space]\n"optim.nope" = { type = "uniform", low = 0, high = 1 }', "space.optim.nope: unknown field"),
    ('[space]\n"optim.lr_g" = { type = "loguniform", low = 1e-3, high = 1e-3 }', "empty or invalid range"),
    ('[space]\n"loss.real_label_lo" = { type = "uniform", low = 0.7, high = 1.0 }\n'
     '"loss.real_label_hi" = { type = "uniform", low = 0.8, high = 1.0 }', "lo > hi"),
    ("[space]\n", "[space] is empty"),
])
def test_bad_sweep_files_fail_before_any_trial(tmp_path, space, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        tune_job.load_sweep(_sweep(tmp_path, "bad", "", space))


def test_derived_fields_keep_lr_ratio_and_label_range():
    from gan.config import Config, flatten

    cfg = tune_job.trial_config(flatten(Config()), {"optim.lr_g": 1e-4, "optim.lr_ratio": 3.0,
                                                    "loss.real_label_lo": 0.8, "loss.real_label_hi_frac": 0.5})
    assert cfg.optim.lr_d == pytest.approx(3e-4) and cfg.loss.real_label_hi == pytest.approx(0.9)


def test_gpu_request_without_gpus_is_refused(ray_local, faces64, tmp_path, mlflow_store, capsys):
    sweep = _sweep(tmp_path, "gpu", "num_samples = 2\ngrace_period = 4")
    rc = tune_job.main(_args(faces64, tmp_path / "runs", sweep, 24, "--scale.use_gpu=true",
                             "--scale.gpus_per_worker=0.25"))
    assert rc == 2 and "the cluster has 0 GPUs" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "gpu").exists()
