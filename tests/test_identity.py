"""The identity-leak audit (evaluation/identity.py, jobs.audit --identity) on the real CelebA sample.

Training set: 60 of the sample's 152 training people, 20 photos each. Controls:
- positive: their other 10 photos (new photos of training people) as the fakes;
- copies: the training photos themselves;
- negative: photos of the test split's 22 people (in neither set; 30 photos each, so the two
  sets also differ in photos per person).
Held-out (calibration, and the negative class of the AUC): the val split's 26 people.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from datasets.shards import ShardSet, ShardWriter, encode
from evaluation import identity as I
from jobs import audit as audit_job
from jobs import train as train_job
from jobs import tune as tune_job
from tests.conftest import child_runs

pytest.importorskip("dlib")
GUARD_SEED = 0  # see test_publishing_guard_logs_but_never_registers_a_generator_over_the_cap


def _subset(src, out, pick) -> int:
    """The rows of ``src`` for which pick(person, k-th photo of that person) holds, as a shard set."""
    s = ShardSet(src)
    ids, who = s.ids(), s.identities()
    faces = np.concatenate([s.read(rg) for rg in s.row_groups])
    seen, keep = {}, []
    for i, p in enumerate(who.tolist()):
        seen[p] = seen.get(p, 0) + 1
        if pick(p, seen[p] - 1):
            keep.append(i)
    w = ShardWriter(out, s.image_size, "raw")
    w.write_shard(0, [ids[i] for i in keep], [encode(faces[i], "raw") for i in keep], {}, [int(who[i]) for i in keep])
    w.close()
    return len(keep)


@pytest.fixture(scope="module")
def people(celeba64, tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    chosen = set(sorted(set(ShardSet(celeba64 / "train").identities().tolist()))[:60])
    assert _subset(celeba64 / "train", root / "train", lambda p, k: p in chosen and k < 20) == 1200
    assert _subset(celeba64 / "train", root / "others", lambda p, k: p in chosen and k >= 20) == 600
    return root


def _audit(capsys, people, celeba64, fake, *extra):
    rc = audit_job.main(["--identity", "--model", str(fake), "--train", str(people / "train"), "--heldout",
                         str(celeba64 / "val"), "--n", "200", "--cache", str(people / "feature_cache"), *extra])
    out, err = capsys.readouterr()
    return rc, (json.loads(out.strip().splitlines()[-1]) if rc in (0, 1) else err)


def test_identity_audit_controls_and_calibration(people, celeba64, capsys, tmp_path):
    rc, pos = _audit(capsys, people, celeba64, people / "others", "--out", str(tmp_path))
    # Calibration on the sample: the searches of held-out people against the training gallery.
    assert pos["fpir"] <= 0.02 and pos["tpir"] >= 0.70, pos
    assert pos["n_train_identities"] == 60 and pos["n_heldout_identities"] == 26 and pos["n_fake"] == 200
    # New photos of training people: the people are recognised, and the audit says so.
    assert rc == 1 and pos["flagged"] and pos["identity_auc"] >= 0.9 and pos["identity_match_rate"] > 0.5, pos
    assert len(pos["top_identities"]) == 5 and all(t["matches"] >= 2 for t in pos["top_identities"])
    assert json.loads((tmp_path / "identity_summary.json").read_text())["identity_auc"] == pos["identity_auc"]
    assert (tmp_path / "identity_evidence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc, copies = _audit(capsys, people, celeba64, people / "train")
    assert rc == 1 and copies["flagged"] and copies["identity_match_rate"] > 0.95, copies
    # People in neither set: chance level, not flagged.
    rc, neg = _audit(capsys, people, celeba64, celeba64 / "test")
    assert rc == 0 and not neg["flagged"], neg
    assert abs(neg["identity_auc"] - 0.5) <= 0.15 and neg["identity_match_rate"] <= neg["fpir"] + 0.03, neg
    assert neg["threshold"] == pos["threshold"]  # the same calibration, from the cached embeddings


def test_identity_audit_refusals(people, celeba64, faces64, capsys):
    rc, err = _audit(capsys, people, celeba64, people / "others", "--heldout", str(people / "others"))
    assert rc == 2 and "people are in both the training and the held-out set" in err, err
    few = people / "few"
    _subset(celeba64 / "val", few, lambda p, k: k < 2 and p in set(sorted(set(ShardSet(celeba64 / "val").identities().tolist()))[:9]))
    rc, err = _audit(capsys, people, celeba64, people / "others", "--heldout", str(few))
    assert rc == 2 and "at least 10 held-out people, got 9" in err, err
    rc, err = _audit(capsys, people, celeba64, people / "others", "--train", str(faces64))
    assert rc == 2 and "no identity column" in err and "--identities identity_CelebA.txt" in err, err
    assert err.count("\n") == 1


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_identity_score_does_not_depend_on_photos_per_person():
    # Synthetic people: a centre each, photos and fakes scattered around it. Training people
    # have 3 photos, held-out people 30; fakes show people of neither set. With a score that
    # summed or took the minimum over photos, the 30-photo people would look "closer".
    rng = np.random.default_rng(0)
    centres = _unit(rng.normal(size=(300, 128)))
    def photos(people, k):
        v = np.repeat(centres[people], k, axis=0) + 0.08 * rng.normal(size=(len(people) * k, 128))
        return _unit(v), np.repeat(people, k)
    train_v, train_ids = photos(np.arange(0, 100), 3)
    held_v, held_ids = photos(np.arange(100, 200), 30)
    fake_v, _ = photos(np.arange(200, 300), 2)
    r = I.audit(fake_v, train_v, train_ids, held_v, held_ids)
    assert abs(r["identity_auc"] - 0.5) <= 0.1 and not r["flagged"], {k: v for k, v in r.items() if not k.startswith("_")}
    leak, _ = photos(np.arange(0, 100), 2)  # the same people as training, new photos
    r = I.audit(leak, train_v, train_ids, held_v, held_ids)
    assert r["identity_auc"] > 0.95 and r["flagged"] and r["identity_match_rate"] > 0.9


def test_identity_audit_without_the_extra_is_one_line(people, celeba64, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "dlib" else real(name, *a))
    rc, err = _audit(capsys, people, celeba64, people / "others")
    assert rc == 2 and 'pip install -e ".[privacy]"' in err and err.count("\n") == 1, err


def _run_args(people, celeba64, *extra):
    # run.storage_path = people: the run's feature cache is the one the audits above filled.
    return ["--config", "configs/smoke.toml", f"--run.storage_path={people}", "--data.source=shards",
            f"--data.path={people / 'train'}", f"--eval.real_path={celeba64 / 'val'}", "--model.width=0.0625",
            "--train.batch_size=16", "--train.max_steps=8", "--train.log_every=4", "--scale.num_workers=1",
            "--scale.cpus_per_worker=0.5", "--eval.every_steps=8", "--eval.extractor=pixels",
            "--eval.num_samples=64", "--eval.identity_samples=64", *extra]


def test_run_and_sweep_log_the_identity_audit(people, celeba64, faces64, ray_local, mlflow_store, root_cwd, capsys):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_store)
    # Shards with identities and the extra installed: "auto" audits the final generator.
    assert train_job.main(_run_args(people, celeba64, "--run.name=leak")) == 0
    run_id = capsys.readouterr().out.split("run_id: ")[1].split()[0]
    run = client.get_run(run_id)
    assert run.data.params["eval.identity_audit"] == "on"
    [auc] = client.get_metric_history(run_id, "identity_auc")
    assert auc.step == 8 and 0 <= auc.value <= 1 and len(client.get_metric_history(run_id, "identity_match_rate")) == 1
    assert {a.path for a in client.list_artifacts(run_id, "audit")} == {"audit/identity_summary.json",
                                                                           "audit/identity_evidence.png"}
    summary = json.loads(Path(client.download_artifacts(run_id, "audit/identity_summary.json")).read_text())
    assert summary["n_fake"] == 64 and summary["n_train_identities"] == 60 and summary["identity_auc"] == auc.value
    # Without identities, "auto" is off and "on" is refused before Ray, in one line.
    generated = ["--data.source=shards", f"--data.path={faces64}", "--eval.real_path="]
    capsys.readouterr()  # the artifact download's progress bar
    assert train_job.main(_run_args(people, celeba64, "--run.name=noid", "--eval.identity_audit=on", *generated)) == 2
    err = capsys.readouterr().err
    assert "eval.identity_audit=on:" in err and "no identity column" in err and err.count("\n") == 1, err
    # A sweep: every trial's identity_auc in results.csv, the frontier plot, and a cap.
    sweep = people / "leak-sweep.toml"
    sweep.write_text('[sweep]\nname = "leak-sweep"\nnum_samples = 2\ngrace_period = 8\n\n[space]\n'
                     '"optim.lr_ratio" = { type = "loguniform", low = 0.1, high = 4.0 }\n')
    assert tune_job.main(["--sweep", str(sweep), "--max-identity-auc", "0.99", *_run_args(people, celeba64)]) == 0
    parent = capsys.readouterr().out.split("parent_run_id: ")[1].split()[0]
    assert {"results.csv", "sweep_identity.png"} <= {a.path for a in client.list_artifacts(parent)}
    table = list(csv.DictReader(Path(client.download_artifacts(parent, "results.csv")).open()))
    assert len(table) == 2 and all(0 <= float(r["identity_auc"]) <= 1 for r in table)
    best = [c for c in child_runs(client, parent) if c.data.tags.get("facegan.best_trial") == "true"]
    assert len(best) == 1 and best[0].data.metrics["identity_auc"] <= 0.99
    assert tune_job.main(["--sweep", str(sweep), "--max-identity-auc", "0.9", *_run_args(people, celeba64), *generated]) == 2
    assert "max_identity_auc: the trials run no identity audit" in capsys.readouterr().err


def test_sampling_filter_drops_training_people_and_keeps_strangers(people, celeba64, capsys):
    """The filter (evaluation/leak.py) on real photos: new photos of training people stand for
    fakes that show them; photos of the test split's people (in neither set) for strangers."""
    from evaluation.leak import IdentityLeak

    leak = IdentityLeak(people / "train", celeba64 / "val", cache_dir=str(people / "feature_cache"))
    threshold = leak.threshold_at(0.05)
    assert leak.threshold < threshold  # looser than the audit's 1% threshold
    # Every third photo: 200 of the 60 training people's other photos, 220 of the 22 strangers'.
    others = np.concatenate([ShardSet(people / "others").read(rg) for rg in ShardSet(people / "others").row_groups])[::3]
    test = ShardSet(celeba64 / "test")
    strangers = np.concatenate([test.read(rg) for rg in test.row_groups])[::3]
    assert len(others) == 200 and len(strangers) == 220 and len({*ShardSet(people / "others").identities()}) == 60
    removed = leak.near_training(others, threshold)[0].mean()
    kept = 1 - leak.near_training(strangers, threshold)[0].mean()
    assert removed >= 0.90 and kept >= 0.90, (removed, kept)
    # The same through the audit's flag: what the filter keeps matches at the strangers' rate.
    rc, rep = _audit(capsys, people, celeba64, people / "others", "--exclude-training-identities")
    assert rep["filter"]["drawn"] == 200 and rep["filter"]["dropped"] >= 180 and rep["filter"]["fpir"] == 0.05
    assert rep["n_fake"] == rep["filter"]["kept"] and rep["identity_match_rate"] <= rep["heldout_match_rate"] + 0.01, rep
    with pytest.raises(SystemExit) as bad:
        _audit(capsys, people, celeba64, people / "others", "--exclude-training-identities", "--filter-fpir", "2")
    err = capsys.readouterr().err
    assert bad.value.code == 2 and "--filter-fpir: expected a fraction in (0, 1)" in err and err.count("\n") == 1


def test_jobs_sample_filter_draws_again_and_says_what_it_dropped(people, celeba64, faces64, tmp_path, capsys):
    from gan.checkpoint import save_state
    from gan.config import Config, flatten
    from gan.models import Generator
    from jobs import sample

    cfg = Config()
    cfg.model.width = 0.0625
    G = Generator(cfg.model)
    save_state({"step": 1, "G": G.state_dict(), "config": flatten(cfg), "format": 1}, tmp_path / "g.pt")
    args = ["--model", str(tmp_path / "g.pt"), "--out", str(tmp_path / "out"), "--n", "16", "--exclude-training-identities",
            "--cache", str(people / "feature_cache")]
    with pytest.raises(SystemExit) as bad:
        sample.main(args)
    assert bad.value.code == 2 and "needs --train and --heldout" in capsys.readouterr().err
    assert sample.main([*args, "--train", str(faces64), "--heldout", str(celeba64 / "val")]) == 2
    assert "no identity column" in capsys.readouterr().err
    assert sample.main([*args, "--train", str(people / "train"), "--heldout", str(celeba64 / "val")]) == 0
    said = json.loads((tmp_path / "out" / "filter.json").read_text())
    # drawn a forward batch (--batch 100) at a time, until 16 were kept
    assert said["kept"] == 16 and said["drawn"] % 100 == 0 and said["drawn"] - said["dropped"] >= 16
    assert f"dropped {said['dropped']} of {said['drawn']}" in capsys.readouterr().out
    assert len(list((tmp_path / "out").glob("sample_*.png"))) == 16


def test_publishing_guard_logs_but_never_registers_a_generator_over_the_cap(people, celeba64, ray_local, mlflow_store,
                                                                          root_cwd, capsys, tmp_path):
    """eval.max_identity_auc on a real run: the identity audit at every evaluation, and only a
    generator under the cap is published, registered and made champion. The seed is one whose
    generators are over the cap of 0.5 at some evaluation (train.deterministic: the same on
    every run); any evaluation's verdict is checked against the identity_auc it logged."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_store)
    assert train_job.main(_run_args(people, celeba64, "--run.name=capped", "--eval.every_steps=4", "--train.max_steps=12",
                                    "--eval.register_as=capped", "--eval.max_identity_auc=0.5",
                                    "--train.deterministic=true", f"--train.seed={GUARD_SEED}")) == 0
    run_id = capsys.readouterr().out.split("run_id: ")[1].split()[0]
    run = client.get_run(run_id)
    auc = {m.step: m.value for m in client.get_metric_history(run_id, "identity_auc")}
    fid = {m.step: m.value for m in client.get_metric_history(run_id, "fid")}
    assert sorted(auc) == sorted(fid) == [4, 8, 12]  # the audit ran at every evaluation
    over = sorted(s for s, v in auc.items() if v > 0.5)
    assert over, f"seed {GUARD_SEED} no longer draws a generator over the cap: {auc}"
    under = {s: fid[s] for s in auc if s not in over}
    published = sorted(int(v.description.split("step ")[1].split(",")[0])
                       for v in client.search_model_versions("name='capped'"))
    # Published: each new FID best among the evaluations under the cap, in order; never one over it.
    bests, best = [], float("inf")
    for s in sorted(under):
        if under[s] < best:
            bests, best = bests + [s], under[s]
    assert published == bests and not set(published) & set(over)
    tags = run.data.tags
    assert tags["facegan.privacy_guard"].startswith(f"step {over[-1]}: identity_auc ")
    assert "is over eval.max_identity_auc 0.5" in tags["facegan.privacy_guard"]
    assert "Privacy guard" in tags["mlflow.note.content"]
    if bests:
        champion = client.get_model_version_by_alias("capped", "champion")
        assert f"step {bests[-1]}" in champion.description and tags["facegan.best_step"] == str(bests[-1])
    else:  # none under the cap: the final generator is the run's model, and nothing is registered
        from jobs import sample

        assert "facegan.best_step" not in tags and not client.search_model_versions("name='capped'")
        assert sample.main(["--model", f"runs:/{run_id}/generator", "--out", str(tmp_path / "final"), "--n", "2"]) == 0


def test_quality_benchmark_reports_privacy_columns_and_a_filter_row(people, celeba64, tmp_path):
    """benchmarks.quality on shards with identities: ε, the identity audit's columns, and the
    same generator behind the sampling filter as a second row; --table reads a results file."""
    import subprocess
    import sys

    root = tmp_path / "data"
    root.mkdir()
    (root / "train").symlink_to(people / "train")
    (root / "val").symlink_to(celeba64 / "val")
    rows_file = tmp_path / "rows.jsonl"
    cmd = [sys.executable, "-m", "benchmarks.quality", "--data", str(root), "--max-steps", "3", "--n", "32",
           "--identity-n", "32", "--width", "0.0625", "--extractor", "pixels", "--identity", "on",
           "--variants", "faces64+dp:model.d_norm=none;privacy.dp_epsilon=5", "--cache", str(people / "feature_cache"),
           "--out", str(tmp_path / "strips"), "--jsonl", str(rows_file)]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["faces64+dp", "faces64+dp+filter"]
    plain, filtered = rows
    assert plain["overrides"]["optim.lr_d"] == 4e-4  # faces64's recipe under the ad-hoc part
    assert 0 < plain["epsilon"] <= 5 and filtered["epsilon"] == plain["epsilon"]
    for r in rows:
        assert 0 <= r["identity_auc"] <= 1 and r["identity_n"] == 32 and r["fid"] > 0
        assert {"identity_match_rate", "heldout_match_rate"} <= set(r)
    assert filtered["filter_drawn"] % 100 == 0 and filtered["filter_drawn"] - filtered["filter_dropped"] >= 32
    assert filtered["identity_match_rate"] <= filtered["heldout_match_rate"] + 0.05
    table = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--table", str(rows_file)],
                           cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert "| faces64+dp+filter |" in table.stdout and "identity AUC" in table.stdout
