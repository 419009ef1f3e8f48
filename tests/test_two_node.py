"""A run on a real two-node Ray cluster with its storage in object storage, as on a real
cluster: a head (`ray start --head`) and a second node (`ray start --address`, its own temp dir,
a custom resource that pins the training workers to it), checkpoints and the FID feature cache in
a local S3 API server (moto), MLflow on an `mlflow server` whose artifacts go to that S3. A
worker is killed mid-run; the run resumes from its last checkpoint in S3 and finishes, and the
driver's working directory stays empty. Also: a local Ray started by facegan listens on
127.0.0.1 only. Everything here listens on 127.0.0.1 and is stopped by PID or by its own
temp dir."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import boto3
import pytest
from mlflow.tracking import MlflowClient
from moto.server import ThreadedMotoServer

from tests.conftest import ROOT, _free_port, child_runs, ray_train_workers, stop_ray_by_tmpdir, wait_http

BUCKET = "facegan"


@pytest.fixture(scope="module")
def s3_env():
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield env, client
    finally:
        server.stop()


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="module")
def cluster(s3_env, tmp_path_factory):
    """Head + a second node, each with its own RAY_TMPDIR (short: socket paths < 107 bytes)."""
    env = {**os.environ, **s3_env[0], "RAY_AUTH_MODE": "disabled"}
    head_tmp, node_tmp = f"/tmp/fg-h{os.getpid()}", f"/tmp/fg-n{os.getpid()}"
    port, dash = _free_port(), _free_port()
    common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    started = [head_tmp, node_tmp]
    try:  # each node's dashboard agent on a port of its own, not the default every Ray shares
        subprocess.run(["ray", "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", *common,
                        f"--dashboard-agent-listen-port={_free_port()}"],
                       env={**env, "RAY_TMPDIR": head_tmp}, check=True, capture_output=True, timeout=180)
        subprocess.run(["ray", "start", f"--address=127.0.0.1:{port}", "--num-cpus=2",
                        '--resources={"trainer": 2}', f"--temp-dir={node_tmp}", *common,
                        f"--dashboard-agent-listen-port={_free_port()}"],
                       env={**env, "RAY_TMPDIR": node_tmp}, check=True, capture_output=True, timeout=180)
        wait_http(f"http://127.0.0.1:{dash}/api/version")
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": env,
               "tmp_dirs": started}
    finally:
        for tmp in reversed(started):  # each node by its own temp dir: nothing else on the machine
            stop_ray_by_tmpdir(tmp)


@pytest.fixture(scope="module")
def mlflow_s3(s3_env, tmp_path_factory):
    store, port = tmp_path_factory.mktemp("mlflow-s3"), _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store / 'server.db'}",
         "--artifacts-destination", f"s3://{BUCKET}/mlartifacts"],
        env={**os.environ, **s3_env[0], "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _worker_nodes(dashboard: str) -> tuple[set[str], str]:
    """(node ids of every RayTrainWorker actor so far, the id of the node with 'trainer')."""
    from ray.util.state import list_actors, list_nodes

    nodes = list_nodes(address=dashboard, detail=True)
    trainer = next(n.node_id for n in nodes if "trainer" in (n.resources_total or {}))
    actors = list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                         limit=100)
    return {a.node_id for a in actors}, trainer


def test_two_nodes_s3_storage_and_a_killed_worker(cluster, mlflow_s3, s3_env, faces64, tmp_path):
    _, s3 = s3_env
    cwd = tmp_path / "driver-cwd"
    cwd.mkdir()
    env = {**cluster["env"], "RAY_ADDRESS": cluster["address"], "MLFLOW_TRACKING_URI": mlflow_s3,
           "FACEGAN_LOCAL_DIR": str(tmp_path / "local"), "PYTHONPATH": str(ROOT)}
    env.pop("RAY_TMPDIR", None)
    cmd = [sys.executable, "-m", "jobs.train", "--config", str(ROOT / "configs" / "smoke.toml"),
           "--data.source=shards", f"--data.path={faces64}", "--model.width=0.0625", "--train.batch_size=16",
           "--train.max_steps=200", "--train.epochs=50", "--train.log_every=10", "--train.checkpoint_every=20",
           "--eval.every_steps=200", "--eval.num_samples=32", f"--run.storage_path=s3://{BUCKET}/runs",
           "--run.name=twonode", "--scale.max_failures=1", "--scale.num_workers=2", "--scale.cpus_per_worker=0.5",
           "--scale.worker_resources=trainer=1"]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    victim, deadline = None, time.time() + 400
    while proc.poll() is None and time.time() < deadline:
        # A checkpoint counts once Ray's checkpoint manager has registered it (its snapshot,
        # written to the run's storage: here the bucket).
        try:
            snapshot = s3.get_object(Bucket=BUCKET, Key="runs/twonode/checkpoint_manager_snapshot.json")
            registered = "checkpoint_0" in snapshot["Body"].read().decode()
        except s3.exceptions.NoSuchKey:
            registered = False
        if registered:
            workers = ray_train_workers(*cluster["tmp_dirs"])  # this cluster's, not another test's
            if workers:
                victim = workers[-1]
                victim.kill()
                break
        time.sleep(0.1)
    rc = proc.wait(timeout=600)
    reader.join(timeout=10)
    out = "".join(lines)
    assert rc == 0, out[-4000:]
    assert victim is not None, "the run ended before a worker could be killed"
    run_id = out.split("run_id: ")[1].split()[0]
    assert f"checkpoints: s3://{BUCKET}/runs/twonode" in out

    client = MlflowClient(mlflow_s3)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "d_loss")]
    assert steps == list(range(10, 201, 10))  # every logged step exactly once across the restart
    resumed = [m.value for m in client.get_metric_history(run_id, "resumed_from_step")]
    assert len(resumed) == 1 and resumed[0] >= 20 and resumed[0] % 20 == 0
    assert [m.step for m in client.get_metric_history(run_id, "fid")] == [200]

    keys = _keys(s3, "")
    assert "runs/twonode/checkpoint_000000200/checkpoint.pt" in keys  # Train's checkpoints, in S3
    assert any(k.startswith("runs/feature_cache/features-") for k in keys)  # FID's real side, in S3
    artifacts = [k for k in keys if k.startswith("mlartifacts/")]
    assert any(k.endswith("samples/final.png") for k in artifacts), artifacts  # the server wrote to S3
    assert any("/generator/" in k or k.endswith("generator.pt") or "model" in k for k in artifacts), artifacts

    nodes, trainer = _worker_nodes(cluster["dashboard"])
    assert nodes == {trainer}  # both worker groups, before and after the kill, on the second node
    assert not any(cwd.iterdir()), sorted(p.name for p in cwd.iterdir())  # nothing in the driver's cwd



@pytest.mark.extended  # two nodes, S3 storage and a killed worker: the test above; PBT: test_tune
def test_pbt_sweep_with_its_storage_in_s3(cluster, mlflow_s3, s3_env, faces64, tmp_path):
    """Tune's experiment state, the trials' Train checkpoints and the donors PBT clones all live
    in the bucket; an exploit restarts a trial from a donor's checkpoint read back from S3."""
    _, s3 = s3_env
    cwd = tmp_path / "driver-cwd"
    cwd.mkdir()
    sweep = tmp_path / "s3pbt.toml"
    sweep.write_text('[sweep]\nname = "s3pbt"\nnum_samples = 2\nscheduler = "pbt"\nperturbation_interval = 4\n'
                     'synch = true\n\n[space]\n"optim.lr_g" = { type = "loguniform", low = 5e-5, high = 1e-3 }\n')
    env = {**cluster["env"], "RAY_ADDRESS": cluster["address"], "MLFLOW_TRACKING_URI": mlflow_s3,
           "FACEGAN_LOCAL_DIR": str(tmp_path / "local"), "PYTHONPATH": str(ROOT)}
    env.pop("RAY_TMPDIR", None)
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.tune", "--config", str(ROOT / "configs" / "smoke.toml"), "--sweep", str(sweep),
         "--data.source=shards", f"--data.path={faces64}", "--model.width=0.0625", "--train.batch_size=16",
         "--train.max_steps=8", "--train.log_every=4", "--eval.every_steps=4", "--eval.extractor=pixels",
         "--eval.num_samples=64", "--scale.num_workers=1", "--scale.cpus_per_worker=0.5",
         "--scale.worker_resources=trainer=1", f"--run.storage_path=s3://{BUCKET}/sweeps"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    keys = _keys(s3, "sweeps/")
    assert any(k.startswith("sweeps/s3pbt/") for k in keys)  # Tune's experiment state
    clones = {k.split("/")[2] for k in keys if k.startswith("sweeps/s3pbt-train/") and "-from-" in k}
    assert clones, "PBT never exploited"
    assert any(k.startswith(f"sweeps/s3pbt-train/{c}/checkpoint_") for c in clones for k in keys)
    client = MlflowClient(mlflow_s3)
    parents = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                 filter_string="attributes.run_name = 'sweep-s3pbt'")
    assert len(parents) == 1
    children = child_runs(client, parents[0].info.run_id)
    assert len(children) == 2
    resumed = [m.value for c in children for m in client.get_metric_history(c.info.run_id, "resumed_from_step")]
    assert resumed and min(resumed) >= 4, resumed  # a clone continued from the donor's step
    # The clone runs with the donor's hyper-parameters, perturbed: its lr_g history changes.
    lr_g = [[m.value for m in sorted(client.get_metric_history(c.info.run_id, "hp.optim.lr_g"), key=lambda m: m.step)]
            for c in children]
    assert any(len(h) >= 2 and h[-1] != h[0] for h in lr_g), lr_g
    for c, h in zip(children, lr_g):  # the tag holds the trial's current value
        assert float(client.get_run(c.info.run_id).data.tags["hp.optim.lr_g"]) == pytest.approx(h[-1], rel=1e-5)
    for c in children:  # whatever was exploited, each trial reached the end and no step was logged twice
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "fid")]
        assert max(steps) == 8 and len(steps) == len(set(steps)), steps
    assert not any(cwd.iterdir()), sorted(p.name for p in cwd.iterdir())
