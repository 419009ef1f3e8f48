"""A StyleGAN2-style generator (``model.arch = "stylegan2"``), after Karras et al. 2020, small
enough to train on a CPU budget: a mapping network z -> w, a learned 4x4 constant, and per
resolution two modulated 3x3 convolutions with weight demodulation, per-pixel noise inputs and
a skip connection of modulated 1x1 toRGB outputs. Weights use the equalised learning rate (the
mapping network at 0.01 of it), so Adam's step is the same for every layer whatever its fan-in.

Left out for size: style mixing, path-length regularisation, the FIR up-sampling filter
(bilinear here), and the truncation trick. The discriminator is the residual one of
gan/resnet.py (StyleGAN2's D is residual too); pair it with ``model.d_norm = "none"`` and R1
(``loss.r1_gamma``), as StyleGAN2 does.

Channels follow ``model.width`` on StyleGAN2's min(512, 16384 / resolution): 512 up to 32 px,
256 at 64, 128 at 128. Noise: fresh per call in train mode, a fixed buffer per layer in eval
mode, so a published generator maps each z to one face.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from gan.config import ModelConfig

MAPPING_LAYERS = 4
LR_MUL_MAPPING = 0.01


def _ch(res: int, width: float) -> int:
    return max(1, round(min(512, 16384 // res) * width))


class EqualLinear(nn.Module):
    def __init__(self, cin: int, cout: int, bias_init: float = 0.0, lr_mul: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) / lr_mul)
        self.bias = nn.Parameter(torch.full((cout,), bias_init / lr_mul))
        self.scale, self.lr_mul = lr_mul / math.sqrt(cin), lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class ModConv(nn.Module):
    """A modulated convolution: the style scales the input channels, the conv is shared over
    the batch, and demodulation rescales each output channel to unit expected variance
    (StyleGAN2's non-fused form, which needs no grouped convolution)."""

    def __init__(self, cin: int, cout: int, k: int, w_dim: int, demod: bool = True, noise_size: int = 0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
        self.scale, self.pad, self.demod = 1 / math.sqrt(cin * k * k), k // 2, demod
        self.affine = EqualLinear(w_dim, cin, bias_init=1.0)
        self.bias = nn.Parameter(torch.zeros(cout))
        self.noise_strength = nn.Parameter(torch.zeros(())) if noise_size else None
        if noise_size:
            self.register_buffer("noise_const", torch.randn(1, 1, noise_size, noise_size))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        s = self.affine(w)  # (n, cin)
        weight = self.weight * self.scale
        x = F.conv2d(x * s[:, :, None, None], weight, padding=self.pad)
        if self.demod:  # 1 / sqrt(sum over (cin, k, k) of (weight * s)^2)
            d = torch.rsqrt((s.square() @ weight.square().sum(dim=(2, 3)).t()) + 1e-8)  # (n, cout)
            x = x * d[:, :, None, None]
        if self.noise_strength is not None:
            noise = (torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype) if self.training
                     else self.noise_const)
            x = x + noise * self.noise_strength
        return x + self.bias[None, :, None, None]


class StyleGenerator(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.z_dim, self.size = cfg.z_dim, cfg.size
        w_dim = max(32, round(512 * cfg.width))
        layers = [EqualLinear(cfg.z_dim if i == 0 else w_dim, w_dim, lr_mul=LR_MUL_MAPPING) for i in range(MAPPING_LAYERS)]
        self.mapping = nn.ModuleList(layers)
        self.const = nn.Parameter(torch.randn(1, _ch(4, cfg.width), 4, 4))
        self.convs, self.to_rgbs = nn.ModuleList(), nn.ModuleList()
        res, cin = 4, _ch(4, cfg.width)
        self.convs.append(ModConv(cin, cin, 3, w_dim, noise_size=4))
        self.to_rgbs.append(ModConv(cin, 3, 1, w_dim, demod=False))
        while res < cfg.size:
            res *= 2
            cout = _ch(res, cfg.width)
            self.convs.extend([ModConv(cin, cout, 3, w_dim, noise_size=res), ModConv(cout, cout, 3, w_dim, noise_size=res)])
            self.to_rgbs.append(ModConv(cout, 3, 1, w_dim, demod=False))
            cin = cout

    def mapped(self, z: torch.Tensor) -> torch.Tensor:
        w = z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)  # pixel norm of z
        for layer in self.mapping:
            w = F.leaky_relu(layer(w), 0.2) * math.sqrt(2)
        return w

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        w = self.mapped(z)
        act = lambda t: F.leaky_relu(t, 0.2) * math.sqrt(2)
        x = act(self.convs[0](self.const.expand(z.shape[0], -1, -1, -1), w))
        rgb = self.to_rgbs[0](x, w)
        for i, to_rgb in enumerate(self.to_rgbs[1:]):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = act(self.convs[2 * i + 2](act(self.convs[2 * i + 1](x, w)), w))
            rgb = F.interpolate(rgb, scale_factor=2, mode="bilinear", align_corners=False) + to_rgb(x, w)
        return rgb
