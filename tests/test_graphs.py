"""perf.cuda_graphs on a machine without CUDA: what it refuses, and the warm-up undo that lets
a captured step start from exactly the eager state (the capture itself: benchmarks/graph_check.py
on a GPU)."""
import pytest
import torch

from gan.config import ConfigError, LossConfig, ModelConfig, load, validate
from gan.graphs import resolve, undone
from gan.models import build
from gan.perf import resolve as resolve_all
from gan.step import Nets, train_step

from tests.conftest import ROOT


def _nets():
    torch.manual_seed(0)
    G, D = build(ModelConfig(size=64, width=0.0625))
    return Nets(G, D, D, torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999)),
                torch.optim.Adam(D.parameters(), 4e-5, betas=(0.5, 0.999)), 100)


def _step(nets, images, seed):
    return train_step(images, nets, LossConfig(), torch.Generator().manual_seed(seed))


def _tensors(nets):
    return ([t.clone() for m in (nets.G, nets.D) for t in m.state_dict().values()],
            [v.clone() for o in (nets.opt_g, nets.opt_d) for s in o.state.values() for v in s.values()])


@pytest.mark.parametrize("trained_before", [0, 2])
def test_warmup_is_undone_in_place(trained_before):
    images = torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8)
    nets, twin = _nets(), _nets()
    for k in range(trained_before):  # resumed optimizer state exists before the warm-up
        _step(nets, images, k), _step(twin, images, k)
    params = [p for p in nets.G.parameters()]
    with undone(nets):
        for k in range(3):
            _step(nets, images, 100 + k)
    assert all(a is b for a, b in zip(params, nets.G.parameters()))  # written back, not replaced
    model, opt = _tensors(nets)
    model_t, opt_t = _tensors(twin)
    assert all(torch.equal(a, b) for a, b in zip(model, model_t))  # BN running stats included
    if trained_before:
        assert len(opt) == len(opt_t) and all(torch.equal(a, b) for a, b in zip(opt, opt_t))
    else:  # born in the warm-up: zeros, the state a fresh Adam starts from
        assert opt and all(not v.any() for v in opt) and not twin.opt_g.state
    # and the next real step is the eager one
    _step(nets, images, 7), _step(twin, images, 7)
    assert all(torch.equal(a, b) for a, b in zip(_tensors(nets)[0], _tensors(twin)[0]))


def test_a_replaced_parameter_is_an_error():
    nets = _nets()
    with pytest.raises(RuntimeError, match="replaced during the warm-up"):
        with undone(nets):
            nets.G.fc.weight = torch.nn.Parameter(nets.G.fc.weight.detach().clone())


def test_where_graphs_apply():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve("auto", cuda, 1, False) and not resolve("off", cuda, 1, False)
    assert not resolve("auto", cpu, 1, False)  # auto never errs: it turns off
    assert not resolve("auto", cuda, 2, False) and not resolve("auto", cuda, 1, True)
    for device, world, aug, needle in ((cpu, 1, False, "needs a CUDA device, this rank runs on cpu"),
                                       (cuda, 2, False, "is not supported with DDP"),
                                       (cuda, 1, True, "is not supported with loss.diffaug")):
        with pytest.raises(ValueError, match=f"perf.cuda_graphs=on {needle}"):
            resolve("on", device, world, aug)
    perf = load(ROOT / "configs" / "smoke.toml").perf
    assert not resolve_all(perf, cuda, world_size=2)["cuda_graphs"]


@pytest.mark.parametrize("overrides, needle", [
    (["--perf.cuda_graphs=on"], "perf.cuda_graphs: on needs scale.use_gpu=true"),
    (["--perf.cuda_graphs=on", "--scale.use_gpu=true"], "perf.cuda_graphs: on is not supported with DDP"),
    (["--perf.cuda_graphs=sometimes"], "perf.cuda_graphs: must be auto, on or off"),
])
def test_config_refuses_before_any_worker(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(load(ROOT / "configs" / "smoke.toml", overrides))
