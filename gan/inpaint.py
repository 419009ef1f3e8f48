"""Face repair by latent search (Yeh et al. 2017, "Semantic Image Inpainting with Deep Generative
Models"): find the z whose face G(z) matches the photo where it is intact (the context loss)
and that D finds real (the prior loss); its pixels then fill the hole (blended by the caller).

    context(z) = sum_p W_p |G(z)_p - y_p|        W: intact pixels, weighted by how many of their
                                                 7x7 neighbours are in the hole (the paper's W)
    prior(z)   = softplus(-D(G(z)))              -log D(G(z)), D's logits
    min_z context + lam * prior,  Adam on z, z clamped to the prior's support [-1, 1]

The paper writes the prior as lam * log(1 - D(G(z))); its non-saturating form -log D(G(z)) has
the same minimiser and does not vanish when D is sure a face is fake (the usual GAN trick).
``restarts`` > 1 searches from that many latents per face and keeps the one with the lowest
loss. G and D run in eval mode (BN on running statistics), on whatever device they are on.
Pure torch, no I/O: masks are bool tensors, True where the face is missing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from gan.models import sample_z

MASKS = ("centre", "lower", "eyes", "strokes")


@dataclass
class SearchConfig:
    steps: int = 1000
    lr: float = 0.03
    lam: float = 0.003
    restarts: int = 1
    window: int = 7


def named_mask(kind: str, size: int, seed: int = 0) -> torch.Tensor:
    """A (size, size) bool hole: ``centre`` (the middle quarter of the area), ``lower`` (the lower
    half: mouth and chin), ``eyes`` (the band over both eyes), ``strokes`` (random scratches,
    ~15% of the face, from ``seed``)."""
    m = torch.zeros(size, size, dtype=torch.bool)
    q = size // 4
    if kind == "centre":
        m[q:size - q, q:size - q] = True
    elif kind == "lower":
        m[size // 2:, :] = True
    elif kind == "eyes":  # the CelebA crop's eyes sit at 49% of its height (datasets/align.py)
        m[round(0.38 * size):round(0.60 * size), round(0.14 * size):round(0.86 * size)] = True
    elif kind == "strokes":
        m = torch.from_numpy(_strokes(size, np.random.default_rng(seed)))
    else:
        raise ValueError(f"mask {kind!r}: expected one of {', '.join(MASKS)} or a mask image")
    return m


def _strokes(size: int, rng: np.random.Generator, cover: float = 0.15) -> np.ndarray:
    """Random-walk scratches of a round brush (3-7% of the side wide) until ``cover`` of the area."""
    yy, xx = np.mgrid[0:size, 0:size]
    m = np.zeros((size, size), bool)
    while m.mean() < cover:
        x, y = rng.uniform(0.15, 0.85, 2) * size
        r = rng.uniform(0.03, 0.07) * size / 2 + 0.5
        angle = rng.uniform(0, 2 * math.pi)
        for _ in range(rng.integers(4, 9)):
            angle += rng.uniform(-0.8, 0.8)
            length = rng.uniform(0.06, 0.15) * size
            for t in np.linspace(0, 1, max(2, int(length))):
                cx, cy = x + t * length * math.cos(angle), y + t * length * math.sin(angle)
                m |= (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
            x, y = np.clip([x + length * math.cos(angle), y + length * math.sin(angle)], 0, size - 1)
    return m


def context_weights(holes: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Yeh et al.'s W: 0 in the hole; an intact pixel weighs the fraction of its ``window``^2
    neighbours that are in the hole (so the ring around the hole matters most), and pixels with
    none of the hole around them a small floor so that the whole face still constrains z."""
    h = holes.float().unsqueeze(1)  # (N, 1, H, W)
    near = F.avg_pool2d(h, window, stride=1, padding=window // 2, count_include_pad=False)
    return ((near + 0.05) * (1 - h)).squeeze(1)


def latent_search(G: torch.nn.Module, D: torch.nn.Module, images: torch.Tensor, holes: torch.Tensor,
                  cfg: SearchConfig = SearchConfig(), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``images`` (N, 3, H, W) in [-1, 1], ``holes`` (N, H, W) bool -> (the best z per face,
    G(z), stats: the final context and prior losses per face)."""
    G, D = G.eval(), D.eval()
    dev = images.device
    k, n = cfg.restarts, len(images)
    for p in (*G.parameters(), *D.parameters()):
        p.requires_grad_(False)
    y = images.repeat(k, 1, 1, 1)
    w = context_weights(holes.to(dev), cfg.window).repeat(k, 1, 1).unsqueeze(1)
    z = sample_z(n * k, G.z_dim, torch.Generator().manual_seed(seed)).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=cfg.lr)
    with torch.enable_grad():
        for _ in range(cfg.steps):
            g = G(z)
            context = (w * (g - y).abs()).flatten(1).sum(1)
            prior = F.softplus(-D(g))
            opt.zero_grad(set_to_none=True)
            (context + cfg.lam * prior).sum().backward()
            opt.step()
            with torch.no_grad():
                z.clamp_(-1, 1)
    with torch.no_grad():
        g = G(z)
        context = (w * (g - y).abs()).flatten(1).sum(1)
        prior = F.softplus(-D(g))
        loss = (context + cfg.lam * prior).view(k, n)
        best = loss.argmin(0)
        pick = best * n + torch.arange(n, device=best.device)
    return z[pick].detach(), g[pick], {"context": context[pick].cpu(), "prior": prior[pick].cpu()}


def fill(images: torch.Tensor, generated: torch.Tensor, holes: torch.Tensor) -> torch.Tensor:
    """The photo with the generated pixels pasted into the hole (no blending)."""
    return torch.where(holes.unsqueeze(1).to(images.device), generated, images)
