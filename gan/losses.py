"""GAN losses as pure functions: tensors in, ``(loss, stats)`` out; no optimizer, no randomness.

Stats are detached tensors, never Python numbers, so that the hot loop does not sync with
the device; the loop reduces them every ``log_every`` steps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor,
           real_labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The seed's D loss: ½·(BCE(D(x+ε), y_real) + BCE(D(G(z)), 0)), labels already smoothed."""
    real = F.binary_cross_entropy_with_logits(real_logits, real_labels)
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    loss = 0.5 * (real + fake)
    return loss, {
        "d_loss": loss.detach(),
        "d_real": torch.sigmoid(real_logits.detach()).mean(),
        "d_fake": torch.sigmoid(fake_logits.detach()).mean(),
    }


def g_loss(fake_logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Non-saturating G loss: BCE(D(G(z)), 1)."""
    loss = F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    return loss, {"g_loss": loss.detach()}


def d_hinge(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Hinge D loss: E[relu(1 − D(x))] + E[relu(1 + D(G(z)))] (SAGAN, BigGAN)."""
    loss = F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return loss, {
        "d_loss": loss.detach(),
        "d_real": torch.sigmoid(real_logits.detach()).mean(),
        "d_fake": torch.sigmoid(fake_logits.detach()).mean(),
    }


def g_hinge(fake_logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Hinge G loss: −E[D(G(z))]."""
    loss = -fake_logits.mean()
    return loss, {"g_loss": loss.detach()}


def r1(real_logits: torch.Tensor, real_in: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """R1 (Mescheder et al. 2018): E‖∇ₓD(x)‖² on real faces, with the graph kept so that the
    penalty's gradient reaches D's weights. ``real_in`` is the leaf D saw (requires_grad)."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real_in, create_graph=True)
    penalty = grad.square().sum(dim=(1, 2, 3)).mean()
    return penalty, {"r1_penalty": penalty.detach()}
