"""Recipe options (issue: better faces for the same budget): each one's shapes, where its
gradients go, and that a step stays replayable from its generator. The seed's own step is
covered, unchanged, by tests/test_step.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gan import augment as aug_mod
from gan.augment import AugmentState, augment
from gan.config import Config, ConfigError, LossConfig, ModelConfig, validate
from gan.losses import d_hinge, g_hinge
from gan.models import build, sample_z
from gan.step import Nets, d_step, g_step, train_step


def _nets(model: ModelConfig, loss: LossConfig, aug: AugmentState | None = None) -> Nets:
    torch.manual_seed(0)
    G, D = build(model)
    return Nets(G, D, D, torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3),
                model.z_dim, loss_kind=loss.kind, aug=aug)


def _params(m):
    return [p.detach().clone() for p in m.parameters()]


def test_resize_upsampling_generator_has_no_transposed_conv():
    for size in (64, 128):
        G, _ = build(ModelConfig(size=size, width=0.0625, g_upsample="resize"))
        kinds = {type(m) for m in G.body}
        assert nn.Upsample in kinds and nn.Conv2d in kinds
        assert sum(isinstance(m, nn.ConvTranspose2d) for m in G.modules()) == 1  # only the stride-1 RGB output
        out = G(sample_z(3, 100))
        assert out.shape == (3, 3, size, size) and out.abs().max() <= 1


def test_discriminator_normalisations():
    _, D = build(ModelConfig(width=0.0625, d_norm="none"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in D.modules())
    _, D = build(ModelConfig(width=0.0625, d_norm="spectral"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in D.modules())
    D.train()
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    for _ in range(30):  # power iterations run in train-mode forwards
        D(x)
    for m in [*D.body, D.fc]:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
            assert sigma == pytest.approx(1.0, abs=0.05)


def test_hinge_losses_are_the_formula():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    loss, stats = d_hinge(real, fake)
    assert float(loss) == pytest.approx((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3)
    assert float(g_hinge(fake)[0]) == pytest.approx(1 / 3)
    assert {"d_loss", "d_real", "d_fake"} <= set(stats)


@pytest.mark.parametrize("kind", ["nonsaturating", "hinge"])
def test_other_losses_drop_noise_and_smoothing(kind):
    loss = LossConfig(kind=kind)
    nets = _nets(ModelConfig(width=0.0625), loss)
    stats = train_step(torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8), nets, loss,
                       torch.Generator().manual_seed(1))
    assert "noise_sigma" not in stats
    assert float(stats["label_min"]) == float(stats["label_max"]) == 1.0


def test_diffaugment_ops():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 32, 32) * 2 - 1
    for op in aug_mod.OPS:
        y = getattr(aug_mod, op)(x, gen)
        assert y.shape == x.shape and not torch.equal(y, x)
    cut = aug_mod.cutout(torch.ones(64, 3, 32, 32), gen)
    zeros = (cut == 0).float().mean()
    assert 0.12 < float(zeros) < 0.25  # a 16x16 square of a 32x32 image, clipped at the borders
    moved = aug_mod.translation(torch.ones(64, 3, 32, 32), gen)
    assert float((moved == 0).float().mean()) > 0  # what shifted out is zero-filled
    assert torch.equal(augment(x, ("color",), torch.tensor(0.0), gen), x)  # p = 0: untouched
    with pytest.raises(ValueError, match="unknown op 'blur'"):
        aug_mod.parse("color,blur")


def test_diffaugment_gradients_reach_g_through_the_augmentation():
    loss = LossConfig(diffaug="color,translation,cutout")
    aug = AugmentState(aug_mod.parse(loss.diffaug), 0.0, 1000, "cpu")
    nets = _nets(ModelConfig(width=0.0625), loss, aug)
    gen = torch.Generator().manual_seed(0)
    fake = nets.G(sample_z(8, 100, gen))
    g0, d0 = _params(nets.G), _params(nets.D)
    d_step(torch.rand(8, 3, 64, 64) * 2 - 1, fake, torch.ones(8), nets, gen)
    assert all(torch.equal(a, b) for a, b in zip(g0, nets.G.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d0, nets.D.parameters()))
    d1 = _params(nets.D)
    g_step(fake, nets, gen)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in nets.G.parameters())
    assert all(torch.equal(a, b) for a, b in zip(d1, nets.D.parameters()))


@pytest.mark.parametrize("model, loss", [
    (ModelConfig(width=0.0625, d_norm="spectral"), LossConfig()),
    (ModelConfig(width=0.0625, g_upsample="resize"), LossConfig(kind="hinge")),
    (ModelConfig(width=0.0625), LossConfig(diffaug="color,translation,cutout", ada_target=0.6)),
])
def test_steps_with_options_are_replayable(model, loss):
    images = torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8)
    outs = []
    for _ in range(2):
        aug = AugmentState(aug_mod.parse(loss.diffaug), loss.ada_target, 1000, "cpu") if loss.diffaug else None
        nets = _nets(model, loss, aug)
        if aug is not None:
            aug.p.fill_(0.5)
        stats = [train_step(images, nets, loss, torch.Generator().manual_seed(s)) for s in (3, 4)]
        outs.append((stats, _params(nets.G) + _params(nets.D)))
    (s1, w1), (s2, w2) = outs
    assert all(torch.equal(a[k], b[k]) for a, b in zip(s1, s2) for k in a)
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))


def test_adaptive_probability_follows_d_overfitting():
    state = AugmentState(("color",), 0.6, images=64, device="cpu")
    assert float(state.p) == 0.0
    for _ in range(4):
        state.observe(torch.full((16,), 5.0))  # D sure of every real face: r = 1 > 0.6
    state.adjust(lambda t: t, global_batch=4)
    assert float(state.p) == pytest.approx(4 * 4 / 64)
    for _ in range(4):
        state.observe(torch.full((16,), -5.0))  # r = -1 < 0.6: p comes back down
    state.adjust(lambda t: t, global_batch=4)
    assert float(state.p) == 0.0
    fixed = AugmentState(("color",), 0.0, 64, "cpu")  # no target: DiffAugment's p = 1, never adjusted
    fixed.adjust(lambda t: t, 4)
    assert float(fixed.p) == 1.0


@pytest.mark.parametrize("key, value, needle", [
    ("model.d_norm", "layer", "model.d_norm"), ("model.g_upsample", "pixelshuffle", "model.g_upsample"),
    ("loss.kind", "wgan", "loss.kind"), ("loss.diffaug", "color,zoom", "unknown op 'zoom'"),
    ("loss.ada_target", "0.6", "set loss.diffaug"),
])
def test_recipe_options_are_validated(key, value, needle):
    from gan.config import apply

    with pytest.raises(ConfigError, match=needle):
        validate(apply(Config(), {key: value}))
