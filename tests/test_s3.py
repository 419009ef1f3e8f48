"""Shards on object storage: a real S3-compatible server (moto in server mode) on 127.0.0.1."""
from __future__ import annotations

import boto3
import numpy as np
import pytest
from moto.server import ThreadedMotoServer

from datasets import celeba
from datasets.shards import ShardError, ShardReader, ShardSet, ShardWriter
from tests.conftest import CELEBA_SAMPLE, _free_port


@pytest.fixture
def s3(monkeypatch):
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL_S3": endpoint}.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="faces")
    yield client
    server.stop()


def test_writer_and_reader_round_trip_on_s3(s3):
    imgs = np.random.default_rng(0).integers(0, 256, (40, 64, 64, 3), dtype=np.uint8)
    w = ShardWriter("s3://faces/gen64", 64, "png", rows_per_shard=16, row_group_size=8)
    for i, im in enumerate(imgs):
        w.add(str(i), im)
    w.close()
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="faces", Prefix="gen64/")["Contents"]}
    assert keys == {"gen64/manifest.json", "gen64/part-00000.parquet", "gen64/part-00001.parquet",
                    "gen64/part-00002.parquet"}
    shards = ShardSet("s3://faces/gen64", verify_checksums=True)
    got = np.concatenate([shards.read(rg) for rg in shards.row_groups])
    assert np.array_equal(got, imgs)  # PNG is lossless
    batches = list(ShardReader(shards, 0, 2, batch_size=4).iter_epoch(0))
    assert len(batches) >= 4 and batches[0].shape == (4, 64, 64, 3)
    with pytest.raises(ShardError, match="s3://faces/nothing"):
        ShardSet("s3://faces/nothing")


@pytest.mark.skipif(not (CELEBA_SAMPLE / "img_align_celeba.zip").is_file(), reason="needs the CelebA sample")
def test_celeba_converter_writes_to_s3(s3, tmp_path):
    import zipfile

    src = tmp_path / "small.zip"
    with zipfile.ZipFile(CELEBA_SAMPLE / "img_align_celeba.zip") as full, zipfile.ZipFile(src, "w") as z:
        for name in full.namelist()[:300]:
            z.writestr(name, full.read(name))
    rc = celeba.main(["--src", str(src), "--partition", str(CELEBA_SAMPLE / "list_eval_partition.txt"),
                      "--out", "s3://faces/celeba64", "--size", "64", "--workers", "2"])
    assert rc == 0
    total = sum(ShardSet(f"s3://faces/celeba64/{s}", verify_checksums=True).count
                for s in ("train", "val", "test")
                if s3.list_objects_v2(Bucket="faces", Prefix=f"celeba64/{s}/manifest.json").get("KeyCount"))
    assert total == 300
    assert s3.get_object(Bucket="faces", Key="celeba64/rejected.jsonl")["Body"].read() == b""


def test_storage_checks_on_object_storage(s3, monkeypatch):
    """What jobs.train/jobs.tune check before Ray for an s3:// run.storage_path."""
    from gan.config import ConfigError
    from jobs.preflight import exists, writable

    assert not exists("s3://faces/runs/a")
    writable("s3://faces/runs", "run.storage_path")  # a probe object, put and deleted
    left = [o["Key"] for o in s3.list_objects_v2(Bucket="faces", Prefix="runs/").get("Contents", [])]
    assert all(k.endswith("/") for k in left), left  # no probe left (pyarrow may keep a "runs/" marker)
    s3.put_object(Bucket="faces", Key="runs/a/checkpoint_000000010/checkpoint.pt", Body=b"x")
    assert exists("s3://faces/runs/a")  # a prefix with objects is a run
    with pytest.raises(ConfigError, match=r"^run.storage_path: s3://missing-bucket/runs is not writable \("):
        writable("s3://missing-bucket/runs", "run.storage_path")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{_free_port()}")  # nothing listens
    with pytest.raises(ConfigError, match=r"^run.storage_path: cannot read s3://faces/runs/a \(.*connect"):
        exists("s3://faces/runs/a")
