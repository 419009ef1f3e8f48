"""Ray Tune sweeps over the LR asymmetry and the label-smoothing range, judged by FID/KID.

    python -m jobs.tune --config configs/smoke.toml --sweep configs/sweeps/smoke.toml [--section.field=value ...]
    python -m jobs.tune ... --resume          # continue an interrupted sweep (Tuner.restore)

Each trial is a Ray Train run (its own workers) launched from a Tune function trainable
(jobs/relay.py). The sweep file (jobs/sweep.py, configs/sweeps/) picks the search space over
config fields by name; the objective is ``sweep.metric`` (fid or kid) from the evaluation,
minimised. MLflow: one parent run per sweep, a child run per trial, the best trial tagged,
``results.csv`` and ``best_config.toml`` on the parent.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune import CheckpointConfig, CLIReporter
from ray.tune import RunConfig as TuneRunConfig
from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from gan.config import Config, ConfigError, flatten, load, validate
from jobs.cli import Parser
from jobs.preflight import exists as storage_exists
from jobs.preflight import ray_storage
from jobs.relay import trainable
from jobs.sweep import Sweep, clamp_to_space, load_sweep, trial_config, tune_space
from jobs.sweep_summary import best_preset, rank, results_csv, summarize
from jobs.tracking import end_run, resolve_tracking_uri, start_run
from jobs.train import prepare

TRIAL_CPU = 0.01


def _max_concurrent(cfg: Config, sweep: Sweep) -> int:
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
    if sweep.search == "optuna":
        import optuna  # an extra: load_sweep has checked it is installed

        return ConcurrencyLimiter(OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed)), max_concurrent)
    return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)


def build_tuner(cfg: Config, sweep: Sweep, storage: str, uri: str, parent: str, resume: bool,
                evaluation: dict | None = None):
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
        if not ray.is_initialized():
            ray.init()
        gpus = ray.cluster_resources().get("GPU", 0)
        if plan.cfg.scale.use_gpu and gpus < plan.cfg.scale.gpus_per_worker:
            raise ConfigError(f"scale.use_gpu: the cluster has {gpus:g} GPUs; a trial worker asks for "
                              f"{plan.cfg.scale.gpus_per_worker:g}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    uri = resolve_tracking_uri()
    parent = start_run(uri, plan.cfg.run.experiment, f"sweep-{sweep.name}", f"{storage}/{sweep.name}",
                       {**flatten(plan.cfg), **{f"sweep.{k}": str(v) for k, v in vars(sweep).items()}},
                       resume=args.resume)
    if not args.resume:
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
        try:  # from Tune's results alone: the privacy cap holds whatever MLflow does
            rows, ranked = rank(results, sweep)
        except RuntimeError as e:  # nothing to rank, or no trial under the identity cap
            print(f"error: {e}", file=sys.stderr)
            return 1
        try:
            table, toml, best = summarize(results, sweep, uri, parent)
        except Exception as e:  # noqa: BLE001 - the tracking server went away: the ranking stands
            print(f"facegan: the sweep's summary could not be recorded in MLflow ({str(e).splitlines()[0][:200]})",
                  file=sys.stderr)
            table, toml, best = results_csv(rows, sweep.metric), best_preset(ranked), \
                {"score": ranked[0], "hp": ranked[2], "run_id": None}
        status = "FINISHED"
    finally:
        try:
            end_run(uri, parent, status)
        except Exception as e:  # noqa: BLE001 - an unreachable server must not hide the result
            print(f"facegan: the sweep's parent run could not be ended in MLflow ({str(e).splitlines()[0][:200]})",
                  file=sys.stderr)
    print(table)
    print(f"best {sweep.metric} {best['score']:.4g} with {best['hp']}\n\n{toml}")
    print(f"parent_run_id: {parent}\ntracking_uri: {uri}")
    if best.get("run_id"):  # from the sweep to faces in one command
        print(f"best_generator: runs:/{best['run_id']}/generator\n"
              f"  python -m jobs.sample --model runs:/{best['run_id']}/generator --out faces/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
