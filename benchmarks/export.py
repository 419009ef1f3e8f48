"""What publishing a new best generator costs the training thread.

    python -m benchmarks.export                  # 64 px (width 1/8 and 1) and 128 px (width 1)
    python -m benchmarks.export --out benchmarks/results/cpu-2core-export.jsonl

MLflow's pt2 format runs ``torch.export``, which must not run on a thread beside training
(jobs/publish.py). Two ways to keep it off: export on the training thread itself, which then
stops for the whole export and upload (the reference, measured here as ``inline_s``), or what
facegan does: the training thread copies the weights to the host (``handover_s``, the only part
it waits for) and the publishing process exports and logs them in the background: ``child_first_s``
for the first publication of a process (the child's imports included, unless ``warm`` started it
earlier), ``child_s`` for each later one. Each row is one size, both ways measured in this run
against a fresh SQLite store.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from gan.config import ModelConfig
from gan.models import Generator, count_params
from jobs.cli import Parser
from jobs import publish as publisher
from jobs.publish import log_generator, publish
from jobs.tracking import start_run

SIZES = ((64, 0.125), (64, 1.0), (128, 1.0))


def measure(size: int, width: float, uri: str, repeats: int) -> dict:
    cfg = ModelConfig(size=size, width=width)
    torch.manual_seed(0)
    G = Generator(cfg)
    run_id = start_run(uri, "export-benchmark", f"{size}px-{width:g}", f"/bench/{size}/{width}", {}, resume=False)
    inline, handover, first, child = [], [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        log_generator(uri, run_id, G, cfg)  # the reference: the training thread exports and uploads
        inline.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        state = {k: v.detach().to("cpu", copy=True) for k, v in G.state_dict().items()}  # BackgroundTracker's copy
        handover.append(time.perf_counter() - t0)
        publisher.shutdown()  # a fresh publishing process: its imports are in the first publication
        for times in (first, child):
            t0 = time.perf_counter()
            publish(uri, run_id, state, cfg)  # on the tracking thread: the publishing process exports and logs
            times.append(time.perf_counter() - t0)
    return {"size": size, "width": width, "g_params": count_params(G), "repeats": repeats,
            "inline_s": round(min(inline), 3), "handover_s": round(min(handover), 4),
            "child_first_s": round(min(first), 2), "child_s": round(min(child), 2), "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    p = Parser("benchmarks.export", __doc__)
    p.add_argument("--repeats", type=int, default=2, help="each way, per size; the fastest is kept")
    p.add_argument("--out", default="", help="append the rows to this JSONL file")
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        for size, width in SIZES:
            rows.append(measure(size, width, uri, a.repeats))
            print(json.dumps(rows[-1]), flush=True)
    print("| size | width | G params | export on the training thread | training thread's hand-over | "
          "publishing process (background): first, then each |\n|---|---|---|---|---|---|", file=sys.stderr)
    for r in rows:
        print(f"| {r['size']} | {r['width']:g} | {r['g_params']:,} | {r['inline_s']:.2f} s | "
              f"{r['handover_s'] * 1000:.1f} ms | {r['child_first_s']:.1f} s, then {r['child_s']:.1f} s |", file=sys.stderr)
    if a.out:
        with open(a.out, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "machine": "2-core CPU"}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
