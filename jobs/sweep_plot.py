"""The sweep parent's picture: FID against the LR asymmetry and against the real-label range."""
from __future__ import annotations

import io


def plot_trials(rows: list[dict], metric: str) -> bytes:
    """``rows``: one per trial with ``metric``, ``lr_ratio``, ``label_lo``, ``label_hi`` and
    ``stopped_early``. Returns a PNG: left, the score against lr_d/lr_g (log axis); right, the
    score against the real-label range, drawn as the segment [lo, hi]. Hollow markers: trials a
    scheduler stopped early (their score is from fewer steps)."""
    from matplotlib.figure import Figure  # deferred: see DEFERRED in tests/test_imports.py

    fig = Figure(figsize=(10, 4))  # the OO API: no pyplot state, no display backend to choose
    left, right = fig.subplots(1, 2, sharey=True)
    for r in rows:
        style = {"mfc": "none" if r["stopped_early"] else "C0", "mec": "C0", "marker": "o", "ms": 7}
        left.plot([r["lr_ratio"]], [r[metric]], **style)
        right.plot([r["label_lo"], r["label_hi"]], [r[metric]] * 2, "-", color="C0", alpha=0.6)
        right.plot([(r["label_lo"] + r["label_hi"]) / 2], [r[metric]], **style)
    left.set_xscale("log")
    left.set_xlabel("lr_d / lr_g")
    left.set_ylabel(f"{metric} (lower is better)")
    left.axvline(0.2, color="grey", ls=":", lw=1)
    left.text(0.2, 1.0, " seed", transform=left.get_xaxis_transform(), va="top", color="grey", fontsize=8)
    right.set_xlabel("real label range [lo, hi]")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{len(rows)} trials: {metric} of each trial's best evaluation (hollow: stopped early)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def plot_frontier(rows: list[dict], metric: str, cap: float | None = None) -> bytes:
    """The quality/privacy frontier: each trial's best ``metric`` against its final
    ``identity_auc`` (0.5: no identity leak; 1: every training person recognisable), the
    Pareto-best trials joined, and the sweep's cap (``max_identity_auc``) when it has one."""
    from matplotlib.figure import Figure

    pts = sorted((r["identity_auc"], r[metric]) for r in rows if r.get("identity_auc") is not None)
    fig = Figure(figsize=(6, 4.2))
    ax = fig.subplots()
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color="C0", ms=7)
    front, best = [], float("inf")
    for auc, score in pts:  # by AUC: on the frontier when no less leaky trial scores better
        if score < best:
            front.append((auc, score))
            best = score
    ax.plot([p[0] for p in front], [p[1] for p in front], "-", color="C1", lw=1.5, label="frontier")
    ax.axvline(0.5, color="grey", ls=":", lw=1)
    ax.text(0.5, 1.0, " chance", transform=ax.get_xaxis_transform(), va="top", color="grey", fontsize=8)
    if cap is not None:
        ax.axvline(cap, color="C3", ls="--", lw=1, label=f"cap {cap:g}")
    ax.set_xlabel("identity_auc (membership attack on training people)")
    ax.set_ylabel(f"{metric} (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{len(pts)} trials: quality against identity leak", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()
