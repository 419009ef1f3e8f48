"""Checkpoint state: unwrapped G and D, both Adam states, EMA, step, RNG and data position.

Everything in it is a tensor, number, string or container of those, so it loads with
``torch.load(weights_only=True)``: a checkpoint cannot run code on the machine that opens it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1


def save_state(state: dict[str, Any], path: str | Path) -> None:
    """Writes to a temporary name and renames, so a crash never leaves a half checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: str | Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a facegan checkpoint (format {FORMAT_VERSION})")
    return state


def generator_from_state(state: dict[str, Any], model_cfg, use_ema: bool = True) -> torch.nn.Module:
    """The (EMA, when present) generator of a checkpoint, in eval mode on the CPU."""
    from gan.models import Generator

    G = Generator(model_cfg)
    G.load_state_dict(state["ema"] if use_ema and state.get("ema") is not None else state["G"])
    return G.eval()
