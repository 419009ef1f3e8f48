"""Shared fixtures: generated shard sets, a real local Ray, a real MLflow store."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from datasets.shards import ShardWriter

ROOT = Path(__file__).resolve().parents[1]
CELEBA_SAMPLE = ROOT.parent / "shared" / "data" / "celeba-sample"
# Ray Train's spot-preemption watcher is one more actor process per run (~2.5 s of CPU to start,
# 115 s over the suite); the clusters the tests start (and their `ray start` nodes, which
# inherit this) are never preempted.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def measured_seconds() -> dict[str, float]:
    """Each test module's seconds as last measured (benchmarks/results/suite-durations.jsonl,
    written by python -m benchmarks.suite_durations)."""
    import json

    path = ROOT / "benchmarks" / "results" / "suite-durations.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return {r["module"]: r["seconds"] for r in rows if r.get("kind") == "module"}


EXTENDED = ("the extended tier: a second scenario of a feature the default tier already covers; "
            "python -m pytest -q --extended runs it too (docs/testing.md)")


def pytest_addoption(parser):
    parser.addoption("--extended", action="store_true", help="also run the tests marked extended (docs/testing.md)")


def pytest_collection_modifyitems(session, config, items):
    """Tests marked ``extended`` are skipped, with the reason, unless ``--extended`` is given.
    Longest module first: pytest-xdist hands whole modules (--dist loadfile) to its two
    workers in this order, so the last ones to start are short and both finish together. A
    module not yet measured counts as long. Tests keep their order within a module."""
    if not config.getoption("--extended"):
        for item in items:
            if item.get_closest_marker("extended"):
                item.add_marker(pytest.mark.skip(reason=EXTENDED))
    seconds, first_seen = measured_seconds(), {}
    module = lambda it: it.module.__name__.rsplit(".", 1)[-1]  # noqa: E731
    for item in items:
        first_seen.setdefault(module(item), len(first_seen))
    items.sort(key=lambda it: (-seconds.get(module(it), 1e9), first_seen[module(it)]))


@pytest.fixture(scope="session", autouse=True)
def _one_thread_per_test_process():
    """Two test processes share two cores (pytest -n 2): torch computes on one thread in each,
    as a Ray worker with one CPU does. (Capping OpenMP, OpenBLAS and OpenCV too, through the
    environment of every process a test starts, measured 16% slower: 2,510 s against 2,167 s, docs/testing.md.)"""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
    yield


def write_indexed(out: Path, count: int, size: int = 64, row_group_size: int = 64,
                  rows_per_shard: int = 256, encoding: str = "raw") -> Path:
    """A shard set whose image i carries i in its first pixel, so tests can say which row is which
    (``encoding``: raw or a lossless one)."""
    w = ShardWriter(out, size, encoding, rows_per_shard=rows_per_shard, row_group_size=row_group_size)
    rng = np.random.default_rng(0)
    for i in range(count):
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        img[0, 0, :3] = (i >> 16) & 255, (i >> 8) & 255, i & 255
        w.add(f"img-{i:06d}", img)
    w.close()
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120) -> None:
    import time
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def processes_naming(*tmp_dirs: str) -> list:
    """The processes (not this one) whose command line names one of ``tmp_dirs``: a Ray node's
    processes all name its temp dir (/tmp/fg-1/..., never /tmp/fg-12/...)."""
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and any(t.rstrip("/") + "/" in part or part.endswith(t.rstrip("/"))
                                            for t in tmp_dirs for part in (p.info["cmdline"] or [])):
                out.append(p)
        except psutil.Error:
            pass
    return out


def stop_ray_by_tmpdir(tmp: str, grace: float = 10) -> int:
    """Stops the Ray processes of the node(s) started with this temp dir (each names it in its
    command line, or is a child of one that does: the dashboard agent retitles itself
    "ray::DashboardAgent", and orphaned it spins for a minute holding its port), and no other:
    `ray stop` kills every Ray on the machine. Returns how many there were."""
    import psutil

    procs = {p.pid: p for p in processes_naming(tmp)}
    for p in list(procs.values()):
        try:
            procs.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            pass
    procs = list(procs.values())
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return len(procs)


def ray_train_workers(*tmp_dirs: str) -> list:
    """The RayTrainWorker processes of this test's own Ray cluster, never another test's (under
    pytest -n 2 two modules' clusters run side by side): the descendants of this process (a local
    ``ray.init`` starts its raylet as a child), or, given the temp dirs of ``ray start`` nodes,
    the descendants of the processes that name one of them (each node's raylet does)."""
    import psutil

    found = {}
    for root in processes_naming(*tmp_dirs) if tmp_dirs else [psutil.Process()]:
        try:
            for child in root.children(recursive=True):
                if any("RayTrainWorker" in part for part in child.cmdline()):
                    found[child.pid] = child
        except psutil.Error:
            pass
    return [found[pid] for pid in sorted(found)]


def start_mlflow_server(store: Path, port: int):
    """A real `mlflow server` on 127.0.0.1:port over a SQLite store and artifact folder in
    ``store``, in its own process group (stop it with os.killpg); returns once it answers."""
    import subprocess
    import sys

    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{store / 'server.db'}",
         "--artifacts-destination", str(store / "server-artifacts")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
    except TimeoutError:
        os.killpg(proc.pid, 9)
        raise
    return proc


def ids_of(batch: np.ndarray) -> list[int]:
    p = batch[:, 0, 0, :3].astype(np.int64)
    return list((p[:, 0] << 16) | (p[:, 1] << 8) | p[:, 2])


def child_runs(client, parent: str) -> list:
    """The MLflow runs nested under ``parent`` (a sweep's trials)."""
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


@pytest.fixture(scope="session")
def faces64(tmp_path_factory) -> Path:
    """512 procedural faces at 64px in small row groups (8 groups: enough for 2 workers), at
    ``.../train``, with 128 other faces as the held-out ``.../val`` beside them."""
    from datasets.synthetic import write_generated

    out = tmp_path_factory.mktemp("faces64") / "train"
    write_generated(out, 512, 64, seed=0, row_group_size=64)
    write_generated(out.parent / "val", 128, 64, seed=0, row_group_size=64, start=512)
    return out


@pytest.fixture(scope="session")
def celeba64(tmp_path_factory) -> Path:
    """The CelebA sample from ../shared converted at 64 px (train/val/test, with the identity
    column), once per session."""
    if not (CELEBA_SAMPLE / "img_align_celeba.zip").is_file():
        pytest.skip("the CelebA sample is not in ../shared")
    from datasets.celeba import main as convert

    out = tmp_path_factory.mktemp("celeba64")
    assert convert(["--src", str(CELEBA_SAMPLE / "img_align_celeba.zip"), "--partition",
                    str(CELEBA_SAMPLE / "list_eval_partition.txt"), "--out", str(out), "--size", "64",
                    "--identities", str(CELEBA_SAMPLE / "identity_CelebA.txt")]) == 0
    return out


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A real local Ray instance for one test module. With the dashboard:
    Ray Train's placement-group cleaner asks the state API whether a stopped Tune trial is
    gone, and without it a stopped trial's workers keep their CPUs for good."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray workers inherit it: MLflow's system metrics every second, so short runs have some.
    os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    # A short temp dir: Ray's socket paths must fit AF_UNIX's 107 bytes, and pytest's basetemp
    # (/tmp/pytest-of-<user>/pytest-N/..., deeper under pytest-xdist) can leave too little room.
    tmp = tempfile.mkdtemp(prefix="fg-ray-")
    ray.init(num_cpus=2, include_dashboard=True, _temp_dir=tmp, log_to_driver=False)
    yield ray
    ray.shutdown()
    stop_ray_by_tmpdir(tmp)
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A real MLflow SQLite store in a temporary directory."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # default artifact location ./mlartifacts lands here too
    return uri


@pytest.fixture
def root_cwd(monkeypatch):
    """The repository root as working directory (presets are named relative to it)."""
    monkeypatch.chdir(ROOT)
