"""Residual generator and discriminator (``model.arch = "resnet"``), SNGAN-style as in Miyato et
al. 2018 and Mimicry's ``SNGANGenerator64``/``SNGANDiscriminator64`` (FID 5.7 on CelebA 64 px at
full width): 3x3 convolutions, ReLU, nearest-neighbour upsampling in G, average pooling in D,
a 1x1 shortcut wherever the shape changes, and D's features summed over space before the logit.

Widths follow ``model.width`` on Mimicry's ngf = ndf = 1024: at 64 px G runs 1024 (4x4) -> 512 ->
256 -> 128 -> 64 and D 64 -> 128 -> 256 -> 512 -> 1024; 128 px adds one block to each.
``model.d_norm``: "spectral" is SNGAN's D; "none" suits R1 (loss.r1_gamma); "batch" puts BN
before each of D's activations.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from gan.config import ModelConfig

NGF = NDF = 1024
BOTTOM = 4  # G starts from 4x4


def _ch(c: int, width: float) -> int:
    return max(1, round(c * width))


def _xavier(m: nn.Module, gain: float) -> None:
    nn.init.xavier_uniform_(m.weight, gain)
    nn.init.zeros_(m.bias)


class GBlock(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: ModelConfig):
        super().__init__()
        bn = dict(eps=cfg.bn_eps, momentum=cfg.bn_momentum)
        self.b1, self.c1 = nn.BatchNorm2d(cin, **bn), nn.Conv2d(cin, cout, 3, padding=1)
        self.b2, self.c2 = nn.BatchNorm2d(cout, **bn), nn.Conv2d(cout, cout, 3, padding=1)
        self.sc = nn.Conv2d(cin, cout, 1)
        for c in (self.c1, self.c2):
            _xavier(c, math.sqrt(2))
        _xavier(self.sc, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.relu(self.b1(x)), scale_factor=2, mode="nearest")
        h = self.c2(F.relu(self.b2(self.c1(h))))
        return h + self.sc(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResNetGenerator(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        blocks = int(math.log2(cfg.size // BOTTOM))  # 64 px: 4, 128 px: 5
        chans = [_ch(NGF >> i, cfg.width) for i in range(blocks + 1)]
        self.z_dim, self.size, self._c0 = cfg.z_dim, cfg.size, chans[0]
        self.fc = nn.Linear(cfg.z_dim, chans[0] * BOTTOM * BOTTOM)
        self.blocks = nn.Sequential(*[GBlock(a, b, cfg) for a, b in zip(chans[:-1], chans[1:])])
        self.bn = nn.BatchNorm2d(chans[-1], eps=cfg.bn_eps, momentum=cfg.bn_momentum)
        self.to_rgb = nn.Conv2d(chans[-1], 3, 3, padding=1)
        _xavier(self.fc, 1.0)
        _xavier(self.to_rgb, 1.0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(z.shape[0], self._c0, BOTTOM, BOTTOM)
        return torch.tanh(self.to_rgb(F.relu(self.bn(self.blocks(x)))))


class DBlock(nn.Module):
    """``first``: the optimised first block (no activation before its first conv, pool before
    the shortcut's conv)."""

    def __init__(self, cin: int, cout: int, cfg: ModelConfig, first: bool = False, down: bool = True):
        super().__init__()
        self.first, self.down = first, down
        self.c1, self.c2 = nn.Conv2d(cin, cout, 3, padding=1), nn.Conv2d(cout, cout, 3, padding=1)
        self.sc = nn.Conv2d(cin, cout, 1) if (cin != cout or down) else None
        batch = cfg.d_norm == "batch"
        self.n1 = nn.BatchNorm2d(cout, eps=cfg.bn_eps, momentum=cfg.bn_momentum) if batch else nn.Identity()
        self.n2 = nn.BatchNorm2d(cout, eps=cfg.bn_eps, momentum=cfg.bn_momentum) if batch else nn.Identity()
        for c in (self.c1, self.c2):
            _xavier(c, math.sqrt(2))
        if self.sc is not None:
            _xavier(self.sc, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c2(F.relu(self.n1(self.c1(x if self.first else F.relu(x)))))
        h = F.avg_pool2d(self.n2(h), 2) if self.down else self.n2(h)
        s = x
        if self.first:
            s = self.sc(F.avg_pool2d(s, 2))
        elif self.sc is not None:
            s = self.sc(s)
            s = F.avg_pool2d(s, 2) if self.down else s
        return h + s


class ResNetDiscriminator(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        blocks = int(math.log2(cfg.size // BOTTOM))
        chans = [_ch(NDF >> i, cfg.width) for i in reversed(range(blocks + 1))]  # 64 px: 64 .. 1024
        layers = [DBlock(3, chans[0], cfg, first=True)]
        layers += [DBlock(a, b, cfg) for a, b in zip(chans[:-1], chans[1:])]
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(chans[-1], 1)
        _xavier(self.fc, 1.0)
        if cfg.d_norm == "spectral":
            for m in [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]:
                nn.utils.parametrizations.spectral_norm(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.blocks(x)).sum(dim=(2, 3))  # global sum pooling
        return self.fc(h).squeeze(1)
