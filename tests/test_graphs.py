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
    (["--perf.cuda_graphs=on", "--scale.use_gpu=true", "--scale.num_workers=2"], "perf.cuda_graphs: on is not supported with DDP"),
    (["--perf.cuda_graphs=sometimes"], "perf.cuda_graphs: must be auto, on or off"),
])
def test_config_refuses_before_any_worker(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(load(ROOT / "configs" / "smoke.toml", overrides))


class _Replayer:
    """A stand-in for a captured CUDA graph on a CPU: replay() runs the step into the static
    outputs. ``stale``: with the random numbers of the capture (a graph that baked them in);
    ``no_bn``: without the BN buffer updates (a graph that missed them)."""

    def __init__(self, step, static_in, gen, out, stale=False, no_bn=False, nets=None):
        self.step, self.static_in, self.gen, self.out = step, static_in, gen, out
        self.capture_seed, self.stale, self.no_bn, self.nets = gen.initial_seed(), stale, no_bn, nets

    def replay(self):
        if self.stale:
            self.gen.manual_seed(self.capture_seed)
        bufs = [b for m in (self.nets.G, self.nets.D) for b in m.buffers()]
        kept = [b.clone() for b in bufs]
        self.out.clear()
        self.out.update(self.step(self.static_in))
        if self.no_bn:
            with torch.no_grad():
                for b, v in zip(bufs, kept):
                    b.copy_(v)


def _graphed(nets, **bad):
    import functools

    from gan.graphs import GraphedStep

    gen = torch.Generator()
    step = functools.partial(train_step, nets=nets, cfg=LossConfig(), gen=gen)

    class OnCpu(GraphedStep):  # everything but the CUDA capture itself (_record) is the real class
        def _record(self, seed):
            with undone(self.nets):  # the warm-up, undone, as the real capture does
                gen.manual_seed(seed)
                self.step(self.static_in)
            gen.manual_seed(seed)
            out = {}
            return _Replayer(self.step, self.static_in, gen, out, nets=self.nets, **bad), out

    return OnCpu(step, nets, gen), gen


@pytest.mark.parametrize("bad", [{}, {"stale": True}, {"no_bn": True}])
def test_the_first_step_checks_the_graph_against_the_eager_step(bad, capsys):
    """A faithful graph is kept; one with baked-in random numbers or without the BN updates is
    caught on the first step, which then equals the eager step bit for bit, as do the next."""
    batches = [torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(k))
               for k in range(3)]
    nets, twin = _nets(), _nets()
    run, gen = _graphed(nets, **bad)
    for k, x in enumerate(batches):
        gen.manual_seed(1000 + k)
        got = run(x)
        want = _step(twin, x, 1000 + k)
        assert torch.equal(got["d_loss"], want["d_loss"]), k
        for a, b in zip(_tensors(nets)[0] + _tensors(nets)[1], _tensors(twin)[0] + _tensors(twin)[1]):
            assert torch.equal(a, b), k
    printed = capsys.readouterr().out
    if bad:
        assert run.checked_gap > 0.5 and run.error.startswith("the graphed step differs from the eager one (gap ")
        assert printed.count("facegan: perf.cuda_graphs: the graphed step differs") == 1
    else:
        assert run.checked_gap == 0.0 and run.error == "" and printed == ""


def test_gap_is_relative_to_the_step():
    from gan.graphs import gap

    before = [torch.zeros(1000)]
    eager = [torch.full((1000,), 1e-4)]  # an Adam first step: every element moves by lr
    flipped = [eager[0].clone()]
    flipped[0][:3] *= -1  # three signs flipped at near-zero gradients: rounding, not a wrong graph
    assert gap(before, eager, eager) == 0.0
    assert gap(before, eager, flipped) == pytest.approx((3 * 4 / 1000) ** 0.5)
    assert gap(before, eager, before) == pytest.approx(1.0)  # a step that did nothing
    assert gap(before, before, before) == 0.0 and gap(before, before, eager) == float("inf")
