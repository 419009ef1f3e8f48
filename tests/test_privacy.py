"""Differentially private D (gan/privacy.py, datasets/poisson.py), the publishing guard and the
privacy cap (gan/state.py), on the training core (LocalContext) and through jobs.train."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from compose import train_from_config
from datasets.poisson import PoissonBatches
from gan.checkpoint import load_state
from gan.config import Config, ConfigError, validate
from gan.context import CHECKPOINT_FILE, LocalContext
from gan.state import TrainState
from tests.conftest import ROOT

opacus = pytest.importorskip("opacus")
from opacus.accountants import RDPAccountant  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402


def _cfg(path, max_steps, epsilon=4.0, checkpoint_every=1000):
    c = Config()
    c.data.path = str(path)
    c.model.width = 0.0625
    c.model.d_norm = "none"
    c.train.batch_size = 16
    c.train.max_steps = max_steps
    c.train.log_every = 5
    c.train.checkpoint_every = checkpoint_every
    c.scale.num_workers = 1
    c.privacy.dp_epsilon = epsilon
    return validate(c)


def _opacus_epsilon(target: float, delta: float, q: float, planned: int, done: int) -> float:
    """What Opacus itself says: σ for the target over the planned steps, then ε after ``done``."""
    sigma = get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=planned,
                                 accountant="rdp")
    acc = RDPAccountant()
    acc.history = [(sigma, q, done)]
    return acc.get_epsilon(delta)


def test_accountant_epsilon_is_opacus_for_the_configured_noise_and_steps(faces64, tmp_path):
    ctx = LocalContext(tmp_path, resume=False)
    res = train_from_config(_cfg(faces64, 20), ctx)
    q, delta = 16 / 512, 1 / 512  # batch / N, and δ = 1/N by default
    assert res.step == 20
    assert res.epsilon == pytest.approx(_opacus_epsilon(4.0, delta, q, 20, 20), rel=1e-9)
    assert 3.9 <= res.epsilon <= 4.0  # the target is what the whole run spends (Opacus's 1% tolerance)
    # Logged at every log step, as the accountant stood then; rising.
    logged = [(s, m["dp_epsilon"]) for s, m in ctx.history if "dp_epsilon" in m]
    assert [s for s, _ in logged] == [5, 10, 15, 20]
    for s, eps in logged:
        assert eps == pytest.approx(_opacus_epsilon(4.0, delta, q, 20, s), rel=1e-9)
    assert [e for _, e in logged] == sorted(e for _, e in logged)
    assert "differential privacy" in ctx.tags["facegan.privacy"] and f"ε = {res.epsilon:.4g} spent" in ctx.tags["facegan.privacy"]
    state = load_state(tmp_path / CHECKPOINT_FILE)
    assert state["privacy"]["accountant"]["history"] == [(pytest.approx(state["privacy"]["noise_multiplier"]), q, 20)]


def test_d_update_is_clipped_and_noised(faces64, tmp_path):
    """One DP step's update of D: per-face gradients clipped to C, summed, N(0, σ²C²) added, over
    the expected batch. With a huge C nothing is clipped and the update is the plain mean
    gradient plus noise; the noise's spread is σC/B as Opacus's formula says."""
    from gan.privacy import DPTraining

    cfg = _cfg(faces64, 1, epsilon=1.0)
    D = TrainState(cfg, torch.device("cpu")).D
    x = torch.randn(16, 3, 64, 64)
    dp = DPTraining(cfg.privacy, 512, 16 / 512, 100)
    deltas = []
    for seed in range(2):
        D2 = TrainState(cfg, torch.device("cpu")).D  # the same initial weights (train.seed)
        opt = torch.optim.SGD(D2.parameters(), lr=1.0)
        gsm, dpo = dp.wrap(D2, opt, 16.0, 1, noise=torch.Generator().manual_seed(seed))
        dpo.zero_grad(set_to_none=True)
        gsm(x).mean().backward()
        dpo.step()
        deltas.append(torch.cat([(p0 - p1).flatten() for p0, p1 in zip(D.parameters(), D2.parameters())]))
    noise = deltas[0] - deltas[1]  # the same clipped gradient, two noise draws
    expected = dp.noise_multiplier * cfg.privacy.dp_max_grad_norm / 16 * 2 ** 0.5
    assert noise.std().item() == pytest.approx(expected, rel=0.05)
    assert dp.accountant.history[-1][:2] == (dp.noise_multiplier, 16 / 512)


def test_resume_continues_the_accountant(faces64, tmp_path):
    straight = train_from_config(_cfg(faces64, 24, checkpoint_every=12), LocalContext(tmp_path / "a", resume=False))
    # The same run, stopped after its step-12 checkpoint (a preemption), then resumed.
    cut = LocalContext(tmp_path / "b", resume=False)
    cut.should_stop = lambda: 12 in cut.checkpoint_steps
    assert train_from_config(_cfg(faces64, 24, checkpoint_every=12), cut).step == 12
    half = load_state(tmp_path / "b" / CHECKPOINT_FILE)
    assert [h[2] for h in half["privacy"]["accountant"]["history"]] == [12]
    res = train_from_config(_cfg(faces64, 24, checkpoint_every=12), LocalContext(tmp_path / "b", resume=True))
    assert res.resumed_from == 12 and res.step == 24
    assert res.epsilon == pytest.approx(straight.epsilon, rel=1e-12)
    end = load_state(tmp_path / "b" / CHECKPOINT_FILE)
    assert sum(h[2] for h in end["privacy"]["accountant"]["history"]) == 24
    # Poisson draws and noise come from (seed, rank, epoch/step): the resumed run is the same run.
    ref = load_state(tmp_path / "a" / CHECKPOINT_FILE)
    assert all(torch.equal(ref["D"][k], end["D"][k]) for k in ref["D"])
    # Another privacy setting cannot continue it: its earlier steps were spent at other noise.
    with pytest.raises(ValueError, match="differs from this config"):
        train_from_config(_cfg(faces64, 24, epsilon=8.0, checkpoint_every=12), LocalContext(tmp_path / "b", resume=True))


def test_poisson_batches_are_poisson_and_resumable(faces64):
    src = PoissonBatches(str(faces64), 0, 1, 32, seed=3)
    assert src.sample_rate == 32 / 512 and src.steps_in_epoch(0) == 16 and src.expected_batch == 32
    sizes = [len(x) for _, _, x in src.stream(0, 0, 4)]
    assert len(sizes) == 64 and len(set(sizes)) > 5  # the batch size varies
    assert abs(np.mean(sizes) - 32) < 4 and 15 < np.var(sizes) < 60  # Poisson-like: variance ≈ mean
    whole = [(e, b, x) for e, b, x in src.stream(0, 0, 2)]
    tail = [(e, b, x) for e, b, x in src.stream(1, 5, 2)]
    assert [(e, b) for e, b, _ in tail] == [(e, b) for e, b, _ in whole if (e, b) >= (1, 5)]
    assert all(torch.equal(x, y) for (_, _, x), (_, _, y) in zip(tail, whole[16 + 5:]))
    # Two ranks: disjoint shares whose rates add up to one Poisson batch of the whole set.
    r0, r1 = PoissonBatches(str(faces64), 0, 2, 32), PoissonBatches(str(faces64), 1, 2, 32)
    assert len(r0.faces) + len(r1.faces) == 512 and r0.expected_batch == r1.expected_batch == 16


def test_batchnorm_d_and_other_unaccountable_settings_are_refused():
    c = Config()
    c.privacy.dp_epsilon = 1.0
    with pytest.raises(ConfigError, match="model.d_norm=batch.*set model.d_norm=none"):
        validate(c)
    c.model.d_norm = "none"
    c.loss.diffaug, c.loss.ada_target = "color", 0.6
    with pytest.raises(ConfigError, match="ada_target"):
        validate(c)
    c.loss.ada_target = 0.0
    c.train.batch_size, c.scale.num_workers = 16, 2
    with pytest.raises(ConfigError, match=">= 16 faces per worker"):
        validate(c)


def test_batchnorm_d_is_refused_in_one_line_before_ray_starts(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jobs.train", "--config", "configs/smoke.toml",
                           "--model.d_norm=batch", "--loss.r1_gamma=0", "--privacy.dp_epsilon=1",
                           f"--run.storage_path={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PATH": "/usr/bin:/bin",
                               "RAY_ADDRESS": ""})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: privacy.dp_epsilon: D has BatchNorm (model.d_norm=batch), which mixes the faces of a batch, so no "
        "face has a gradient of its own to clip; set model.d_norm=none"]
    assert "Ray" not in proc.stdout + proc.stderr and not (tmp_path / "mlflow.db").exists()


def test_the_privacy_cap_keeps_a_generator_from_being_the_best(faces64):
    cfg = Config()
    cfg.eval.max_identity_auc = 0.7
    s = TrainState(cfg, torch.device("cpu"))
    s.step = 10
    assert not s.record({"fid": 50.0, "kid": 0.1, "identity_auc": 0.9})
    assert s.best is None and "identity_auc 0.900 is over eval.max_identity_auc 0.7" in s.over_cap["why"]
    assert not s.record({"fid": 40.0, "kid": 0.1})  # no identity score: not trusted to be under the cap
    s.step = 20
    assert s.record({"fid": 60.0, "kid": 0.1, "identity_auc": 0.65})
    assert s.best == {"metric": "fid", "value": 60.0, "step": 20}
    assert not s.record({"fid": 30.0, "kid": 0.1, "identity_auc": 0.71})  # better FID, over the cap
    assert s.best["value"] == 60.0
