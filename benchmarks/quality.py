"""Quality benchmark: which recipe makes better faces for the same budget, measured on any laptop.

    python -m benchmarks.quality                                   # every variant, 1 seed, CPU protocol
    python -m benchmarks.quality --variants seed,ttur,ttur+ema --seeds 2
    python -m benchmarks.quality --variants ttur --epochs 1        # a quick look
    python -m benchmarks.quality --size 128 --width 1 --device cuda --variants seed,ttur   # GPU protocol

The CPU protocol: the CelebA sample (``--data``, or ``../shared/data/celeba-sample`` converted
at ``--size`` into ``data/celeba{size}``), the seed's architecture at ``--width`` (1/8), batch
64, ``--epochs`` (20) over the 4,560 training faces (1,420 steps, ~7 minutes a run on 2 cores),
``LocalContext`` (one process, no Ray, no MLflow). Each run's final generator (the EMA when the
variant keeps one) is scored through the project's own evaluation (evaluation/fid.py): FID and KID
of ``--n`` (512) samples against the held-out ``val`` faces with the standard FID Inception.
Variants run one after another in this process with fixed seeds; ``--seeds 2`` shows the
run-to-run spread. Prints one JSON line per run, then a table (mean ± half-range over seeds),
and writes a strip of 16 samples per variant to ``--out`` (PNG).

A variant is a name from VARIANTS, a preset (``configs/faces64.toml``, or ``faces64`` for
``configs/faces64.toml``: its recipe, the [loss], [optim] and [model] fields but size and width,
and train.batch_size / train.ema_decay, on the protocol), or ``base+name:section.field=value;...``
for an ad-hoc one (on top of the longest leading ``+``-part of its name that is a variant, e.g.
``ttur+sn2:model.d_norm=spectral`` on ``ttur``, ``ttur+ada+bs16:train.batch_size=16`` on ``ttur+ada``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from compose import train_from_config
from datasets.celeba import main as convert
from datasets.shards import ShardSet
from evaluation.fid import Evaluator, build_extractor
from gan.config import Config, ConfigError, apply, flatten, load, validate
from gan.context import LocalContext
from gan.images import grid, to_uint8
from gan.models import sample_z

ROOT = Path(__file__).resolve().parents[1]
# The CelebA sample beside the checkout; on a GPU box, where ../shared does not travel, a copy
# of its zip and partition file in the git-ignored data/celeba-sample.
SAMPLES = (ROOT.parent / "shared" / "data" / "celeba-sample", ROOT / "data" / "celeba-sample")
SAMPLE = next((s for s in SAMPLES if (s / "img_align_celeba.zip").is_file()), SAMPLES[0])
TTUR = {"optim.lr_d": 4e-4, "optim.lr_g": 1e-4}
VARIANTS: dict[str, dict] = {
    "seed": {},  # lr_d 4e-5, lr_g 2e-4: the seed's ratio 0.2
    "equal": {"optim.lr_d": 2e-4, "optim.lr_g": 2e-4},
    "ttur": TTUR,
    "ttur+ema": {**TTUR, "train.ema_decay": 0.999},
    "ttur+sn": {**TTUR, "model.d_norm": "spectral"},
    "ttur+nobn": {**TTUR, "model.d_norm": "none"},
    "ttur+hinge": {**TTUR, "loss.kind": "hinge"},
    "ttur+ns": {**TTUR, "loss.kind": "nonsaturating"},
    "ttur+resize": {**TTUR, "model.g_upsample": "resize"},
    "ttur+diffaug": {**TTUR, "loss.diffaug": "color,translation,cutout"},
    "ttur+ada": {**TTUR, "loss.diffaug": "color,translation,cutout", "loss.ada_target": 0.6},
}


# What a preset contributes to the protocol: its recipe, not its data, size, budget or cluster.
RECIPE_SECTIONS = ("loss", "optim", "model")
RECIPE_EXTRA = {"train.batch_size", "train.ema_decay"}
PROTOCOL_FIELDS = {"model.size", "model.width"}


def preset_recipe(path: Path) -> dict:
    cfg, default = flatten(load(path)), flatten(Config())
    return {k: v for k, v in cfg.items() if (k.split(".")[0] in RECIPE_SECTIONS or k in RECIPE_EXTRA)
            and k not in PROTOCOL_FIELDS and v != default[k]}


def parse_variant(spec: str) -> tuple[str, dict]:
    preset = Path(spec) if spec.endswith(".toml") else ROOT / "configs" / f"{spec}.toml"
    if ":" not in spec and spec not in VARIANTS and preset.is_file():
        return preset.stem, preset_recipe(preset)
    if ":" not in spec:
        if spec not in VARIANTS:
            raise ConfigError(f"--variants: unknown variant {spec!r}; known: {', '.join(VARIANTS)} "
                              f"(or name:section.field=value;...)")
        return spec, VARIANTS[spec]
    name, _, body = spec.partition(":")
    pairs = [p.split("=", 1) for p in body.split(";") if p]
    if any(len(p) != 2 for p in pairs):
        raise ConfigError(f"--variants: {spec!r}: expected name:section.field=value;...")
    parts = name.split("+")  # on top of the longest leading part that is a variant: ttur+ada+bs16 -> ttur+ada
    base = next((VARIANTS[b] for b in ("+".join(parts[:i]) for i in range(len(parts), 0, -1)) if b in VARIANTS), {})
    return name, {**base, **dict(pairs)}


def ensure_data(data: str | None, size: int) -> Path:
    if data:
        return Path(data)
    out = ROOT / "data" / f"celeba{size}"
    if not (out / "val" / "manifest.json").is_file():
        if not (SAMPLE / "img_align_celeba.zip").is_file():
            raise ConfigError(f"--data: no shard set given and no CelebA sample at {' or '.join(map(str, SAMPLES))}")
        rc = convert(["--src", str(SAMPLE / "img_align_celeba.zip"), "--partition",
                      str(SAMPLE / "list_eval_partition.txt"), "--out", str(out), "--size", str(size)])
        if rc != 0:
            raise ConfigError(f"converting the CelebA sample into {out} failed")
    return out


def protocol_config(data: Path, a, overrides: dict, seed: int, storage: str) -> Config:
    cfg = Config()
    apply(cfg, {"model.size": a.size, "model.width": a.width, "model.bn_momentum": 0.1,
                "data.source": "shards", "data.path": str(data / "train"), "data.verify_checksums": False,
                "train.batch_size": 64, "train.epochs": a.epochs, "train.max_steps": a.max_steps,
                "train.seed": seed, "train.log_every": 50, "train.checkpoint_every": 10**9,
                "eval.every_steps": 0, "scale.num_workers": 1, "run.storage_path": storage,
                "perf.prefetch": 2})
    apply(cfg, overrides, where="variant: ")
    return validate(cfg)


def run_one(name: str, overrides: dict, seed: int, data: Path, a, extractor, out: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = protocol_config(data, a, overrides, seed, tmp)
        t0 = time.perf_counter()
        res = train_from_config(cfg, LocalContext(tmp, device=a.device, resume=False))
        train_s = time.perf_counter() - t0
        ev = Evaluator(extractor, ShardSet(data / "val"), a.n, 0, 1, torch.device(a.device),
                       ROOT / "runs" / "feature_cache", seed=0)
        t1 = time.perf_counter()
        scores = ev(res.generator)
        eval_s = time.perf_counter() - t1
    with torch.no_grad():
        G = res.generator.eval()
        z = sample_z(16, cfg.model.z_dim, torch.Generator().manual_seed(0)).to(a.device)
        grid(to_uint8(G(z)), nrow=16).save(out / f"{name}-seed{seed}.png")
    return {"variant": name, "seed": seed, **scores, "steps": res.step, "train_s": round(train_s, 1),
            "eval_s": round(eval_s, 1), "img_per_s": round(res.step * 64 / train_s, 1),
            "n": a.n, "size": a.size, "width": a.width, "epochs": a.epochs, "device": a.device,
            "overrides": overrides}


def table(rows: list[dict]) -> str:
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    lines = ["| variant | FID (mean ± half-range) | KID ×1e3 | runs | train min/run |", "|---|---|---|---|---|"]
    for name, rs in by.items():
        f, k = [r["fid"] for r in rs], [r["kid"] * 1e3 for r in rs]
        spread = (max(f) - min(f)) / 2
        lines.append(f"| {name} | {statistics.mean(f):.1f} ± {spread:.1f} | {statistics.mean(k):.1f} | {len(rs)} | "
                     f"{statistics.mean(r['train_s'] for r in rs) / 60:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed+seeds-1 (to split runs over processes)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--max-steps", type=int, default=0, help="stop each run at this step (0: the epochs)")
    p.add_argument("--n", type=int, default=512, help="samples for FID/KID")
    p.add_argument("--size", type=int, choices=(64, 128), default=64)
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", help="a shard root with train/ and val/ (default: the converted CelebA sample)")
    p.add_argument("--extractor", choices=("inception", "pixels"), default="inception")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality"))
    a = p.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in a.variants.split(",") if v]
        data = ensure_data(a.data, a.size)
        for name, ov in variants:  # every variant's config is valid before the first run starts
            protocol_config(data, a, ov, 0, "runs")
        extractor = build_extractor(a.extractor)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, ov in variants:
        for seed in range(a.first_seed, a.first_seed + a.seeds):
            row = run_one(name, ov, seed, data, a, extractor, out)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(table(rows), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
