"""Train the seed DCGAN with Ray Train (DDP over N workers), tracked in MLflow.

    python -m jobs.train --config configs/smoke.toml [--section.field=value ...] [--resume]

On a running cluster (see docs/cluster.md):

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.train --config configs/smoke.toml

``--resume`` continues the run named ``run.name`` under ``run.storage_path`` from its last
checkpoint, logging into the same MLflow run. Everything is validated (config, data, run
directory) before any Ray resource is requested; errors are one line and exit status 2.
"""
from __future__ import annotations

import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
from mlflow.tracking import MlflowClient
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from datasets.shards import ShardError, ShardReader, ShardSet, is_uri
from datasets.synthetic import ensure_generated
from gan.checkpoint import CheckpointError
from gan.config import (
    Config,
    ConfigError,
    flatten,
    load,
    to_toml,
    validate,
    worker_resources,
)
from gan.loop import total_steps
from jobs.cli import Parser
from jobs.plan import plan_line
from jobs.preflight import (
    check_evaluation,
    exists,
    local_home,
    ray_storage,
    refuse_relative_under_submit,
    writable,
)
from jobs.progress import Progress
from jobs.spool import SPOOL, fail_fast, spool_of, spooled_tags
from jobs.tracking import (
    check_reachable,
    end_run,
    find_run,
    log_dataset,
    resolve_tracking_uri,
    source_tags,
    start_run,
)
from jobs.worker import train_worker


class Diverged(RuntimeError):
    """Training met a non-finite state and stopped (gan/loop.py): exit 1, run FAILED."""


class Interrupted(Exception):
    """Ctrl+C during training: exit 130, run KILLED."""


@dataclass
class Plan:
    cfg: Config
    run_name: str
    storage_path: str
    resume: bool
    evaluation: dict | None = None  # what the FID means (extractor, sha1, protocol, held-out set)
    preset: str = ""
    faces: int = 0  # in the training shards
    dry_run: bool = False  # print the plan and stop


def prepare(argv: list[str] | None) -> Plan:
    """Parses, validates and resolves everything; touches no Ray resource."""
    p = Parser("jobs.train", __doc__)
    p.epilog = fields_help()
    p.add_argument("--config", help="a TOML preset from configs/ (without one: the defaults, a long run)")
    p.add_argument("--resume", action="store_true", help="continue run.name from its last checkpoint")
    p.add_argument("--dry-run", action="store_true", help="check everything, print the plan, start nothing")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (preset, then --section.field=value) as a TOML preset, and stop")
    args, rest = p.parse_known_args(argv)
    cfg = validate(load(args.config, rest))
    if args.print_config:
        print(to_toml(cfg), end="")
        raise SystemExit(0)

    refuse_relative_under_submit(cfg)
    check_reachable(resolve_tracking_uri())  # in seconds, before faces are drawn or features cached

    # Workers have another working directory than the driver: pass them absolute paths.
    if not is_uri(cfg.data.path):
        cfg.data.path = str(Path(cfg.data.path).resolve())
    if not is_uri(cfg.run.storage_path):  # object storage (s3://...) is the same URI everywhere
        cfg.run.storage_path = str(Path(cfg.run.storage_path).resolve())
    storage = cfg.run.storage_path
    if cfg.data.source == "generated":
        try:
            shards = ensure_generated(cfg.data.path, cfg.data.generated_count, cfg.model.size, cfg.train.seed,
                                      heldout=cfg.data.generated_heldout)
        except ValueError as e:  # the generated set there is another one (count, size or seed)
            raise ConfigError(f"data.generated_count/data.path: {e}") from None
    else:
        # Checksums once, here, before any worker starts: a damaged shard fails by name now.
        shards = ShardSet(cfg.data.path, verify_checksums=cfg.data.verify_checksums)
    if shards.image_size != cfg.model.size:
        raise ConfigError(f"data.path {cfg.data.path} holds {shards.image_size}px faces but "
                          f"model.size is {cfg.model.size}")
    if cfg.train.batch_size > shards.count:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} exceeds the {shards.count} faces in "
                          f"{cfg.data.path}: an epoch would have no step")

    if args.resume and not cfg.run.name:
        raise ConfigError("--resume needs run.name (the run to continue)")
    stem = Path(args.config).stem if args.config else "default"
    name = cfg.run.name or f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = f"{storage}/{name}"
    if args.resume and not exists(run_dir):
        raise ConfigError(f"--resume: no run at {run_dir}")
    if not args.resume and exists(run_dir):
        raise ConfigError(f"run.name: {run_dir} exists; pass --resume to continue it or choose another name")
    cfg.run.name = name
    # After the checks that write nothing (a config that fails there creates no directory),
    # before the real side of FID is cached under it.
    writable(storage, "run.storage_path")
    return Plan(cfg, name, storage, args.resume, check_evaluation(cfg), args.config or "", shards.count,
                args.dry_run)


def fields_help() -> str:
    """``--help``'s list of config fields, each with its default: one line per section."""
    by: dict[str, list[str]] = {}
    for key, value in flatten(Config()).items():
        section, name = key.split(".", 1)
        by.setdefault(section, []).append(f"{name}={value!r}" if isinstance(value, str) else f"{name}={value}")
    return ("config fields, set with --section.field=value after the preset (python -m jobs.train "
            "--print-config shows them resolved):\n" + "\n".join(
                textwrap.fill(" ".join(v), 100, initial_indent=f"  [{s}] ", subsequent_indent="      ")
                for s, v in by.items()))


def build_trainer(plan: Plan, tracking_uri: str, run_id: str, extra: dict | None = None, callbacks=None):
    sc = plan.cfg.scale
    resources = {"CPU": sc.cpus_per_worker, **({"GPU": sc.gpus_per_worker} if sc.use_gpu else {}),
                 **worker_resources(sc.worker_resources)}
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": flatten(plan.cfg), "tracking_uri": tracking_uri, "run_id": run_id,
                           "spool": str(local_home(plan.storage_path, plan.run_name) / SPOOL), **(extra or {})},
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=plan.run_name,
            **ray_storage(plan.storage_path),
            failure_config=FailureConfig(max_failures=sc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=plan.cfg.run.keep_checkpoints),
            callbacks=callbacks,
        ),
    )


def run(argv: list[str] | None = None) -> dict:
    plan = prepare(argv)
    print(plan_line(plan.cfg, plan.preset, total_steps_of(plan.cfg), plan.faces), flush=True)
    if plan.dry_run:
        return {}



    uri = resolve_tracking_uri()
    run_dir = f"{plan.storage_path}/{plan.run_name}"  # the run's identity in MLflow (find_run)
    home = local_home(plan.storage_path, plan.run_name)  # this machine's spool for the run
    prior = find_run(uri, plan.cfg.run.experiment, run_dir) if plan.resume else None
    run_id = start_run(uri, plan.cfg.run.experiment, plan.run_name, run_dir, flatten(plan.cfg), plan.resume)

    client = MlflowClient(uri)
    before = (prior.info.status if prior else "RUNNING", _last_step(client, run_id))
    for k, v in (plan.evaluation or {}).items():
        client.set_tag(run_id, f"facegan.fid_{k}", str(v))
    if not ray.is_initialized():
        ray.init()  # joins RAY_ADDRESS when set (e.g. under `ray job submit`), else starts a local one
    if plan.resume and "facegan.failed_reason" in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, "facegan.failed_reason")  # this attempt gets its own verdict
    if not plan.resume:
        describe(client, uri, run_id, plan)
    fail_fast()  # from here on, a server that went away costs seconds, not minutes of retries
    offline = None  # why the tracking server could not be reached after training, if it could not
    ok, reason = False, None
    try:
        with Progress(total_steps_of(plan.cfg), _last_step(client, run_id) if plan.resume else 0,
                      desc=plan.run_name) as progress:
            result = build_trainer(plan, uri, run_id, callbacks=[progress]).fit()
        try:
            # Rank 0 tags a divergence (gan/loop.py); Ray's Result only keeps checkpointed metrics.
            tags = client.get_run(run_id).data.tags
        except Exception as e:  # noqa: BLE001 - the server went away: the spool has rank 0's tags
            offline, tags = str(e).splitlines()[0][:200], spooled_tags(home)
        reason = tags.get("facegan.failed_reason")
        ok = reason is None
        best = next((k for k in tags if k.startswith("facegan.best_") and k != "facegan.best_step"), None)
        if offline is None and ok and "mlflow.note.content" in tags:
            client.set_tag(run_id, "mlflow.note.content", closing_note(tags, best))
    except (KeyboardInterrupt, SystemExit):
        # Ctrl+C: Ray Train's own SIGINT handler aborts the run and then calls sys.exit(0) in the
        # middle of fit(). The checkpoints so far are kept; --resume continues.
        ok = "KILLED"
        raise Interrupted(plan.run_name) from None
    finally:
        status = "FINISHED" if ok is True else ("FAILED" if ok is False else ok)
        try:
            if offline is not None:
                raise ConnectionError(offline)
            # A resume that failed before training a step leaves the run as it was (FINISHED stays).
            unchanged = plan.resume and not ok and reason is None and _last_step(client, run_id) == before[1]
            end_run(uri, run_id, before[0] if unchanged else ok)
        except Exception as e:  # noqa: BLE001 - the verdict waits in the spool for jobs.sync
            spool = spool_of(home)
            spool.claim(uri, run_id)  # whether or not rank 0 got as far as spooling anything
            spool.write({"kind": "end", "args": status})
            offline = offline or str(e).splitlines()[0][:200]
    if offline is not None:
        left = len(spool_of(home).files())
        print(f"facegan: the tracking server {uri} is unreachable ({offline}); {left} record(s) of run {run_id}, "
              f"its {status} status included, wait in {home}/{SPOOL}: send them with "
              f"python -m jobs.sync {home}", file=sys.stderr)
    if reason is not None:
        raise Diverged(reason)
    return {"run_id": run_id, "tracking_uri": uri, "run_dir": run_dir, "result": result}


def closing_note(tags: dict[str, str], best: str | None) -> str:
    """The run's description at its end: the best score, and what privacy says of the run."""
    note = tags["mlflow.note.content"]
    if best:
        note += f" Best {best.split('_', 1)[1]} {tags[best]} at step {tags.get('facegan.best_step')}."
    elif "facegan.privacy_guard" in tags:
        note += (f" Privacy guard: no evaluated generator was under eval.max_identity_auc (last: "
                 f"{tags['facegan.privacy_guard']}); the final generator is logged with the run, not registered.")
    if best and "facegan.privacy_guard" in tags:
        note += f" Privacy guard: {tags['facegan.privacy_guard']}."
    if "facegan.privacy" in tags:
        note += f" {tags['facegan.privacy']}"
    return note


def worker_error(e: BaseException) -> str | None:
    """The first worker's failure that facegan explains itself (a damaged checkpoint, shard or
    config), as one line; None for anything else (a bug: its traceback is what helps)."""
    for rank, err in sorted((getattr(e, "worker_failures", None) or {}).items()):
        cause = getattr(err, "cause", None) or err  # Ray wraps a worker's exception
        if isinstance(cause, (CheckpointError, ShardError, ConfigError)):
            return f"worker {rank}: {str(cause).splitlines()[0]}"
    return None


def total_steps_of(cfg: Config) -> int:
    world = cfg.scale.num_workers
    if cfg.privacy.dp_epsilon > 0:  # Poisson batches (datasets/poisson.py): N // batch steps an epoch
        by_epochs = ShardSet(cfg.data.path).count // cfg.train.batch_size * cfg.train.epochs
        return min(by_epochs, cfg.train.max_steps) if cfg.train.max_steps > 0 else by_epochs
    reader = ShardReader(ShardSet(cfg.data.path), 0, world, cfg.train.batch_size // world, cfg.train.seed,
                         cfg.data.shuffle_groups)
    return total_steps(reader, cfg)


def describe(client, uri: str, run_id: str, plan: Plan) -> None:
    """What the run page shows before any metric: a description, the source and the data."""

    cfg = plan.cfg
    note = (f"facegan DCGAN, {cfg.model.size} px, width {cfg.model.width:g}; preset {plan.preset or 'defaults'}; "
            f"{cfg.scale.num_workers} worker(s), batch {cfg.train.batch_size}; data {cfg.data.path}; "
            f"checkpoints in {plan.storage_path}/{plan.run_name}.")
    if plan.evaluation:
        note += f" FID: {plan.evaluation.get('protocol', '')} against {plan.evaluation.get('real_path', '')}."
    for k, v in {**source_tags("jobs.train"), "mlflow.note.content": note}.items():
        client.set_tag(run_id, k, v)
    log_dataset(uri, run_id, cfg.data.path, "train")
    if plan.evaluation and plan.evaluation.get("real_path"):
        log_dataset(uri, run_id, plan.evaluation["real_path"], "eval")


def _last_step(client, run_id: str) -> int:
    """The run's last logged training step (-1: none)."""
    steps = [m.step for m in client.get_metric_history(run_id, "d_loss")]
    return max(steps, default=-1)


def main(argv: list[str] | None = None) -> int:
    try:
        out = run(argv)
    except (ConfigError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        again = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--resume" and not a.startswith("--run.name=")]
        print(f"interrupted; run {e} is KILLED with its checkpoints kept. Continue it with:\n"
              f"  python -m jobs.train {' '.join(again)} --run.name={e} --resume", file=sys.stderr)
        return 130
    except Exception as e:  # a worker's known failure is one line; anything else keeps its traceback
        known = worker_error(e)
        if known is None:
            raise
        print(f"error: {known}", file=sys.stderr)
        return 1
    if not out:  # --dry-run
        return 0
    print(f"run_id: {out['run_id']}")
    print(f"tracking_uri: {out['tracking_uri']}")
    print(f"checkpoints: {out['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
