import json

import numpy as np
import pytest

from datasets.shards import MANIFEST, ShardError, ShardReader, ShardSet, ShardWriter
from datasets.synthetic import draw_face, ensure_generated, write_generated
from tests.conftest import ids_of, write_indexed


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    # 1000 rows, row groups of 64 (the last of each 256-row file shorter): uneven on purpose.
    return write_indexed(tmp_path_factory.mktemp("indexed"), 1000, size=8, row_group_size=60)


def test_round_trip_is_exact(tmp_path):
    imgs = np.random.default_rng(1).integers(0, 256, (10, 64, 64, 3), dtype=np.uint8)
    w = ShardWriter(tmp_path, 64, rows_per_shard=4, row_group_size=2)
    for i, im in enumerate(imgs):
        w.add(str(i), im)
    m = w.close()
    assert m["count"] == 10 and [s["rows"] for s in m["shards"]] == [4, 4, 2]
    assert not list(tmp_path.glob(".*tmp"))  # nothing left under a temporary name
    s = ShardSet(tmp_path, verify_checksums=True)
    got = np.concatenate([s.read(rg) for rg in s.row_groups])
    assert np.array_equal(got, imgs)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_shares_are_disjoint_and_complete(indexed, world):
    s = ShardSet(indexed)
    readers = [ShardReader(s, r, world, batch_size=7, seed=3) for r in range(world)]
    for epoch in range(2):
        shares = [[i for b in rd.iter_epoch(epoch) for i in ids_of(b)] for rd in readers]
        seen = [i for share in shares for i in share]
        assert len(seen) == len(set(seen))  # disjoint, and no repeats within a rank
        assert len({len(sh) for sh in shares}) == 1  # same number of steps on every rank
        groups = [g for r in range(world) for g in readers[0].share(epoch, r)]
        assert sorted((g.file, g.index) for g in groups) == sorted((g.file, g.index) for g in s.row_groups)
        # Only the tail that does not fill a batch (plus the uneven ranks' excess) is dropped.
        assert len(seen) >= 1000 - world * (7 + 60)


def test_epochs_are_shuffled_differently(indexed):
    rd = ShardReader(ShardSet(indexed), 0, 1, batch_size=10, seed=0)
    e0 = [i for b in rd.iter_epoch(0) for i in ids_of(b)]
    e1 = [i for b in rd.iter_epoch(1) for i in ids_of(b)]
    assert e0 != e1 and e0 != sorted(e0)
    again = [i for b in ShardReader(ShardSet(indexed), 0, 1, 10, seed=0).iter_epoch(0) for i in ids_of(b)]
    assert e0 == again


@pytest.mark.parametrize("start", [0, 1, 13, 40, 99])
def test_resuming_mid_epoch_gives_the_same_batches(indexed, start):
    rd = ShardReader(ShardSet(indexed), 1, 2, batch_size=9, seed=4, shuffle_groups=3)
    full = [ids_of(b) for b in rd.iter_epoch(2)]
    assert [ids_of(b) for b in rd.iter_epoch(2, start)] == full[start:]


def test_missing_and_broken_sets_name_the_file(tmp_path, indexed):
    with pytest.raises(ShardError, match="does not exist"):
        ShardSet(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match=r"manifest.json: missing"):
        ShardSet(tmp_path / "empty")
    bad = tmp_path / "bad"
    write_indexed(bad, 100, size=8, row_group_size=10)
    first = sorted(bad.glob("part-*.parquet"))[0]
    first.write_bytes(first.read_bytes()[:200])  # truncated
    with pytest.raises(ShardError, match=first.name):
        ShardSet(bad)
    m = json.loads((indexed / MANIFEST).read_text())
    m["shards"][0]["rows"] += 1
    alt = tmp_path / "alt"
    alt.mkdir()
    for f in indexed.iterdir():
        (alt / f.name).write_bytes(f.read_bytes())
    (alt / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ShardError, match="rows, manifest says"):
        ShardSet(alt)


def test_too_few_row_groups_for_the_workers(tmp_path):
    write_indexed(tmp_path, 10, size=8, row_group_size=10)
    with pytest.raises(ShardError, match="1 row groups for 2 workers"):
        ShardReader(ShardSet(tmp_path), 0, 2, 4)


def test_generated_faces_are_reproducible_and_varied(tmp_path):
    a, b = draw_face(7, 64, seed=1), draw_face(7, 64, seed=1)
    assert np.array_equal(a, b) and a.shape == (64, 64, 3) and a.dtype == np.uint8
    faces = np.stack([draw_face(i, 64) for i in range(32)]).astype(np.float32)
    # Faces differ from each other far more than JPEG-noise level, and each is not flat.
    pair = np.abs(faces[:, None] - faces[None]).mean(axis=(2, 3, 4))
    assert pair[~np.eye(32, dtype=bool)].min() > 5
    assert faces.std(axis=(1, 2)).min() > 10
    m = write_generated(tmp_path / "g", 300, 64, workers=2, row_group_size=50)
    assert m["count"] == 300 and ShardSet(tmp_path / "g").count == 300
    assert ensure_generated(tmp_path / "g", 300, 64).count == 300  # reused, not redrawn
    with pytest.raises(ValueError, match="different shard set"):
        ensure_generated(tmp_path / "g", 400, 64)
