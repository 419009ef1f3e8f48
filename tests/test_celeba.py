"""CelebA -> shards on the real sample (../shared/data/celeba-sample) and corrupted copies."""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from datasets import celeba
from datasets.shards import ShardError, ShardSet
from tests.conftest import CELEBA_SAMPLE

ZIP, PARTITION = CELEBA_SAMPLE / "img_align_celeba.zip", CELEBA_SAMPLE / "list_eval_partition.txt"
IDENTITIES = CELEBA_SAMPLE / "identity_CelebA.txt"
pytestmark = pytest.mark.skipif(not ZIP.is_file(), reason="needs ../shared/data/celeba-sample")


def _convert(tmp_path, src, out, *extra):
    return celeba.main(["--src", str(src), "--partition", str(PARTITION), "--out", str(out),
                        "--workers", "2", *extra])


def _jpeg(im: Image.Image, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    (im.convert(mode) if mode else im).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad_zip(tmp_path_factory) -> tuple[Path, dict]:
    """60 real photos plus one of each kind of bad input; returns the zip and what to expect."""
    src = zipfile.ZipFile(ZIP)
    names = sorted(src.namelist())[:72]
    good, spare = names[:60], names[60:]
    photo = lambda n: Image.open(io.BytesIO(src.read(n))).convert("RGB")
    stem = lambda n: Path(n).stem
    out = tmp_path_factory.mktemp("bad") / "celeba_bad.zip"
    full = src.read(spare[0])
    with zipfile.ZipFile(out, "w") as z:
        for n in good:
            z.writestr(n, src.read(n))
        z.writestr(f"img_align_celeba/{stem(spare[0])}.jpg", full[: len(full) // 2])  # truncated
        z.writestr(f"img_align_celeba/{stem(spare[1])}.jpg", b"")  # zero bytes
        z.writestr(f"img_align_celeba/{stem(spare[2])}.jpg", b"this is not a JPEG at all")  # corrupt
        z.writestr("img_align_celeba/README.txt", b"not an image")  # non-image file
        z.writestr(f"img_align_celeba/{stem(spare[3])}.jpg", _jpeg(photo(spare[3]), "L"))  # grayscale
        z.writestr(f"img_align_celeba/{stem(spare[4])}.jpg", _jpeg(photo(spare[4]), "CMYK"))  # CMYK
        png = io.BytesIO()
        photo(spare[5]).save(png, "PNG")
        z.writestr(f"img_align_celeba/{stem(spare[5])}.png", png.getvalue())  # PNG inside the zip
        z.writestr(f"img_align_celeba/{stem(spare[6])}.jpg", _jpeg(photo(spare[6]).resize((89, 109))))  # half size
        z.writestr(f"img_align_celeba/{stem(spare[7])}.jpg", _jpeg(photo(spare[7]).resize((150, 150))))  # odd aspect
        z.writestr(f"elsewhere/{stem(good[0])}.jpg", src.read(good[1]))  # duplicate file name
        z.writestr("img_align_celeba/999999.jpg", src.read(good[2]))  # not in the partition file
    expect = {
        "converted": {stem(n) for n in good} | {stem(spare[i]) for i in (3, 4, 5, 6)},
        "rejected": {f"img_align_celeba/{stem(spare[0])}.jpg": "unreadable image",
                     f"img_align_celeba/{stem(spare[1])}.jpg": "empty file",
                     f"img_align_celeba/{stem(spare[2])}.jpg": "unreadable image",
                     "img_align_celeba/README.txt": "not an image file",
                     f"img_align_celeba/{stem(spare[7])}.jpg": "unexpected size 150x150",
                     f"elsewhere/{stem(good[0])}.jpg": "duplicate file name",
                     "img_align_celeba/999999.jpg": "not in the partition file"},
    }
    return out, expect


def _ids(out: Path) -> set[str]:
    ids = set()
    for split in ("train", "val", "test"):
        if (out / split / "manifest.json").is_file():
            s = ShardSet(out / split, verify_checksums=True)
            ids |= {i for f in s.files for i in f.read(columns=["id"]).column("id").to_pylist()}
    return ids


def test_bad_inputs_are_converted_or_reported(bad_zip, tmp_path, capsys):
    src, expect = bad_zip
    out = tmp_path / "out"
    assert _convert(tmp_path, src, out, "--size", "64", "--max-rejected", "0.5") == 0
    assert _ids(out) == expect["converted"]
    rejected = {r["name"]: r["reason"] for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}
    assert rejected.keys() == expect["rejected"].keys()
    for name, reason in expect["rejected"].items():
        assert rejected[name].startswith(reason), (name, rejected[name])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rejected"] == 7 and summary["converted"] == 64 and summary["notes"] == 3
    assert "rejected 7" in capsys.readouterr().out
    # Past the allowed fraction the run still writes everything but exits non-zero.
    assert _convert(tmp_path, src, tmp_path / "strict", "--size", "64", "--max-rejected", "0.01") == 1
    assert _ids(tmp_path / "strict") == expect["converted"]


def test_unexpected_size_policy_reject(bad_zip, tmp_path):
    src, expect = bad_zip
    assert _convert(tmp_path, src, tmp_path / "o", "--size", "64", "--unexpected-size", "reject",
                    "--max-rejected", "1") == 0
    rejected = [json.loads(line) for line in (tmp_path / "o" / "rejected.jsonl").read_text().splitlines()]
    assert sum(r["reason"].startswith("unexpected size 89x109") for r in rejected) == 1


def test_full_sample_at_128_with_manifest(tmp_path):
    out = tmp_path / "c128"
    assert _convert(tmp_path, ZIP, out, "--size", "128", "--encoding", "jpeg", "--identities", str(IDENTITIES)) == 0
    truth = {ln.split()[0][:-4]: int(ln.split()[1]) for ln in IDENTITIES.read_text().splitlines()}
    people = {}
    for split, n in {"train": 4560, "val": 780, "test": 660}.items():
        s = ShardSet(out / split, verify_checksums=True)
        m = s.manifest
        assert s.count == n and m["counts"] == {"train": 4560, "val": 780, "test": 660}
        # Who is in each photo, row by row as the identity file says; the sample's splits hold
        # 152 / 26 / 22 people with 30 photos each, and no person is in two splits.
        who = s.identities()
        assert who is not None and who.tolist() == [truth[i] for i in s.ids()]
        people[split] = set(who.tolist())
        assert m["identity_counts"] == {"train": {"identities": 152, "photos_min": 30, "photos_max": 30},
                                        "val": {"identities": 26, "photos_min": 30, "photos_max": 30},
                                        "test": {"identities": 22, "photos_min": 30, "photos_max": 30}}
        assert m["source_files"]["identity_CelebA.txt"] == _sha_from_sums("identity_CelebA.txt")
        assert m["image_size"] == 128 and m["encoding"] == "jpeg" and m["crop_box"] == [25, 50, 153, 178]
        assert m["source_files"]["img_align_celeba.zip"] == _sha_from_sums("img_align_celeba.zip")
        assert m["source_files"]["list_eval_partition.txt"] == _sha_from_sums("list_eval_partition.txt")
        assert all(e["rows"] > 0 and len(e["sha256"]) == 64 for e in m["shards"])
    assert not (people["train"] & people["val"]) and not (people["train"] & people["test"])
    faces = ShardSet(out / "val").read(ShardSet(out / "val").row_groups[0])
    assert faces.shape[1:] == (128, 128, 3) and faces.std() > 30  # real photos, not blank
    assert (out / "rejected.jsonl").read_text() == ""


def _sha_from_sums(name: str) -> str:
    for line in (CELEBA_SAMPLE / "SHA256SUMS").read_text().splitlines():
        sha, _, fname = line.partition("  ")
        if fname.strip() == name:
            return sha
    raise KeyError(name)


def test_rerun_keeps_finished_shards_and_redoes_the_rest(bad_zip, tmp_path):
    src, _ = bad_zip
    out = tmp_path / "o"
    args = ["--size", "64", "--encoding", "raw", "--rows-per-shard", "16", "--max-rejected", "1"]
    assert _convert(tmp_path, src, out, *args) == 0
    first = {p.name: p.read_bytes() for p in (out / "train").glob("part-*.parquet")}
    manifest = (out / "train" / "manifest.json").read_text()
    # An interruption: one shard never renamed into place, the manifest never written.
    victim = sorted(first)[1]
    (out / "train" / victim).unlink()
    (out / "train" / "manifest.json").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("part-*.parquet")}
    assert _convert(tmp_path, src, out, *args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards_skipped"] == sum(len(list((out / s).glob("part-*"))) for s in ("train", "val", "test")) - 1
    assert all((out / "train" / n).stat().st_mtime_ns == t for n, t in kept.items())  # not rewritten
    assert {p.name: p.read_bytes() for p in (out / "train").glob("part-*.parquet")} == first
    assert (out / "train" / "manifest.json").read_text() == manifest
    assert len((out / "rejected.jsonl").read_text().splitlines()) == 7  # kept shards' rejects too
    # Other options: nothing is reused.
    assert _convert(tmp_path, src, out, "--size", "128", "--encoding", "raw", "--rows-per-shard", "16",
                    "--max-rejected", "1") == 0
    assert json.loads((out / "summary.json").read_text())["shards_skipped"] == 0
    assert ShardSet(out / "train").image_size == 128


def test_reader_names_a_truncated_or_altered_shard(bad_zip, tmp_path):
    src, _ = bad_zip
    out = tmp_path / "o"
    assert _convert(tmp_path, src, out, "--size", "64", "--rows-per-shard", "16", "--max-rejected", "1") == 0
    shard = sorted((out / "train").glob("part-*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"{shard.name}: sha256 differs"):
        ShardSet(out / "train", verify_checksums=True)
    shard.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(ShardError, match=shard.name):
        ShardSet(out / "train")


def test_bad_arguments_are_clear(tmp_path, capsys):
    assert _convert(tmp_path, tmp_path / "missing.zip", tmp_path / "o", "--size", "64") == 2
    assert "missing.zip: no such file or folder" in capsys.readouterr().err
    notzip = tmp_path / "x.zip"
    notzip.write_bytes(b"nope")
    assert _convert(tmp_path, notzip, tmp_path / "o", "--size", "64") == 2
    assert "not a zip file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _convert(tmp_path, ZIP, tmp_path / "o", "--size", "64", "--crop", "0,0,300,300")
    assert "--crop" in capsys.readouterr().err


def test_identity_file_names_missing_twice_and_malformed(bad_zip, tmp_path, capsys):
    src, expect = bad_zip
    out = tmp_path / "o"
    assert _convert(tmp_path, src, out, "--size", "64", "--max-rejected", "1") == 0
    assert ShardSet(out / "train").identities() is None  # optional: no file, no column
    listing = [ln for ln in IDENTITIES.read_text().splitlines()]
    kept = sorted(expect["converted"])
    dropped = kept[0]  # a good photo whose name the identity file lacks: rejected, by reason
    ident = tmp_path / "identity.txt"
    ident.write_text("\n".join(ln for ln in listing if ln.split()[0][:-4] != dropped) + "\n")
    # A rerun with identities redoes the shards written without them.
    assert _convert(tmp_path, src, out, "--size", "64", "--max-rejected", "1", "--identities", str(ident)) == 0
    rejected = {json.loads(ln)["name"]: json.loads(ln)["reason"] for ln in (out / "rejected.jsonl").read_text().splitlines()}
    assert rejected[f"img_align_celeba/{dropped}.jpg"] == "not in the identity file"
    sets = [ShardSet(out / sp) for sp in ("train", "val", "test") if (out / sp / "manifest.json").is_file()]
    assert sum(s.count for s in sets) == len(kept) - 1 and all(len(s.identities()) == s.count for s in sets)
    twice = tmp_path / "twice.txt"
    twice.write_text(f"{listing[0]}\n{listing[1]}\n{listing[0].split()[0]} 7\n")
    assert _convert(tmp_path, src, tmp_path / "o2", "--size", "64", "--identities", str(twice)) == 2
    assert f"{twice}:3: {listing[0].split()[0]} is listed twice (first at line 1)" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{listing[0]}\n000002.jpg person\n")
    assert _convert(tmp_path, src, tmp_path / "o3", "--size", "64", "--identities", str(bad)) == 2
    assert f"{bad}:2: expected '<file name> <identity number>', got '000002.jpg person'" in capsys.readouterr().err


def test_train_people_keeps_the_first_people_whole(tmp_path, capsys):
    """--train-people K: the leak stress protocol's small private set (docs/privacy.md)."""
    out = tmp_path / "few"
    assert _convert(tmp_path, ZIP, out, "--size", "64", "--identities", str(IDENTITIES), "--train-people", "5") == 0
    train, val = ShardSet(out / "train"), ShardSet(out / "val")
    split = dict(line.split() for line in PARTITION.read_text().splitlines())
    in_zip = {Path(n).name for n in zipfile.ZipFile(ZIP).namelist()}
    people = sorted({int(p) for name, p in (line.split() for line in IDENTITIES.read_text().splitlines())
                     if split.get(name) == "0" and name in in_zip})
    who = train.identities()
    assert sorted(set(who.tolist())) == people[:5]  # the first five training people by identity number
    assert train.count == 150 and all((who == p).sum() == 30 for p in people[:5])  # all their photos
    assert val.count == 780 and len(set(val.identities().tolist())) == 26  # held-out splits stay whole
    with pytest.raises(SystemExit):
        _convert(tmp_path, ZIP, tmp_path / "o", "--size", "64", "--train-people", "5")
    assert "--train-people 5: expected a count >= 1 together with --identities" in capsys.readouterr().err
