"""Quality benchmark: which recipe makes better faces for the same budget, measured on any laptop.

    python -m benchmarks.quality                                   # every variant, 1 seed, CPU protocol
    python -m benchmarks.quality --variants seed,ttur,ttur+ema --seeds 2
    python -m benchmarks.quality --variants ttur --epochs 1        # a quick look
    python -m benchmarks.quality --size 128 --width 1 --device cuda --variants seed,ttur   # GPU protocol
    python -m benchmarks.quality --table benchmarks/results/privacy.jsonl   # a results file's table

The CPU protocol: the CelebA sample (``--data``, or ``../shared/data/celeba-sample`` converted
at ``--size`` into ``data/celeba{size}``), the seed's architecture at ``--width`` (1/8), batch
64, ``--epochs`` (20) over the 4,560 training faces (1,420 steps, ~7 minutes a run on 2 cores),
``LocalContext`` (one process, no Ray, no MLflow). Each run's final generator (the EMA when the
variant keeps one) is scored through the project's own evaluation (evaluation/fid.py): FID and KID
of ``--n`` (512) samples against the held-out ``val`` faces with the standard FID Inception.
Variants run one after another in this process with fixed seeds; ``--seeds 2`` shows the
run-to-run spread. ``--minutes 20`` is the speedrun protocol instead (docs/recipes.md): each
run trains for 20 minutes of wall time, evaluation excluded (train.max_minutes), at whatever
batch, width and architecture the variant sets, and reports the steps and img/s it reached.
Prints one JSON line per run, then a table (mean ± half-range over seeds),
and writes a strip of 16 samples per variant to ``--out`` (PNG).

A variant is a name from VARIANTS, a preset (``configs/faces64.toml``, or ``faces64`` for
``configs/faces64.toml``: its recipe, the [loss], [optim] and [model] fields but size and width,
and train.batch_size / train.ema_decay, on the protocol), or ``base+name:section.field=value;...``
for an ad-hoc one (on top of the longest leading ``+``-part of its name that is a variant or a
preset, e.g. ``ttur+sn2:model.d_norm=spectral`` on ``ttur``, ``faces64+dp10:model.d_norm=none;
privacy.dp_epsilon=10`` on configs/faces64.toml).

Privacy columns (docs/privacy.md): ``epsilon`` (the accountant's ε spent; null without DP) and,
when the shards have identities and the privacy extra is installed (``--identity``), the
identity audit of ``--identity-n`` faces: ``identity_auc``, ``identity_match_rate`` and
``heldout_match_rate``. With ``--filter-fpir`` > 0 each such run gets a second row,
``<variant>+filter``: the same generator's faces behind the sampling-time filter.
``--train-people K --epochs E`` is the leak stress protocol (docs/privacy.md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from compose import train_from_config
from datasets.celeba import main as convert
from datasets.shards import ShardSet
from evaluation.faceid import FaceIDError
from evaluation.fid import Evaluator, build_extractor
from evaluation.identity import IdentityAuditError
from evaluation.leak import IdentityLeak, draw_excluding, verdict
from gan.config import Config, ConfigError, apply, flatten, load, validate
from gan.context import CHECKPOINT_FILE, LocalContext
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
    # On top of the longest leading part that is a variant or a preset: ttur+ada+bs16 -> ttur+ada,
    # faces64+dp10 -> configs/faces64.toml's recipe.
    parts = name.split("+")
    base = next((_named(b) for b in ("+".join(parts[:i]) for i in range(len(parts), 0, -1)) if _named(b) is not None), {})
    return name, {**base, **dict(pairs)}


def _named(name: str) -> dict | None:
    if name in VARIANTS:
        return VARIANTS[name]
    preset = ROOT / "configs" / f"{name}.toml"
    return preset_recipe(preset) if preset.is_file() else None


def ensure_data(data: str | None, size: int, people: int = 0) -> Path:
    """The protocol's shards: ``--data``, or the CelebA sample converted at ``size`` with its
    identities (``people`` > 0: only the first that many training people, the stress protocol)."""
    if data:
        return Path(data)
    out = ROOT / "data" / (f"celeba{size}" + (f"-people{people}" if people else ""))
    identities = SAMPLE / "identity_CelebA.txt"
    have = (out / "val" / "manifest.json").is_file() and (not identities.is_file() or
                                                           ShardSet(out / "val").identities() is not None)
    if not have:
        if not (SAMPLE / "img_align_celeba.zip").is_file():
            raise ConfigError(f"--data: no shard set given and no CelebA sample at {' or '.join(map(str, SAMPLES))}")
        args = ["--src", str(SAMPLE / "img_align_celeba.zip"), "--partition", str(SAMPLE / "list_eval_partition.txt"),
                "--out", str(out), "--size", str(size)]
        if identities.is_file():
            args += ["--identities", str(identities)] + (["--train-people", str(people)] if people else [])
        elif people:
            raise ConfigError(f"--train-people: the CelebA sample at {SAMPLE} has no identity_CelebA.txt")
        if convert(args) != 0:
            raise ConfigError(f"converting the CelebA sample into {out} failed")
    return out


def protocol_config(data: Path, a, overrides: dict, seed: int, storage: str) -> Config:
    cfg = Config()
    apply(cfg, {"model.size": a.size, "model.width": a.width, "model.bn_momentum": 0.1,
                "data.source": "shards", "data.path": str(data / "train"), "data.verify_checksums": False,
                "train.batch_size": 64, "train.epochs": a.epochs if not a.minutes else 10**6,
                "train.max_steps": a.max_steps, "train.max_minutes": a.minutes,
                "train.seed": seed, "train.log_every": 50, "train.checkpoint_every": 10**9,
                "eval.every_steps": 0, "scale.num_workers": 1, "run.storage_path": storage,
                "perf.prefetch": 2})
    apply(cfg, overrides, where="variant: ")
    return validate(cfg)


def keep_checkpoint(src: Path, dst: Path) -> None:
    """Copy a checkpoint and its digest sidecar whole (temp name, then rename)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    for a, b in ((src, dst), (src.with_name(src.name + ".sha256"), dst.with_name(dst.name + ".sha256"))):
        if a.is_file():
            tmp = b.with_name(f".{b.name}.tmp")
            shutil.copyfile(a, tmp)
            os.replace(tmp, b)


def identity_leak(data: Path, a) -> IdentityLeak | None:
    """The identity audit for every run (``--identity``): auto = when the training and held-out
    shards have identities and the privacy extra is installed."""
    if a.identity == "off":
        return None
    try:
        return IdentityLeak(data / "train", data / "val", a.identity_n, seed=0, cache_dir=a.cache)
    except (IdentityAuditError, FaceIDError) as e:
        if a.identity == "on":
            raise ConfigError(f"--identity on: {e}") from None
        print(f"quality: no identity columns ({e})", file=sys.stderr)
        return None


def run_one(name: str, overrides: dict, seed: int, data: Path, a, extractor, out: Path,
            leak: IdentityLeak | None = None) -> list[dict]:
    """The run's row, and with ``--filter-fpir`` > 0 (and the identity audit) a second one: the
    same generator's faces behind the sampling-time filter (evaluation/leak.py)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = protocol_config(data, a, overrides, seed, tmp)
        t0 = time.perf_counter()
        ctx = LocalContext(tmp, device=a.device, resume=False)
        res = train_from_config(cfg, ctx)
        ctx.flush()
        train_s = time.perf_counter() - t0
        if a.keep:  # the final checkpoint (G, D, optimisers, config): what jobs.repair needs
            keep_checkpoint(Path(tmp) / CHECKPOINT_FILE, Path(a.keep) / f"{name}-seed{seed}.pt")
        ev = Evaluator(extractor, ShardSet(data / "val"), a.n, 0, 1, torch.device(a.device), a.cache, seed=0)
        t1 = time.perf_counter()
        scores = ev(res.generator)
        eval_s = time.perf_counter() - t1
        privacy = {"epsilon": res.epsilon}  # the accountant's ε spent (None: no DP)
        filtered = None
        if leak is not None:
            t2 = time.perf_counter()
            privacy |= _leak_columns(leak(res.generator, a.device), time.perf_counter() - t2)
            try:  # the same generator behind the sampling-time filter
                faces, kept, vectors = draw_excluding(res.generator, leak, a.n, 0, a.filter_fpir, a.device) \
                    if a.filter_fpir > 0 else (None, None, None)
            except IdentityAuditError as e:  # it draws its training people nearly always
                print(f"quality: {name} seed {seed}: no filter row ({e})", file=sys.stderr)
                faces = None
            if faces is not None:
                filtered = {**ev.score_faces(torch.from_numpy(b).permute(0, 3, 1, 2) for b in np.array_split(faces, 8)),
                            **_leak_columns(leak.audit_faces(faces, vectors)[0], 0.0),
                            "filter_dropped": kept["dropped"], "filter_drawn": kept["drawn"], "filter_fpir": a.filter_fpir}
    with torch.no_grad():
        G = res.generator.eval()
        z = sample_z(16, cfg.model.z_dim, torch.Generator().manual_seed(0)).to(a.device)
        grid(to_uint8(G(z)), nrow=16).save(out / f"{name}-seed{seed}.png")
    # Under --minutes the loop's own clock (training only); otherwise the whole call (setup included)
    loop_s = res.metrics.get("train_minutes", train_s / 60) * 60
    row = {"variant": name, "seed": seed, **scores, **privacy, "steps": res.step, "train_s": round(loop_s, 1),
            "wall_s": round(train_s, 1), "eval_s": round(eval_s, 1),
            "img_per_s": round(res.step * cfg.train.batch_size / loop_s, 1),
            "n": a.n, "size": a.size, "width": a.width, "epochs": a.epochs if not a.minutes else None,
            "minutes": a.minutes or None, "device": a.device, "threads": torch.get_num_threads(),
            "data": data.name, "train_faces": ShardSet(data / "train").count,
            "overrides": overrides}
    return [row] + ([{**row, "variant": f"{name}+filter", **filtered}] if filtered else [])


def _leak_columns(report: dict, seconds: float) -> dict:
    return {**verdict(report), "identity_p_value": report["identity_auc_p_value"], "identity_flagged": report["flagged"],
            "identity_n": report["n_fake"], "identity_s": round(seconds, 1)}


def _each(rs: list[dict], key: str) -> str:
    """Each run's value, when there are several: " (0.83, 0.73)"."""
    vals = [r[key] for r in rs if r.get(key) is not None]
    return f" ({', '.join(f'{v:.2f}' for v in vals)})" if len(vals) > 1 else ""


def table(rows: list[dict]) -> str:
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    lines = [("| variant | ε | FID (mean ± half-range) | KID ×1e3 | identity AUC | match rate | held-out match rate "
              "| runs | train min/run | steps | img/s |"), "|---|---|---|---|---|---|---|---|---|---|---|"]

    def mean(rs, key, fmt, scale=1.0):
        vals = [r[key] * scale for r in rs if r.get(key) is not None]
        return format(statistics.mean(vals), fmt) if vals else "–"

    for name, rs in by.items():
        f = [r["fid"] for r in rs]
        spread = (max(f) - min(f)) / 2
        lines.append(f"| {name} | {mean(rs, 'epsilon', '.3g')} | {statistics.mean(f):.1f} ± {spread:.1f} | "
                     f"{mean(rs, 'kid', '.1f', 1e3)} | {mean(rs, 'identity_auc', '.2f')}{_each(rs, 'identity_auc')} | "
                     f"{mean(rs, 'identity_match_rate', '.1%')} | {mean(rs, 'heldout_match_rate', '.1%')} | {len(rs)} | "
                     f"{statistics.mean(r['train_s'] for r in rs) / 60:.1f} | {mean(rs, 'steps', '.0f')} | "
                     f"{mean(rs, 'img_per_s', '.0f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed+seeds-1 (to split runs over processes)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--max-steps", type=int, default=0, help="stop each run at this step (0: the epochs)")
    p.add_argument("--minutes", type=float, default=0.0,
                   help="the speedrun protocol: each run trains for this many minutes of wall time (evaluation "
                        "excluded), whatever its batch, width or architecture; --epochs is then ignored")
    p.add_argument("--n", type=int, default=512, help="samples for FID/KID")
    p.add_argument("--size", type=int, choices=(64, 128), default=64)
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", help="a shard root with train/ and val/ (default: the converted CelebA sample)")
    p.add_argument("--train-people", type=int, default=0,
                   help="train on the sample's first K training people only, all their photos (the leak stress "
                        "protocol, docs/privacy.md); 0: all 152")
    p.add_argument("--extractor", choices=("inception", "pixels"), default="inception")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality"))
    p.add_argument("--identity", choices=("auto", "on", "off"), default="auto",
                   help="identity-leak columns (needs shards with identities and the privacy extra)")
    p.add_argument("--identity-n", type=int, default=500, help="faces drawn for the identity audit")
    p.add_argument("--filter-fpir", type=float, default=0.05,
                   help="with the identity audit: also score each generator behind the sampling-time filter at "
                        "this fpir (a '+filter' row); 0: no filter rows")
    p.add_argument("--keep", metavar="DIR", help="keep each run's final checkpoint as DIR/<variant>-seed<k>.pt")
    p.add_argument("--jsonl", help="also append each run's row to this JSON-lines file")
    p.add_argument("--cache", default=str(ROOT / "runs" / "feature_cache"), help="feature and face-vector cache")
    p.add_argument("--table", metavar="JSONL", help="print the table of the rows in this file, and stop")
    a = p.parse_args(argv)
    if a.table:
        print(table([json.loads(line) for line in Path(a.table).read_text().splitlines() if line.strip()]))
        return 0
    try:
        variants = [parse_variant(v) for v in a.variants.split(",") if v]
        data = ensure_data(a.data, a.size, a.train_people)
        for name, ov in variants:  # every variant's config is valid before the first run starts
            protocol_config(data, a, ov, 0, "runs")
        extractor = build_extractor(a.extractor)
        leak = identity_leak(data, a)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, ov in variants:
        for seed in range(a.first_seed, a.first_seed + a.seeds):
            for row in run_one(name, ov, seed, data, a, extractor, out, leak):
                rows.append(row)
                print(json.dumps(row), flush=True)
                if a.jsonl:
                    with open(a.jsonl, "a") as f:
                        f.write(json.dumps(row) + "\n")
    print(table(rows), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
