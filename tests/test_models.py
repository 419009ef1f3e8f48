import pytest
import torch

from gan.config import ModelConfig
from gan.models import build, count_params, sample_z


def _seed_counts():
    """The seed's parameter counts, from its layer list (weights + biases + BN affine)."""
    g = 100 * 8 * 8 * 1024 + 8 * 8 * 1024
    chans = [1024, 512, 256, 128, 64]
    for cin, cout in zip(chans, chans[1:]):
        g += cin * cout * 25 + cout + 2 * cout
    g += 64 * 3 * 25 + 3
    d, cin = 0, 3
    for cout in (64, 128, 256, 512, 1024):
        d += cin * cout * 25 + cout + 2 * cout
        cin = cout
    d += 8 * 8 * 1024 + 1
    return g, d


def test_seed_parameter_counts():
    G, D = build(ModelConfig(size=128))
    g, d = _seed_counts()
    assert (count_params(G), count_params(D)) == (g, d)
    assert abs(count_params(G) - 24.0e6) < 0.05e6  # ≈ 24.0M
    assert abs(count_params(D) - 17.4e6) < 0.1e6   # ≈ 17.4M (17.48M with biases and BN)


@pytest.mark.parametrize("size", [64, 128])
def test_shapes_and_range(size):
    G, D = build(ModelConfig(size=size, width=0.125))
    z = sample_z(3, 100)
    assert z.min() >= -1 and z.max() <= 1
    x = G(z)
    assert x.shape == (3, 3, size, size) and x.abs().max() <= 1
    assert D(x).shape == (3,)


def test_64px_is_one_stage_fewer():
    G128, D128 = build(ModelConfig(size=128))
    G64, D64 = build(ModelConfig(size=64))
    convs = lambda m: [l for l in m.modules() if isinstance(l, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert len(convs(G64)) == len(convs(G128)) - 1 and len(convs(D64)) == len(convs(D128)) - 1


def test_init_is_truncated_normal_002():
    G, D = build(ModelConfig(size=64))
    w = torch.cat([m.weight.flatten() for m in D.modules() if isinstance(m, torch.nn.Conv2d)])
    assert w.abs().max() <= 0.04 + 1e-7
    assert 0.015 < w.std() < 0.02  # truncation at 2σ shrinks the std to ≈ 0.88σ
    bn = [m for m in G.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.eps == 5e-5 for m in bn) and all(torch.all(m.weight == 1) for m in bn)
