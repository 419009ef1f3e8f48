"""The suite's own machinery: which Ray workers a test may kill, the order pytest -n 2 runs the
modules in, and the durations file that order comes from (docs/testing.md)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, measured_seconds, ray_train_workers, stop_ray_by_tmpdir

SLEEPER = "import sys, time; time.sleep(float(sys.argv[1]))"


def _spawn_parent(tmp: str) -> subprocess.Popen:
    """A stand-in raylet: a process naming ``tmp`` on its command line (and not the worker's name),
    with a 'RayTrainWorker' child."""
    code = ("import subprocess, sys, time; "
            f"subprocess.Popen([sys.executable, '-c', {SLEEPER!r}, '60', 'RayTrain' + 'Worker']); time.sleep(60)")
    return subprocess.Popen([sys.executable, "-c", code, f"--temp-dir={tmp}"])


def _children_named(proc: subprocess.Popen, timeout: float = 30) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        kids = [c.pid for c in psutil.Process(proc.pid).children() if "RayTrainWorker" in c.cmdline()]
        if kids:
            return kids
        time.sleep(0.05)
    raise TimeoutError("the stand-in worker did not start")


def test_a_test_finds_only_its_own_clusters_ray_train_workers(tmp_path):
    # Under pytest -n 2 another module's cluster runs beside this one: killing "a RayTrainWorker"
    # found machine-wide once killed the other module's worker (its run resumed, this one never did).
    mine, other = str(tmp_path / "fg-1"), str(tmp_path / "fg-12")  # one a prefix of the other
    parents = [_spawn_parent(mine), _spawn_parent(other)]
    # And a worker of a cluster this process did not start (reparented away from it).
    stray = subprocess.run(["bash", "-c", f"{sys.executable} -c {SLEEPER!r} 60 RayTrainWorker >/dev/null 2>&1 & echo $!"],
                           capture_output=True, text=True, check=True)
    pids = [p.pid for p in parents] + [int(stray.stdout.strip())]
    try:
        (mine_kid,), (other_kid,) = _children_named(parents[0]), _children_named(parents[1])
        pids += [mine_kid, other_kid]
        assert [p.pid for p in ray_train_workers(mine)] == [mine_kid]
        assert [p.pid for p in ray_train_workers(other)] == [other_kid]
        # No temp dir: this process's own descendants (a local ray.init's raylet is its child).
        assert sorted(p.pid for p in ray_train_workers()) == sorted([mine_kid, other_kid])
        assert pids[2] not in {p.pid for p in ray_train_workers()}
        # A fixture's teardown stops its own node's processes the same way, by temp dir, and their
        # children, which need not name it: Ray's dashboard agent retitles itself
        # "ray::DashboardAgent" and, orphaned, spun half a core for a minute and kept its port.
        assert stop_ray_by_tmpdir(mine) == 2 and parents[0].wait(timeout=30) is not None
        assert not psutil.pid_exists(mine_kid) or psutil.Process(mine_kid).status() == psutil.STATUS_ZOMBIE
        assert parents[1].poll() is None and psutil.Process(other_kid).is_running()
    finally:
        for pid in pids:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass


def test_modules_are_collected_longest_first():
    out = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-n", "0", "-p", "no:cacheprovider",
                          "tests/test_shards.py", "tests/test_identity.py", "tests/test_checkpoint.py"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    modules = []
    for line in out.stdout.splitlines():
        if "::" in line:
            name = line.split("::")[0].rsplit("/", 1)[-1]
            if not modules or modules[-1] != name:
                modules.append(name)
    seconds = {m + ".py": v for m, v in measured_seconds().items()}
    assert modules == sorted(modules, key=lambda m: -seconds[m]) and len(modules) == 3  # each module once, in one piece


def test_suite_durations_reads_a_pytest_log_and_keeps_the_suite_history(tmp_path, capsys):
    from benchmarks import suite_durations

    out = tmp_path / "durations.jsonl"
    out.write_text(json.dumps({"kind": "suite", "commit": "old", "workers": 0, "wall_s": 2844.45}) + "\n"
                   + json.dumps({"kind": "module", "module": "test_gone", "seconds": 9.0}) + "\n")
    log = tmp_path / "suite.log"
    log.write_text("..F\n= slowest durations =\n"
                   "12.50s call     tests/test_tune.py::test_asha[a-b]\n"
                   "2.00s setup    tests/test_tune.py::test_asha[a-b]\n"
                   "4.25s call     tests/test_loop.py::test_resume\n"
                   "= 2 passed, 1 failed, 3 warnings in 21.70s (0:00:21) =\n")
    assert suite_durations.main([str(log), "--workers", "2", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["kind"], r.get("commit")) for r in rows[:2]] == [("suite", "old"), ("suite", rows[1]["commit"])]
    assert {k: rows[1][k] for k in ("workers", "tests", "passed", "failed", "wall_s")} == \
        {"workers": 2, "tests": 3, "passed": 2, "failed": 1, "wall_s": 21.7}
    assert rows[2:] == [{"kind": "module", "module": "test_tune", "seconds": 14.5},
                        {"kind": "module", "module": "test_loop", "seconds": 4.2},
                        {"kind": "test", "test": "tests.test_tune::test_asha[a-b]", "seconds": 14.5},
                        {"kind": "test", "test": "tests.test_loop::test_resume", "seconds": 4.2}]
    # --suite-only: one more suite row, the module and test rows kept.
    log2 = tmp_path / "ci.log"
    log2.write_text("= 3 passed in 30.00s =\n")
    assert suite_durations.main([str(log2), "--suite-only", "--out", str(out)]) == 0
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["kind"] for r in again] == ["suite"] * 3 + ["module"] * 2 + ["test"] * 2 and again[3:] == rows[2:]
    assert again[2]["wall_s"] == 30.0 and again[2]["command"] == "python -m pytest -q"
    # A log without pytest's summary: one line naming the file, exit 2, the file untouched.
    log.write_text("12.50s call     tests/test_tune.py::test_asha\n")
    before = out.read_text()
    assert suite_durations.main([str(log), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(log) in err and "summary" in err and out.read_text() == before


def test_process_cpu_sums_every_process_the_command_starts(capsys):
    """benchmarks/process_cpu.py: a command whose child burns 1.5 s of CPU; the child is counted
    (it is not the process we started), the command's exit status comes back, a bad flag is one line."""
    from benchmarks import process_cpu

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.5: pass"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {burn!r}]); sys.exit(3)"
    assert process_cpu.main(["--every", "0.1", sys.executable, "-c", parent]) == 3
    report = json.loads(capsys.readouterr().out.splitlines()[0])
    assert 1.4 <= report["cpu_s"] < 3.5 and report["wall_s"] >= 1.5
    python = report["kinds"][Path(sys.executable).name]
    assert python["processes"] == 2 and python["cpu_s"] >= 1.4
    assert process_cpu.kind(["ray::TrainController"]) == "ray::TrainController"
    assert process_cpu.kind(["/v/bin/python", "-m", "jobs.publish", "--serve"]) == "publishing child"
    # A process started meanwhile by someone else (here: this test, as the other pytest process
    # or a Ray node would) is not the command's: it once added ~2 s to this 1.5 s command.
    import threading

    other = []
    timer = threading.Timer(0.2, lambda: other.append(subprocess.Popen([sys.executable, "-c", burn.replace("1.5", "3")])))
    timer.start()
    assert process_cpu.main(["--every", "0.1", sys.executable, "-c", parent]) == 3
    timer.join()
    other[0].wait(timeout=60)
    report = json.loads(capsys.readouterr().out.splitlines()[0])
    assert 1.4 <= report["cpu_s"] < 2.9, report
    with pytest.raises(SystemExit) as exit_:
        process_cpu.main(["--every", "0", "true"])
    assert exit_.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_:
        process_cpu.main([])
    assert exit_.value.code == 2 and "no command to run" in capsys.readouterr().err


def test_extended_tests_are_skipped_saying_how_to_run_them_and_are_listed_in_the_docs():
    """The default tier skips the tests marked extended (with the command that runs them); the
    docs list exactly those, each with the default-tier test that covers its feature."""
    import re

    listed = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-n", "0", "-p", "no:cacheprovider",
                             "-m", "extended"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stdout[-2000:] + listed.stderr[-2000:]
    marked = sorted(line.strip() for line in listed.stdout.splitlines() if "::" in line)
    documented = sorted(re.findall(r"^\| `(tests/[\w/]+\.py::\w+)` \|", (ROOT / "docs" / "testing.md").read_text(), re.M))
    assert marked == documented and len(marked) == 4, (marked, documented)
    ran = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-n", "0", "-p", "no:cacheprovider", marked[0]],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0 and "1 skipped" in ran.stdout, ran.stdout[-2000:]
    assert "python -m pytest -q --extended" in ran.stdout
