"""Checkpoint state: unwrapped G and D, both Adam states, EMA, step, RNG and data position.

Everything in it is a tensor, number, string or container of those, so it loads with
``torch.load(weights_only=True)``: a checkpoint cannot run code on the machine that opens it.
Beside each file, ``<name>.sha256`` holds its digest: a checkpoint damaged after it was written
(a truncated copy, a bad disk, an interrupted upload) fails by name instead of loading garbage.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: unreadable, damaged, or not facegan's."""


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_state(state: dict[str, Any], path: str | Path) -> None:
    """Writes to temporary names and renames, so a crash never leaves a half checkpoint; the
    digest goes first, so a file whose digest is missing or stale reads as damaged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    side = _sidecar(path)
    side_tmp = side.with_name(f".{side.name}.tmp")
    side_tmp.write_text(_digest(tmp) + "\n")
    os.replace(side_tmp, side)
    os.replace(tmp, path)


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
    from gan.models import Generator

    G = Generator(model_cfg)
    G.load_state_dict(state["ema"] if use_ema and state.get("ema") is not None else state["G"])
    return G.eval()
