"""The batch source the loop is handed (datasets/loader.py): loader processes give exactly the
rows, order and resumable positions of the in-process reader, and name a bad shard."""
import numpy as np
import pytest
import torch

from datasets.loader import BatchSource, loader_workers
from datasets.shards import ShardError, ShardReader, ShardSet, ShardWriter, encode
from gan.checkpoint import load_state
from gan.config import Config
from gan.context import CHECKPOINT_FILE, LocalContext
from compose import train_from_config
from tests.conftest import ids_of, write_indexed


@pytest.fixture(scope="module")
def indexed_png(tmp_path_factory):
    # 700 rows in uneven row groups of 60, PNG-encoded (lossless: the index pixel survives), so
    # the loader processes decode as they would JPEG shards.
    return write_indexed(tmp_path_factory.mktemp("png"), 700, size=8, row_group_size=60, encoding="png")


@pytest.mark.parametrize("world,window", [(1, 4), (2, 3), (3, 1)])
def test_plan_is_the_reader_order(indexed_png, world, window):
    s = ShardSet(indexed_png)
    for rank in range(world):
        r = ShardReader(s, rank, world, batch_size=7, seed=5, shuffle_groups=window)
        for epoch in (0, 1):
            old = [ids_of(b) for b in r.iter_epoch(epoch)]
            plan = r.plan(epoch)
            assert plan.tolist() == old  # stored-order index i holds the face that carries i
            assert [ids_of(s.take(row)) for row in plan] == old


def _stream(source, *start):
    return [(e, b, ids_of(x.numpy())) for e, b, x in source.stream(*start)]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 processes on a 2-core CI machine
@pytest.mark.parametrize("start", [(0, 0), (0, 11), (1, 0)])
def test_loader_processes_give_the_in_process_batches(indexed_png, start):
    args = dict(rank=1, world=2, batch_size=9, seed=3, shuffle_groups=2)
    inproc = BatchSource(indexed_png, **args, workers=0)
    procs = BatchSource(indexed_png, **args, workers=3, prefetch=2)
    want = _stream(inproc, *start, 3)
    assert want[0][:2] == start and want[-1][:2] == (2, inproc.steps_in_epoch(2) - 1)
    assert _stream(procs, *start, 3) == want
    # pixels too, not only the index pixel
    a = next(inproc.stream(0, 5, 1))[2]
    b = next(procs.stream(0, 5, 1))[2]
    assert a.dtype == b.dtype == torch.uint8 and torch.equal(a, b)


def test_a_bad_image_in_a_loader_process_is_one_error_naming_the_shard(tmp_path):
    good = encode(np.zeros((8, 8, 3), np.uint8), "png")
    w = ShardWriter(tmp_path, 8, "png", row_group_size=10)
    w.write_shard(0, [f"f{i}" for i in range(40)], [good] * 37 + [b"not an image"] + [good] * 2)
    w.close()
    for workers in (2, 0):
        src = BatchSource(tmp_path, batch_size=8, workers=workers)
        with pytest.raises(ShardError) as err:
            list(src.stream(0, 0, 1))
        msg = str(err.value)
        assert "\n" not in msg and "part-00000.parquet: row group 3" in msg and "not a decodable image" in msg


def test_worker_count_from_the_machine():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert loader_workers(-1, cpu, cpus=16) == 0  # a CPU run's cores train
    assert loader_workers(-1, gpu, cpus=4) == 3  # one CPU left to launch kernels
    assert loader_workers(-1, gpu, cpus=1) == 1
    assert loader_workers(-1, gpu, cpus=64) == 8
    assert loader_workers(2, cpu, cpus=1) == 2  # asked for: as it is


def _cfg(path, steps, workers):
    c = Config()
    c.data.path, c.data.loader_workers = str(path), workers
    c.model.width, c.train.batch_size, c.train.max_steps = 0.0625, 16, steps
    c.train.log_every, c.train.checkpoint_every, c.scale.num_workers = 3, 1000, 1
    return c


def test_training_on_loader_processes_is_the_same_run_and_resumes_exactly(faces64, tmp_path):
    """2 loader processes, interrupted at step 20 and resumed (into epoch 2: 32 steps an epoch),
    end with the weights of the run read in-process without a break."""
    train_from_config(_cfg(faces64, 45, 0), LocalContext(tmp_path / "a", resume=False))
    train_from_config(_cfg(faces64, 20, 2), LocalContext(tmp_path / "b", resume=False))
    res = train_from_config(_cfg(faces64, 45, 2), LocalContext(tmp_path / "b", resume=True))
    assert res.resumed_from == 20 and res.step == 45
    a, b = load_state(tmp_path / "a" / CHECKPOINT_FILE), load_state(tmp_path / "b" / CHECKPOINT_FILE)
    assert a["data"] == b["data"] == {"epoch": 1, "batch": 13}
    for key in ("G", "D"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
