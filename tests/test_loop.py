"""The training loop on one process (LocalContext): resume is bit-exact."""
import torch

from gan.checkpoint import load_state
from gan.config import Config
from gan.context import CHECKPOINT_FILE, LocalContext
from compose import train_from_config


def _cfg(path, max_steps, ema=0.0):
    c = Config()
    c.data.path = str(path)
    c.model.width = 0.0625
    c.train.batch_size = 16
    c.train.max_steps = max_steps
    c.train.log_every = 3
    c.train.checkpoint_every = 1000
    c.train.ema_decay = ema
    c.scale.num_workers = 1
    return c


def test_resume_is_bit_exact(faces64, tmp_path):
    N = 20  # 512 faces / batch 16 = 32 steps an epoch: the resumed part crosses into epoch 2
    straight = LocalContext(tmp_path / "a", resume=False)
    train_from_config(_cfg(faces64, 2 * N + 30, ema=0.9), straight)
    first = LocalContext(tmp_path / "b", resume=False)
    train_from_config(_cfg(faces64, N, ema=0.9), first)
    second = LocalContext(tmp_path / "b", resume=True)
    res = train_from_config(_cfg(faces64, 2 * N + 30, ema=0.9), second)
    assert res.resumed_from == N and res.step == 2 * N + 30
    a, b = load_state(tmp_path / "a" / CHECKPOINT_FILE), load_state(tmp_path / "b" / CHECKPOINT_FILE)
    assert a["step"] == b["step"] == 2 * N + 30 and a["data"] == b["data"] and a["data"]["epoch"] >= 1
    for key in ("G", "D", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for key in ("opt_g", "opt_d"):
        sa, sb = a[key]["state"], b[key]["state"]
        assert all(torch.equal(sa[i][n], sb[i][n]) for i in sa for n in sa[i]), key
    # Metrics match the uninterrupted run's, step for step, once the logging window (3 steps)
    # lies wholly after the resume point (the first window after a resume is shorter).
    ha = {s: m for s, m in straight.history if s > N + 3 and "d_loss" in m}
    hb = {s: m for s, m in second.history if s > N + 3 and "d_loss" in m}
    assert ha.keys() == hb.keys() and all(ha[s]["d_loss"] == hb[s]["d_loss"] for s in ha)


def test_epoch_grids_and_final_checkpoint(faces64, tmp_path):
    ctx = LocalContext(tmp_path, resume=False)
    res = train_from_config(_cfg(faces64, 40), ctx)
    assert (tmp_path / "samples" / "epoch_001.png").is_file() and (tmp_path / "samples" / "final.png").is_file()
    assert (tmp_path / "samples" / "real.png").is_file()
    assert ctx.checkpoint_steps == [40] and res.step == 40
    assert [s for s, m in ctx.history if "d_loss" in m] == list(range(3, 40, 3)) + [40]
    st = load_state(tmp_path / CHECKPOINT_FILE)
    assert set(st) >= {"G", "D", "opt_g", "opt_d", "ema", "step", "rng", "data"}


def test_divergence_stops_before_anything_non_finite_is_saved(faces64, tmp_path):
    good = _cfg(faces64, 6)
    good.train.checkpoint_every = 6
    train_from_config(good, LocalContext(tmp_path, resume=False))
    before, grid = load_state(tmp_path / CHECKPOINT_FILE), (tmp_path / "samples" / "final.png").read_bytes()
    # The same run resumed with absurd learning rates: NaN within a window.
    bad = _cfg(faces64, 30)
    bad.train.checkpoint_every = 3
    bad.optim.lr_d = bad.optim.lr_g = 1e30
    ctx = LocalContext(tmp_path, resume=True)
    res = train_from_config(bad, ctx)
    assert res.step == 9 and "at step 9" in res.diverged and "last good checkpoint is step 6" in res.diverged
    assert "d_loss" in res.diverged and ctx.tags["facegan.failed_reason"] == res.diverged
    assert ctx.checkpoint_steps == [] and ctx.best_steps == []  # nothing written after step 6
    after = load_state(tmp_path / CHECKPOINT_FILE)
    assert after["step"] == 6 and all(torch.equal(before["G"][k], after["G"][k]) for k in before["G"])
    assert ctx.reports[-1].step == 9 and ctx.reports[-1].diverged == res.diverged  # a typed signal,
    assert all("diverged_at_step" not in m for _, m in ctx.history)  # not a metric key
    assert (tmp_path / "samples" / "final.png").read_bytes() == grid  # no grid of NaN faces


def test_damaged_checkpoints_fail_by_name(tmp_path):
    import pytest

    from gan.checkpoint import CheckpointError, save_state

    path = tmp_path / CHECKPOINT_FILE
    save_state({"format": 1, "w": torch.ones(1000)}, path)
    assert load_state(path)["w"].sum() == 1000
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit inside the tensor data: torch.load alone takes it
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{CHECKPOINT_FILE}: damaged \(sha256"):
        load_state(path)
    path.write_bytes(bytes(data[:100]))  # truncated, and no digest to compare with
    (tmp_path / f"{CHECKPOINT_FILE}.sha256").unlink()
    with pytest.raises(CheckpointError, match=rf"{CHECKPOINT_FILE}: unreadable as a checkpoint"):
        load_state(path)
