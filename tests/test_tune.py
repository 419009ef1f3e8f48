"""Ray Tune sweeps on a real local Ray (2 CPUs) with a real MLflow store: sweep-file
validation, ASHA stopping trials early, and an interrupted driver resumed with --resume. PBT
cloning a donor's checkpoint runs on two nodes with its storage in S3 (tests/test_two_node.py),
a trial that diverges in a sweep submitted with `ray job submit` (tests/test_job_submit.py)."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gan.config import Config, ConfigError, flatten, load
from jobs import relay, sweep as sweep_file, tune as tune_job
from tests.conftest import ROOT, child_runs

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
            "--scale.num_workers=1", "--scale.cpus_per_worker=0.5", "--eval.publish=end",  # one export per trial
            f"--run.storage_path={storage}", *extra]


@pytest.mark.parametrize("space, needle", [
    ('[space]\n"optim.nope" = { type = "uniform", low = 0, high = 1 }', "space.optim.nope: unknown field"),
    ('[space]\n"optim.lr_g" = { type = "loguniform", low = 1e-3, high = 1e-3 }', "empty or invalid range"),
    ('[space]\n"loss.real_label_lo" = { type = "uniform", low = 0.7, high = 1.0 }\n'
     '"loss.real_label_hi" = { type = "uniform", low = 0.8, high = 1.0 }', "lo > hi"),
    ("[space]\n", "[space] is empty"),
])
def test_bad_sweep_files_fail_before_any_trial(tmp_path, space, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        sweep_file.load_sweep(_sweep(tmp_path, "bad", "", space))


@pytest.mark.parametrize("body, needle", [
    ('synch = "no"', '[sweep] synch must be a bool, got \'no\''),
    ("num_samples = 2.5", "[sweep] num_samples must be a int, got 2.5"),
])
def test_sweep_options_of_the_wrong_type_fail_by_name(tmp_path, body, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        sweep_file.load_sweep(_sweep(tmp_path, "bad", body))


def test_derived_fields_keep_lr_ratio_and_label_range():
    cfg = sweep_file.trial_config(flatten(Config()), {"optim.lr_g": 1e-4, "optim.lr_ratio": 3.0,
                                                    "loss.real_label_lo": 0.8, "loss.real_label_hi_frac": 0.5})
    assert cfg.optim.lr_d == pytest.approx(3e-4) and cfg.loss.real_label_hi == pytest.approx(0.9)


def test_optuna_search_without_optuna_fails_before_any_trial(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # how Python marks a module as not importable
    with pytest.raises(ConfigError, match=r'search = "optuna" needs Optuna'):
        sweep_file.load_sweep(_sweep(tmp_path, "opt", 'search = "optuna"'))


def test_pbt_explore_stays_inside_the_searched_ranges(tmp_path):
    sweep = sweep_file.load_sweep(_sweep(tmp_path, "pbt", 'scheduler = "pbt"'))
    # PBT's explore multiplies by 1.2 or 0.8; a label lo of 0.95 becomes 1.14 (lo > hi = 1).
    out = sweep_file.clamp_to_space(sweep.space, {"loss.real_label_lo": 0.95 * 1.2, "optim.lr_g": 5e-5 * 0.8,
                                                "optim.lr_ratio": 1.0, "_base": {}})
    assert out == {"loss.real_label_lo": 1.0, "optim.lr_g": 5e-5, "optim.lr_ratio": 1.0, "_base": {}}
    sweep_file.trial_config(flatten(Config()), {k: v for k, v in out.items() if k != "_base"})  # valid


@pytest.mark.parametrize("search", ["random", "optuna"])
def test_search_is_seeded_by_train_seed(tmp_path, search):
    from ray import tune

    sweep = sweep_file.load_sweep(_sweep(tmp_path, "s", f'search = "{search}"'))

    def draw(seed):
        s = tune_job.make_search(sweep, seed, max_concurrent=2)
        if search == "random":
            s.add_configurations(tune.Experiment("s", relay.trainable, config=sweep_file.tune_space(sweep),
                                                 num_samples=3))
            picks = [getattr(s.next_trial(), "config", None) for _ in range(3)]
        else:
            s.set_search_properties("fid", "min", sweep_file.tune_space(sweep))
            picks = [s.suggest(str(i)) for i in range(3)]
        assert picks[2] is None, "the concurrency limit did not hold the third trial back"
        return picks[:2]

    first = draw(0)
    assert first[0] != first[1] and draw(0) == first and draw(1) != first


def test_sweep_config_table_sits_between_preset_and_command_line(tmp_path):
    sweep = _sweep(tmp_path, "cfg", "num_samples = 2", SPACE + '[config]\n"train.max_steps" = 77\n"eval.num_samples" = 99\n')
    assert sweep_file.load_sweep(sweep).config == {"train.max_steps": 77, "eval.num_samples": 99}
    bad = _sweep(tmp_path, "bad", "num_samples = 2", SPACE + '[config]\n"train.max_stepz" = 1\n')
    with pytest.raises(ConfigError, match=r"\[config\] unknown config key 'train.max_stepz'"):
        sweep_file.load_sweep(bad)
    shipped = sweep_file.load_sweep(str(ROOT / "configs" / "sweeps" / "smoke.toml"))
    assert shipped.config["eval.extractor"] == "inception" and shipped.config["train.max_steps"] > 0
    # Recipe switches as categorical choices: every combination is a valid trial config.
    recipes = sweep_file.load_sweep(str(ROOT / "configs" / "sweeps" / "recipes.toml"))
    base = flatten(load(str(ROOT / "configs" / "celeba64.toml"), [f"--{k}={v}" for k, v in recipes.config.items()]))
    import itertools

    choices = {k: v["values"] for k, v in recipes.space.items() if v["type"] == "choice"}
    assert set(choices) >= {"model.d_norm", "model.g_upsample", "loss.kind", "loss.diffaug"}
    for combo in itertools.product(*choices.values()):
        sweep_file.trial_config(base, {**dict(zip(choices, combo)), "optim.lr_ratio": 4.0, "optim.lr_g": 1e-4})


def test_sweep_without_its_extractor_fails_before_any_trial(faces64, tmp_path, mlflow_store, capsys, monkeypatch):
    monkeypatch.setenv("FACEGAN_INCEPTION_WEIGHTS", str(tmp_path / "gone.pt"))
    sweep = _sweep(tmp_path, "noinception", "num_samples = 2\ngrace_period = 4")
    rc = tune_job.main(_args(faces64, tmp_path / "runs", sweep, 24, "--eval.extractor=inception"))
    err = capsys.readouterr().err
    assert rc == 2 and "gone.pt: FID Inception weights not found" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "noinception").exists()


def test_gpu_request_without_gpus_is_refused(ray_local, faces64, tmp_path, mlflow_store, capsys):
    sweep = _sweep(tmp_path, "gpu", "num_samples = 2\ngrace_period = 4")
    rc = tune_job.main(_args(faces64, tmp_path / "runs", sweep, 24, "--scale.use_gpu=true",
                             "--scale.gpus_per_worker=0.25"))
    assert rc == 2 and "the cluster has 0 GPUs" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "gpu").exists()


def _parent(client, name):
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"attributes.run_name = 'sweep-{name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0].info.run_id


def test_asha_optuna_sweep_stops_trials_early_and_logs_parent_children_best(ray_local, faces64, tmp_path, mlflow_store,
                                                                      capsys):
    from mlflow.tracking import MlflowClient

    # Optuna's TPE picks the trials (random search is the default, used by the other sweeps here).
    # Ranked by the standard Inception's FID on 16 samples every 4 steps (the command line wins
    # over _args' pixels); the sweep file's [config] sets what the command line leaves alone.
    # Rungs at steps 4, 8 and 16: a trial escapes ASHA only by being in the better half of those
    # before it at all three. With one rung (FID every 12 steps) no trial was stopped in ~1 of 8
    # sweeps (simulated with ASHA's cutoff; it happened on CI); with three, ~1 in 600.
    sweep = _sweep(tmp_path, "asha", 'num_samples = 4\ngrace_period = 4\nreduction_factor = 2\nsearch = "optuna"',
                   SPACE + '[config]\n"eval.kid_subset_size" = 16\n"eval.num_samples" = 1000\n')
    assert tune_job.main(_args(faces64, tmp_path / "runs", sweep, 24, "--eval.extractor=inception",
                               "--eval.num_samples=16")) == 0
    out = capsys.readouterr().out
    client = MlflowClient(mlflow_store)
    parent = _parent(client, "asha")
    children = child_runs(client, parent)
    assert len(children) == 4
    assert {a.path for a in client.list_artifacts(parent)} >= {"results.csv", "best_config.toml", "sweep_fid.png"}
    params = client.get_run(parent).data.params
    assert params["eval.kid_subset_size"] == "16" and params["eval.num_samples"] == "16"  # [config], then the CLI
    best = [c for c in children if c.data.tags.get("facegan.best_trial") == "true"]
    assert len(best) == 1
    table = list(csv.DictReader(Path(client.download_artifacts(parent, "results.csv", str(tmp_path))).open()))
    assert len(table) == 4 and len({r["trial"] for r in table}) == 4
    assert min(int(r["last_step"]) for r in table) < 24, "ASHA stopped no trial early"
    assert max(int(r["last_step"]) for r in table) == 24
    # Trials ASHA stopped are closed (their actors ended without a word) and say where they stopped.
    assert all(c.info.status == "FINISHED" for c in children)
    stopped = sorted(c.data.tags["facegan.stopped_early"] for c in children if "facegan.stopped_early" in c.data.tags)
    assert stopped == sorted(r["last_step"] for r in table if int(r["last_step"]) < 24)
    # The best config is a valid preset: it loads, and it carries the winning trial's hyper-parameters.
    cfg = load(client.download_artifacts(parent, "best_config.toml", str(tmp_path)), [])
    top = table[0]
    assert cfg.optim.lr_g == pytest.approx(float(top["optim.lr_g"]))
    assert cfg.optim.lr_d == pytest.approx(float(top["optim.lr_g"]) * float(top["optim.lr_ratio"]))
    assert float(best[0].data.params["optim.lr_g"]) == pytest.approx(cfg.optim.lr_g)
    assert "best fid" in out and parent in out
    note = client.get_run(parent).data.tags["mlflow.note.content"]  # the parent's run page says what won
    assert f"Best fid {float(top['fid']):.4g} ({top['trial']}" in note and "4 trials (asha, optuna search)" in note, note
    assert {"lr_ratio", "label_lo", "label_hi"} <= set(top)
    # Every child holds its own metric history, judged by the standard Inception's FID.
    for c in children:
        assert client.get_metric_history(c.info.run_id, "fid")
        assert c.data.params["eval.extractor"] == "inception" and c.data.params["eval.num_samples"] == "16"
        assert c.data.tags["facegan.fid_protocol"].startswith("stylegan3")


def _wait_for(predicate, proc, timeout=600.0, what=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended (rc {proc.returncode}) before {what}:\n{proc.stdout.read()}")
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def test_interrupted_sweep_resumes_and_runs_every_trial_once(ray_local, faces64, tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    # One trial at a time: when the driver is interrupted, trial 1 is done, trial 2 is half-way
    # (with a checkpoint) and trial 3 has not started.
    sweep = _sweep(tmp_path, "resume", "num_samples = 3\nmax_concurrent = 1\ngrace_period = 8")
    args = _args(faces64, tmp_path / "runs", sweep, 16, "--train.checkpoint_every=4")
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           "MLFLOW_TRACKING_URI": mlflow_store, "PYTHONPATH": str(ROOT)}
    exp = tmp_path / "runs" / "resume"
    proc = subprocess.Popen([sys.executable, "-m", "jobs.tune", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def results():
        return {p.parent.name: [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
                for p in exp.glob("*/result.json")}

    def one_done_one_checkpointed():
        res = results()
        done = [t for t, rows in res.items() if rows and rows[-1].get("done")]
        going = [t for t in res if t not in done and list((exp / t).glob("checkpoint_*"))]
        return done and going

    try:
        _wait_for(one_done_one_checkpointed, proc, what="one trial finished and the next one checkpointed")
        before = results()
        finished = [t for t, rows in before.items() if rows and rows[-1].get("done")]
        assert len(before) == 2, f"max_concurrent = 1 not kept: {sorted(before)}"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, out
    client = MlflowClient(mlflow_store)
    parent = _parent(client, "resume")
    assert client.get_run(parent).info.status == "KILLED"

    assert tune_job.main([*args, "--resume"]) == 0
    after = results()
    assert len(after) == 3
    for t in finished:  # not run again: same results, one Train run
        assert after[t] == before[t]
        assert [p.name for p in (tmp_path / "runs" / "resume-train").iterdir() if p.name.startswith(t)] == [t]
    children = child_runs(client, parent)
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    assert client.get_run(parent).info.status == "FINISHED"
    table = list(csv.DictReader(Path(client.download_artifacts(parent, "results.csv", str(tmp_path))).open()))
    assert sorted(r["trial"] for r in table) == sorted(after)
    # The interrupted trial continued from its checkpoint; no step was logged twice anywhere.
    resumed = [m.value for c in children for m in client.get_metric_history(c.info.run_id, "resumed_from_step")]
    assert resumed and min(resumed) >= 4
    for c in children:
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "fid")]
        assert len(steps) == len(set(steps)), steps
    for t in after:  # 4 scored checkpoints per trial; Tune keeps run.keep_checkpoints (2) of them
        kept = sorted(p.name for p in (exp / t).glob("checkpoint_*"))
        assert 1 <= len(kept) <= 2, kept
