"""Real jobs.train runs on a local Ray and a real MLflow store: generators published and audited
while both ranks train, and replayable (deterministic) runs."""
from __future__ import annotations

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from gan.context import CHECKPOINT_FILE
from jobs import train as train_job
from tests.test_ray_train import _args, _last_checkpoint

pytestmark = pytest.mark.usefixtures("ray_local")



def test_generators_published_while_ranks_train_all_load_and_audit(faces64, tmp_path, mlflow_store, root_cwd,
                                                                   capsys):
    """2 DDP workers (EMA generator) evaluate every 4 steps for 64 steps: new best generators are
    published while many more steps follow on both ranks. The run ends FINISHED; each new best is
    a registered version, the alias follows it, every version loads and runs; the memorisation
    audit runs at the end and again from the CLI on the logged model. One run for all of it (a
    Ray Train run costs ~50 s of CPU to start and stop)."""
    import json

    from mlflow.entities import RunStatus

    from jobs import audit, sample

    assert train_job.main(_args(faces64, tmp_path / "runs", "publishing", 64, "--eval.every_steps=4",
                                "--eval.extractor=pixels", "--eval.num_samples=64",
                                "--eval.register_as=facegan-best", "--eval.audit_samples=64",
                                "--train.ema_decay=0.9", "--train.checkpoint_every=8")) == 0
    run_id = capsys.readouterr().out.split("run_id: ")[1].split()[0]
    client = MlflowClient(mlflow_store)
    assert client.get_run(run_id).info.status == RunStatus.to_string(RunStatus.FINISHED)
    fid = {m.step: m.value for m in client.get_metric_history(run_id, "fid")}
    assert sorted(fid) == list(range(4, 65, 4)) and len(client.get_metric_history(run_id, "kid")) == 16
    versions = sorted(client.search_model_versions("name='facegan-best'"), key=lambda v: int(v.version))
    assert all(v.run_id == run_id for v in versions)
    steps = [int(v.description.split("step ")[1].split(",")[0]) for v in versions]
    assert len(versions) >= 2 and steps == sorted(steps) and steps[0] < 48, steps
    assert steps == [s for s in sorted(fid) if fid[s] < min([fid[t] for t in fid if t < s], default=float("inf"))]
    best = min(fid, key=fid.get)
    tags = client.get_run(run_id).data.tags
    assert tags["facegan.best_step"] == str(best) == str(steps[-1]) and tags["facegan.generator_step"] == str(best)
    # The alias follows each new best: models:/facegan-best@champion is the last published one.
    champion = client.get_model_version_by_alias("facegan-best", "champion")
    assert int(champion.version) == int(versions[-1].version)
    assert f"step {best}" in champion.description and "champion" in client.get_registered_model("facegan-best").description
    assert f"Best fid {tags['facegan.best_fid']} at step {best}" in tags["mlflow.note.content"]
    assert {i.tags[0].value for i in client.get_run(run_id).inputs.dataset_inputs} == {"train", "eval"}
    z = torch.rand(4, 100) * 2 - 1
    mlflow.set_tracking_uri(mlflow_store)  # models:/ resolves through the global URI, which other tests set
    for v in versions:
        G = mlflow.pytorch.load_model(f"models:/facegan-best/{v.version}")
        out = G(z)
        assert out.shape == (4, 3, 64, 64) and torch.isfinite(out).all()
    assert sample.main(["--model", "models:/facegan-best@champion", "--out", str(tmp_path / "champ"), "--n", "4"]) == 0
    assert {a.path for a in client.list_artifacts(run_id, "audit")} == {"audit/summary.json", "audit/closest_pairs.png"}
    assert len(client.get_metric_history(run_id, "audit_fraction_memorized")) == 1
    capsys.readouterr()
    assert audit.main(["--run", run_id, "--n", "32"]) in (0, 1)  # the CLI, on the logged model
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["n_fake"] == 32 and report["n_train"] == 512 and report["n_heldout"] == 128
    assert len(client.get_metric_history(run_id, "audit_fraction_memorized")) == 2


def test_deterministic_runs_are_bit_identical(faces64, tmp_path, mlflow_store, root_cwd, capsys):
    """train.deterministic: two runs of one config and seed through jobs.train (Ray, 1 CPU
    worker) log the same metrics to the last bit and write checkpoints with the same digest.
    Timing metrics are measurements and are left out."""
    import hashlib
    import shutil

    args = _args(faces64, tmp_path / "runs", "replay", 24, "--scale.num_workers=1", "--train.deterministic=true",
                 "--train.ema_decay=0.9", "--train.checkpoint_every=12")
    runs, digests = [], []
    for attempt in ("a", "b"):
        assert train_job.main(args) == 0
        runs.append(capsys.readouterr().out.split("run_id: ")[1].split()[0])
        last = sorted((tmp_path / "runs" / "replay").glob("checkpoint_0*"))[-1] / CHECKPOINT_FILE
        digests.append(hashlib.sha256(last.read_bytes()).hexdigest())
        shutil.move(tmp_path / "runs" / "replay", tmp_path / f"replay-{attempt}")  # the same name and path again
    client = MlflowClient(mlflow_store)
    a, b = (client.get_run(r).data.metrics for r in runs)
    keys = sorted(k for k in a if k != "img_per_s" and not k.startswith("system/"))
    assert {"d_loss", "g_loss", "d_real", "d_fake"} <= set(keys) and set(keys) <= set(b)
    for k in keys:
        ha = [(m.step, m.value) for m in sorted(client.get_metric_history(runs[0], k), key=lambda m: m.step)]
        hb = [(m.step, m.value) for m in sorted(client.get_metric_history(runs[1], k), key=lambda m: m.step)]
        assert ha == hb, k
    assert digests[0] == digests[1]
    assert _last_checkpoint(tmp_path / "replay-a")["step"] == 24
