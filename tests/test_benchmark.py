"""The benchmark script keeps working (its figures are read by people, not asserted)."""
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def test_train_step_benchmark_prints_one_json_line_per_variant():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.train_step", "--size", "64", "--batch", "4",
                           "--width", "0.0625", "--steps", "1", "--rounds", "1", "--warmup", "1",
                           "--variants", "eager_fp32_reference,project_step,project+channels_last"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["variant"] for r in rows] == ["eager_fp32_reference", "project_step", "project+channels_last"]
    for r in rows:
        assert r["img_per_s"] > 0 and r["model_gflop_per_img"] > 0 and 0 < r["mfu"]
        assert r["seed_run_h"] == pytest.approx(60 * 162_770 / r["img_per_s"] / 3600, rel=0.01)  # CelebA train
    assert rows[0]["speedup_vs_reference"] == 1.0
    # FLOPs are each variant's own: the project's G step skips D's weight gradients (~7% fewer
    # at full width; here, at 1/16 width, the first layer's share differs, so a range).
    ref, proj = rows[0]["model_gflop_per_img"], rows[1]["model_gflop_per_img"]
    assert 0.80 * ref < proj < 0.97 * ref and rows[2]["model_gflop_per_img"] == proj


def test_quality_benchmark_runs_variants_and_prints_json(faces64, tmp_path):
    """A few steps of two variants (one ad hoc) through the real loop and the project's FID."""
    out = tmp_path / "strips"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--variants", "ttur,ttur+mine:loss.kind=hinge",
                           "--max-steps", "3", "--n", "32", "--width", "0.0625", "--extractor", "pixels",
                           "--data", str(faces64.parent), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["variant"] for r in rows] == ["ttur", "ttur+mine"] and all(r["steps"] == 3 for r in rows)
    assert rows[1]["overrides"]["loss.kind"] == "hinge" and rows[1]["overrides"]["optim.lr_d"] == 4e-4
    assert all(r["fid"] > 0 and r["n"] == 32 for r in rows)
    assert (out / "ttur-seed0.png").is_file() and "| ttur |" in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--variants", "nope"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown variant 'nope'" in bad.stderr


def test_quality_variant_from_a_preset_takes_its_recipe_not_its_protocol(tmp_path):
    from benchmarks.quality import parse_variant

    preset = tmp_path / "mine.toml"
    preset.write_text('[model]\nsize = 128\nwidth = 1.0\ng_upsample = "resize"\n[loss]\nkind = "hinge"\n'
                      '[optim]\nlr_d = 4e-4\n[train]\nbatch_size = 32\nepochs = 60\n[data]\npath = "x"\n'
                      '[scale]\nnum_workers = 4\n')
    name, recipe = parse_variant(str(preset))
    assert name == "mine"
    assert recipe == {"model.g_upsample": "resize", "loss.kind": "hinge", "optim.lr_d": 4e-4,
                      "train.batch_size": 32}


def test_ad_hoc_variant_builds_on_the_longest_named_variant():
    from benchmarks.quality import VARIANTS, parse_variant

    assert parse_variant("ttur+ada+bs16:train.batch_size=16") == (
        "ttur+ada+bs16", {**VARIANTS["ttur+ada"], "train.batch_size": "16"})
    assert parse_variant("ttur+x:loss.kind=hinge")[1] == {**VARIANTS["ttur"], "loss.kind": "hinge"}
    assert parse_variant("mine:loss.kind=hinge")[1] == {"loss.kind": "hinge"}


def test_loop_benchmark_times_the_real_loop_beside_the_step(faces64):
    """The real loop on shards, fed by 2 loader processes, and the step alone: one JSON line."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.loop", "--size", "64", "--width", "0.0625",
                           "--batch", "16", "--steps", "8", "--warmup", "2", "--window", "2",
                           "--loader-workers", "2", "--device", "cpu", "--data", str(faces64.parent)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (row,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert row["loader_workers"] == 2 and row["timed_steps"] == 8
    assert row["loop_img_per_s"] > 0 and row["step_img_per_s"] > 0
    # Within the rounding of the printed img/s (0.1), which is a percent at a loaded CPU's ~10 img/s.
    assert row["loop_over_step"] == pytest.approx(row["loop_img_per_s"] / row["step_img_per_s"], rel=0.01)
    assert row["seed_run_min"] == pytest.approx(60 * 162_770 / row["loop_img_per_s"] / 60, rel=0.01)


def test_checkpoint_benchmark_times_the_training_threads_share_and_checks_the_file():
    """The seed state written in the loop and off it: the same checkpoint, one JSON line."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.checkpoint", "--size", "64", "--width", "0.125",
                           "--rounds", "2", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (row,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert row["identical"] is True
    # 1/8 width at 64 px: G, D, EMA and two Adam states (2 moments each) are ~20 MB of float32.
    assert 15 < row["state_mb"] < 25
    assert min(row[k] for k in ("torch_save_ms", "sync_ms", "blocked_ms", "write_ms")) > 0
    assert row["write_ms"] >= row["blocked_ms"]  # the write is timed from the hand-over to done
