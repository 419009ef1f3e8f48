"""One typed config: the CLI, the TOML presets, the MLflow params and the Tune space.

Keys are always ``section.field``. Every way in (TOML file, ``--section.field=value``
overrides, a Tune trial's dict) goes through :func:`apply`, so a typo or a wrong type
fails the same way everywhere, before any cluster resource is requested.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from gan.augment import parse
from gan.report import SCORES


class ConfigError(ValueError):
    """A config problem, phrased for the person who wrote the config."""


@dataclass
class ModelConfig:
    size: int = 64  # 64 or 128 px; 128 is the seed
    z_dim: int = 100
    # Channel multiplier on the seed's 1024/512/... widths: 1.0 is the seed, smaller
    # widths exist so that the same family trains in minutes on a laptop CPU.
    width: float = 1.0
    bn_eps: float = 5e-5
    # The seed is TensorFlow, whose BN "momentum" 0.99 is PyTorch's momentum 0.01.
    bn_momentum: float = 0.01
    leaky_slope: float = 0.2
    init_std: float = 0.02
    # Recipe options (the seed's choice first; benchmarks/quality.py measures the others):
    d_norm: str = "batch"  # D's normalisation: "batch" (seed), "spectral" (spectral norm, no BN), "none"
    # "dcgan" (the seed's), "resnet" (SNGAN-style residual G and D, gan/resnet.py), "stylegan2"
    # (mapping network and modulated convolutions, gan/stylegan.py, with the residual D)
    arch: str = "dcgan"
    g_upsample: str = "deconv"  # the DCGAN G's upsampling: "deconv" (seed: 5x5 stride-2 transposed conv), "resize" (nearest x2, then 5x5 conv)


@dataclass
class DataConfig:
    # "generated": procedural faces written to `path` on first use (the embedded default);
    # "shards": an existing shard set at `path` (e.g. from `python -m datasets.celeba`).
    source: str = "generated"
    path: str = "data/generated64"
    generated_count: int = 10_000
    # Held-out generated faces, written as the 'val' set beside a '.../train' data.path (other
    # faces than the training ones): what FID and the audit compare against.
    generated_heldout: int = 1000
    # Rows are shuffled within windows of this many row groups (memory vs. mixing).
    shuffle_groups: int = 4
    verify_checksums: bool = True  # sha256 of every shard against the manifest, before training
    # Processes that decode batches (datasets/loader.py); 0: a thread of the training process;
    # -1 (auto): 0 on CPU, else the rank's CPUs (Ray: scale.cpus_per_worker) less one, at most 8.
    loader_workers: int = -1


@dataclass
class LossConfig:
    # "seed": BCE with instance noise and one-sided label smoothing (the fields below);
    # "nonsaturating": BCE with hard labels and no instance noise; "hinge": the hinge loss.
    kind: str = "seed"
    real_label_lo: float = 0.9
    real_label_hi: float = 1.0
    noise_sigma_max: float = 0.1
    # Which of D's inputs get the instance noise: "real" (the seed's) or "both" (real and fake,
    # as Sønderby et al. 2016 define it: D cannot tell them apart by the noise alone)
    noise_on: str = "real"
    diffaug: str = ""  # differentiable augmentation of every D input: e.g. "color,translation,cutout"
    ada_target: float = 0.0  # > 0: augmentation probability adapts to keep E[sign(D(real))] near it
    ada_images: int = 100_000  # images for the adaptive probability to go from 0 to 1
    # R1 penalty on real faces, (gamma / 2) E||grad_x D(x)||^2 (Mescheder et al. 2018); 0: off.
    # Lazy: every r1_every D steps, weighted by r1_every (StyleGAN2).
    r1_gamma: float = 0.0
    r1_every: int = 16


@dataclass
class OptimConfig:
    lr_d: float = 4e-5
    lr_g: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999


@dataclass
class TrainConfig:
    batch_size: int = 64  # global: split evenly over the workers
    epochs: int = 60
    max_steps: int = 0  # > 0: stop at this step even if epochs remain
    # > 0: stop at the first log window after this many minutes of training (evaluation excluded)
    max_minutes: float = 0.0
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 1000
    ema_decay: float = 0.0  # 0 disables the generator EMA
    threads: int = 0  # torch intra-op threads per worker; 0 leaves the default
    # Replayable runs: the same config and seed on the same machine give bit-identical metrics
    # and checkpoints (gan/determinism.py says what it takes, what it costs and where it cannot hold).
    deterministic: bool = False


@dataclass
class EvalConfig:
    every_steps: int = 0  # FID/KID every N steps and at the end; 0 turns evaluation off
    num_samples: int = 2000
    metric: str = "fid"  # "fid" or "kid": which one picks the best generator
    extractor: str = "inception"  # "inception" (standard FID, evaluation/inception.py) or "pixels" (tests)
    inception_weights: str = ""  # another TorchScript FID Inception file; env FACEGAN_INCEPTION_WEIGHTS
    real_path: str = ""  # held-out shards; empty: the "val" set beside data.path, else data.path
    batch_size: int = 100
    kid_subset_size: int = 1000
    register_as: str = ""  # register the best generator under this model name
    # When the best generator becomes the run's MLflow model: "each_best" at every new best (a
    # run that dies keeps its best so far), "end" once, after the last step (one export, ~10 s
    # of CPU in a child process, instead of one per improvement: sweeps, short runs).
    publish: str = "each_best"
    audit_samples: int = 0  # > 0: memorization audit of the final generator with this many samples
    # Identity-leak audit of the final generator (evaluation/identity.py) when the evaluation is on:
    # "auto" runs it when the training and held-out shards have identities and the privacy extra
    # is installed, "on" requires both (checked before Ray starts), "off".
    identity_audit: str = "auto"
    identity_samples: int = 500
    # Publishing guard: a generator whose identity AUC is above this is never registered nor made
    # champion (the run says why); 1 = no cap. Below 1 it needs the identity audit (it then
    # runs at every evaluation, and the best generator is the best-scoring one under the cap).
    max_identity_auc: float = 1.0


@dataclass
class PrivacyConfig:
    # Differentially private D (gan/privacy.py, Opacus DP-SGD): the ε the whole run may spend
    # (the noise is set from it); 0 turns DP off. Needs model.d_norm = none (no BatchNorm in D).
    dp_epsilon: float = 0.0
    dp_max_grad_norm: float = 1.0  # C: each face's gradient is clipped to this L2 norm
    dp_delta: float = 0.0  # δ of (ε, δ)-DP; 0: 1/N for N training faces


@dataclass
class PerfConfig:
    # "auto": on for CUDA, off elsewhere; "on"; "off". See gan/perf.py.
    bf16: str = "auto"
    channels_last: str = "auto"
    compile: str = "auto"
    fused_adam: str = "auto"
    tf32: str = "auto"
    # auto: on for one CUDA process without diffaug (gan/graphs.py); each run's first step
    # checks the graph against the eager step and falls back to eager if they differ.
    cuda_graphs: str = "auto"
    prefetch: int = 4  # batches decoded ahead of the step (0: none ahead, with data.loader_workers = 0)


@dataclass
class ScaleConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    max_failures: int = 0  # worker-group restarts from the last checkpoint
    # Custom Ray resources each worker needs, "name=amount[,name=amount]": pins the workers to
    # the nodes started with them (`ray start --resources='{"trainer": 8}'`).
    worker_resources: str = ""


@dataclass
class RunSection:
    name: str = ""  # empty: derived from the preset name and the time
    storage_path: str = "runs"
    experiment: str = "facegan"
    keep_checkpoints: int = 2
    # At the end of training, how long rank 0 keeps trying an unreachable tracking server before
    # leaving the rest in the run's spool for `python -m jobs.sync` (jobs/spool.py).
    tracking_grace_s: float = 30.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    run: RunSection = field(default_factory=RunSection)


def _sections(cfg: Config) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _coerce(key: str, raw: Any, typ: type, where: str) -> Any:
    """Converts CLI strings and TOML values to the field's type, or says what is wrong."""
    if isinstance(raw, str) and typ is not str:
        text = raw.strip()
        try:
            if typ is bool:
                if text.lower() in ("true", "1", "yes", "on"):
                    return True
                if text.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            if typ is int:
                return int(text)
            if typ is float:
                return float(text)
        except ValueError:
            raise ConfigError(f"{where}{key}: expected {typ.__name__}, got {raw!r}") from None
    if typ is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if typ is bool and not isinstance(raw, bool):
        raise ConfigError(f"{where}{key}: expected bool, got {raw!r}")
    if typ is int and (isinstance(raw, bool) or not isinstance(raw, int)):
        raise ConfigError(f"{where}{key}: expected int, got {raw!r}")
    if not isinstance(raw, typ):
        raise ConfigError(f"{where}{key}: expected {typ.__name__}, got {raw!r}")
    return raw


def apply(cfg: Config, values: dict[str, Any], where: str = "") -> Config:
    """Sets flat ``section.field`` keys on ``cfg`` (in place) and returns it."""
    sections = _sections(cfg)
    for key, raw in values.items():
        section_name, _, field_name = key.partition(".")
        if section_name not in sections or not field_name:
            raise ConfigError(
                f"{where}unknown config key {key!r}: expected section.field with section one of "
                f"{', '.join(sections)}"
            )
        section = sections[section_name]
        hints = get_type_hints(type(section))
        if field_name not in hints:
            raise ConfigError(
                f"{where}unknown config key {key!r}: [{section_name}] has "
                f"{', '.join(hints)}"
            )
        setattr(section, field_name, _coerce(key, raw, hints[field_name], where))
    return cfg


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """A TOML file's tables, or a one-line ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML preset, then ``--section.field=value`` overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        doc = read_toml(path, "config file")
        flat = {}
        for section, body in doc.items():
            if not isinstance(body, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section] table")
            flat.update({f"{section}.{k}": v for k, v in body.items()})
        apply(cfg, flat, where=f"{path}: ")
    apply(cfg, parse_overrides(overrides or []), where="command line: ")
    return cfg


def parse_overrides(args: list[str]) -> dict[str, str]:
    out = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"command line: expected --section.field=value, got {arg!r}")
        key, _, value = arg[2:].partition("=")
        out[key] = value
    return out


def flatten(cfg: Config) -> dict[str, Any]:
    """``{"section.field": value}``: the MLflow params and the Tune space's key names."""
    return {
        f"{name}.{k}": v for name, sec in _sections(cfg).items() for k, v in dataclasses.asdict(sec).items()
    }


def to_toml(cfg: Config) -> str:
    """The config as a preset (``[section]`` tables): ``load`` reads back the same config."""
    flat = flatten(cfg)
    return "\n".join(f"[{sec}]\n" + "".join(f"{k.split('.', 1)[1]} = {_toml_value(v)}\n" for k, v in flat.items()
                                           if k.startswith(sec + "."))
                     for sec in dict.fromkeys(k.split(".")[0] for k in flat))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return '"nan"'
    return repr(v) if not isinstance(v, str) else json.dumps(v)


def from_flat(values: dict[str, Any]) -> Config:
    return apply(Config(), values)


def worker_resources(text: str) -> dict[str, float]:
    """``scale.worker_resources`` as Ray's resources dict (validated by :func:`validate`)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, amount = part.partition("=")
        out[name.strip()] = float(amount)
    return out


def _resources_ok(text: str) -> bool:
    try:
        res = worker_resources(text)
    except ValueError:
        return False
    parts = [p for p in text.split(",") if p.strip()]
    return len(res) == len(parts) and all(
        k and k not in ("CPU", "GPU") and math.isfinite(v) and v > 0 for k, v in res.items())


def validate(cfg: Config) -> Config:
    """Checks what types cannot: ranges and the relations between fields."""
    m, t, lo, op, sc = cfg.model, cfg.train, cfg.loss, cfg.optim, cfg.scale
    checks = [
        (m.size in (64, 128), "model.size", f"must be 64 or 128, got {m.size}"),
        (m.z_dim > 0, "model.z_dim", f"must be > 0, got {m.z_dim}"),
        (0 < m.width <= 4 and int(64 * m.width) >= 1, "model.width",
         f"must be in (0, 4] with at least one channel per layer, got {m.width}"),
        (cfg.data.source in ("generated", "shards"), "data.source",
         f"must be 'generated' or 'shards', got {cfg.data.source!r}"),
        (bool(cfg.data.path), "data.path", "must name a directory"),
        (cfg.data.generated_count > 0, "data.generated_count", "must be > 0"),
        (cfg.data.generated_heldout >= 0, "data.generated_heldout", "must be >= 0"),
        (cfg.data.shuffle_groups >= 1, "data.shuffle_groups", "must be >= 1"),
        (cfg.data.loader_workers >= -1, "data.loader_workers", "must be >= 0, or -1 (auto)"),
        (0.0 <= lo.real_label_lo <= lo.real_label_hi <= 1.0, "loss.real_label_lo/hi",
         f"need 0 <= lo <= hi <= 1, got lo={lo.real_label_lo}, hi={lo.real_label_hi}"),
        (lo.noise_sigma_max >= 0, "loss.noise_sigma_max", "must be >= 0"),
        (lo.noise_on in ("real", "both"), "loss.noise_on", f"must be real or both, got {lo.noise_on!r}"),
        (lo.kind in ("seed", "nonsaturating", "hinge"), "loss.kind",
         f"must be seed, nonsaturating or hinge, got {lo.kind!r}"),
        (0.0 <= lo.ada_target < 1.0, "loss.ada_target", f"must be in [0, 1), got {lo.ada_target}"),
        (lo.ada_target == 0 or bool(lo.diffaug), "loss.ada_target", "adapts loss.diffaug's ops: set loss.diffaug"),
        (lo.ada_images > 0, "loss.ada_images", "must be > 0"),
        (lo.r1_gamma >= 0 and math.isfinite(lo.r1_gamma), "loss.r1_gamma", f"must be >= 0 (0: off), got {lo.r1_gamma}"),
        (lo.r1_every >= 1, "loss.r1_every", f"must be >= 1, got {lo.r1_every}"),
        (cfg.eval.publish in ("each_best", "end"), "eval.publish",
         f"must be each_best or end, got {cfg.eval.publish!r}"),
        (m.d_norm in ("batch", "spectral", "none"), "model.d_norm",
         f"must be batch, spectral or none, got {m.d_norm!r}"),
        (m.arch in ("dcgan", "resnet", "stylegan2"), "model.arch",
         f"must be dcgan, resnet or stylegan2, got {m.arch!r}"),
        (m.g_upsample in ("deconv", "resize"), "model.g_upsample", f"must be deconv or resize, got {m.g_upsample!r}"),
        (op.lr_d > 0 and math.isfinite(op.lr_d), "optim.lr_d", f"must be > 0, got {op.lr_d}"),
        (op.lr_g > 0 and math.isfinite(op.lr_g), "optim.lr_g", f"must be > 0, got {op.lr_g}"),
        (0 <= op.beta1 < 1 and 0 <= op.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)"),
        (sc.num_workers >= 1, "scale.num_workers", f"must be >= 1, got {sc.num_workers}"),
        (t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}"),
        (t.batch_size % max(sc.num_workers, 1) == 0, "train.batch_size",
         f"{t.batch_size} is not divisible by scale.num_workers={sc.num_workers}"),
        (t.epochs >= 1, "train.epochs", f"must be >= 1 (train.max_steps caps the steps), got {t.epochs}"),
        (t.max_steps >= 0, "train.max_steps", "must be >= 0"),
        (t.max_minutes >= 0 and math.isfinite(t.max_minutes), "train.max_minutes", "must be >= 0 (0: no time limit)"),
        (t.max_minutes == 0 or not t.deterministic, "train.max_minutes",
         "a wall-clock budget stops at a step no run can replay; with train.deterministic=true use train.max_steps"),
        (t.log_every >= 1, "train.log_every", "must be >= 1"),
        (t.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1"),
        (0.0 <= t.ema_decay < 1.0, "train.ema_decay", f"must be in [0, 1), got {t.ema_decay}"),
        (sc.cpus_per_worker > 0, "scale.cpus_per_worker", "must be > 0"),
        (not sc.use_gpu or sc.gpus_per_worker > 0, "scale.gpus_per_worker", "must be > 0"),
        (sc.max_failures >= -1, "scale.max_failures", "must be >= -1 (-1: unlimited)"),
        (_resources_ok(sc.worker_resources), "scale.worker_resources",
         f"must be name=amount[,name=amount] with amounts > 0 and names other than CPU/GPU, "
         f"got {sc.worker_resources!r}"),
        (cfg.run.keep_checkpoints >= 1, "run.keep_checkpoints", "must be >= 1"),
        (cfg.run.tracking_grace_s >= 0, "run.tracking_grace_s", "must be >= 0 (seconds)"),
    ]
    for name in ("bf16", "channels_last", "compile", "fused_adam", "tf32", "cuda_graphs"):
        value = getattr(cfg.perf, name)
        checks.append((value in ("auto", "on", "off"), f"perf.{name}", f"must be auto, on or off, got {value!r}"))
    checks.append((cfg.perf.prefetch >= 0, "perf.prefetch", "must be >= 0"))
    if cfg.perf.cuda_graphs == "on":  # what gan/graphs.resolve would refuse on the workers
        checks += [(sc.use_gpu, "perf.cuda_graphs", "on needs scale.use_gpu=true (CUDA); use auto or off"),
                   (sc.num_workers == 1, "perf.cuda_graphs", "on is not supported with DDP (scale.num_workers > 1) "
                                                           "yet; use auto or off"),
                   (not lo.diffaug, "perf.cuda_graphs", "on is not supported with loss.diffaug; use auto or off"),
                   (lo.r1_gamma == 0, "perf.cuda_graphs", "on is not supported with loss.r1_gamma; use auto or off")]
    e = cfg.eval
    checks += [
        (e.every_steps >= 0, "eval.every_steps", "must be >= 0 (0: off)"),
        (e.num_samples >= 2 * sc.num_workers, "eval.num_samples", f"must be >= 2 per worker, got {e.num_samples}"),
        (e.metric in SCORES, "eval.metric", f"must be one of {', '.join(SCORES)}, got {e.metric!r}"),
        (e.extractor in ("inception", "pixels"), "eval.extractor",
         f"must be inception or pixels, got {e.extractor!r}"),
        (e.batch_size >= 1 and e.kid_subset_size >= 2, "eval.batch_size/kid_subset_size", "must be positive"),
        (e.identity_audit in ("auto", "on", "off"), "eval.identity_audit", f"must be auto, on or off, got {e.identity_audit!r}"),
        (e.identity_samples >= 1, "eval.identity_samples", "must be >= 1"),
        (0.5 <= e.max_identity_auc <= 1, "eval.max_identity_auc",
         f"must be in [0.5, 1] (0.5: no leak at all; 1: no cap), got {e.max_identity_auc}"),
        (e.max_identity_auc == 1 or (e.identity_audit != "off" and e.every_steps > 0), "eval.max_identity_auc",
         "a cap needs the identity audit: set eval.identity_audit to on (or auto) and eval.every_steps > 0"),
    ]
    pv = cfg.privacy
    checks += [
        (pv.dp_epsilon >= 0 and math.isfinite(pv.dp_epsilon), "privacy.dp_epsilon", f"must be >= 0 (0: off), got {pv.dp_epsilon}"),
        (pv.dp_max_grad_norm > 0, "privacy.dp_max_grad_norm", f"must be > 0, got {pv.dp_max_grad_norm}"),
        (0 <= pv.dp_delta < 1, "privacy.dp_delta", f"must be in [0, 1) (0: 1/N), got {pv.dp_delta}"),
    ]
    if pv.dp_epsilon > 0:
        checks += [
            (m.d_norm != "batch", "privacy.dp_epsilon",
             "D has BatchNorm (model.d_norm=batch), which mixes the faces of a batch, so no face has a gradient "
             "of its own to clip; set model.d_norm=none"),
            (m.d_norm != "spectral", "privacy.dp_epsilon",
             "Opacus has no per-face gradients for spectral-normalised layers; set model.d_norm=none"),
            (t.batch_size // sc.num_workers >= 16, "privacy.dp_epsilon",
             f"Poisson batches need a mean of >= 16 faces per worker (train.batch_size / scale.num_workers = "
             f"{t.batch_size // max(sc.num_workers, 1)}), or a step may draw no face at all"),
            (m.arch == "dcgan", "privacy.dp_epsilon", f"DP training supports model.arch=dcgan only, got {m.arch!r}"),
            (lo.r1_gamma == 0, "privacy.dp_epsilon",
             "the R1 penalty (loss.r1_gamma) differentiates D twice, which Opacus's per-face gradients cannot; set it to 0"),
            (lo.ada_target == 0, "privacy.dp_epsilon",
             "loss.ada_target adapts to D's outputs on real faces, outside the privacy accounting; set it to 0"),
        ]
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    try:
        parse(lo.diffaug)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg
