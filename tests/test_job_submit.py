"""`ray job submit` against a real local head, tracked in a real `mlflow server`, both on
127.0.0.1, both started and stopped here."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess

import pytest
from mlflow.tracking import MlflowClient
from ray._private.ray_constants import DEFAULT_DASHBOARD_AGENT_LISTEN_PORT

from tests.conftest import ROOT, _free_port, child_runs, start_mlflow_server, stop_ray_by_tmpdir, wait_http


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    port = _free_port()
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def ray_head():
    ray_tmp = f"/tmp/fg-ray-{os.getpid()}"  # short: Ray's socket paths must stay under 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": ray_tmp}
    dash = _free_port()
    # Jobs reach a node through its dashboard agent's HTTP port, by default 52365 on every Ray.
    # Another Ray on this machine (the other test process's cluster) may hold it; the agent
    # then runs without HTTP and every submission fails "No available agent". Holding that port
    # while this head runs makes that collision certain, and the head's own port avoids it.
    squatter = socket.socket()
    with contextlib.suppress(OSError):
        squatter.bind(("", DEFAULT_DASHBOARD_AGENT_LISTEN_PORT))
        squatter.listen()
    try:
        subprocess.run(["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={_free_port()}",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
                        f"--dashboard-agent-listen-port={_free_port()}",
                        "--include-dashboard=true", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, timeout=180)
        wait_http(f"http://127.0.0.1:{dash}/api/version")
        yield f"http://127.0.0.1:{dash}", env
    finally:
        stop_ray_by_tmpdir(ray_tmp)  # this head's processes only: `ray stop` stops every Ray on the machine
        squatter.close()


def test_ray_job_submit_lands_in_mlflow(ray_head, mlflow_server, faces64, tmp_path):
    address, env = ray_head
    # System metrics every second (MLflow's default, 10 s, can outlast a 12-step run).
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}}
    proc = subprocess.run(
        ["ray", "job", "submit", "--address", address, "--working-dir", str(ROOT),
         "--runtime-env-json", json.dumps(runtime_env), "--",
         "python", "-m", "jobs.train", "--config", "configs/smoke.toml",
         "--data.source=shards", f"--data.path={faces64}", "--model.width=0.0625",
         "--train.batch_size=16", "--train.max_steps=12", "--train.log_every=4",
         "--eval.every_steps=12", "--eval.num_samples=32", "--eval.register_as=submitted-g",
         f"--run.storage_path={tmp_path / 'runs'}", "--run.name=submitted",
         "--scale.num_workers=2", "--scale.cpus_per_worker=0.5"],
        env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    run_id = proc.stdout.split("run_id: ")[1].split()[0]
    assert f"tracking_uri: {mlflow_server}" in proc.stdout
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.max_steps"] == "12"
    assert [m.step for m in client.get_metric_history(run_id, "g_loss")] == [4, 8, 12]
    assert [m.step for m in client.get_metric_history(run_id, "fid")] == [12]  # standard Inception, on the cluster
    assert "samples/final.png" in {a.path for a in client.list_artifacts(run_id, "samples")}
    assert (tmp_path / "runs" / "submitted" / "checkpoint_000000012" / "checkpoint.pt").is_file()
    # What the UI's run page reads from this server's REST API (infra/screenshots.sh shows it):
    # images by key and step for the step slider, both dataset inputs, system metrics, the
    # model-training experiment kind, and the champion alias on this run's registered generator.
    images = [a.path.split("/")[-1] for a in client.list_artifacts(run_id, "images")]
    assert {n.split("+step+")[0] + "@" + n.split("+")[2] for n in images} == {"real@0", "samples@12"}, images
    assert {i.tags[0].value for i in run.inputs.dataset_inputs} == {"train", "eval"}
    assert any(k.startswith("system/cpu_utilization_percentage") for k in run.data.metrics), sorted(run.data.metrics)
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_model_version_by_alias("submitted-g", "champion").run_id == run_id


@pytest.mark.extended  # job submission: the train job above; divergence: test_ray_failures
def test_ray_job_submit_runs_a_sweep_in_which_a_diverging_trial_fails_alone(ray_head, mlflow_server, faces64, tmp_path):
    """A sweep submitted to the cluster; one of its trials diverges (lr_g 1e30): that trial
    fails by name, the other finishes and wins, and the sweep goes on to its summary."""
    address, env = ray_head
    sweep = tmp_path / "submitted.toml"
    sweep.write_text('[sweep]\nname = "submitted-sweep"\nnum_samples = 2\nmax_concurrent = 1\ngrace_period = 8\n\n'
                     '[space]\n"optim.lr_g" = { type = "choice", values = [1e-4, 1e30] }\n')
    proc = subprocess.run(
        ["ray", "job", "submit", "--address", address, "--working-dir", str(ROOT),
         "--runtime-env-json", json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": mlflow_server}}), "--",
         "python", "-m", "jobs.tune", "--config", "configs/smoke.toml", "--sweep", str(sweep),
         "--data.source=shards", f"--data.path={faces64}", "--model.width=0.0625",
         "--train.batch_size=16", "--train.max_steps=8", "--train.log_every=4", "--eval.every_steps=4",
         "--eval.extractor=pixels", "--eval.num_samples=64", "--scale.num_workers=1",
         "--train.seed=2",  # seeds the search: it draws 1e30, then 1e-4
         "--scale.cpus_per_worker=0.5", f"--run.storage_path={tmp_path / 'runs'}"],
        env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parent = proc.stdout.split("parent_run_id: ")[1].split()[0]
    client = MlflowClient(mlflow_server)
    assert client.get_run(parent).info.status == "FINISHED"
    assert {"results.csv", "best_config.toml", "sweep.toml"} <= {a.path for a in client.list_artifacts(parent)}
    children = child_runs(client, parent)
    lr = {c.info.run_id: float(c.data.params["optim.lr_g"]) for c in children}
    assert sorted(lr.values()) == [1e-4, 1e30], lr  # the seeded draws hold both values
    for c in children:
        if lr[c.info.run_id] == 1e30:
            assert c.info.status == "FAILED" and "non-finite" in c.data.tags["facegan.failed_reason"]
            assert "facegan.best_trial" not in c.data.tags
        else:
            assert c.info.status == "FINISHED" and client.get_metric_history(c.info.run_id, "fid")
    best = [c for c in children if c.data.tags.get("facegan.best_trial") == "true"]
    assert len(best) == 1 and lr[best[0].info.run_id] == 1e-4
