"""FID/KID plumbing (torchmetrics, with the built-in 'pixels' extractor standing in for
Inception), best-generator tracking, the memorization audit and the sampling CLI."""
from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from torch import nn

from datasets.shards import ShardSet
from datasets.synthetic import write_generated
from evaluation import memorization as A
from gan.config import Config
from gan.context import CHECKPOINT_FILE, LocalContext
from evaluation.fid import Evaluator, Pixels, iter_rows
from compose import train_from_config


class Replay(nn.Module):
    """A 'generator' that returns given uint8 faces in order, ignoring z."""

    def __init__(self, faces_u8: np.ndarray, z_dim: int = 100):
        super().__init__()
        self.faces = torch.from_numpy(faces_u8).permute(0, 3, 1, 2).float() / 127.5 - 1
        self.z_dim, self.pos = z_dim, 0

    def forward(self, z):
        out = self.faces[self.pos:self.pos + len(z)]
        self.pos += len(z)
        return out


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    out = tmp_path_factory.mktemp("heldout")
    write_generated(out, 256, 64, seed=1, row_group_size=64)
    return out


def _faces(shards, n):
    return np.concatenate(list(iter_rows(shards, n)))


def _evaluator(shards, n, tmp_path, rank=0, world=1):
    return Evaluator(Pixels(), shards, n, rank, world, torch.device("cpu"), tmp_path / "cache",
                     batch_size=50, kid_subset_size=n)


def test_identical_sets_score_zero_and_shifted_sets_do_not(heldout, tmp_path):
    shards = ShardSet(heldout)
    faces = _faces(shards, 200)
    same = _evaluator(shards, 200, tmp_path)(Replay(faces))
    # KID's unbiased estimator is off zero by O(1/n) on identical sets (its cross term keeps
    # the diagonal), so "≈ 0" there is relative to the shifted set's value.
    assert abs(same["fid"]) < 1e-3
    darker = (faces * 0.7).astype(np.uint8)
    shifted = _evaluator(shards, 200, tmp_path)(Replay(darker))
    assert shifted["fid"] > 1.0 and shifted["kid"] > 10 * abs(same["kid"])
    assert list((tmp_path / "cache").glob("features-*.pt"))  # real side computed once, cached


def _cfg(faces, heldout, storage, steps=30):
    c = Config()
    c.data.path, c.model.width = str(faces), 0.0625
    c.train.batch_size, c.train.max_steps, c.train.log_every, c.train.ema_decay = 16, steps, 10, 0.9
    c.scale.num_workers = 1
    c.eval.every_steps, c.eval.extractor, c.eval.num_samples = 5, "pixels", 64
    c.eval.real_path, c.run.storage_path = str(heldout), str(storage)
    return c


def test_best_generator_is_the_minimum_and_survives_resume(faces64, heldout, tmp_path):
    ctx = LocalContext(tmp_path / "a", resume=False)
    res = train_from_config(_cfg(faces64, heldout, tmp_path), ctx)
    fids = {s: m["fid"] for s, m in ctx.history if "fid" in m}
    assert sorted(fids) == list(range(5, 31, 5))
    best_step = min(fids, key=fids.get)
    assert res.best == {"metric": "fid", "value": fids[best_step], "step": best_step}
    # A new best is published exactly when the score improves on everything before it.
    improving = [s for s in sorted(fids) if fids[s] < min([fids[t] for t in fids if t < s], default=np.inf)]
    assert ctx.best_steps == improving
    # The checkpoint carries best and EMA, and a resumed run keeps comparing against them.
    first = LocalContext(tmp_path / "b", resume=False)
    train_from_config(_cfg(faces64, heldout, tmp_path, steps=15), first)
    second = LocalContext(tmp_path / "b", resume=True)
    res2 = train_from_config(_cfg(faces64, heldout, tmp_path, steps=30), second)
    assert res2.best == res.best
    from gan.checkpoint import load_state
    a, b = load_state(tmp_path / "a" / CHECKPOINT_FILE), load_state(tmp_path / "b" / CHECKPOINT_FILE)
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def _px(u8):
    return Pixels()(torch.from_numpy(u8).permute(0, 3, 1, 2))


def test_audit_flags_copies_and_not_noise(faces64, heldout):
    train_u8 = _faces(ShardSet(faces64), 512)
    held = _px(_faces(ShardSet(heldout), 256))
    train_f = _px(train_u8)
    copies = A.audit(_px(train_u8[:200]), train_f, held)
    assert copies["flagged"] and copies["fraction_memorized"] == 1.0 and copies["p_value"] < 1e-10
    noise = np.random.default_rng(0).integers(0, 256, (200, 64, 64, 3), dtype=np.uint8)
    fresh = A.audit(_px(noise), train_f, held)
    assert not fresh["flagged"] and fresh["fraction_memorized"] == 0.0
    picture = A.closest_pairs(train_u8[:200], lambda idx: train_u8[idx], copies, k=4)
    assert picture.size == (4 * 66 + 2, 2 * 66 + 2)
    # Held-out faces that are training faces make the threshold meaningless: refused.
    with pytest.raises(A.AuditError, match="identical to training faces"):
        A.audit(_px(noise), train_f, train_f[:100])


def test_sample_cli_from_checkpoint_run_and_registry(faces64, heldout, tmp_path, mlflow_store, capsys):
    from PIL import Image

    from gan.checkpoint import generator_from_state, load_state
    from gan.config import flatten
    from jobs import sample
    from jobs.publish import log_generator
    from jobs.tracking import start_run

    cfg = _cfg(faces64, heldout, tmp_path, steps=5)
    cfg.eval.every_steps = 0
    train_from_config(cfg, LocalContext(tmp_path / "run", resume=False))
    ckpt = tmp_path / "run" / CHECKPOINT_FILE
    state = load_state(ckpt)
    run_id = start_run(mlflow_store, "samples", "r", str(tmp_path / "run"), flatten(cfg), resume=False)
    log_generator(mlflow_store, run_id, generator_from_state(state, cfg.model), cfg.model, register_as="facegan-test")
    outputs = {}
    for name, source in {"ckpt": str(ckpt), "ckpt_dir": str(tmp_path / "run"), "run": f"runs:/{run_id}/generator",
                         "registry": "models:/facegan-test/1"}.items():
        out = tmp_path / name
        assert sample.main(["--model", source, "--out", str(out), "--n", "10", "--seed", "3",
                            "--interpolate", "4"]) == 0
        assert len(list(out.glob("sample_*.png"))) == 10 and (out / "grid.png").is_file()
        gif = Image.open(out / "interpolation.gif")
        assert gif.n_frames == 6  # 4 frames there, 2 back
        outputs[name] = np.asarray(Image.open(out / "sample_003.png"))
    # The same EMA weights through every route give the same faces, under the provenance mark of
    # their source: the checkpoint's digest for a checkpoint, the run's id for a run or its model.
    assert np.array_equal(outputs["ckpt"], outputs["ckpt_dir"]) and np.array_equal(outputs["run"], outputs["registry"])
    diff = np.abs(outputs["ckpt"].astype(int) - outputs["run"])
    assert diff.max() <= 2 * 21 and diff.mean() < 6
    from evaluation.watermark import Watermark, source_id_of
    from jobs import verify

    assert verify.main([str(tmp_path / "registry")]) == 0  # the 10 faces and their grid
    out = capsys.readouterr().out
    assert f"11 image(s): 11 marked (source {source_id_of(run_id)})" in out and "(10 of 10 faces of a grid)" in out
    # The marked MLflow model: uint8 faces, each carrying the run's source id; the tensor model stays raw.
    z = (torch.rand(6, cfg.model.z_dim) * 2 - 1).numpy()
    faces = mlflow.pyfunc.load_model(f"runs:/{run_id}/faces").predict(z)
    assert faces.dtype == np.uint8 and faces.shape == (6, 64, 64, 3)
    assert all(r.marked and r.source_id == source_id_of(run_id) for r in Watermark().read(faces))
    raw = mlflow.pytorch.load_model(f"runs:/{run_id}/generator")(torch.from_numpy(z))
    assert raw.dtype == torch.float32 and raw.shape == (6, 3, 64, 64)
    # What is not a generator is one line (exit 2); a NaN generator writes no black faces (exit 1).
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "cut.pt").write_bytes(ckpt.read_bytes()[:1000])
    for bad, needle in ((tmp_path / "nothing", "expected runs:/"), (tmp_path / "notes.txt", "unreadable as a checkpoint"),
                        (tmp_path / "cut.pt", "unreadable as a checkpoint"), ("runs:/0123456789abcdef/generator", "")):
        capsys.readouterr()
        assert sample.main(["--model", str(bad), "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --model {bad}") and needle in err[0], err
    state["ema"] = {k: v.float() * float("nan") if v.is_floating_point() else v for k, v in state["ema"].items()}
    torch.save(state, tmp_path / "nan.pt")
    assert sample.main(["--model", str(tmp_path / "nan.pt"), "--out", str(tmp_path / "y")]) == 1
    assert "outputs NaN" in capsys.readouterr().err and not (tmp_path / "y").exists()
