"""The speedrun's switches: the residual and StyleGAN2-style architectures, lazy R1 and the
wall-clock budget (train.max_minutes)."""
import time

import pytest
import torch

from compose import open_batches
from gan.checkpoint import load_state
from gan.config import Config, ConfigError, LossConfig, ModelConfig, load, validate
from gan.context import CHECKPOINT_FILE, LocalContext
from gan.loop import train
from gan.losses import d_loss
from gan.models import build, sample_z
from gan.step import Nets, to_unit_range, train_step


@pytest.mark.parametrize("arch,d_norm", [("resnet", "spectral"), ("resnet", "batch"), ("stylegan2", "none")])
@pytest.mark.parametrize("size", [64, 128])
def test_architectures_make_images_and_logits_and_learn(arch, d_norm, size):
    cfg = ModelConfig(size=size, width=0.0625, arch=arch, d_norm=d_norm)
    torch.manual_seed(0)
    G, D = build(cfg)
    assert (G.z_dim, G.size) == (100, size)
    x = G(sample_z(4, 100))
    assert x.shape == (4, 3, size, size) and D(x).shape == (4,)
    nets = Nets(G, D, D, torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3), 100,
                loss_kind="nonsaturating")
    before = {k: v.clone() for k, v in G.state_dict().items()}
    stats = train_step(torch.randint(0, 256, (4, size, size, 3), dtype=torch.uint8), nets,
                       LossConfig(kind="nonsaturating"), torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v).all() for v in stats.values())
    assert any(not torch.equal(before[k], v) for k, v in G.state_dict().items())  # G learned


def test_stylegan_noise_is_fresh_in_training_and_fixed_once_published():
    G, _ = build(ModelConfig(width=0.0625, arch="stylegan2", d_norm="none"))
    z = sample_z(2, 100, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert all(float(c.noise_strength) == 0 for c in G.convs)  # StyleGAN2's start: learned from zero
        for c in G.convs:
            c.noise_strength.fill_(0.5)
        G.train()
        assert not torch.equal(G(z), G(z))  # per-pixel noise inputs
        G.eval()
        assert torch.equal(G(z), G(z))  # one face per z for the published model
        G.convs[3].noise_strength.fill_(0.0)
        quiet = G(z)
        G.convs[3].noise_strength.fill_(1.0)
        assert not torch.equal(quiet, G(z))  # the noise input reaches the image


def test_lazy_r1_is_the_gradient_penalty_on_its_steps_only():
    torch.manual_seed(0)
    cfg = ModelConfig(width=0.0625, arch="resnet", d_norm="none")
    G, D = build(cfg)
    images = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8)
    loss = LossConfig(kind="nonsaturating", r1_gamma=10.0, r1_every=4)

    def d_grads(step):
        D2 = build(cfg)[1]
        D2.load_state_dict(D.state_dict())
        opt = torch.optim.SGD(D2.parameters(), lr=0.0)  # lr 0: the step leaves the weights, keeps .grad
        nets = Nets(G, D2, D2, torch.optim.SGD(G.parameters(), lr=0.0), opt, 100, loss_kind="nonsaturating")
        stats = train_step(images, nets, loss, torch.Generator().manual_seed(3), step=step)
        return stats, [p.grad.clone() for p in D2.parameters()]

    on, g_on = d_grads(8)
    off, g_off = d_grads(9)
    assert "r1_penalty" in on and "r1_penalty" not in off
    # The same D loss by hand, plus (gamma / 2) * every * E||grad_x D(x)||^2 on the real faces.
    gen = torch.Generator().manual_seed(3)
    x = to_unit_range(images)
    flip = torch.rand(4, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x).requires_grad_(True)
    with torch.no_grad():
        fake = G(sample_z(4, 100, gen))
    real_logits = D(x)
    base, _ = d_loss(real_logits, D(fake), torch.ones(4))
    (gx,) = torch.autograd.grad(real_logits.sum(), x, create_graph=True)
    penalty = gx.square().sum(dim=(1, 2, 3)).mean()
    assert float(on["r1_penalty"]) == pytest.approx(float(penalty.detach()), rel=1e-5)
    D.zero_grad()
    (base + 10.0 / 2 * 4 * penalty).backward()
    for mine, ref in zip(g_on, [p.grad for p in D.parameters()]):
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(a, b) for a, b in zip(g_on, g_off))


def _cfg(faces64, max_steps, minutes):
    c = Config()
    c.data.path, c.model.width = str(faces64), 0.0625
    c.train.batch_size, c.train.max_steps, c.train.log_every, c.train.max_minutes = 8, max_steps, 2, minutes
    c.train.checkpoint_every, c.scale.num_workers = 1000, 1
    c.eval.every_steps = 2
    return c


class _SlowScorer:
    """An evaluation that takes seconds: it must not count against train.max_minutes."""

    def __init__(self, seconds):
        self.seconds, self.calls = seconds, []

    def __call__(self, G):
        time.sleep(self.seconds)
        self.calls.append(time.perf_counter())
        return {"fid": 100.0 - len(self.calls), "kid": 0.1}


def test_time_budget_stops_at_a_log_window_with_checkpoint_and_evaluation(faces64, tmp_path):
    cfg = _cfg(faces64, 40, 1e-6)  # spent after the first step: the run ends at the first log window
    ctx = LocalContext(tmp_path, resume=False)
    scorer = _SlowScorer(0.0)
    res = train(cfg, ctx, open_batches(cfg, ctx), scorer)
    assert res.step == 2 and ctx.checkpoint_steps == [2] and len(scorer.calls) == 1
    assert (tmp_path / "samples" / "final.png").is_file()
    state = load_state(tmp_path / CHECKPOINT_FILE)
    assert state["step"] == 2 and 0 < state["train_seconds"] < 60
    assert [m["train_minutes"] for s, m in ctx.history if "train_minutes" in m] == [state["train_seconds"] / 60]


def test_evaluation_time_is_not_training_time(faces64, tmp_path):
    # 12 quick steps take ~1-2 s, on a loaded machine too; six evaluations take 12 s. A budget of
    # 6 s that counted them would stop at step 6.
    cfg = _cfg(faces64, 12, 0.1)
    ctx = LocalContext(tmp_path, resume=False)
    res = train(cfg, ctx, open_batches(cfg, ctx), _SlowScorer(2.0))
    assert res.step == 12
    assert load_state(tmp_path / CHECKPOINT_FILE)["train_seconds"] < 6


def test_switches_are_validated(tmp_path):
    for bad, field in (("--model.arch=vit", "model.arch"), ("--loss.r1_gamma=-1", "loss.r1_gamma"),
                       ("--loss.r1_every=0", "loss.r1_every"), ("--train.max_minutes=-2", "train.max_minutes"),
                       ("--eval.publish=sometimes", "eval.publish")):
        with pytest.raises(ConfigError, match=field):
            validate(load(None, [bad]))
    validate(load(None, ["--loss.r1_gamma=1", "--scale.num_workers=2"]))  # R1 through DDP (tests/test_step.py)
    with pytest.raises(ConfigError, match="train.max_minutes.*replay"):
        validate(load(None, ["--train.max_minutes=5", "--train.deterministic=true"]))
    with pytest.raises(ConfigError, match="Opacus.*R1|R1.*Opacus|second derivative.*per-face|differentiates D twice"):
        validate(load(None, ["--privacy.dp_epsilon=10", "--model.d_norm=none", "--loss.r1_gamma=1", "--scale.num_workers=1"]))
    with pytest.raises(ConfigError, match="model.arch=dcgan only"):
        validate(load(None, ["--privacy.dp_epsilon=10", "--model.d_norm=none", "--model.arch=resnet"]))


@pytest.mark.parametrize("noise_on", ["real", "both"])
def test_instance_noise_on_fakes_only_when_asked(noise_on):
    torch.manual_seed(0)
    G, D = build(ModelConfig(width=0.0625))
    seen, made = [], []
    D.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    G.register_forward_hook(lambda m, a, out: made.append(out.detach().clone()))
    nets = Nets(G, D, D, torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters()), 100)
    stats = train_step(torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8), nets,
                       LossConfig(noise_sigma_max=0.5, noise_on=noise_on), torch.Generator().manual_seed(1))
    d_fake, g_fake = seen[1] - made[0], seen[2] - made[0]  # D's passes: real, fake (D step), fake (G step)
    if noise_on == "real":
        assert torch.equal(d_fake, torch.zeros_like(d_fake)) and torch.equal(g_fake, torch.zeros_like(g_fake))
    else:
        sigma = float(stats["noise_sigma"])
        assert d_fake.std().item() == pytest.approx(sigma, rel=0.05) and g_fake.std().item() == pytest.approx(sigma, rel=0.05)
        assert not torch.equal(d_fake, g_fake)  # fresh noise for each pass
