"""How long a checkpoint holds up the training thread: written in the loop vs off it.

    python -m benchmarks.checkpoint --size 64 --width 0.125      # CPU, a quick look
    python -m benchmarks.checkpoint --size 128 --device cuda     # GPU (benchmarks/gpu.sh)

Builds the seed model's full checkpoint state (G, D, both Adam states after a step, the EMA
copy) on the device, then, per round, times on the training thread:
  - ``torch_save_ms``: ``torch.save(state, path)``, what a competent loop writes (the reference);
  - ``sync_ms``: the project's ``save_state`` in the loop (the same plus a digest, temp, rename);
  - ``blocked_ms``: what the loop pays now: the copy to the host (``to_host``) and the hand-over
    to the background writer;
and ``write_ms``, the background write from hand-over to done (the loop does not wait for it).
It reloads the background-written file and says whether it equals the in-loop one (``identical``).
Prints one JSON line (medians over ``--rounds``). Needs only torch.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.train_step import _sync
from gan.checkpoint import BackgroundWriter, load_state, save_state, to_host
from gan.config import Config, apply
from gan.models import build


def seed_state(cfg: Config, device: torch.device) -> dict:
    """A checkpoint as the loop captures it, with Adam's moments present."""
    G, D = (m.to(device) for m in build(cfg.model))
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-4, betas=(0.5, 0.999)) for k, m in (("opt_g", G), ("opt_d", D))}
    for m, opt in ((G, opts["opt_g"]), (D, opts["opt_d"])):
        for p in m.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    ema = copy.deepcopy(G)
    return {"format": 1, "step": 1, "G": G.state_dict(), "D": D.state_dict(), "ema": ema.state_dict(),
            **{k: o.state_dict() for k, o in opts.items()}}


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, choices=(64, 128), default=128)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    cfg = Config()
    apply(cfg, {"model.size": a.size, "model.width": a.width})
    state = seed_state(cfg, device)
    rows = {k: [] for k in ("torch_save_ms", "sync_ms", "blocked_ms", "write_ms")}
    writer = BackgroundWriter()
    with tempfile.TemporaryDirectory() as tmp:
        ref, bg = Path(tmp) / "ref.pt", Path(tmp) / "bg.pt"
        for _ in range(a.rounds):
            for key, write in (("torch_save_ms", lambda: torch.save(state, ref)),
                               ("sync_ms", lambda: save_state(state, ref))):
                _sync(device)
                t0 = time.perf_counter()
                write()
                _sync(device)
                rows[key].append(1e3 * (time.perf_counter() - t0))
            _sync(device)
            t0 = time.perf_counter()
            host = to_host(state)
            writer.submit(lambda: save_state(host, bg))
            rows["blocked_ms"].append(1e3 * (time.perf_counter() - t0))
            writer.wait()
            rows["write_ms"].append(1e3 * (time.perf_counter() - t0))
        identical = equal(load_state(ref), load_state(bg))
        mb = bg.stat().st_size / 2**20
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    med = {k: round(statistics.median(v), 2) for k, v in rows.items()}
    print(json.dumps({"device": device_name, "size": a.size, "width": a.width, "rounds": a.rounds,
                      "state_mb": round(mb, 1), **med, "identical": identical,
                      "blocked_vs_torch_save": round(med["blocked_ms"] / med["torch_save_ms"], 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
