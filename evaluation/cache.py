"""Files cached beside the runs (``run.storage_path/feature_cache``: the real side of FID, the
audits' embeddings), on local disk or object storage alike, since the workers of a multi-node
run share no disk: the cache must live where ``run.storage_path`` does."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch

from datasets.shards import ensure_dir, is_file, is_uri, open_fs, write_bytes


def read(cache_dir: str | Path, name: str) -> bytes | None:
    fs, root = open_fs(cache_dir)
    if not is_file(fs, f"{root}/{name}"):
        return None
    with fs.open_input_stream(f"{root}/{name}") as f:
        return f.read()


def write(cache_dir: str | Path, name: str, data: bytes) -> None:
    """Complete or absent. Locally under a per-process temp name (ranks may write the same
    entry at once), then renamed; an object store's PUT is already all-or-nothing."""
    fs, root = open_fs(cache_dir)
    ensure_dir(fs, root)
    if is_uri(cache_dir):
        write_bytes(fs, f"{root}/{name}", data)
        return
    tmp = Path(root) / f".{name}.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, Path(root) / name)


def load_tensor(cache_dir, name: str) -> torch.Tensor | None:
    data = read(cache_dir, name)
    return None if data is None else torch.load(io.BytesIO(data), weights_only=True)


def save_tensor(cache_dir, name: str, value: torch.Tensor) -> None:
    buf = io.BytesIO()
    torch.save(value, buf)
    write(cache_dir, name, buf.getvalue())


def load_array(cache_dir, name: str) -> np.ndarray | None:
    data = read(cache_dir, name)
    return None if data is None else np.load(io.BytesIO(data), allow_pickle=False)


def save_array(cache_dir, name: str, value: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, value, allow_pickle=False)
    write(cache_dir, name, buf.getvalue())
