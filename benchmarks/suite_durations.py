"""The test suite's wall time, per module and per test, from a pytest log, into
``benchmarks/results/suite-durations.jsonl`` (tests/conftest.py schedules the longest modules first
from it).

    python -m pytest -q --durations=0 2>&1 | tee suite.log
    python -m benchmarks.suite_durations suite.log --workers 2

The file keeps one ``suite`` row per measurement (its history: commit, CPU, workers, wall time)
and the ``module`` and ``test`` rows of the latest one. A module's seconds are the sum of its
tests' setup, call and teardown times as pytest reports them (under ``-n 2`` each test shares the
cores with another one, so the sums exceed the wall time).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "suite-durations.jsonl"
ROOT = OUT.parents[2]
DURATION = re.compile(r"^([0-9.]+)s (setup|call|teardown)\s+tests/(\w+)\.py::(\S+)")
SUMMARY = re.compile(r"(\d+) passed.* in ([0-9.]+)s")


def parse(text: str) -> tuple[dict, Counter, Counter]:
    """(the summary: tests passed, failed, wall seconds), seconds per module, seconds per test."""
    modules, tests = Counter(), Counter()
    for line in text.splitlines():
        m = DURATION.match(line.strip())
        if m:
            modules[m.group(3)] += float(m.group(1))
            tests[f"tests.{m.group(3)}::{m.group(4)}"] += float(m.group(1))
    last = [line for line in text.splitlines() if SUMMARY.search(line)]
    if not last:
        raise ValueError("no pytest summary line ('N passed ... in S s') in the log")
    passed, wall = SUMMARY.search(last[-1]).groups()
    failed = re.search(r"(\d+) failed", last[-1])
    return {"passed": int(passed), "failed": int(failed.group(1)) if failed else 0, "wall_s": float(wall)}, modules, tests


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.suite_durations", description=__doc__.split("\n\n")[0])
    p.add_argument("log", help="a pytest log written with --durations=0")
    p.add_argument("--workers", type=int, default=2, help="pytest-xdist processes the log was run with (0: serial)")
    p.add_argument("--top", type=int, default=30, help="how many of the slowest tests to keep")
    p.add_argument("--suite-only", action="store_true",
                   help="add the suite row only, keep the module and test rows (a log with pytest's default --durations)")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    try:
        summary, modules, tests = parse(Path(a.log).read_text())
    except (OSError, ValueError) as e:
        print(f"error: {a.log}: {e}", file=sys.stderr)
        return 2
    if not modules and not a.suite_only:
        print(f"error: {a.log}: no per-test durations (run pytest with --durations=0)", file=sys.stderr)
        return 2
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    out = Path(a.out)
    history = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.is_file() else []
    suite = {"kind": "suite", "commit": commit, "cpu": cpu_name(), "cores": os.cpu_count(), "workers": a.workers,
             "tests": summary["passed"] + summary["failed"], **summary,
             "command": "python -m pytest -q" + ("" if a.suite_only else " --durations=0")}
    rows = [r for r in history if r.get("kind") == "suite"] + [suite]
    if a.suite_only:
        rows += [r for r in history if r.get("kind") != "suite"]
    else:
        rows += [{"kind": "module", "module": m, "seconds": round(s, 1)} for m, s in modules.most_common()]
        rows += [{"kind": "test", "test": t, "seconds": round(s, 1)} for t, s in tests.most_common(a.top)]
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, out)
    print(json.dumps(suite))
    return 0


if __name__ == "__main__":
    sys.exit(main())
