"""Face repair: the latent search (gan/inpaint.py) and jobs.repair on real photos, its model
specs (a checkpoint, a run, a registered model; a generator alone refused) and its bad inputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from compose import train_from_config
from gan.config import Config
from gan.context import CHECKPOINT_FILE, LocalContext
from gan.inpaint import SearchConfig, context_weights, latent_search, named_mask
from jobs import repair, verify
from jobs.tracking import RUN_DIR_TAG
from tests import wild
from tests.conftest import CELEBA_SAMPLE

ZIP = CELEBA_SAMPLE / "img_align_celeba.zip"
needs_sample = pytest.mark.skipif(not ZIP.is_file(), reason="needs ../shared/data/celeba-sample")


@pytest.fixture(scope="module")
def trained(faces64, tmp_path_factory) -> Path:
    """A run folder as Ray Train leaves it (checkpoint_NNN/checkpoint.pt), from a short real run."""
    out = tmp_path_factory.mktemp("run")
    c = Config()
    c.data.path, c.model.width = str(faces64), 0.0625
    c.train.batch_size, c.train.max_steps, c.train.log_every, c.train.checkpoint_every = 16, 12, 6, 1000
    c.scale.num_workers = 1
    ctx = LocalContext(out / "checkpoint_000012", resume=False)
    train_from_config(c, ctx)
    ctx.flush()
    return out


def test_named_masks_cover_what_they_say():
    assert named_mask("centre", 64).float().mean() == 0.25
    lower = named_mask("lower", 64)
    assert lower[32:].all() and not lower[:32].any()
    eyes = named_mask("eyes", 64)
    assert eyes[31].any() and not eyes[:20].any() and not eyes[45:].any()  # the eyes' row is 49% down
    s0, s1 = named_mask("strokes", 64, seed=0), named_mask("strokes", 64, seed=1)
    assert 0.15 <= s0.float().mean() < 0.3 and not torch.equal(s0, s1)
    assert torch.equal(s0, named_mask("strokes", 64, seed=0))
    w = context_weights(named_mask("centre", 64)[None])[0]
    assert (w[16:48, 16:48] == 0).all() and w[15, 30] > w[2, 30] > 0  # the ring around the hole weighs most


def test_latent_search_fits_the_intact_pixels_and_keeps_z_in_range(trained):
    pair = repair.load_pair(str(trained / "checkpoint_000012"))
    with torch.no_grad():  # a face the generator can draw: the search has an exact answer
        target = pair.G.eval()(torch.rand(4, pair.G.z_dim) * 2 - 1)
    holes = named_mask("centre", 64)[None].repeat(4, 1, 1)
    _, _, before = latent_search(pair.G, pair.D, target, holes, SearchConfig(steps=0), seed=1)
    z, g, after = latent_search(pair.G, pair.D, target, holes, SearchConfig(steps=60, lr=0.05), seed=1)
    assert (after["context"] < 0.7 * before["context"]).all(), (before["context"], after["context"])
    assert z.abs().max() <= 1 and g.shape == target.shape
    _, _, best = latent_search(pair.G, pair.D, target, holes, SearchConfig(steps=60, lr=0.05, restarts=3), seed=1)
    assert (best["context"] + 0.003 * best["prior"] <= after["context"] + 0.003 * after["prior"] + 1e-4).all()


@needs_sample
def test_jobs_repair_on_photos_from_the_wild(trained, tmp_path, capsys):
    photos = tmp_path / "photos"
    wild.build(photos, ZIP)
    picked = sorted(photos.glob("single_*.jpg"))[:3]
    out = tmp_path / "out"
    argv = ["--model", str(trained), "--photos", *map(str, picked), "--mask", "lower", "--out", str(out),
            "--steps", "20", "--batch", "2"]
    assert repair.main(argv) == 0
    report = json.loads((out / "repair.json").read_text())
    assert [r["photo"] for r in report["faces"]] == [p.stem for p in picked]
    assert all(0.45 < r["hole"] < 0.55 for r in report["faces"])
    for p in picked:
        fixed = np.asarray(Image.open(out / "repaired" / f"{p.stem}.png"))
        masked = np.asarray(Image.open(out / "masked" / f"{p.stem}.png"))
        assert fixed.shape == (64, 64, 3)
        # the intact upper half is the photo's own, under the provenance mark (a residual bounded by 0.08 of
        # the range, after pulling the extreme levels in by as much: at most ~21 levels)
        diff = np.abs(fixed[:30].astype(int) - masked[:30])
        assert diff.max() <= 21 and diff.mean() < 4
        assert (fixed[40:].astype(int) - masked[40:]).std() > 10  # the hole was filled, not left grey
        assert Image.open(out / "photos" / f"{p.stem}.png").size == Image.open(p).size
    assert Image.open(out / "sheet.png").size[0] == 4 * 66 + 2
    assert not list(out.glob(".partial-*"))
    assert report["watermark"]["source_id"] == repair.source_id(str(trained))[0]
    assert verify.main([str(out / "repaired"), str(out / "generated")]) == 0  # every face leaves marked
    assert f"6 image(s): 6 marked (source {report['watermark']['source_id']})" in capsys.readouterr().out


@needs_sample
def test_bad_inputs_are_one_line_and_write_nothing(trained, tmp_path, capsys):
    photos = tmp_path / "photos"
    wild.build(photos, ZIP)
    face = sorted(photos.glob("single_*.jpg"))[0]
    out = tmp_path / "out"

    def run(*args) -> str:
        rc = repair.main(["--model", str(trained), "--out", str(out), "--steps", "5", *args])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert not out.exists() or not any(out.iterdir())
        return err

    small = tmp_path / "small_mask.png"
    Image.new("L", (32, 32), 255).save(small)
    assert "must have its photo's size" in run("--photos", str(face), "--mask", str(small))
    assert "no face found" in run("--photos", str(photos / "scene_0.jpg"), "--mask", "centre")
    full = tmp_path / "full.png"
    Image.new("L", Image.open(face).size, 255).save(full)
    assert "covers 100%" in run("--photos", str(face), "--mask", str(full))
    assert "not a readable image" in run("--photos", str(photos / "broken_text.png"), "--mask", "centre")
    # a generator alone (what LocalContext and MLflow publish) cannot drive the search
    alone = tmp_path / "best_generator.pt"
    torch.save({"format": 1, "G": torch.load(trained / "checkpoint_000012" / CHECKPOINT_FILE)["G"]}, alone)
    rc = repair.main(["--model", str(alone), "--photos", str(face), "--mask", "centre", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "without its discriminator" in err and "checkpoint" in err


def test_runs_and_registered_models_resolve_to_their_checkpoint(trained, mlflow_store, tmp_path, capsys):
    client = MlflowClient(mlflow_store)
    exp = client.create_experiment("facegan-test")
    good = client.create_run(exp, tags={RUN_DIR_TAG: str(trained)}).info.run_id
    empty = client.create_run(exp, tags={RUN_DIR_TAG: str(tmp_path / "gone")}).info.run_id
    client.create_registered_model("faces")
    v = client.create_model_version("faces", f"runs:/{good}/generator", run_id=good)
    client.set_registered_model_alias("faces", "champion", v.version)
    for spec in (f"runs:/{good}/generator", f"runs:/{good}", "models:/faces@champion", f"models:/faces/{v.version}"):
        assert repair.load_pair(spec).source.endswith(f"checkpoint_000012/{CHECKPOINT_FILE}")
    with pytest.raises(repair.SpecError, match="holds no checkpoint on this machine; latent search needs"):
        repair.load_pair(f"runs:/{empty}/generator")
    with pytest.raises(repair.SpecError, match="cannot load G and D"):
        repair.load_pair("models:/nothing@champion")
    faces = tmp_path / "faces"
    faces.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(faces / f"f{i}.png")
    assert repair.main(["--model", "models:/faces@champion", "--photos", str(faces), "--aligned", "--mask",
                        "strokes", "--out", str(tmp_path / "o"), "--steps", "3", "--mlflow", "repairs"]) == 0
    runs = client.search_runs([client.get_experiment_by_name("repairs").experiment_id])
    arts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "repair")}
    assert {"repair/sheet.png", "repair/repair.json", "repair/repaired"} <= arts
    assert runs[0].data.params["mask"] == "strokes" and "seconds_per_face" in runs[0].data.metrics
