"""A new best generator is published while training goes on: no other thread traces a module.

``torch.export`` (MLflow's pt2 format) patches ``nn.Module.__call__`` for the whole process while
it traces, so an export on the tracking thread captured the training thread's forward passes
(``NameError: module is not installed as a submodule``). These tests train on the calling thread
while generators are published, and every published version must load and run.
"""
from __future__ import annotations

import threading
import time

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from gan.config import Config
from gan.models import build
from gan.step import Nets, train_step
from jobs.spool import BackgroundTracker
from jobs.tracking import start_run


@pytest.fixture
def process_group(tmp_path):
    """A real one-process gloo group, so that the step runs DDP-wrapped modules as a Ray Train
    worker does (DDP's forward refuses to run while any thread of the process exports)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _nets(cfg: Config) -> Nets:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    G, D = build(cfg.model)
    return Nets(DDP(G, broadcast_buffers=False), DDP(D, broadcast_buffers=False), D,
                torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999)),
                torch.optim.Adam(D.parameters(), 4e-5, betas=(0.5, 0.999)), cfg.model.z_dim)


def test_publishing_while_training_traces_nothing_in_this_process(mlflow_store, tmp_path, process_group):
    """Four generators are published while this thread trains without pause (each publication
    overlaps hundreds of forward passes); training never fails, every version loads and runs."""
    cfg = Config()
    cfg.model.width = 0.0625
    nets = _nets(cfg)
    run_id = start_run(mlflow_store, "publish", "p", str(tmp_path / "p"), {}, resume=False)
    tracker = BackgroundTracker(mlflow_store, run_id, tmp_path / "spool")
    gen, x = torch.Generator().manual_seed(0), torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8)
    published, steps, deadline = 0, 0, time.monotonic() + 240
    try:
        # Train until every publication is in MLflow (the writer's queue is empty), at least
        # 40 steps after the last one was handed over.
        while time.monotonic() < deadline:
            if steps % 20 == 0 and published < 4:
                tracker.log_generator(nets.G.module, cfg.model, step=steps, scores={"fid": 100.0 - steps},
                                      register_as="publish-race")
                published += 1
            train_step(x, nets=nets, cfg=cfg.loss, gen=gen)
            steps += 1
            if published == 4 and steps >= 100 and not tracker.memory and not tracker.spool.files():
                break
    finally:
        left = tracker.close(grace=5)
    assert left == 0, "every publication reached MLflow"
    client = MlflowClient(mlflow_store)
    versions = client.search_model_versions("name='publish-race'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4]
    assert client.get_model_version_by_alias("publish-race", "champion").version in ("4", 4)
    mlflow.set_tracking_uri(mlflow_store)  # models:/ and runs:/ resolve through the global URI
    for v in versions:
        G = mlflow.pytorch.load_model(f"models:/publish-race/{v.version}")
        out = G(torch.rand(3, cfg.model.z_dim) * 2 - 1)
        assert out.shape == (3, 3, 64, 64) and torch.isfinite(out).all()
    # The step each version holds is the step it was published at, not a later one.
    tags = client.get_run(run_id).data.tags
    assert tags["facegan.generator_step"] == "60"


def test_no_background_thread_traces(mlflow_store, tmp_path, monkeypatch):
    """torch.export never runs in this process while the tracking thread is alive: the export
    happens in a child process (the only process-wide tracer is then in that child)."""
    import torch.export as export_mod

    calls = []
    real = export_mod.export

    def spy(*a, **k):
        calls.append(threading.current_thread().name)
        return real(*a, **k)

    monkeypatch.setattr(export_mod, "export", spy)
    monkeypatch.setattr(torch.export, "export", spy)
    cfg = Config()
    cfg.model.width = 0.0625
    G, _ = build(cfg.model)
    run_id = start_run(mlflow_store, "publish", "q", str(tmp_path / "q"), {}, resume=False)
    tracker = BackgroundTracker(mlflow_store, run_id, tmp_path / "spool")
    tracker.log_generator(G, cfg.model, step=3)
    assert tracker.close(grace=5) == 0
    assert calls == []
    mlflow.set_tracking_uri(mlflow_store)
    G2 = mlflow.pytorch.load_model(f"runs:/{run_id}/generator")
    z = torch.rand(5, cfg.model.z_dim) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(G2(z), G.eval()(z), atol=1e-5), "the published weights are the handed-over ones"


def test_only_the_training_thread_runs_modules(faces64, mlflow_store, tmp_path):
    """The real loop with every background thread it has (batch prefetch, checkpoint writer,
    tracking writer publishing a new best at each of several evaluations): every module forward
    in this process runs on the training thread."""
    from gan.context import LocalContext
    from compose import train_from_config

    class Tracked(LocalContext):
        def __init__(self, out, tracker, model_cfg):
            super().__init__(out, resume=False)
            self.tracker, self.model_cfg = tracker, model_cfg

        def report(self, r):
            super().report(r)
            self.tracker.log_metrics(r.step, r.logged())
            if r.artifacts:
                self.tracker.log_images(r.step, r.artifacts)
            if r.model is not None:
                self.tracker.log_generator(r.model, self.model_cfg, step=r.step, scores=r.scores)

    cfg = Config()
    cfg.data.path, cfg.model.width, cfg.scale.num_workers = str(faces64), 0.0625, 1
    cfg.train.batch_size, cfg.train.max_steps, cfg.train.log_every, cfg.train.checkpoint_every = 16, 40, 5, 10
    cfg.data.loader_workers = 0  # the prefetch thread decodes in this process
    cfg.eval.every_steps, cfg.eval.extractor, cfg.eval.num_samples = 8, "pixels", 64
    cfg.run.storage_path = str(tmp_path)
    run_id = start_run(mlflow_store, "publish", "loop", str(tmp_path / "loop"), {}, resume=False)
    tracker = BackgroundTracker(mlflow_store, run_id, tmp_path / "spool")
    ctx = Tracked(tmp_path / "loop", tracker, cfg.model)
    threads: set[str] = set()
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, a: threads.add(threading.current_thread().name))
    try:
        train_from_config(cfg, ctx)
    finally:
        hook.remove()
        assert tracker.close(grace=5) == 0
    assert threads == {threading.current_thread().name}
    assert ctx.best_steps and ctx.best_steps[0] < 40  # published mid-run, with steps after it
    mlflow.set_tracking_uri(mlflow_store)
    G = mlflow.pytorch.load_model(f"runs:/{run_id}/generator")
    assert torch.isfinite(G(torch.rand(2, cfg.model.z_dim) * 2 - 1)).all()


def test_a_refused_publication_comes_back_with_mlflows_code(mlflow_store):
    """The child's failure reaches the tracking thread as one PublishError carrying MLflow's
    error code, so a refusal the server will repeat is dropped, not retried forever."""
    from jobs.publish import PublishError, publish
    from jobs.spool import permanent

    cfg = Config()
    cfg.model.width = 0.0625
    G, _ = build(cfg.model)
    with pytest.raises(PublishError) as err:
        publish(mlflow_store, "0" * 32, G.state_dict(), cfg.model)
    assert err.value.error_code == "RESOURCE_DOES_NOT_EXIST" and permanent(err.value)
    assert "Traceback" not in str(err.value) and len(str(err.value).splitlines()) == 1


def test_one_publishing_process_serves_a_run_and_a_dead_or_hung_one_is_replaced(mlflow_store, tmp_path):
    """The publishing process is started once (jobs.publish.warm) and serves every new best:
    two publications, one process, two versions. One that died answers with one line (the
    writer retries the record) and is replaced by a fresh process; one that hangs past the
    timeout is killed and replaced; shutdown ends it cleanly."""
    import socket

    from gan.checkpoint import to_host
    from jobs import publish as pub

    cfg = Config()
    cfg.model.width = 0.0625
    G, _ = build(cfg.model)
    state = to_host(G.state_dict())
    run_id = start_run(mlflow_store, "publish", "served", str(tmp_path / "s"), {}, resume=False)
    client = MlflowClient(mlflow_store)

    def versions():
        return sorted(int(v.version) for v in client.search_model_versions("name='served'"))

    pub.warm()
    first = pub._child.proc
    pub.publish(mlflow_store, run_id, state, cfg.model, register_as="served")
    pub.publish(mlflow_store, run_id, state, cfg.model, register_as="served")
    assert pub._child.proc is first and first.poll() is None and versions() == [1, 2]
    first.kill()
    first.wait()
    # Asked after it died: one line, the writer's retry goes to a fresh process.
    with pytest.raises(pub.PublishError, match="^the publishing process exited -9"):
        pub._child.ask(tmp_path / "unread.pt", timeout=10)
    pub.publish(mlflow_store, run_id, state, cfg.model, register_as="served")  # dead between requests: replaced
    second = pub._child.proc
    assert second.pid != first.pid and versions() == [1, 2, 3]
    with socket.socket() as hung:  # a server that accepts and never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen()
        with pytest.raises(pub.PublishError, match="took over 3 s"):
            pub.publish(f"http://127.0.0.1:{hung.getsockname()[1]}", run_id, state, cfg.model, timeout=3)
    assert pub._child is None and second.poll() is not None
    pub.publish(mlflow_store, run_id, state, cfg.model, register_as="served")
    third = pub._child.proc
    pub.shutdown()
    assert third.returncode == 0 and pub._child is None and versions() == [1, 2, 3, 4]
