"""The sweep parent's picture: FID against the LR asymmetry and against the real-label range."""
from __future__ import annotations

import io


def plot_trials(rows: list[dict], metric: str) -> bytes:
    """``rows``: one per trial with ``metric``, ``lr_ratio``, ``label_lo``, ``label_hi`` and
    ``stopped_early``. Returns a PNG: left, the score against lr_d/lr_g (log axis); right, the
    score against the real-label range, drawn as the segment [lo, hi]. Hollow markers: trials a
    scheduler stopped early (their score is from fewer steps)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
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
    plt.close(fig)
    return buf.getvalue()
