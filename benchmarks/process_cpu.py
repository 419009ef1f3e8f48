"""Where a command's CPU goes, by kind of process: every process the command starts, directly or
through its children (Ray's actors and workers, MLflow servers, publishing children, test
processes), is sampled until it ends, and their CPU seconds are summed by kind. Processes that
others start meanwhile are not counted.

    python -m benchmarks.process_cpu python -m pytest -q
    python -m benchmarks.process_cpu --every 0.5 python -m jobs.train --config configs/smoke.toml

Prints one JSON line (wall and CPU seconds, and per kind: seconds and processes), then a table.
A process is read every ``--every`` seconds, so one that lives less than that is missed and a
process's last fraction of a sample is lost: the sums are lower bounds. A process counts under
the name it had last (a Ray worker takes its actor's name, ``ray::TrainController``).
Exit status: the command's own.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter

import psutil

from jobs.cli import Parser

# (what the command line holds, the kind): the first match wins
KINDS = (("pytest", "pytest"), ("exec(eval(sys.stdin", "pytest-xdist worker"), ("jobs.publish", "publishing child"),
         ("mlflow server", "mlflow server"), ("uvicorn", "mlflow server"), ("gcs_server", "ray gcs_server"),
         ("raylet", "ray raylet"), ("dashboard/agent", "ray dashboard agent"), ("dashboard.py", "ray dashboard"),
         ("log_monitor", "ray log_monitor"), ("moto", "moto (S3)"), ("multiprocessing", "python multiprocessing child"))


def kind(cmdline: list[str]) -> str:
    line = " ".join(cmdline)
    if line.startswith("ray::"):
        return line.split()[0][:40]  # the actor's class, as Ray names the process (may be cut at 15 chars)
    for needle, name in KINDS:
        if needle in line:
            return name
    return (cmdline[0].rsplit("/", 1)[-1] if cmdline else "?")[:40]


def measure(command: list[str], every: float = 0.3) -> tuple[int, dict]:
    before = {p.pid for p in psutil.process_iter()}
    seen: dict[int, tuple[str, float]] = {}
    t0 = time.monotonic()
    proc = subprocess.Popen(command)
    ours = {proc.pid}  # the command and its descendants, kept once seen (a daemon is re-parented later)
    while True:
        done = proc.poll() is not None
        for p in sorted(psutil.process_iter(["cmdline", "cpu_times", "ppid"]), key=lambda p: p.info["ppid"] not in ours):
            if p.pid not in ours and (p.pid in before or p.info["ppid"] not in ours):
                continue
            ours.add(p.pid)
            if p.info["cpu_times"] is None:
                continue
            cpu = p.info["cpu_times"].user + p.info["cpu_times"].system
            seen[p.pid] = (kind(p.info["cmdline"] or [p.name()]) if p.info["cmdline"] else seen.get(p.pid, ("?",))[0], cpu)
        if done:
            break
        time.sleep(every)
    seconds, count = Counter(), Counter()
    for name, cpu in seen.values():
        seconds[name] += cpu
        count[name] += 1
    return proc.returncode, {"wall_s": round(time.monotonic() - t0, 1), "cpu_s": round(sum(seconds.values()), 1),
                             "kinds": {k: {"cpu_s": round(s, 1), "processes": count[k]} for k, s in seconds.most_common()}}


def main(argv: list[str] | None = None) -> int:
    p = Parser("benchmarks.process_cpu", __doc__)
    p.add_argument("--every", type=float, default=0.3, help="seconds between two readings of every process")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command to run (everything after the options)")
    a = p.parse_args(argv)
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if a.every <= 0:
        p.error(f"--every must be > 0, got {a.every}")
    if not command:
        p.error("no command to run: python -m benchmarks.process_cpu [--every S] COMMAND ...")
    rc, report = measure(command, a.every)
    print(json.dumps(report), flush=True)
    print(f"wall {report['wall_s']:,.0f} s, CPU {report['cpu_s']:,.0f} s\n| kind | CPU s | processes |\n|---|---|---|")
    for k, v in report["kinds"].items():
        print(f"| {k} | {v['cpu_s']:,.1f} | {v['processes']} |")
    return rc


if __name__ == "__main__":
    sys.exit(main())
