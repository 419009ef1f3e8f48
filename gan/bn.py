"""One well-defined generator: BatchNorm running statistics that fit the weights published.

Under DDP each rank keeps its own BN running statistics (``broadcast_buffers=False``, see
gan/context.py), so before anything is evaluated, sampled, checkpointed or published the loop
averages every floating buffer over the ranks: all ranks then hold the same model, and the FID
that is logged is that of the generator in MLflow.

The generator EMA averages weights, not statistics: the live generator's running statistics do
not fit the EMA's weights (copying them gave FID 337 against 163 on the CPU quality protocol).
So the EMA's statistics are recomputed from its own activations ("standing statistics",
BigGAN): ``batches`` forward passes in train mode on fresh latents, with a cumulative average
(momentum None), seeded from the step so that a resumed run recomputes the same values.
"""
from __future__ import annotations

import torch
from torch import nn

from gan.models import sample_z


def average_buffers(module: nn.Module, mean) -> None:
    """Every floating buffer set to its mean over the ranks (``mean`` is Context.mean)."""
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    if not bufs:
        return
    flat = mean(torch.cat([b.detach().reshape(-1).float() for b in bufs]))
    for b, v in zip(bufs, flat.split([b.numel() for b in bufs])):
        b.copy_(v.view_as(b))


@torch.no_grad()
def recalibrate(G: nn.Module, z_dim: int, seed: int, batches: int = 8, batch_size: int = 64) -> None:
    """Recomputes G's BN running statistics from ``batches`` batches of its own activations."""
    bns = [m for m in G.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    device = next(G.parameters()).device
    was, momenta = G.training, [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the exact mean over the batches
    G.train()
    gen = torch.Generator(device=device).manual_seed(seed)
    for _ in range(batches):
        G(sample_z(batch_size, z_dim, gen, device))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    G.train(was)
