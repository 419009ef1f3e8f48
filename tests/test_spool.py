"""Rank 0's tracking never blocks training (jobs/spool.py): with nothing listening at the
tracking URI every call returns at once, records past the memory buffer go to the run's spool
in order, and jobs.sync later delivers each metric step exactly once."""
import time

import torch
from mlflow.tracking import MlflowClient

from gan.config import ModelConfig
from gan.models import Generator
from jobs import sync
from jobs.spool import SPOOL, BackgroundTracker, Spool, spool_of, spooled_tags
from tests.conftest import _free_port


def test_unreachable_server_never_blocks_and_sync_delivers_everything_once(mlflow_store, tmp_path):
    client = MlflowClient(mlflow_store)
    run_id = client.create_run(client.create_experiment("spool")).info.run_id
    client.log_metric(run_id, "d_loss", 0.5, step=3)  # already there: must not come twice
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens here
    run_dir = tmp_path / "run"
    tracker = BackgroundTracker(dead, run_id, run_dir / SPOOL, memory=3)
    t0 = time.perf_counter()
    for step in range(1, 13):
        tracker.log_metrics(step, {"d_loss": float(step), "g_loss": -float(step)})
    tracker.log_images(12, {"samples/final.png": _png()})
    tracker.set_tags({"facegan.final_step": "12"})
    model = ModelConfig(size=64, width=0.0625)
    torch.manual_seed(0)
    G0 = Generator(model)
    tracker.log_generator(G0, model, step=12)
    calls = time.perf_counter() - t0
    left = tracker.close(grace=0.5)
    assert left == 15 and calls < left * 0.5  # every call returned at once; all 15 records kept
    files = spool_of(run_dir).files()
    kinds = [Spool.read(p)["kind"] for p in files]
    assert kinds == ["metrics"] * 12 + ["images", "tags", "generator"]  # in the order they were made
    assert [Spool.read(p)["args"][0] for p in files[:12]] == list(range(1, 13))
    assert spooled_tags(run_dir) == {"facegan.final_step": "12"}
    assert not list((run_dir / SPOOL).glob(".*.tmp"))  # nothing half-written

    assert sync.main([str(run_dir)]) == 1  # the recorded server is still away: the records stay
    assert len(spool_of(run_dir).files()) == 15
    assert sync.main([str(run_dir), "--tracking-uri", mlflow_store]) == 0
    assert spool_of(run_dir).files() == []
    steps = sorted(m.step for m in client.get_metric_history(run_id, "d_loss"))
    assert steps == list(range(1, 13)) and len(client.get_metric_history(run_id, "g_loss")) == 12
    run = client.get_run(run_id)
    assert run.data.tags["facegan.final_step"] == "12" and run.data.tags["facegan.generator_step"] == "12"
    import mlflow

    mlflow.set_tracking_uri(mlflow_store)  # runs:/ resolves through the global URI, which other tests set
    G = mlflow.pytorch.load_model(f"runs:/{run_id}/generator")  # the spooled weights, as logged
    z = torch.rand(2, 100) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(G(z), G0.eval()(z), atol=1e-6)
    assert any(a.path.startswith("images/samples+step+12") for a in client.list_artifacts(run_id, "images"))
    assert sync.main([str(run_dir)]) == 0  # nothing left: sending again is a no-op


def test_sync_names_a_missing_run_directory(tmp_path, capsys):
    assert sync.main([str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    return buf.getvalue()
