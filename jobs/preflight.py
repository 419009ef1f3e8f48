"""Checks that run before any Ray resource is requested (jobs.train's and jobs.tune's
``prepare``): each failure is a one-line ConfigError, exit 2."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.fs as pafs

from compose import NoHeldOut, identity_leak, prepare_evaluation, real_path
from datasets.shards import ShardSet, is_uri, open_fs, write_bytes
from evaluation.faceid import FaceIDError, model_dir
from evaluation.identity import IdentityAuditError, check_people
from evaluation.inception import ExtractorError
from gan.config import Config, ConfigError


def submitted_with_working_dir() -> bool:
    """Under `ray job submit --working-dir`, the driver runs in Ray's temporary copy of that
    directory (Ray hands the job's runtime_env to the driver in this variable)."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return False
    return bool((job.get("runtime_env") or {}).get("working_dir"))


def refuse_relative_under_submit(cfg: Config) -> None:
    """Relative locations would resolve inside Ray's temporary copy of the working directory
    and be lost with it: refused, saying what to pass, rather than silently resolved."""
    if not submitted_with_working_dir():
        return
    where = "Ray's temporary copy of `ray job submit --working-dir`, lost when the job ends"
    for key, value in (("run.storage_path", cfg.run.storage_path), ("data.path", cfg.data.path)):
        if not is_uri(value) and not Path(value).is_absolute():
            raise ConfigError(f"{key}: {value!r} is relative, so it would be in {where}; "
                              f"pass --{key}=<an absolute path every node sees>")
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri or (uri.startswith("sqlite:///") and not uri.startswith("sqlite:////")):
        raise ConfigError(f"MLFLOW_TRACKING_URI: {'unset, so ./mlflow.db' if not uri else uri + ' is relative and'} "
                          f"would be in {where}; set it in the job's runtime env to an mlflow server "
                          f"(http://host:5000) or sqlite:////absolute/path.db")


def writable(path: str | Path, key: str) -> None:
    """Creates ``path`` and writes a file in it, now, rather than after an epoch of training;
    on object storage (``s3://...``), puts and deletes a probe object."""
    try:
        if is_uri(path):
            fs, root = open_fs(path)
            probe = f"{root}/.facegan-write-test-{os.getpid()}"
            write_bytes(fs, probe, b"")
            fs.delete_file(probe)
            return
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".facegan-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:  # pyarrow's filesystem errors are OSErrors too
        raise ConfigError(f"{key}: {path} is not writable ({_why(e)})") from None


def _why(e: OSError) -> str:
    """An OS or pyarrow filesystem error in one line."""
    text = str(e).strip()
    return e.strerror or (text.splitlines()[0][:300] if text else type(e).__name__)


def exists(path: str, key: str = "run.storage_path") -> bool:
    """A local path, or anything under an object-storage prefix; storage that cannot be
    reached is one line naming ``key``."""
    try:
        fs, p = open_fs(path)
        return fs.get_file_info(p).type != pafs.FileType.NotFound
    except OSError as e:  # pyarrow's errors: no endpoint, no bucket, no credentials
        raise ConfigError(f"{key}: cannot read {path} ({_why(e)})") from None


def ray_storage(path: str) -> dict:
    """Ray Train/Tune's storage arguments for ``run.storage_path``: object storage goes with
    its filesystem (the S3 endpoint of AWS_ENDPOINT_URL_S3 included, see datasets/shards.py)."""
    if not is_uri(path):
        return {"storage_path": path}
    fs, p = open_fs(path)
    return {"storage_path": p, "storage_filesystem": fs}


def local_home(storage: str, name: str) -> Path:
    """This machine's directory for a run's local files (the tracking spool, jobs/spool.py):
    the run's own directory on local storage; with object storage, which has no local
    directory, $FACEGAN_LOCAL_DIR/<run> (default ~/.cache/facegan/runs/<run>)."""
    if not is_uri(storage):
        return Path(storage) / name
    return Path(os.environ.get("FACEGAN_LOCAL_DIR") or Path.home() / ".cache" / "facegan" / "runs").expanduser() / name


def check_evaluation(cfg: Config) -> dict | None:
    """FID's extractor and held-out faces exist, and the real side is cached, before Ray starts;
    eval.identity_audit "auto" is settled here to "on" or "off" (the run's params say which)."""

    try:
        if cfg.eval.audit_samples > 0:
            real_path(cfg)
        cfg.eval.identity_audit = identity_audit_mode(cfg)
        if cfg.eval.max_identity_auc < 1 and cfg.eval.identity_audit != "on":
            identity_audit_mode(cfg, required="eval.max_identity_auc")  # says why in one line
        if cfg.eval.identity_audit == "on":
            identity_leak(cfg)  # both sides embedded now, into the cache the workers read
        return prepare_evaluation(cfg) if cfg.eval.every_steps > 0 else None
    except (ExtractorError, NoHeldOut) as e:
        raise ConfigError(str(e)) from None


def identity_audit_mode(cfg: Config, required: str = "") -> str:
    """"on" when the identity audit can run: evaluation on, identities on both sides, held-out
    people disjoint and enough of them, the face matcher installed. ``required``: the field that
    needs it (a refusal names it)."""
    mode = "on" if required else cfg.eval.identity_audit
    if mode == "off":
        return "off"

    try:
        if cfg.eval.every_steps <= 0:
            raise IdentityAuditError("it runs with the final evaluation: set eval.every_steps > 0")
        sides = []
        for path in (cfg.data.path, real_path(cfg)):
            ids = ShardSet(path).identities()
            if ids is None:
                raise IdentityAuditError(f"{path} has no identity column (convert CelebA with --identities)")
            sides.append(ids)
        check_people(*sides)
        model_dir()
    except (IdentityAuditError, FaceIDError) as e:
        if mode == "on":
            raise ConfigError(f"{required or 'eval.identity_audit=on'}: {e}") from None
        return "off"
    return "on"
