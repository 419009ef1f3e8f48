"""One vocabulary and typed reports: sweep files written like presets, the resolved config as a
preset, renamed flags that say their new name, the sweep's privacy cap read from Tune's results
(no tracking server involved), and a report's summary that carries its signals."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from gan.config import Config, flatten, load, to_toml
from gan.report import Report
from jobs import sweep as sweep_file
from jobs.sweep_summary import rank
from tests.conftest import ROOT


def test_sweep_files_take_the_presets_tables(tmp_path):
    dotted = tmp_path / "dotted.toml"
    dotted.write_text('[sweep]\nname = "s"\n[space]\n"optim.lr_g" = { type = "loguniform", low = 1e-4, high = 1e-3 }\n'
                      '[config]\n"train.max_steps" = 40\n"eval.every_steps" = 20\n')
    tables = tmp_path / "tables.toml"
    tables.write_text('[sweep]\nname = "s"\n[space.optim]\nlr_g = { type = "loguniform", low = 1e-4, high = 1e-3 }\n'
                      '[config.train]\nmax_steps = 40\n[config.eval]\nevery_steps = 20\n')
    a, b = sweep_file.load_sweep(str(dotted)), sweep_file.load_sweep(str(tables))
    assert a.space == b.space == {"optim.lr_g": {"type": "loguniform", "low": 1e-4, "high": 1e-3}}
    assert a.config == b.config == {"train.max_steps": 40, "eval.every_steps": 20}


def test_a_typo_in_a_sweep_table_is_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[sweep]\nname = "s"\n[space.optim]\nlr_q = { type = "uniform", low = 0.1, high = 0.2 }\n')
    with pytest.raises(Exception, match="space.optim.lr_q: unknown field"):
        sweep_file.load_sweep(str(bad))


def test_print_config_is_a_preset_that_loads_back_to_the_same_config(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jobs.train", "--config", "configs/smoke.toml",
                          "--train.epochs=2", "--optim.lr_g=3e-4", "--print-config"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    saved = tmp_path / "resolved.toml"
    saved.write_text(out.stdout)
    want = load(ROOT / "configs" / "smoke.toml", ["--train.epochs=2", "--optim.lr_g=3e-4"])
    assert flatten(load(saved)) == flatten(want)
    assert not (ROOT / "runs" / "resolved").exists()  # nothing was started or written
    assert to_toml(Config()).startswith("[model]\n")


@pytest.mark.parametrize("job, old, new", [
    ("jobs.fid", "--fake", "--model"), ("jobs.audit", "--fake", "--model"),
    ("jobs.audit", "--space", "--extractor"), ("jobs.audit", "--samples", "--n"),
])
def test_renamed_flags_say_their_new_name(job, old, new):
    out = subprocess.run([sys.executable, "-m", job, f"{old}=x"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: {old} was renamed to {new} (python -m {job} --help)"


def _trial(name, fid, auc=None, lr=1e-4):
    base = flatten(Config())
    metrics = {"fid": fid, "step": 40, **({"identity_auc": auc} if auc is not None else {})}
    return SimpleNamespace(metrics=metrics, metrics_dataframe=None, path=f"/sweeps/s/{name}",
                           config={"_base": base, "_sweep_dir": "/sweeps/s", "optim.lr_g": lr})


def test_the_privacy_cap_ranks_from_tunes_results_alone():
    """Tune's results carry each trial's final identity audit (jobs/relay.py): the cap needs no
    tracking server (rank() never opens one)."""
    sweep = sweep_file.Sweep(name="s", space={"optim.lr_g": {"type": "loguniform", "low": 1e-5, "high": 1e-3}},
                             max_identity_auc=0.7)
    trials = [_trial("leaky", 90.0, auc=0.95), _trial("private", 120.0, auc=0.55, lr=2e-4),
              _trial("unaudited", 80.0)]
    rows, (score, best, hp) = rank(trials, sweep)
    assert (score, best.path, hp) == (120.0, "/sweeps/s/private", {"optim.lr_g": 2e-4})
    assert {r["trial"]: r.get("identity_auc") for r in rows} == {"leaky": 0.95, "private": 0.55, "unaudited": None}
    sweep.max_identity_auc = 0.5
    with pytest.raises(RuntimeError, match="no trial qualifies .lowest identity_auc: 0.55"):
        rank(trials, sweep)


def test_a_reports_summary_carries_signals_not_metric_keys():
    r = Report(9, {"d_loss": 0.5}, {"fid": 80.0}, checkpoint=lambda: {}, model=object(), diverged="nan at 9",
               resumed_from=5, audits={"identity_auc": 0.6})
    s = r.summary()
    assert s == {"step": 9, "metrics": {"d_loss": 0.5}, "scores": {"fid": 80.0}, "resumed_from": 5,
                 "diverged": "nan at 9", "audits": {"identity_auc": 0.6}}
    back = Report.from_summary(s)
    assert (back.step, back.metrics, back.scores, back.resumed_from, back.diverged, back.audits) == \
        (9, {"d_loss": 0.5}, {"fid": 80.0}, 5, "nan at 9", {"identity_auc": 0.6})
    assert back.checkpoint is None and back.model is None
