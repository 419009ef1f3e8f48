"""Ray Train with 2 real workers on a local Ray, tracked in a real MLflow store."""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from gan.checkpoint import load_state
from gan.context import CHECKPOINT_FILE
from jobs import train as train_job
from tests.conftest import CELEBA_SAMPLE, ray_train_workers

pytestmark = pytest.mark.usefixtures("ray_local")


def _args(faces, storage, name, steps, *extra):
    return ["--config", "configs/smoke.toml", f"--run.storage_path={storage}", f"--run.name={name}",
            "--data.source=shards", f"--data.path={faces}", "--model.width=0.0625",
            "--train.batch_size=16", f"--train.max_steps={steps}", "--train.log_every=5",
            "--train.checkpoint_every=10", "--scale.num_workers=2", "--scale.cpus_per_worker=0.5", "--eval.every_steps=0", *extra]


def _steps(client, run_id, key="d_loss"):
    return [m.step for m in client.get_metric_history(run_id, key)]


def _last_checkpoint(run_dir: Path) -> dict:
    return load_state(sorted(run_dir.glob("checkpoint_0*"))[-1] / CHECKPOINT_FILE)


def _probe(config):
    """One 2-worker TorchTrainer run, two probes (each Ray Train run costs ~60 s of CPU to start
    and stop). First the real loop on each worker, then every parameter compared across ranks;
    then each worker scores its share of the same 'generated' faces, and torchmetrics syncs."""
    import torch.distributed as dist

    import numpy as np

    from compose import train_from_config
    from datasets.shards import ShardSet
    from evaluation.fid import Evaluator, Pixels, iter_rows
    from gan.config import from_flat
    from jobs.ray_context import RayTrainContext

    result = train_from_config(from_flat(config["cfg"]), RayTrainContext(None))
    flat = torch.cat([p.detach().flatten() for p in result.generator.parameters()]
                     + [p.detach().flatten() for p in result.discriminator.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    rank, world = dist.get_rank(), dist.get_world_size()
    fakes = np.concatenate(list(iter_rows(ShardSet(config["fake"]), config["n"])))[rank::world]
    ev = Evaluator(Pixels(), ShardSet(config["real"]), config["n"], rank, world, torch.device("cpu"),
                   config["cache"], batch_size=32, kid_subset_size=config["n"])
    scores = ev(_Replay(fakes))
    # Ray's Result keeps the metrics of the last checkpoint only; the verdicts go to a file.
    if rank == 0:
        Path(config["out"]).write_text(json.dumps({
            "max_diff": max(float((g - gathered[0]).abs().max()) for g in gathered),
            "final_step": result.step, "world": world, "scores": scores}))


class _Replay(torch.nn.Module):
    def __init__(self, faces_u8):
        super().__init__()
        self.faces = torch.from_numpy(faces_u8).permute(0, 3, 1, 2).float() / 127.5 - 1
        self.z_dim, self.pos = 100, 0

    def forward(self, z):
        out = self.faces[self.pos:self.pos + len(z)]
        self.pos += len(z)
        return out


@pytest.fixture(scope="module")
def probed(faces64, tmp_path_factory):
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from datasets.synthetic import write_generated
    from gan.config import Config, flatten

    tmp = tmp_path_factory.mktemp("probe")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = Config()
    cfg.data.path, cfg.model.width = str(faces64), 0.0625
    cfg.train.batch_size, cfg.train.max_steps, cfg.train.checkpoint_every = 16, 12, 100
    write_generated(tmp / "fake", 128, 64, seed=5, row_group_size=64)
    TorchTrainer(_probe, train_loop_config={"cfg": flatten(cfg), "out": str(tmp / "verdict.json"),
                                            "fake": str(tmp / "fake"), "real": str(faces64), "n": 128,
                                            "cache": str(tmp / "c2")},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(storage_path=str(tmp), name="probe")).fit()
    return tmp, json.loads((tmp / "verdict.json").read_text())


def test_two_workers_stay_identical(probed):
    got = probed[1]
    assert got["world"] == 2 and got["final_step"] == 12
    assert got["max_diff"] == 0.0


@pytest.fixture(scope="module")
def straight_run(faces64, tmp_path_factory):
    """One uninterrupted 2-worker run through `python -m jobs.train`'s main()."""
    import os

    here = tmp_path_factory.mktemp("straight")
    uri = f"sqlite:///{here / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    cwd = os.getcwd()
    os.chdir(Path(__file__).resolve().parents[1])
    try:
        out = train_job.run(_args(faces64, here / "runs", "straight", 40))
    finally:
        os.chdir(cwd)
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
    return out


def test_mlflow_run_holds_params_metrics_grids_and_model(straight_run):
    client = MlflowClient(straight_run["tracking_uri"])
    run = client.get_run(straight_run["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr_d"] == "0.0004" and run.data.params["model.size"] == "64"
    assert run.data.params["scale.num_workers"] == "2"
    for key in ("d_loss", "g_loss", "d_real", "d_fake", "img_per_s"):
        assert _steps(client, run.info.run_id, key) == list(range(5, 41, 5)), key
    d_real = [m.value for m in client.get_metric_history(run.info.run_id, "d_real")]
    assert all(0 < v < 1 for v in d_real)
    samples = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert {"samples/real.png", "samples/epoch_001.png", "samples/final.png"} <= samples
    # The grids as images by step too (the UI's step slider): the real faces once, at step 0.
    images = [a.path.split("/")[-1] for a in client.list_artifacts(run.info.run_id, "images")]
    def steps(key):
        return sorted({int(n.split("+")[2]) for n in images if n.startswith(f"{key}+step+")})
    assert steps("real") == [0] and steps("samples") == [32, 40], images  # epoch 1 ends at step 32
    # What the run page shows: source, description, data lineage, system metrics; model-training mode.
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "jobs.train" and len(tags.get("mlflow.source.git.commit", "x" * 40)) == 40
    assert "2 worker(s), batch 16" in tags["mlflow.note.content"] and "checkpoints in" in tags["mlflow.note.content"]
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train"} and json.loads(inputs["train"].profile)["faces"] == 512
    assert inputs["train"].digest and json.loads(inputs["train"].source)["uri"].endswith("faces640/train")
    assert any(k.startswith("system/cpu_utilization_percentage") for k in run.data.metrics), sorted(run.data.metrics)
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    mlflow.set_tracking_uri(straight_run["tracking_uri"])
    # pt2 (torch.export): it loads with MLflow's pickle deserialization switched off (a pickled
    # model is refused then), and it is an exported graph, not our module.
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    try:
        G = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/generator")
    finally:
        os.environ.pop("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
    assert isinstance(G, torch.fx.GraphModule)
    for n in (1, 3, 7):  # any batch size, not the input example's
        out = G(torch.rand(n, 100) * 2 - 1)
        assert out.shape == (n, 3, 64, 64) and out.abs().max() <= 1
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/generator")
    assert pyfunc.metadata.signature is not None
    assert pyfunc.predict((torch.rand(5, 100) * 2 - 1).numpy()).shape == (5, 3, 64, 64)


def test_cli_resume_equals_straight_run(straight_run, faces64, tmp_path, mlflow_store, root_cwd, capsys):
    runs = tmp_path / "runs"
    assert train_job.main(_args(faces64, runs, "halves", 20)) == 0
    first_id = capsys.readouterr().out.split("run_id: ")[1].split()[0]
    # The second half reads through a loader process on each Ray worker (data.loader_workers):
    # the same batches as the straight run's in-process reading, so the same weights.
    assert train_job.main(_args(faces64, runs, "halves", 40, "--resume", "--data.loader_workers=1")) == 0
    out = capsys.readouterr().out
    assert f"run_id: {first_id}" in out and f"tracking_uri: {mlflow_store}" in out
    client = MlflowClient(mlflow_store)
    assert _steps(client, first_id) == list(range(5, 41, 5))  # one run, no duplicate steps
    assert [m.value for m in client.get_metric_history(first_id, "resumed_from_step")] == [20.0]
    a = _last_checkpoint(Path(straight_run["run_dir"]))
    b = _last_checkpoint(runs / "halves")
    assert a["step"] == b["step"] == 40
    for key in ("G", "D"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_resume_flag_and_name_collisions(faces64, tmp_path, mlflow_store, root_cwd, capsys):
    assert train_job.main(_args(faces64, tmp_path, "nothing-here", 10, "--resume")) == 2
    assert "--resume: no run at" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert train_job.main(_args(faces64, tmp_path, "taken", 10)) == 2
    assert "exists; pass --resume" in capsys.readouterr().err


def test_killed_worker_resumes_from_last_checkpoint(faces64, tmp_path, mlflow_store, root_cwd):
    runs, out, errors = tmp_path / "runs", {}, []
    # 120 steps: the kill lands right after the step-20 checkpoint is registered, ~100 steps early.
    args = _args(faces64, runs, "killed", 120, "--train.epochs=50", "--scale.max_failures=1",
                 "--train.checkpoint_every=20",
                 "--train.log_every=10")

    def target():
        try:
            out.update(train_job.run(args))
        except BaseException as e:  # surfaced below
            errors.append(e)

    th = threading.Thread(target=target)
    th.start()
    deadline, victim = time.time() + 240, None
    while time.time() < deadline and th.is_alive():
        # A checkpoint counts once Ray's checkpoint manager has registered it; its directory
        # appears earlier, while it is still being written.
        snapshot = runs / "killed" / "checkpoint_manager_snapshot.json"
        if snapshot.is_file() and "checkpoint_0" in snapshot.read_text():
            workers = ray_train_workers()  # this module's cluster only
            if workers:
                victim = workers[-1]
                victim.kill()
                break
        time.sleep(0.05)
    th.join(timeout=600)
    assert not errors, errors
    assert victim is not None, "the run ended before a worker could be killed"
    assert not victim.is_running() or victim.status() == psutil.STATUS_ZOMBIE
    assert out["result"].metrics["step"] == 120
    client = MlflowClient(mlflow_store)
    steps = _steps(client, out["run_id"])
    assert steps == sorted(set(steps)) and steps[-1] == 120  # finished, no duplicate steps
    resumed = [m.value for m in client.get_metric_history(out["run_id"], "resumed_from_step")]
    assert len(resumed) == 1 and resumed[0] >= 20 and resumed[0] % 20 == 0


@pytest.mark.skipif(not (CELEBA_SAMPLE / "img_align_celeba.zip").is_file(), reason="needs the CelebA sample")
def test_short_celeba64_run_logs_real_faces(tmp_path, mlflow_store, root_cwd, capsys):
    import io
    import zipfile

    import numpy as np
    from PIL import Image

    from datasets import celeba

    src = tmp_path / "part.zip"
    with zipfile.ZipFile(CELEBA_SAMPLE / "img_align_celeba.zip") as full, zipfile.ZipFile(src, "w") as z:
        for name in full.namelist()[:1200]:
            z.writestr(name, full.read(name))
    assert celeba.main(["--src", str(src), "--partition", str(CELEBA_SAMPLE / "list_eval_partition.txt"),
                        "--out", str(tmp_path / "c64"), "--size", "64", "--row-group-size", "64"]) == 0
    capsys.readouterr()
    assert train_job.main(["--config", "configs/celeba64.toml", f"--data.path={tmp_path / 'c64' / 'train'}",
                           f"--run.storage_path={tmp_path / 'runs'}", "--model.width=0.0625",
                           "--train.max_steps=6", "--train.log_every=3", "--scale.cpus_per_worker=0.5"]) == 0
    run_id = capsys.readouterr().out.split("run_id: ")[1].split()[0]
    client = MlflowClient(mlflow_store)
    assert [m.step for m in client.get_metric_history(run_id, "d_loss")] == [3, 6]
    real = Image.open(io.BytesIO(open(client.download_artifacts(run_id, "samples/real.png", str(tmp_path)), "rb").read()))
    pixels = np.asarray(real, dtype=np.float32)
    # Rank 0's first local batch: 64 / 2 workers = 32 photos in a 6x6 grid of 64+2 px cells.
    assert real.size == (6 * 66 + 2, 6 * 66 + 2) and pixels.std() > 30  # photos, not a blank grid


def test_distributed_fid_equals_single_process(probed, faces64):
    import numpy as np

    from datasets.shards import ShardSet
    from evaluation.fid import Evaluator, Pixels, iter_rows

    tmp, got = probed
    n = 128
    fakes = np.concatenate(list(iter_rows(ShardSet(tmp / "fake"), n)))
    single = Evaluator(Pixels(), ShardSet(faces64), n, 0, 1, torch.device("cpu"), tmp / "c1",
                       batch_size=32, kid_subset_size=n)(_Replay(fakes))
    assert got["scores"]["fid"] == pytest.approx(single["fid"], rel=1e-5)
    assert got["scores"]["kid"] == pytest.approx(single["kid"], rel=1e-4, abs=1e-7)


def test_logged_fid_is_that_of_the_logged_generator(faces64, tmp_path, mlflow_store, root_cwd, capsys):
    """2 workers, standard Inception: the FID logged at the published step equals jobs.fid on the
    published model in one process (BN statistics averaged over the ranks before evaluating), and
    the run records the extractor's hash. eval.publish = "end": one export, of the best of the
    evaluations, after the last step."""
    from evaluation.inception import STANDARD_SHA1
    from jobs import fid as fid_job

    assert train_job.main(_args(faces64, tmp_path / "runs", "consistent", 20, "--eval.every_steps=10",
                                "--eval.num_samples=32", "--eval.extractor=inception", "--eval.publish=end")) == 0
    run_id = capsys.readouterr().out.split("run_id: ")[1].split()[0]
    client = MlflowClient(mlflow_store)
    run = client.get_run(run_id)
    fid = {m.step: m.value for m in client.get_metric_history(run_id, "fid")}
    assert sorted(fid) == [10, 20] and len(client.get_metric_history(run_id, "kid")) == 2
    assert run.data.tags["facegan.fid_extractor_sha1"] == STANDARD_SHA1
    step = int(run.data.tags["facegan.generator_step"])
    assert step == min(fid, key=fid.get) == int(run.data.tags["facegan.best_step"])
    logged = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert sorted(m.name for m in logged) == ["faces", "generator"]  # published once
    again = fid_job.compute(str(faces64.parent / "val"), f"runs:/{run_id}/generator", 32,
                            cache=str(tmp_path / "c"))
    assert again["n_real"] == again["n_fake"] == 32
    assert again["fid"] == pytest.approx(fid[step], rel=1e-3)



def test_two_worker_ddp_run_with_dp_finishes(faces64, tmp_path, mlflow_store, root_cwd, capsys):
    """DP under DDP: Opacus's DistributedDPOptimizer on each worker (rank 0 adds the noise, the
    ranks sum), Poisson batches from each worker's share; ε logged every log step."""
    pytest.importorskip("opacus")
    assert train_job.main(_args(faces64, tmp_path / "runs", "private", 20, "--train.batch_size=32",
                                "--model.d_norm=none", "--loss.r1_gamma=0", "--privacy.dp_epsilon=8")) == 0
    run_id = capsys.readouterr().out.split("run_id: ")[1].split()[0]
    client = MlflowClient(mlflow_store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["privacy.dp_epsilon"] == "8.0"
    eps = {m.step: m.value for m in client.get_metric_history(run_id, "dp_epsilon")}
    assert sorted(eps) == [5, 10, 15, 20] and 7.8 <= eps[20] <= 8.0
    assert [eps[s] for s in sorted(eps)] == sorted(eps.values())
    assert "D trained with differential privacy" in run.data.tags["mlflow.note.content"]
    state = _last_checkpoint(tmp_path / "runs" / "private")
    assert state["step"] == 20 and sum(h[2] for h in state["privacy"]["accountant"]["history"]) == 20
    assert state["privacy"]["sample_rate"] == 32 / 512
