"""Image helpers: generator output -> uint8 -> PNG grids (Pillow)."""
from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid(images_u8: np.ndarray, nrow: int | None = None, pad: int = 2) -> Image.Image:
    n, h, w, _ = images_u8.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    canvas = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images_u8):
        r, c = divmod(i, nrow)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    return Image.fromarray(canvas)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@torch.no_grad()
def sample_grid_png(G: torch.nn.Module, z: torch.Tensor) -> bytes:
    """An 8x8 (for 64 z's) grid from G in eval mode; G's mode is restored afterwards."""
    was_training = G.training
    G.eval()
    try:
        return png_bytes(grid(to_uint8(G(z))))
    finally:
        G.train(was_training)
