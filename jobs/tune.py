"""Ray Tune sweeps over the LR asymmetry and the label-smoothing range, judged by FID/KID.

    python -m jobs.tune --config configs/smoke.toml --sweep configs/sweeps/smoke.toml [--section.field=value ...]
    python -m jobs.tune ... --resume          # continue an interrupted sweep (Tuner.restore)

Each trial is a Ray Train run (its own workers) launched from a Tune function trainable.
The sweep file (see configs/sweeps/) picks the search space over config fields by name, plus
two derived ones: ``optim.lr_ratio`` (lr_d = ratio * lr_g) and ``loss.real_label_hi_frac``
(hi = lo + frac * (1 - lo), so hi is always in [lo, 1]). The objective is ``sweep.metric``
(fid or kid) from the evaluation, minimised. MLflow: one parent run per sweep, a child run
per trial, the best trial tagged, ``results.csv`` and ``best_config.toml`` on the parent.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import sys
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from gan.config import Config, ConfigError, apply, flatten, from_flat, load, validate
from jobs.cli import Parser
from jobs.preflight import exists as storage_exists, ray_storage

DERIVED = {"optim.lr_ratio", "loss.real_label_hi_frac"}
KINDS = ("loguniform", "uniform", "choice")
TRIAL_CPU = 0.01


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
    if not p.is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    try:
        doc = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for top in doc:
        if top not in ("sweep", "space", "config"):
            raise ConfigError(f"{path}: unknown table [{top}]; expected [sweep], [space] and [config]")
        if not isinstance(doc[top], dict):
            raise ConfigError(f"{path}: {top} must be a [{top}] table, got {doc[top]!r}")
    opts, space, overrides = doc.get("sweep", {}), doc.get("space", {}), doc.get("config", {})
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
                       (sweep.metric in ("fid", "kid"), "metric must be fid or kid"),
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
    from ray import tune

    make = {"loguniform": lambda s: tune.loguniform(s["low"], s["high"]),
            "uniform": lambda s: tune.uniform(s["low"], s["high"]),
            "choice": lambda s: tune.choice(s["values"])}
    return {k: make[s["type"]](s) for k, s in sweep.space.items()}


def trainable(config: dict) -> None:
    """One trial: a Ray Train run whose reports (and checkpoints) are handed to Tune."""
    from ray import tune
    from ray.train.v2.api.callback import UserCallback
    from ray.util.queue import Queue

    from jobs.tracking import end_run, start_run
    from jobs.train import Plan, build_trainer, total_steps_of

    hp = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg = trial_config(config["_base"], hp)
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    donor = tune.get_checkpoint()
    # A restart from a checkpoint (PBT exploit, sweep restore) is a new Train run: deterministic
    # name, no timestamps, and it starts from that checkpoint instead of its own storage.
    run_name = trial_id if donor is None else f"{trial_id}-from-{hashlib.sha256(donor.path.encode()).hexdigest()[:8]}"
    cfg.run.name = run_name
    params = {**hp, "optim.lr_d": cfg.optim.lr_d, "loss.real_label_hi": cfg.loss.real_label_hi}
    run_id = start_run(config["_uri"], cfg.run.experiment, ctx.get_trial_name(),
                       f"{config['_sweep_dir']}/{trial_id}", {**flatten(cfg), **params}, resume=True,
                       parent_run_id=config["_parent"])
    if config.get("_evaluation"):  # what the trial's FID means, as on a jobs.train run
        from mlflow.tracking import MlflowClient

        for k, v in config["_evaluation"].items():
            MlflowClient(config["_uri"]).set_tag(run_id, f"facegan.fid_{k}", str(v))
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})

    class ToTune(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            queue.put((metrics[0], checkpoint))  # the Checkpoint with its filesystem, not a local path

    plan = Plan(cfg, run_name, config["_train_storage"], resume=False)
    trainer = build_trainer(plan, config["_uri"], run_id, extra={"init_checkpoint": donor, "hp": params},
                            callbacks=[ToTune()])
    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # re-raised in the trial
            outcome["error"] = e

    diverged, held, last = None, None, total_steps_of(cfg)
    th = threading.Thread(target=fit, daemon=True)
    th.start()
    while th.is_alive() or not queue.empty():
        try:
            metrics, checkpoint = queue.get(timeout=1)
        except Exception:  # queue.Empty
            continue
        if "diverged_at_step" in metrics:  # the worst score for the scheduler, then a failed trial
            diverged = {**metrics, config["_metric"]: math.inf}
            tune.report(diverged)
        elif config["_metric"] in metrics:  # Tune wants its metric in every result it is given
            if metrics.get("step", 0) >= last and th.is_alive():
                # The last result makes ASHA stop the trial at max_t, which would kill the Train
                # run mid-way through what follows it (the final audits): Tune gets it at the end.
                held = (metrics, checkpoint)
                continue
            tune.report(metrics, checkpoint=checkpoint)
    if held is not None and "error" not in outcome:
        tune.report(held[0], checkpoint=held[1])
    end_run(config["_uri"], run_id, "error" not in outcome and diverged is None)
    if "error" in outcome:
        raise outcome["error"]
    if diverged is not None:
        raise RuntimeError(f"trial {trial_id} diverged at step {int(diverged['diverged_at_step'])}")


def clamp_to_space(space: dict, config: dict) -> dict:
    """PBT's explore step multiplies values by 0.8 or 1.2, which can leave the searched range
    (a real-label lo of 1.14): bring each searched value back inside its range."""
    for key, spec in space.items():
        if key in config and spec["type"] != "choice":
            config[key] = min(max(config[key], spec["low"]), spec["high"])
    return config


def _max_concurrent(cfg: Config, sweep: Sweep) -> int:
    import ray

    if sweep.max_concurrent > 0:
        return sweep.max_concurrent
    res, sc = ray.cluster_resources(), cfg.scale
    # + TRIAL_CPU: each trial's driver holds a sliver too; without it the last trial's workers
    # wait for CPUs that never free up.
    fits = [res.get("CPU", 0) // (sc.num_workers * sc.cpus_per_worker + TRIAL_CPU)]
    if sc.use_gpu:
        fits.append(res.get("GPU", 0) // (sc.num_workers * sc.gpus_per_worker))
    return max(1, int(min(fits)))


def make_search(sweep: Sweep, seed: int, max_concurrent: int):
    """Random search or Optuna's TPE, seeded (train.seed): the same command draws the same trials.
    The concurrency limit lives here: TuneConfig.max_concurrent_trials is ignored (with only a
    log line) when the search is a BasicVariantGenerator made by hand."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if sweep.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed)), max_concurrent)
    return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)


def build_tuner(cfg: Config, sweep: Sweep, storage: str, uri: str, parent: str, resume: bool,
                evaluation: dict | None = None):
    from ray import tune
    from ray.tune import CheckpointConfig, RunConfig as TuneRunConfig
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    if sweep.scheduler == "pbt":  # an exploit needs a scored checkpoint every interval
        cfg.train.checkpoint_every = cfg.eval.every_steps = sweep.perturbation_interval
    fixed = {"_base": flatten(cfg), "_metric": sweep.metric, "_uri": uri, "_parent": parent, "_sweep_dir": f"{storage}/{sweep.name}",
             "_train_storage": f"{storage}/{sweep.name}-train", "_evaluation": evaluation}
    # The trial driver only waits on its Train run; the workers hold the real resources.
    fn = tune.with_resources(trainable, {"CPU": TRIAL_CPU})
    if resume:
        where = ray_storage(f"{storage}/{sweep.name}")  # object storage: path and filesystem
        return tune.Tuner.restore(where["storage_path"], fn, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=where.get("storage_filesystem"))
    total = cfg.train.max_steps or 10**9
    if sweep.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="step", max_t=total, grace_period=sweep.grace_period,
                                  reduction_factor=sweep.reduction_factor)
    else:
        scheduler = PopulationBasedTraining(time_attr="step", perturbation_interval=sweep.perturbation_interval,
                                            hyperparam_mutations=tune_space(sweep), quantile_fraction=0.5,
                                            custom_explore_fn=functools.partial(clamp_to_space, sweep.space),
                                            synch=sweep.synch)
    search = make_search(sweep, cfg.train.seed, _max_concurrent(cfg, sweep))
    return tune.Tuner(
        fn, param_space={**tune_space(sweep), **fixed},
        tune_config=tune.TuneConfig(metric=sweep.metric, mode="min", num_samples=sweep.num_samples,
                                    scheduler=scheduler, search_alg=search,
                                    trial_name_creator=lambda t: f"trial_{t.trial_id}",
                                    trial_dirname_creator=lambda t: t.trial_id),
        # Tune's copies of the trials' checkpoints: PBT only clones the latest, a restore only
        # needs the latest; without a limit every one is kept (~0.6 GB each at 128 px).
        run_config=TuneRunConfig(name=sweep.name, **ray_storage(storage), progress_reporter=reporter(sweep),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints)),
    )


def reporter(sweep: Sweep):
    """A concise trial table: the searched values, the step and the metric, best first, every 30 s.
    Ray's newer console output prints each trial's whole config (the base config included)
    with every result and takes no reporter, so the table reporter is selected."""
    import os

    from ray.tune import CLIReporter

    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    return CLIReporter(metric_columns={"step": "step", sweep.metric: sweep.metric},
                       parameter_columns={k: k for k in sweep.space}, max_report_frequency=30,
                       sort_by_metric=True, max_column_length=14)  # metric and mode come from TuneConfig


def main(argv: list[str] | None = None) -> int:
    p = Parser("jobs.tune", __doc__)
    p.add_argument("--config", required=True, help="the base preset every trial starts from")
    p.add_argument("--sweep", required=True, help="the sweep file: [sweep], [space], [config] (configs/sweeps/)")
    p.add_argument("--resume", action="store_true", help="continue the sweep after an interruption")
    p.add_argument("--max-identity-auc", type=float, default=None,
                   help="the best config must have identity_auc <= this (needs the identity audit)")
    args, rest = p.parse_known_args(argv)
    try:
        sweep = load_sweep(args.sweep)
        if args.max_identity_auc is not None:
            sweep.max_identity_auc = args.max_identity_auc
        if not 0.5 <= sweep.max_identity_auc <= 1:
            raise ConfigError(f"max_identity_auc: must be in [0.5, 1] (0.5: no leak at all; 1: no cap), "
                              f"got {sweep.max_identity_auc}")
        rest = [f"--{k}={v}" for k, v in sweep.config.items()] + rest  # the command line wins
        cfg = validate(load(args.config, rest))
        trial_config(flatten(cfg), {})  # the base alone must be valid too
        if cfg.eval.every_steps <= 0:
            raise ConfigError("eval.every_steps: a sweep is judged by FID/KID; set it > 0")
        if sweep.scheduler == "asha" and cfg.train.max_steps and sweep.grace_period > cfg.train.max_steps:
            raise ConfigError(f"{args.sweep}: grace_period {sweep.grace_period} exceeds train.max_steps "
                              f"{cfg.train.max_steps}")
        from jobs.train import prepare

        plan = prepare(["--config", args.config, *rest, f"--run.name={sweep.name}-base"])
        storage = plan.storage_path
        if sweep.max_identity_auc < 1 and plan.cfg.eval.identity_audit != "on":
            raise ConfigError("max_identity_auc: the trials run no identity audit (eval.identity_audit is off: "
                              "the shards need identities and the privacy extra must be installed)")
        exists = storage_exists(f"{storage}/{sweep.name}")
        if exists and not args.resume:
            raise ConfigError(f"sweep {sweep.name}: {storage}/{sweep.name} exists; pass --resume or rename it")
        if args.resume and not exists:
            raise ConfigError(f"--resume: no sweep at {storage}/{sweep.name}")
        import ray

        if not ray.is_initialized():
            ray.init()
        gpus = ray.cluster_resources().get("GPU", 0)
        if plan.cfg.scale.use_gpu and gpus < plan.cfg.scale.gpus_per_worker:
            raise ConfigError(f"scale.use_gpu: the cluster has {gpus:g} GPUs; a trial worker asks for "
                              f"{plan.cfg.scale.gpus_per_worker:g}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from jobs.tracking import end_run, resolve_tracking_uri, start_run

    uri = resolve_tracking_uri()
    parent = start_run(uri, plan.cfg.run.experiment, f"sweep-{sweep.name}", f"{storage}/{sweep.name}",
                       {**flatten(plan.cfg), **{f"sweep.{k}": str(v) for k, v in vars(sweep).items()}},
                       resume=args.resume)
    if not args.resume:
        from mlflow.tracking import MlflowClient

        MlflowClient(uri).log_text(parent, Path(args.sweep).read_text(), "sweep.toml")
    status = "FAILED"
    try:
        results = build_tuner(plan.cfg, sweep, storage, uri, parent, args.resume, plan.evaluation).fit()
        # Tune returns normally after Ctrl+C, with the state saved; the trials it then cleans up
        # read TERMINATED, but only a trial that ended (or was stopped by the scheduler) has a
        # last result marked done, and trials not yet created are not in the grid at all.
        done = sum(1 for r in results if r.error is None and (r.metrics or {}).get("done"))
        unfinished = sweep.num_samples - done - results.num_errors
        if unfinished:
            status = "KILLED"
            print(f"sweep interrupted with {unfinished} trial(s) unfinished; continue it with the same "
                  f"command and --resume", file=sys.stderr)
            return 130
        from jobs.sweep_summary import summarize

        try:
            table, toml, best = summarize(results, sweep, uri, parent)
        except RuntimeError as e:  # nothing to rank, or no trial under the identity cap
            print(f"error: {e}", file=sys.stderr)
            return 1
        status = "FINISHED"
    finally:
        end_run(uri, parent, status)
    print(table)
    print(f"best {sweep.metric} {best['score']:.4g} with {best['hp']}\n\n{toml}")
    print(f"parent_run_id: {parent}\ntracking_uri: {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
