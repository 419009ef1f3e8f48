import pytest
import torch
import torch.nn.functional as F

from gan.config import LossConfig, ModelConfig
from gan.losses import d_loss, g_loss
from gan.models import build, sample_z
from gan.step import Nets, augment_real, d_step, g_step, real_labels, train_step


def _nets(width=0.0625):
    torch.manual_seed(0)
    G, D = build(ModelConfig(size=64, width=width))
    return Nets(G, D, D, torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999)),
                torch.optim.Adam(D.parameters(), 4e-5, betas=(0.5, 0.999)), 100)


def _snapshot(m):
    return [p.detach().clone() for p in m.parameters()]


def _changed(before, m):
    return [not torch.equal(a, b) for a, b in zip(before, m.parameters())]


def test_d_loss_is_the_seed_formula():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    y = torch.tensor([0.95, 0.9])
    loss, stats = d_loss(real, fake, y)
    expect = 0.5 * (F.binary_cross_entropy_with_logits(real, y) + F.binary_cross_entropy_with_logits(fake, torch.zeros(2)))
    assert torch.allclose(loss, expect)
    assert torch.allclose(stats["d_real"], torch.sigmoid(real).mean())
    assert torch.allclose(stats["d_fake"], torch.sigmoid(fake).mean())
    gl, _ = g_loss(fake)
    assert torch.allclose(gl, F.binary_cross_entropy_with_logits(fake, torch.ones(2)))
    assert not stats["d_loss"].requires_grad


@pytest.mark.parametrize("lo, hi, smax", [(0.9, 1.0, 0.1), (0.7, 0.8, 0.5), (1.0, 1.0, 0.0)])
def test_labels_and_noise_stay_in_their_ranges(lo, hi, smax):
    cfg = LossConfig(real_label_lo=lo, real_label_hi=hi, noise_sigma_max=smax)
    gen = torch.Generator().manual_seed(1)
    sigmas = []
    for _ in range(200):
        y = real_labels(64, cfg, gen, "cpu")
        assert lo <= y.min() and y.max() <= hi
        x = torch.zeros(4, 3, 8, 8)
        noisy, st = augment_real(x, cfg, gen)
        sigmas.append(float(st["noise_sigma"]))
        assert 0 <= st["noise_sigma"] <= smax
        if smax == 0:
            assert torch.equal(noisy, x)
    if smax > 0:  # σ is drawn per step, not once per run
        assert len(set(sigmas)) > 100 and max(sigmas) > 0.8 * smax


def test_flips_are_horizontal_and_random():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float).reshape(2, 3, 4, 4).repeat(16, 1, 1, 1)
    out, _ = augment_real(x, LossConfig(noise_sigma_max=0.0), torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, xi.flip(2)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and 0 < sum(flipped) < len(x)


def test_d_step_changes_only_d_and_g_step_only_g():
    nets = _nets()
    x = torch.rand(8, 3, 64, 64) * 2 - 1
    fake = nets.G(sample_z(8, 100))
    g0, d0 = _snapshot(nets.G), _snapshot(nets.D)
    d_step(x, fake, torch.full((8,), 0.95), nets)
    assert not any(_changed(g0, nets.G)) and all(_changed(d0, nets.D))
    d1 = _snapshot(nets.D)
    nets.opt_d.zero_grad(set_to_none=True)
    g_step(fake, nets)
    assert not any(_changed(d1, nets.D)) and all(_changed(g0, nets.G))
    assert all(p.grad is None for p in nets.D.parameters())  # D's weight grads never computed


def test_train_step_is_replayable_and_returns_detached_stats():
    images = torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8)
    outs = []
    for _ in range(2):
        nets = _nets()
        stats = train_step(images, nets, LossConfig(), torch.Generator().manual_seed(5))
        outs.append((stats, _snapshot(nets.G)))
    (s1, g1), (s2, g2) = outs
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert {"d_loss", "g_loss", "d_real", "d_fake", "noise_sigma"} <= set(s1)
    assert not any(v.requires_grad for v in s1.values())


def _r1_rank(rank: int, world: int, init: str, out: str) -> None:
    """One rank of a gloo group: D (no BN) wrapped in DDP, one d_step with R1 on this rank's half
    of the batch; rank 0 saves D's weights after the SGD step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        G, D, x, fake = _r1_problem()
        half = x.shape[0] // world
        part = slice(rank * half, (rank + 1) * half)
        nets = Nets(G, DDP(D, broadcast_buffers=False), D, torch.optim.SGD(G.parameters(), 1.0),
                    torch.optim.SGD(D.parameters(), 1.0), 100)
        d_step(x[part], fake[part], torch.ones(half), nets, r1_weight=1e4)
        if rank == 0:
            torch.save(D.state_dict(), out)
    finally:
        dist.destroy_process_group()


def _r1_problem():
    torch.manual_seed(0)
    G, D = build(ModelConfig(size=64, width=0.0625, d_norm="none"))
    x = torch.rand(8, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        fake = G(sample_z(8, 100))
    return G, D, x, fake


def test_r1_through_ddp_gives_the_mean_of_the_ranks_gradients(tmp_path):
    """R1 differentiates D twice; through DDP on 2 ranks the step must equal one process
    averaging the two halves' gradients (penalty included), as data parallelism promises."""
    import torch.multiprocessing as mp

    out = tmp_path / "d.pt"
    mp.spawn(_r1_rank, args=(2, f"file://{tmp_path / 'pg'}", str(out)), nprocs=2)
    ddp = torch.load(out)

    def one_process(r1_weight):
        G, D, x, fake = _r1_problem()
        opt = torch.optim.SGD(D.parameters(), 1.0)
        grads = []
        for part in (slice(0, 4), slice(4, 8)):
            nets = Nets(G, D, D, torch.optim.SGD(G.parameters(), 1.0), opt, 100)
            opt.zero_grad(set_to_none=True)
            real_in = x[part].clone().requires_grad_(True)
            real, fk = D(real_in), D(fake[part])
            loss, _ = d_loss(real, fk, torch.ones(4))
            if r1_weight:
                (g,) = torch.autograd.grad(real.sum(), real_in, create_graph=True)
                loss = loss + r1_weight * g.square().sum(dim=(1, 2, 3)).mean()
            loss.backward()
            grads.append([p.grad.clone() for p in D.parameters()])
            del nets
        with torch.no_grad():
            for p, a, b in zip(D.parameters(), *grads):
                p -= (a + b) / 2
        return D.state_dict()

    ref, without_r1 = one_process(1e4), one_process(0.0)
    assert ddp.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ddp[k], ref[k], rtol=1e-4, atol=1e-6)
    # The penalty mattered: without it the step lands elsewhere.
    assert any(not torch.allclose(without_r1[k], ref[k], rtol=1e-3, atol=1e-5) for k in ref)
