"""Checkpoints written off the training thread: the state is the one at the report, whatever
the training does while it is written; a failed write is raised, not lost."""
import threading

import pytest
import torch
from torch import nn

import gan.context
from gan.checkpoint import load_state, save_state
from gan.report import Report
from gan.context import CHECKPOINT_FILE, LocalContext


def _state(net: nn.Module, opt: torch.optim.Optimizer, step: int) -> dict:
    return {"format": 1, "step": step, "G": net.state_dict(), "opt": opt.state_dict(), "note": ["a", (1, 2.5)]}


@pytest.fixture
def gated(monkeypatch):
    """save_state held until the test opens the gate; records which thread wrote."""
    gate, writers = threading.Event(), []

    def held(state, path):
        assert gate.wait(30), "the test never opened the gate"
        writers.append(threading.current_thread().name)
        save_state(state, path)

    monkeypatch.setattr(gan.context, "save_state", held)
    return gate, writers


def test_report_returns_before_the_write_and_the_file_holds_the_reported_state(tmp_path, gated):
    gate, writers = gated
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    opt = torch.optim.Adam(net.parameters())
    for _ in range(2):  # Adam state exists, as in a real checkpoint
        opt.zero_grad(), net(torch.randn(16, 4)).square().mean().backward(), opt.step()
    want = {k: v.clone() for k, v in net.state_dict().items()}
    want_avg = opt.state[net[0].weight]["exp_avg"].clone()

    ctx = LocalContext(tmp_path, resume=False)
    ctx.report(Report(7, {"loss": 1.0}, checkpoint=lambda: _state(net, opt, 7)))
    assert not (tmp_path / CHECKPOINT_FILE).exists()  # report did not wait for the write
    for _ in range(3):  # training goes on: parameters, BN buffers and Adam state change in place
        opt.zero_grad(), net(torch.randn(16, 4)).square().mean().backward(), opt.step()
    assert not torch.equal(net[0].weight, want["0.weight"])
    gate.set()
    ctx.flush()

    got = load_state(tmp_path / CHECKPOINT_FILE)
    assert writers == ["facegan-checkpoint"]
    assert got["step"] == 7 and got["note"] == ["a", (1, 2.5)]
    assert set(got["G"]) == set(want)
    for k, v in want.items():
        assert torch.equal(got["G"][k], v), k
    assert torch.equal(got["opt"]["state"][0]["exp_avg"], want_avg)


def test_one_write_in_flight_and_the_later_state_wins(tmp_path, gated):
    gate, writers = gated
    ctx = LocalContext(tmp_path, resume=False)
    ctx.report(Report(1, checkpoint=lambda: {"format": 1, "step": 1}))
    second = threading.Thread(target=ctx.report, args=(Report(2, checkpoint=lambda: {"format": 1, "step": 2}),))
    second.start()
    second.join(0.5)
    assert second.is_alive()  # the second checkpoint waits for the first write to end
    gate.set()
    second.join(30)
    ctx.flush()
    assert len(writers) == 2 and load_state(tmp_path / CHECKPOINT_FILE)["step"] == 2
    assert ctx.checkpoint_steps == [1, 2]


def test_a_failed_background_write_is_raised_at_flush_and_keeps_the_old_file(tmp_path):
    ctx = LocalContext(tmp_path, resume=False)
    ctx.report(Report(1, checkpoint=lambda: {"format": 1, "step": 1}))
    ctx.flush()
    # A state torch.save cannot pickle: the write fails in the background thread.
    ctx.report(Report(2, checkpoint=lambda: {"format": 1, "step": 2, "bad": lambda: None}))
    with pytest.raises(Exception, match="pickle|lambda"):
        ctx.flush()
    ctx.flush()  # raised once, not forever
    assert load_state(tmp_path / CHECKPOINT_FILE)["step"] == 1  # nothing half-written replaced it
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE, CHECKPOINT_FILE + ".sha256"]
