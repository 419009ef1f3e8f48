"""One well-defined generator (EMA after resume, BN statistics recomputed and averaged), training
health, and the memorization audit's calibration on real CelebA faces."""
from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from gan import bn
from gan.checkpoint import load_state
from gan.config import Config, ModelConfig
from gan.context import CHECKPOINT_FILE, LocalContext
from gan.health import Health
from compose import train_from_config
from gan.models import Generator, sample_z
from jobs import audit as audit_job


def _cfg(path, steps, ema=0.0):
    c = Config()
    c.data.path, c.model.width = str(path), 0.0625
    c.train.batch_size, c.train.max_steps, c.train.log_every, c.train.checkpoint_every = 16, steps, 5, 1000
    c.train.ema_decay, c.scale.num_workers = ema, 1
    return c


def test_ema_turned_on_at_resume_starts_from_the_trained_weights(faces64, tmp_path):
    train_from_config(_cfg(faces64, 10), LocalContext(tmp_path, resume=False))
    g10 = load_state(tmp_path / CHECKPOINT_FILE)["G"]
    train_from_config(_cfg(faces64, 11, ema=0.5), LocalContext(tmp_path, resume=True))
    state = load_state(tmp_path / CHECKPOINT_FILE)
    # One update with decay 0.5 from the loaded weights: ema = (G_10 + G_11) / 2, exactly so.
    for name, p in Generator(ModelConfig(width=0.0625)).named_parameters():
        want = (g10[name] + state["G"][name]) / 2
        assert torch.allclose(state["ema"][name], want, atol=1e-7), name


def test_recalibrated_bn_statistics_are_the_ema_own():
    torch.manual_seed(0)
    G = Generator(ModelConfig(width=0.0625))
    with torch.no_grad():  # statistics from other weights, as the live generator's would be
        for b in G.buffers():
            if b.is_floating_point():
                b.fill_(3.0)
    bn.recalibrate(G, 100, seed=7, batches=4, batch_size=32)
    first = G.body[1]
    # The exact mean of the first BN layer's inputs over the same 4 batches.
    gen, seen = torch.Generator().manual_seed(7), []
    handle = first.register_forward_hook(lambda m, i, o: seen.append(i[0].mean(dim=(0, 2, 3))))
    G.train()
    with torch.no_grad():
        for _ in range(4):
            G(sample_z(32, 100, gen))
    handle.remove()
    assert torch.allclose(first.running_mean, torch.stack(seen[:4]).mean(0), atol=1e-5)
    assert first.momentum == 0.1 or first.momentum == ModelConfig().bn_momentum  # restored


def test_average_buffers_takes_the_mean_over_ranks():
    net = nn.BatchNorm2d(3)
    net.running_mean.fill_(2.0)
    bn.average_buffers(net, lambda t: t / 2)  # a 'world' whose other rank holds zeros
    assert torch.equal(net.running_mean, torch.ones(3)) and net.num_batches_tracked.dtype == torch.long


def test_health_metrics_every_window_and_flags(faces64, tmp_path):
    ctx = LocalContext(tmp_path, resume=False)
    c = _cfg(faces64, 10)
    c.eval.real_path = str(faces64.parent / "val")
    train_from_config(c, ctx)
    logged = [m for _, m in ctx.history if "d_loss" in m]
    keys = {"g_grad_norm", "d_grad_norm", "diversity", "d_score_train", "d_score_heldout", "d_overfit_gap"}
    assert logged and all(keys <= set(m) for m in logged)
    assert all(m["g_grad_norm"] > 0 and m["d_grad_norm"] > 0 for m in logged)
    faces = np.random.default_rng(0).integers(0, 256, (64, 64, 64, 3), dtype=np.uint8)
    health = Health(faces, faces[::-1].copy(), torch.device("cpu"))
    G, D = Generator(ModelConfig(width=0.0625)).eval(), _Const((8,))
    z = sample_z(64, 100, torch.Generator().manual_seed(0))
    out, flags = health(G, D, z, {"d_fake": 0.5}, 5)
    assert flags == {} and 0 < out["diversity"] and out["d_score_train"] == 0.5
    health.peak_diversity = 1.0  # it had variety once, and now draws one face
    _, flags = health(_Const((3, 64, 64)), D, z, {"d_fake": 0.001}, 6)
    assert set(flags) == {"d_wins", "collapse"} and "step 6" in flags["collapse"]
    _, again = health(_Const((3, 64, 64)), D, z, {"d_fake": 0.001}, 7)
    assert again == {}  # each flag is raised once


class _Const(nn.Module):
    """Zeros of a shape per input row: a collapsed G, or a D that cannot tell (logit 0)."""

    def __init__(self, shape):
        super().__init__()
        self.shape = shape

    def forward(self, x):
        out = torch.zeros(len(x), *self.shape)
        return out if len(self.shape) > 1 else out[:, 0]


def test_audit_run_config_ignores_derived_sweep_params():
    cfg = audit_job.run_config({"optim.lr_g": "0.001", "optim.lr_ratio": "2.0", "loss.real_label_hi_frac": "0.5",
                                "eval.extractor": "pixels"})
    assert cfg.optim.lr_g == 0.001 and cfg.eval.extractor == "pixels"


def _audit(capsys, celeba64, fake, heldout="val", n=500, extra=()):
    rc = audit_job.main(["--model", str(fake), "--train", str(celeba64 / "train"), "--heldout",
                         str(celeba64 / heldout), "--n", str(n), "--extractor", "pixels", "--device", "cpu",
                         "--cache", str(celeba64 / "cache"), *extra])
    out, err = capsys.readouterr()
    return rc, (json.loads(out.strip().splitlines()[-1]) if rc in (0, 1) else err)


def test_audit_calibration_on_celeba(celeba64, capsys, tmp_path):
    """Every one of the 4,560 training faces searched: training photos given as samples are all
    flagged; photos of people never trained on are not (about the 1st percentile)."""
    rc, copies = _audit(capsys, celeba64, celeba64 / "train", extra=("--out", str(tmp_path)))
    assert rc == 1 and copies["flagged"] and copies["fraction_memorized"] == 1.0
    assert copies["n_train"] == 4560 and copies["n_heldout"] == 780
    assert (tmp_path / "closest_pairs.png").is_file() and (tmp_path / "summary.json").is_file()
    rc, unseen = _audit(capsys, celeba64, celeba64 / "test", n=660)
    assert rc == 0 and not unseen["flagged"]
    assert unseen["fraction_memorized"] <= 0.05 and unseen["heldout_fraction"] <= 0.05
    # Held-out faces that are the training faces: refused, in one line.
    rc, err = _audit(capsys, celeba64, celeba64 / "test", heldout="train")
    assert rc == 2 and "held-out rows are training rows" in err and len(err.strip().splitlines()) == 1


def test_ema_warms_up_like_tensorflow():
    from gan.step import update_ema

    ema, live = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        ema.weight.fill_(0.0)
        live.weight.fill_(1.0)
    update_ema(ema, live, 0.999, step=0)  # decay min(0.999, 1/10): mostly the live weights
    assert torch.allclose(ema.weight, torch.full((2, 2), 0.9))
    update_ema(ema, live, 0.999, step=10**6)  # late: the configured decay
    assert torch.allclose(ema.weight, torch.full((2, 2), 0.9 + 0.1 * 0.001))
