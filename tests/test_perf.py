"""The optimised training path computes what the plain eager path computes.

Each switch is forced on (they default to off on the CPU) and the real loop runs 8 steps
from the same seed as the all-off loop, logging every step. Tolerances (absolute, on losses
of ~0.3-1.5): fp32 layout/optimizer/compiler changes only reorder floating-point sums, so the
first step agrees to 1e-4 and, as GAN updates compound the differences, all 8 to 5e-3; bf16
autocast rounds activations to 8 mantissa bits (~0.4% per op): 0.02 and 0.05.
"""
import pytest
import torch

from gan.config import Config
from gan.context import LocalContext
from compose import train_from_config
from gan.perf import SWITCHES, resolve

STEPS = 8


def _losses(faces, tmp_path, **switches):
    c = Config()
    c.data.path, c.model.width = str(faces), 0.0625
    c.train.batch_size, c.train.max_steps, c.train.log_every = 16, STEPS, 1
    c.scale.num_workers = 1
    for name in SWITCHES:
        setattr(c.perf, name, switches.get(name, "off"))
    ctx = LocalContext(tmp_path / "_".join(sorted(switches)) if switches else tmp_path / "base", resume=False)
    train_from_config(c, ctx)
    return [(m["d_loss"], m["g_loss"]) for _, m in ctx.history if "d_loss" in m]


@pytest.fixture(scope="module")
def baseline(faces64, tmp_path_factory):
    return _losses(faces64, tmp_path_factory.mktemp("perf"))


def _worst(a, b):
    return max(abs(x - y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


@pytest.mark.parametrize("switch, first_tol, tol", [("channels_last", 1e-4, 5e-3), ("fused_adam", 1e-4, 5e-3),
                                                    ("compile", 1e-4, 5e-3), ("bf16", 0.02, 0.05)])
def test_switch_matches_eager(baseline, faces64, tmp_path, switch, first_tol, tol):
    got = _losses(faces64, tmp_path, **{switch: "on"})
    assert len(got) == len(baseline) == STEPS
    assert _worst(got[:1], baseline[:1]) <= first_tol, f"{switch}: first step"
    worst = _worst(got, baseline)
    assert worst <= tol, f"{switch}: max |Δloss| {worst:.2e} > {tol}"
    if switch == "bf16":
        assert worst > 0  # the switch really changed the arithmetic


def test_all_on_still_learns_like_eager(baseline, faces64, tmp_path):
    got = _losses(faces64, tmp_path, **{s: "on" for s in SWITCHES if s not in ("compile", "cuda_graphs")})
    assert _worst(got, baseline) <= 0.05


def test_auto_means_on_for_cuda_off_for_cpu():
    perf = Config().perf
    assert not any(resolve(perf, torch.device("cpu")).values())
    on_cuda = resolve(perf, torch.device("cuda", 0))
    assert all(on_cuda.values())  # cuda_graphs included: one CUDA process, no diffaug
    assert not resolve(perf, torch.device("cuda", 0), world_size=2)["cuda_graphs"]  # DDP: auto is off
