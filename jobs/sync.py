"""Send a run's tracking records that could not reach the MLflow server while it trained.

    python -m jobs.sync runs/<run name>                       # to the server the run used
    python -m jobs.sync runs/<run name> --tracking-uri http://127.0.0.1:5000   # or another one

While the server is unreachable, rank 0 keeps training and spills what it would have logged
(metrics, tags, grids, artifacts, new best generators, the run's final status) to
``<run dir>/tracking_spool`` (jobs/spool.py); a run still training sends it by itself when the
server returns. This sends what is left after the run ended, in order, each record's file
removed once sent; metric steps already in MLflow are skipped, so running it twice duplicates
nothing. Exit 0: all sent (or nothing to send); 1: the server is still unreachable (the records
stay); 2: not a run directory.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.spool import SPOOL, fail_fast, replay, spool_of


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="the run's directory: run.storage_path/run.name")
    p.add_argument("--tracking-uri", default=None, help="default: the one the run logged to")
    a = p.parse_args(argv)

    run_dir = Path(a.run_dir)
    if not run_dir.is_dir():
        print(f"error: {run_dir}: no such run directory", file=sys.stderr)
        return 2
    spool = spool_of(run_dir)
    if spool.files() and not (spool.dir / "run.json").is_file():
        print(f"error: {spool.dir}/run.json is missing: which run these records belong to is unknown", file=sys.stderr)
        return 2
    fail_fast()
    try:
        sent, uri, run_id = replay(run_dir, a.tracking_uri)
    except Exception as e:  # noqa: BLE001 - the server is away (or refuses): say so, keep the records
        left = len(spool.files())
        print(f"error: {left} record(s) in {run_dir}/{SPOOL} not sent ({str(e).splitlines()[0][:200]})",
              file=sys.stderr)
        return 1
    print(f"{run_dir}: sent {sent} record(s) to run {run_id} at {uri}" if sent else f"{run_dir}: nothing to send")
    return 0


if __name__ == "__main__":
    sys.exit(main())
