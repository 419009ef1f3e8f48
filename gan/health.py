"""Training health, every log window: what the second seed warns about, as numbers and flags.

- ``g_grad_norm``/``d_grad_norm`` (from the step): exploding or vanishing updates.
- ``d_score_train``/``d_score_heldout``: D's mean score (sigmoid) on a fixed batch of training
  faces and of held-out faces, and ``d_overfit_gap`` = train - held-out. A discriminator that
  memorises its training set scores those faces higher than unseen real ones (the signal ADA
  adapts on); a gap near 0 means D still generalises.
- ``diversity``: mean pairwise distance of the fixed-z samples (16x16, eval mode) divided by that
  of the fixed training batch: ~1 is as varied as the data, near 0 is a collapse to copies.
- Flags (a log line on rank 0 and the MLflow tag ``facegan.health.<flag>``, each the first time it is
  raised): ``d_wins`` when the window's mean D(G(z)) is below ``D_WINS`` (G gets no gradient to
  learn from); ``collapse`` when diversity falls below ``COLLAPSE`` after having been above
  twice that (an untrained generator's samples are all alike; that is not a collapse).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gan.step import to_unit_range

D_WINS = 0.01
COLLAPSE = 0.2
PROBE = 64


def _pairwise(x: torch.Tensor) -> torch.Tensor:
    small = F.adaptive_avg_pool2d(x.float(), 16).flatten(1)
    d = torch.cdist(small, small)
    n = len(small)
    return d.sum() / (n * (n - 1))


class Health:
    def __init__(self, train_u8, heldout_u8, device):
        """``train_u8``/``heldout_u8``: fixed uint8 NHWC batches (held-out may be None)."""
        self.train = to_unit_range(torch.from_numpy(train_u8[:PROBE]).to(device))
        self.heldout = None if heldout_u8 is None else to_unit_range(torch.from_numpy(heldout_u8[:PROBE]).to(device))
        self.real_spread = _pairwise(self.train)
        self.peak_diversity, self.raised = 0.0, set()

    @torch.no_grad()
    def _d_score(self, D: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """D's mean score as in training (train mode: batch statistics), its buffers untouched."""
        saved = [b.clone() for b in D.buffers()]
        was = D.training
        D.train()
        score = torch.sigmoid(D(x).float()).mean()
        for b, s in zip(D.buffers(), saved):
            b.copy_(s)
        D.train(was)
        return score

    @torch.no_grad()
    def __call__(self, G: nn.Module, D: nn.Module, z: torch.Tensor, window: dict[str, float], step: int):
        """Metrics for this window, and the flags raised (name -> message)."""
        was = G.training
        G.eval()
        diversity = float(_pairwise(G(z)) / self.real_spread)
        G.train(was)
        out = {"diversity": diversity, "d_score_train": float(self._d_score(D, self.train))}
        if self.heldout is not None:
            out["d_score_heldout"] = float(self._d_score(D, self.heldout))
            out["d_overfit_gap"] = out["d_score_train"] - out["d_score_heldout"]
        self.peak_diversity = max(self.peak_diversity, diversity)
        flags = {}
        if window.get("d_fake", 1.0) < D_WINS:
            flags["d_wins"] = (f"step {step}: D wins outright (mean D(G(z)) {window['d_fake']:.2g} < {D_WINS} "
                               f"over the window): G gets no useful gradient")
        if diversity < COLLAPSE <= self.peak_diversity / 2:
            flags["collapse"] = (f"step {step}: samples collapse to near-copies (diversity {diversity:.2f}, "
                                 f"down from {self.peak_diversity:.2f}; the training faces' is 1)")
        fresh = {k: v for k, v in flags.items() if k not in self.raised}
        self.raised |= set(flags)
        return out, fresh


def nonfinite(window: dict[str, torch.Tensor], nets: dict[str, nn.Module], mean) -> list[str]:
    """What is NaN/inf on any rank: the window's summed stats (losses, scores) and each net's
    weights. One all-reduce (``mean`` is Context.mean), so every rank reaches the same verdict
    and they stop together. Checked before anything is evaluated, checkpointed or published."""
    names = list(window) + [f"{n} weights" for n in nets]
    checks = [torch.isfinite(v).all() for v in window.values()]
    checks += [torch.stack([torch.isfinite(p).all() for p in net.parameters()]).all() for net in nets.values()]
    if not checks:
        return []
    bad = mean((~torch.stack(checks)).float())
    return [n for n, b in zip(names, bad.tolist()) if b > 0]
