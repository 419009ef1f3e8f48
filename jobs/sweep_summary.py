"""A finished sweep, summed up in MLflow: results.csv and best_config.toml on the parent run,
sweep_fid.png (each trial's best score against its LR ratio and label range), the best child
tagged ``facegan.best_trial``, trials ASHA stopped tagged ``facegan.stopped_early``. When the
trials ran the identity-leak audit, ``identity_auc`` is a column, sweep_identity.png plots the
quality/privacy frontier, and ``max_identity_auc`` (< 1) keeps leakier trials out of the best."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from mlflow.tracking import MlflowClient
from PIL import Image

from gan.config import to_toml
from jobs.sweep import Sweep, trial_config
from jobs.sweep_plot import plot_frontier, plot_trials


def rank(results, sweep: Sweep) -> tuple[list[dict], tuple]:
    """Every trial's row and the best one (score, Tune Result, searched values), from Tune's
    results alone: the privacy cap reads each trial's final identity audit as the trial
    reported it (jobs/relay.py), so it holds with the tracking server down. RuntimeError when
    nothing qualifies."""
    cap = sweep.max_identity_auc if sweep.max_identity_auc < 1 else None
    rows, best = [], None
    for r in results:
        df = r.metrics_dataframe
        if df is not None and sweep.metric in df:
            values, last_step = list(df[sweep.metric]), int(df["step"].max())
        elif r.metrics and sweep.metric in r.metrics:
            # A PBT trial paused and restored can come back without its progress.csv (Tune logs
            # "Remote file not found"): its last result still carries the latest score.
            values, last_step = [r.metrics[sweep.metric]], int(r.metrics.get("step", 0))
        else:
            continue
        finite = [float(v) for v in values if math.isfinite(v)]
        if not finite:  # diverged before its first evaluation: nothing to rank
            continue
        score = min(finite)
        hp = {k: v for k, v in r.config.items() if not k.startswith("_")}
        tc = trial_config(r.config["_base"], hp)
        leak = (r.metrics or {}).get("identity_auc")  # the trial's final audit, as Tune got it (jobs/relay.py)
        row = {"trial": Path(r.path).name, sweep.metric: score, "last_step": last_step,
               "lr_ratio": tc.optim.lr_d / tc.optim.lr_g, "label_lo": tc.loss.real_label_lo,
               "label_hi": tc.loss.real_label_hi, **({"identity_auc": leak} if leak is not None else {}), **hp}
        rows.append(row)
        eligible = cap is None or (leak is not None and leak <= cap)
        if eligible and (best is None or score < best[0]):
            best = (score, r, hp)
    if best is None and rows and cap is not None:
        aucs = [row["identity_auc"] for row in rows if "identity_auc" in row]
        raise RuntimeError(f"max_identity_auc {cap:g}: no trial qualifies (lowest identity_auc: "
                           f"{min(aucs) if aucs else 'none logged'}); every trial is in {sweep.name}'s Tune results")
    if best is None:
        raise RuntimeError(f"no trial reported {sweep.metric}; is eval.every_steps > 0 and an extractor available?")
    return rows, best


def summarize(results, sweep: Sweep, uri: str, parent: str) -> tuple[str, str, dict]:
    """results.csv and best_config.toml on the parent run; the best child run tagged."""
    rows, best = rank(results, sweep)
    cap = sweep.max_identity_auc if sweep.max_identity_auc < 1 else None
    client = MlflowClient(uri)
    children = {run.data.tags.get("facegan.run_dir"): run for run in client.search_runs(
        [client.get_run(parent).info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")}
    table, toml = results_csv(rows, sweep.metric), best_preset(best)
    client.log_text(parent, table, "results.csv")
    client.log_text(parent, toml, "best_config.toml")
    sweep_dir = best[1].config["_sweep_dir"]
    last = {f"{sweep_dir}/{row['trial']}": row["last_step"] for row in rows}
    full = max(last.values())

    png = plot_trials([{**row, "stopped_early": row["last_step"] < full} for row in rows], sweep.metric)
    client.log_image(parent, _png_image(png), "sweep_fid.png")
    if any("identity_auc" in row for row in rows):
        client.log_image(parent, _png_image(plot_frontier(rows, sweep.metric, cap)), "sweep_identity.png")
    for where, run in children.items():
        if where == f"{sweep_dir}/{Path(best[1].path).name}":
            client.set_tag(run.info.run_id, "facegan.best_trial", "true")
        if where in last and last[where] < full:
            client.set_tag(run.info.run_id, "facegan.stopped_early", str(last[where]))
        if run.info.status == "RUNNING":  # a trial the scheduler stopped: its actor ended without a word
            client.set_terminated(run.info.run_id, "FINISHED")
    client.set_tag(parent, f"facegan.best_{sweep.metric}", f"{best[0]:.6g}")
    client.set_tag(parent, "mlflow.note.content",  # the run page's description
                   f"Sweep {sweep.name}: {len(rows)} trials ({sweep.scheduler}, {sweep.search} search) over "
                   f"{', '.join(sweep.space)}. Best {sweep.metric} {best[0]:.4g} ({Path(best[1].path).name}: "
                   + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in best[2].items())
                   + "). Artifacts: results.csv, best_config.toml (a preset), sweep_fid.png"
                   + (", sweep_identity.png" if any("identity_auc" in row for row in rows) else "") + ".")
    best_run = children.get(f"{sweep_dir}/{Path(best[1].path).name}")
    return table, toml, {"score": best[0], "hp": best[2],
                         "run_id": best_run.info.run_id if best_run is not None else None}


def results_csv(rows: list[dict], metric: str) -> str:
    """Every trial's row, best first."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda row: row[metric]))
    return buf.getvalue()


def best_preset(best: tuple) -> str:
    """The best trial's config as a preset (best_config.toml)."""
    return to_toml(trial_config(best[1].config["_base"], best[2]))


def _png_image(png: bytes):
    return Image.open(io.BytesIO(png))
