"""infra/mlflow-postgres.sh stands up an mlflow server on PostgreSQL with an S3-compatible
artifact store (moto) on 127.0.0.1: a run logged through it lands in both, and stop stops all
three. Runs where Debian's postgresql and psycopg2 are installed; skipped, saying which is
missing, elsewhere (`apt-get install -y postgresql`, `pip install -e ".[server]"`)."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile

import pytest

from tests.conftest import ROOT, _free_port

INITDB = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
INITDB = INITDB and os.path.realpath(INITDB)  # psql sits beside the real one


@pytest.mark.skipif(INITDB is None, reason="PostgreSQL is not installed (apt-get install -y postgresql)")
def test_mlflow_on_postgres_and_s3(monkeypatch):
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install -e '.[server]')")
    import boto3
    from mlflow.tracking import MlflowClient

    # Not under pytest's tmp_path: as root the script runs PostgreSQL as 'postgres', which must
    # be able to enter the folder (pytest's root-owned 0700 base is closed to it).
    home = tempfile.mkdtemp(prefix="fg-pg-", dir="/tmp")
    os.chmod(home, 0o755)
    ports = {"PG_PORT": _free_port(), "S3_PORT": _free_port(), "MLFLOW_PORT": _free_port()}
    env = {**os.environ, "FACEGAN_HOME": home, **{k: str(v) for k, v in ports.items()}}
    env.pop("MLFLOW_S3_ENDPOINT_URL", None)
    script = str(ROOT / "infra" / "mlflow-postgres.sh")
    try:
        up = subprocess.run(["bash", script, "start"], env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        uri = f"http://127.0.0.1:{ports['MLFLOW_PORT']}"
        assert f"MLFLOW_TRACKING_URI={uri}" in up.stdout
        client = MlflowClient(uri)
        run = client.create_run(client.create_experiment("pg"))
        client.log_metric(run.info.run_id, "fid", 42.0, step=3)
        client.log_text(run.info.run_id, "hello", "notes/hello.txt")
        # The metric is in PostgreSQL, the artifact in the S3 bucket, both read back directly.
        psql = os.path.join(os.path.dirname(INITDB), "psql")
        rows = subprocess.run(["runuser", "-u", "postgres", "--"] * (os.getuid() == 0) +
                              [psql, "-h", "127.0.0.1", "-p", str(ports["PG_PORT"]), "-U", "facegan", "-d", "mlflow",
                               "-tAc", f"SELECT value, step FROM metrics WHERE run_uuid = '{run.info.run_id}'"],
                              capture_output=True, text=True, timeout=60)
        assert rows.stdout.strip() == "42|3", rows.stdout + rows.stderr
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{ports['S3_PORT']}", aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow").get("Contents", [])]
        assert any(k.endswith(f"{run.info.run_id}/artifacts/notes/hello.txt") for k in keys), keys
        assert client.download_artifacts(run.info.run_id, "notes/hello.txt", home).endswith("hello.txt")
    finally:
        down = subprocess.run(["bash", script, "stop"], env=env, capture_output=True, text=True, timeout=120)
        shutil.rmtree(home, ignore_errors=True)
    assert down.returncode == 0, down.stderr
    assert subprocess.run(["curl", "-sf", f"{uri}/health"], capture_output=True).returncode != 0  # stopped
