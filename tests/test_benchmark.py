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
        assert r["seed_run_h"] == pytest.approx(6e6 / r["img_per_s"] / 3600, rel=0.01)  # 60 epochs x 100k
    assert rows[0]["speedup_vs_reference"] == 1.0
