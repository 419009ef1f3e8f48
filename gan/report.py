"""What the training loop hands its launcher at a step: one typed :class:`Report`.

Training metrics, evaluation scores and signals (a resume, a divergence) travel in their own
fields, never as specially named metric keys; the launcher decides how each is shown (the Ray
context logs a resume as the MLflow metric ``resumed_from_step``, a divergence as the run's
failure reason). :meth:`Report.summary` is what crosses a process boundary (Ray Train's report
dict, Tune's relay), :meth:`Report.from_summary` reads it back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

SCORES = ("fid", "kid")  # evaluation scores, lower is better; eval.metric and a sweep's metric are one of them
LEAK = ("identity_auc", "identity_match_rate", "heldout_match_rate")  # the identity audit at an evaluation
StateFn = Callable[[], dict[str, Any]]


@dataclass
class Report:
    step: int
    metrics: dict[str, float] = field(default_factory=dict)  # the log window: losses, health, img_per_s, epoch
    # An evaluation at this step: names in SCORES, and the identity audit's (LEAK) when it runs.
    scores: dict[str, float] = field(default_factory=dict)
    # Built only by the rank that writes it (a function), taken before ``Context.report`` returns.
    checkpoint: StateFn | None = None
    artifacts: dict[str, bytes] = field(default_factory=dict)  # relative path -> bytes (samples/final.png)
    model: nn.Module | None = None  # a new best generator to publish (rank 0)
    tags: dict[str, str] = field(default_factory=dict)  # run tags (training-health flags)
    resumed_from: int | None = None  # this run continued from a checkpoint at this step
    diverged: str = ""  # training stopped on a non-finite state: why (nothing of it was saved)
    audits: dict[str, float] = field(default_factory=dict)  # the final audits' verdicts (identity_auc, ...)

    def summary(self) -> dict[str, Any]:
        """Plain values only (no modules, bytes or functions): what Ray carries between processes."""
        return {"step": self.step, "metrics": dict(self.metrics), "scores": dict(self.scores),
                "resumed_from": self.resumed_from, "diverged": self.diverged, "audits": dict(self.audits)}

    @classmethod
    def from_summary(cls, d: dict[str, Any]) -> "Report":
        return cls(int(d["step"]), dict(d.get("metrics") or {}), dict(d.get("scores") or {}),
                   resumed_from=d.get("resumed_from"), diverged=d.get("diverged") or "",
                   audits=dict(d.get("audits") or {}))

    def logged(self) -> dict[str, float]:
        """Metrics and scores together, as a tracker charts them."""
        return {**self.metrics, **self.scores}
