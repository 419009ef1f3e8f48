"""The seed DCGAN ("Face Generator"), as plain modules: no device, DDP or data logic; and
:func:`build`, which picks the architecture ``model.arch`` names (gan/resnet.py, gan/stylegan.py).

128 px: G = dense z -> 8x8x1024, four 5x5 stride-2 transposed convs (512/256/128/64), a 5x5
stride-1 transposed conv to RGB, tanh. D = 5x5 convs 64(s2) 128(s2) 256(s2) 512(s1) 1024(s2),
dense -> one logit. The 64 px variant drops the full-resolution stage on both sides, so both
keep the seed's 8x8x1024 bottleneck.
"""
from __future__ import annotations

import torch
from torch import nn

from gan.config import ModelConfig
from gan.resnet import ResNetDiscriminator, ResNetGenerator
from gan.stylegan import StyleGenerator

_G_CHANNELS = {128: (1024, 512, 256, 128, 64), 64: (1024, 512, 256, 128)}
_D_LAYERS = {
    128: ((64, 2), (128, 2), (256, 2), (512, 1), (1024, 2)),
    64: ((128, 2), (256, 2), (512, 1), (1024, 2)),
}
BOTTLENECK = 8  # spatial size at the dense layer, both networks


def _ch(c: int, width: float) -> int:
    return max(1, round(c * width))


class Generator(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        chans = [_ch(c, cfg.width) for c in _G_CHANNELS[cfg.size]]
        self.z_dim = cfg.z_dim
        self.size = cfg.size
        self._c0 = chans[0]
        self.fc = nn.Linear(cfg.z_dim, chans[0] * BOTTLENECK * BOTTLENECK)
        self.act0 = nn.LeakyReLU(cfg.leaky_slope)
        blocks = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            if cfg.g_upsample == "resize":  # no uneven kernel overlap, hence no checkerboard
                up = [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 5, padding=2)]
            else:
                up = [nn.ConvTranspose2d(cin, cout, 5, stride=2, padding=2, output_padding=1)]
            blocks += [
                *up,
                nn.BatchNorm2d(cout, eps=cfg.bn_eps, momentum=cfg.bn_momentum),
                nn.LeakyReLU(cfg.leaky_slope),
            ]
        blocks += [nn.ConvTranspose2d(chans[-1], 3, 5, stride=1, padding=2), nn.Tanh()]
        self.body = nn.Sequential(*blocks)
        init_weights(self, cfg.init_std)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.act0(self.fc(z)).view(z.shape[0], self._c0, BOTTLENECK, BOTTLENECK)
        return self.body(x)


class Discriminator(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        layers, cin = [], 3
        for c, stride in _D_LAYERS[cfg.size]:
            cout = _ch(c, cfg.width)
            norm = [nn.BatchNorm2d(cout, eps=cfg.bn_eps, momentum=cfg.bn_momentum)] if cfg.d_norm == "batch" else []
            layers += [nn.Conv2d(cin, cout, 5, stride=stride, padding=2), *norm, nn.LeakyReLU(cfg.leaky_slope)]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(cin * BOTTLENECK * BOTTLENECK, 1)
        init_weights(self, cfg.init_std)
        if cfg.d_norm == "spectral":  # every weight's largest singular value held at 1 (Miyato et al.)
            for m in [*self.body, self.fc]:
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.utils.parametrizations.spectral_norm(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1)).squeeze(1)


def init_weights(module: nn.Module, std: float) -> None:
    """The seed's TF init: truncated normal (cut at 2 std) weights, zero biases, BN at identity."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):  # (resize-conv's Conv2d too)
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def generator(cfg: ModelConfig) -> nn.Module:
    """``model.arch``'s generator: z (n, z_dim) in, images (n, 3, size, size) out; it has
    ``z_dim`` and ``size`` attributes."""
    return {"dcgan": Generator, "resnet": ResNetGenerator, "stylegan2": StyleGenerator}[cfg.arch](cfg)


def discriminator(cfg: ModelConfig) -> nn.Module:
    """``model.arch``'s discriminator: images in, one logit per image out (StyleGAN2's is the
    residual one)."""
    return Discriminator(cfg) if cfg.arch == "dcgan" else ResNetDiscriminator(cfg)


def build(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    return generator(cfg), discriminator(cfg)


def sample_z(n: int, z_dim: int, generator: torch.Generator | None = None,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """z ~ U(-1, 1), as in the seed."""
    return torch.rand(n, z_dim, generator=generator, device=device) * 2 - 1


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
