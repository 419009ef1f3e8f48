"""A sweep file: what a Ray Tune sweep searches, how, and on which base config.

    [sweep]   name, num_samples, scheduler (asha | pbt), search (random | optuna), metric, ...
    [space]   config fields by name, each { type = "loguniform" | "uniform", low, high } or
              { type = "choice", values = [...] }; as a preset's tables ([space.optim] lr_g = {...})
              or as quoted dotted keys ("optim.lr_g" = {...})
    [config]  overrides of the base config for every trial, as in a preset ([config.train] ...)

Two derived fields may be searched besides the config's own: ``optim.lr_ratio`` (lr_d = ratio *
lr_g) and ``loss.real_label_hi_frac`` (hi = lo + frac * (1 - lo), so hi is always in [lo, 1]).
Every error names the file and the field, in one line (a ConfigError).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from ray import tune

from gan.config import (
    Config,
    ConfigError,
    apply,
    flatten,
    from_flat,
    read_toml,
    validate,
)
from gan.report import SCORES

DERIVED = {"optim.lr_ratio", "loss.real_label_hi_frac"}
KINDS = ("loguniform", "uniform", "choice")

@dataclass
class Sweep:
    name: str
    num_samples: int = 4
    scheduler: str = "asha"  # asha | pbt
    search: str = "random"  # random | optuna
    metric: str = "fid"
    max_concurrent: int = 0  # 0: what the cluster holds
    grace_period: int = 100  # ASHA, in steps
    reduction_factor: int = 2
    perturbation_interval: int = 500  # PBT, in steps
    # PBT: true waits for every trial at each interval, then the lower half clones the upper half.
    # False (Ray's default) acts on each result as it comes, against the others' last scores: when
    # the scores drift (FID rises or falls with the step), a trial can meet an exploit point only
    # ever in the lower half while its donor never saved at the top, and nothing is exploited.
    synch: bool = False
    # < 1: the best config is the best trial whose final identity_auc (the identity-leak audit,
    # eval.identity_audit) is at most this; 1: no cap. --max-identity-auc overrides it.
    max_identity_auc: float = 1.0
    space: dict = field(default_factory=dict)
    # [config]: overrides of the base config for every trial (the sweep's budget and evaluation),
    # applied after the preset and before the command line's --section.field=value.
    config: dict = field(default_factory=dict)


def load_sweep(path: str) -> Sweep:
    p = Path(path)
    doc = read_toml(p, "sweep file")
    for top in doc:
        if top not in ("sweep", "space", "config"):
            raise ConfigError(f"{path}: unknown table [{top}]; expected [sweep], [space] and [config]")
        if not isinstance(doc[top], dict):
            raise ConfigError(f"{path}: {top} must be a [{top}] table, got {doc[top]!r}")
    opts = doc.get("sweep", {})
    space = _dotted(doc.get("space", {}), lambda v: "type" in v)  # [space.optim] lr_g = {...}
    overrides = _dotted(doc.get("config", {}), lambda v: False)  # [config.train] max_steps = ...
    apply(Config(), overrides, where=f"{path}: [config] ")  # a typo fails here, by name
    known = set(Sweep.__dataclass_fields__) - {"space", "config"}
    for k, v in opts.items():
        if k not in known:
            raise ConfigError(f"{path}: unknown [sweep] key {k!r}; known: {', '.join(sorted(known))}")
        want = type(Sweep.__dataclass_fields__[k].default) if k != "name" else str
        if type(v) is not want:  # `synch = "no"` would be truthy
            raise ConfigError(f"{path}: [sweep] {k} must be a {want.__name__}, got {v!r}")
    sweep = Sweep(name=opts.get("name", p.stem), space=space, config=overrides,
                  **{k: v for k, v in opts.items() if k != "name"})
    fields = set(flatten(Config())) | DERIVED
    if not space:
        raise ConfigError(f"{path}: [space] is empty; name at least one field to search")
    for key, spec in space.items():
        where = f"{path}: space.{key}"
        if key not in fields:
            raise ConfigError(f"{where}: unknown field; expected section.field from the config or "
                              f"{', '.join(sorted(DERIVED))}")
        if not isinstance(spec, dict):
            raise ConfigError(f'{where}: expected a table such as {{ type = "loguniform", low = 1e-4, high = 1e-3 }} '
                              f'or {{ type = "choice", values = [...] }}, got {spec!r}')
        kind = spec.get("type")
        if kind not in KINDS:
            raise ConfigError(f"{where}: type must be one of {', '.join(KINDS)}, got {kind!r}")
        if kind == "choice":
            if not isinstance(spec.get("values"), list) or not spec["values"]:
                raise ConfigError(f"{where}: values must be a non-empty list, got {spec.get('values')!r}")
            continue
        if not all(isinstance(spec.get(b), (int, float)) and not isinstance(spec.get(b), bool) for b in ("low", "high")):
            raise ConfigError(f"{where}: low and high must be numbers, got low={spec.get('low')!r} "
                              f"high={spec.get('high')!r}")
        if not spec["low"] < spec["high"] or (kind == "loguniform" and spec["low"] <= 0):
            raise ConfigError(f"{where}: empty or invalid range low={spec.get('low')} high={spec.get('high')}")
    lo, frac = space.get("loss.real_label_lo"), space.get("loss.real_label_hi_frac")
    if lo and lo.get("type") != "choice" and not (0 <= lo["low"] and lo["high"] <= 1):
        raise ConfigError(f"{path}: space.loss.real_label_lo must lie in [0, 1]")
    if frac and frac.get("type") != "choice" and not (0 <= frac["low"] and frac["high"] <= 1):
        raise ConfigError(f"{path}: space.loss.real_label_hi_frac must lie in [0, 1]")
    hi = space.get("loss.real_label_hi")
    if lo and hi and "choice" not in (lo.get("type"), hi.get("type")) and lo["high"] > hi["low"]:
        raise ConfigError(f"{path}: space.loss.real_label_lo (up to {lo['high']}) can exceed "
                          f"space.loss.real_label_hi (from {hi['low']}): lo > hi; search "
                          f"loss.real_label_hi_frac instead, which keeps hi in [lo, 1]")
    if "loss.real_label_hi" in space and "loss.real_label_hi_frac" in space:
        raise ConfigError(f"{path}: search loss.real_label_hi or loss.real_label_hi_frac, not both")
    for check, msg in ((sweep.scheduler in ("asha", "pbt"), "scheduler must be asha or pbt"),
                       (sweep.search in ("random", "optuna"), "search must be random or optuna"),
                       (sweep.metric in SCORES, f"metric must be one of {', '.join(SCORES)}"),
                       (sweep.num_samples >= 1, "num_samples must be >= 1")):
        if not check:
            raise ConfigError(f"{path}: [sweep] {msg}")
    if sweep.search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError(f'{path}: [sweep] search = "optuna" needs Optuna: pip install -e ".[optuna]"')
    return sweep


def trial_config(base: dict, hp: dict) -> Config:
    """The trial's config: base, then searched fields, then the derived ones."""
    plain = {k: v for k, v in hp.items() if k not in DERIVED}
    cfg = apply(from_flat(base), plain)
    if "optim.lr_ratio" in hp:
        cfg.optim.lr_d = cfg.optim.lr_g * hp["optim.lr_ratio"]
    if "loss.real_label_hi_frac" in hp:
        lo = cfg.loss.real_label_lo
        cfg.loss.real_label_hi = min(1.0, lo + hp["loss.real_label_hi_frac"] * (1 - lo))
    return validate(cfg)


def tune_space(sweep: Sweep) -> dict:
    make = {"loguniform": lambda s: tune.loguniform(s["low"], s["high"]),
            "uniform": lambda s: tune.uniform(s["low"], s["high"]),
            "choice": lambda s: tune.choice(s["values"])}
    return {k: make[s["type"]](s) for k, s in sweep.space.items()}


def clamp_to_space(space: dict, config: dict) -> dict:
    """PBT's explore step multiplies values by 0.8 or 1.2, which can leave the searched range
    (a real-label lo of 1.14): bring each searched value back inside its range."""
    for key, spec in space.items():
        if key in config and spec["type"] != "choice":
            config[key] = min(max(config[key], spec["low"]), spec["high"])
    return config



def _dotted(table: dict, is_leaf) -> dict:
    """A preset-style table ({"optim": {"lr_g": v}}) as dotted keys ({"optim.lr_g": v});
    dotted keys are kept as they are. ``is_leaf(dict)``: a dict value that is a value, not a section."""
    out = {}
    for k, v in table.items():
        if isinstance(v, dict) and not is_leaf(v) and "." not in k:
            out |= {f"{k}.{kk}": vv for kk, vv in v.items()}
        else:
            out[k] = v
    return out
