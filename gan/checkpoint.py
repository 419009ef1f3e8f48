"""Checkpoint state: unwrapped G and D, both Adam states, EMA, step, RNG and data position.

Everything in it is a tensor, number, string or container of those, so it loads with
``torch.load(weights_only=True)``: a checkpoint cannot run code on the machine that opens it.
Beside each file, ``<name>.sha256`` holds its digest: a checkpoint damaged after it was written
(a truncated copy, a bad disk, an interrupted upload) fails by name instead of loading garbage.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any, Callable

import torch

from gan.models import generator

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: unreadable, damaged, or not facegan's."""


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


class _Hashing:
    """A write-only file that digests what passes through it."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def save_state(state: dict[str, Any], path: str | Path) -> None:
    """Writes to temporary names and renames, so a crash never leaves a half checkpoint; the
    digest goes first, so a file whose digest is missing or stale reads as damaged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    side = _sidecar(path)
    side_tmp = side.with_name(f".{side.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            hashing = _Hashing(f)
            torch.save(state, hashing)  # digested as written: a 0.5 GB state is not read back
        side_tmp.write_text(hashing.sha.hexdigest() + "\n")
    except BaseException:  # a failed write leaves the previous checkpoint and no litter
        tmp.unlink(missing_ok=True)
        side_tmp.unlink(missing_ok=True)
        raise
    os.replace(side_tmp, side)
    os.replace(tmp, path)


def to_host(state: Any) -> Any:
    """A copy of ``state`` whose tensors are CPU tensors of their own, taken now: the next step
    updates parameters and optimizer state in place, so a writer working later needs a copy
    (on a CPU run as much as on a GPU). On CUDA the copies go into pinned memory without a
    wait each, then one synchronise: the training thread pays one device-to-host transfer."""
    cuda = []

    def copy(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            x = x.detach()
            if x.device.type != "cuda":
                return x.clone()
            out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            cuda.append(x.device)
            return out.copy_(x, non_blocking=True)
        if isinstance(x, dict):
            return {k: copy(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(copy(v) for v in x)
        return x

    out = copy(state)
    for device in set(cuda):
        torch.cuda.synchronize(device)
    return out


class BackgroundWriter:
    """Runs checkpoint writes off the training thread, one at a time.

    ``submit`` first waits for the write before it (so host memory holds at most one state
    being written besides the one just taken) and raises that write's error, if any: a run
    whose checkpoints fail stops at its next checkpoint, not hours later. ``wait`` is the same
    barrier for the end of a run. The thread is not a daemon: an exiting process finishes the
    write it started (and the write itself is temp-then-rename, so none is ever half there)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[[], None]) -> None:
        self.wait()

        def run() -> None:
            try:
                write()
            except BaseException as e:  # handed to the training thread at its next call
                self._error = e

        self._thread = threading.Thread(target=run, name="facegan-checkpoint", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def load_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    side = _sidecar(path)
    if side.is_file():  # checkpoints written before digests existed load without one
        want, got = side.read_text().strip(), _digest(path)
        if want != got:
            raise CheckpointError(f"{path}: damaged (sha256 {got[:12]}…, written as {want[:12]}…)")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive
            raise CheckpointError(f"{path}: unreadable as a checkpoint (not a torch.save zip archive)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, a pickle with code in it
        raise CheckpointError(f"{path}: unreadable as a checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a facegan checkpoint (format {FORMAT_VERSION})")
    return state


def generator_from_state(state: dict[str, Any], model_cfg, use_ema: bool = True) -> torch.nn.Module:
    """The (EMA, when present) generator of a checkpoint, in eval mode on the CPU."""

    G = generator(model_cfg)
    G.load_state_dict(state["ema"] if use_ema and state.get("ema") is not None else state["G"])
    return G.eval()
