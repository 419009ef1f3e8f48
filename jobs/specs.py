"""What ``--model SPEC`` names, for jobs.fid and jobs.audit: faces as uint8 NHWC blocks.

SPEC is one of: a shard set (a directory with ``manifest.json``), a folder of images (PNG,
JPEG or WebP, all one size, taken in name order), an MLflow model (``runs:/<id>/generator``,
``models:/<name>/<version>``) or a checkpoint (a ``checkpoint.pt`` file or the folder holding
it). Generators are sampled in eval mode on the evaluation's latents (evaluation/fid.py), so the
same seed and count score the same faces as the in-training evaluation.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow.tracking import MlflowClient
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from datasets.shards import MANIFEST, ShardSet
from evaluation.fid import eval_latents, iter_rows, to_uint8_nchw
from evaluation.watermark import source_id_of
from gan.checkpoint import generator_from_state, load_state
from gan.config import from_flat
from gan.context import CHECKPOINT_FILE
from jobs.tracking import resolve_tracking_uri

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class SpecError(ValueError):
    """A SPEC that names nothing usable; the message says what was expected."""


def kind_of(spec: str) -> str:
    if spec.startswith(("runs:/", "models:/")):
        return "model"
    path = Path(spec)
    if (path / MANIFEST).is_file():
        return "shards"
    if path.is_file() or (path / "checkpoint.pt").is_file():
        return "checkpoint"
    if path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()):
        return "images"
    raise SpecError(f"{spec}: expected a shard set (with {MANIFEST}), a folder of images, runs:/…, "
                    f"models:/… or a checkpoint (file or folder)")


class Exported(torch.nn.Module):
    """A generator logged in the pt2 format: its traced graph (already in eval mode, which an
    exported graph cannot switch) with the ``z_dim`` the rest of the code asks a generator for."""

    def __init__(self, graph: torch.nn.Module, z_dim: int):
        super().__init__()
        self.graph, self.z_dim = graph, int(z_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.graph(z)

    def train(self, mode: bool = True):
        return self


def _load(source: str) -> torch.nn.Module:
    """The generator a SPEC names (MLflow model or checkpoint); errors as they come."""
    if source.startswith(("runs:/", "models:/")):
        mlflow.set_tracking_uri(resolve_tracking_uri())
        model = mlflow.pytorch.load_model(source, map_location="cpu")
        if isinstance(model, torch.fx.GraphModule):  # pt2: an exported graph, not our module
            z_dim = mlflow.models.get_model_info(source).signature.inputs.inputs[0].shape[-1]
            return Exported(model, z_dim)
        return model.eval()  # a generator logged in the pickle format before pt2
    path = Path(source)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError("no such file or folder; expected runs:/…, models:/… or a checkpoint (file or folder)")
    state = load_state(path)
    return generator_from_state(state, from_flat(state["config"]).model)


def run_id_of(spec: str, client: MlflowClient) -> str:
    """The run behind ``runs:/<id>[/…]``, ``models:/<name>/<version>`` or ``models:/<name>@<alias>``."""
    if spec.startswith("runs:/"):
        return spec[len("runs:/"):].split("/")[0]
    name, _, ver = spec[len("models:/"):].partition("/")
    name, _, alias = name.partition("@")
    return (client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, ver)).run_id


def source_id(spec: str) -> tuple[str, str]:
    """The provenance payload for faces made from SPEC (evaluation/watermark.py), and what it names:
    a run's id (``runs:/``, or a registered model's run) or a checkpoint file's sha256."""
    try:
        if spec.startswith(("runs:/", "models:/")):
            run_id = run_id_of(spec, MlflowClient(resolve_tracking_uri()))
        else:
            path = Path(spec)
            if path.is_dir():  # a checkpoint folder, or a run folder of them (the latest)
                path = path / CHECKPOINT_FILE if (path / CHECKPOINT_FILE).is_file() \
                    else sorted(path.glob(f"checkpoint_*/{CHECKPOINT_FILE}"))[-1]
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            return source_id_of(digest), f"checkpoint {path.name} sha256 {digest[:12]}…"
        return source_id_of(run_id), f"run {run_id}"
    except Exception as e:  # the generator loaded, so this is rare: say so and mark with a digest of the spec
        fallback = hashlib.sha256(spec.encode()).hexdigest()
        return source_id_of(fallback), f"{spec} ({type(e).__name__}: the id is a digest of the spec)"


def load_generator(spec: str) -> torch.nn.Module:
    try:
        return _load(spec)
    except Exception as e:  # missing, not a checkpoint, truncated, unknown run: one line, not a traceback
        raise SpecError(f"{spec}: cannot load a generator ({str(e).splitlines()[0]})") from None


def _images(folder: Path, n: int) -> Iterator[np.ndarray]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:n]
    size = None
    for start in range(0, len(files), 100):
        block = []
        for f in files[start:start + 100]:
            try:
                img = np.asarray(Image.open(f).convert("RGB"))
            except (OSError, UnidentifiedImageError) as e:
                raise SpecError(f"{f}: not a readable image ({e})") from None
            if size is not None and img.shape != size:
                raise SpecError(f"{f}: {img.shape[1]}x{img.shape[0]} px, the folder's first image is "
                                f"{size[1]}x{size[0]}; all images must have one size")
            size = img.shape
            block.append(img)
        yield np.stack(block)


@torch.no_grad()
def sample_faces(G: torch.nn.Module, n: int, seed: int, batch: int, device) -> Iterator[np.ndarray]:
    G = G.to(device).eval()
    for z in eval_latents(n, G.z_dim, seed).split(batch):
        yield to_uint8_nchw(G(z.to(device))).permute(0, 2, 3, 1).cpu().numpy()


def fake_faces(spec: str, n: int, seed: int = 0, batch: int = 100, device="cpu") -> Iterator[np.ndarray]:
    """Up to ``n`` faces from SPEC (exactly ``n`` from a generator)."""
    kind = kind_of(spec)
    if kind == "shards":
        return iter_rows(ShardSet(spec), n)
    if kind == "images":
        return _images(Path(spec), n)
    return sample_faces(load_generator(spec), n, seed, batch, device)
