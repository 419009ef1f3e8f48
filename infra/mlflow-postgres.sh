#!/usr/bin/env bash
# An MLflow server as a team runs it: PostgreSQL as the backend store and an S3-compatible
# artifact store (moto's server), everything on 127.0.0.1, its state under $FACEGAN_HOME/pg
# (default ./.facegan/pg).
#   apt-get install -y postgresql && pip install -e ".[server]"    # once
#   infra/mlflow-postgres.sh start    # prints the MLFLOW_TRACKING_URI to use
#   infra/mlflow-postgres.sh stop     # stops the three; the data stays for the next start
# Ports: PG_PORT (5433), S3_PORT (9000), MLFLOW_PORT (5000). Artifacts go to s3://$S3_BUCKET
# (mlflow) through the server (--artifacts-destination): clients need no S3 credentials.
# moto keeps objects in memory, so artifacts last as long as it runs: point
# MLFLOW_S3_ENDPOINT_URL at a real S3-compatible service (and drop the moto part) to keep them.
set -euo pipefail
HOME_DIR=$(realpath -m "${FACEGAN_HOME:-.facegan}/pg")
PG_PORT=${PG_PORT:-5433}
S3_PORT=${S3_PORT:-9000}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
S3_BUCKET=${S3_BUCKET:-mlflow}
# Debian puts the server's tools in /usr/lib/postgresql/<version>/bin (initdb may be linked elsewhere).
PG_BIN=$(dirname "$(realpath -m "$(command -v initdb || ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | tail -n 1 || echo /nonexistent/initdb)")")
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-testing} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-testing}
export AWS_DEFAULT_REGION=${AWS_DEFAULT_REGION:-us-east-1}
export MLFLOW_S3_ENDPOINT_URL=${MLFLOW_S3_ENDPOINT_URL:-http://127.0.0.1:$S3_PORT}

die() { echo "error: $*" >&2; exit 2; }
# PostgreSQL refuses to run as root: as root, its commands run as the 'postgres' user.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
wait_url() { for _ in $(seq 120); do curl -sf "$1" >/dev/null && return 0; sleep 0.5; done; return 1; }

start() {
  [ -x "$PG_BIN/initdb" ] || die "PostgreSQL is not installed (apt-get install -y postgresql)"
  python -c "import psycopg2, moto" 2>/dev/null || die "pip install -e '.[server]' (psycopg2-binary, moto)"
  mkdir -p "$HOME_DIR"
  if [ "$(id -u)" = 0 ]; then
    chown postgres "$HOME_DIR"
    runuser -u postgres -- test -w "$HOME_DIR" \
      || die "as root, $HOME_DIR must be reachable by the postgres user: set FACEGAN_HOME to a folder it can enter (e.g. under /tmp)"
  fi
  if [ ! -f "$HOME_DIR/data/PG_VERSION" ]; then
    as_pg "$PG_BIN/initdb" -D "$HOME_DIR/data" -U facegan --auth=trust >"$HOME_DIR/initdb.log" 2>&1 \
      || die "initdb failed (see $HOME_DIR/initdb.log)"
  fi
  as_pg "$PG_BIN/pg_ctl" -D "$HOME_DIR/data" -l "$HOME_DIR/postgres.log" -w \
    -o "-h 127.0.0.1 -p $PG_PORT -k $HOME_DIR" start >/dev/null || die "postgres did not start (see $HOME_DIR/postgres.log)"
  as_pg "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U facegan -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'mlflow'" | grep -q 1 \
    || as_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U facegan mlflow
  python -m moto.server -H 127.0.0.1 -p "$S3_PORT" >"$HOME_DIR/s3.log" 2>&1 &
  echo $! >"$HOME_DIR/s3.pid"
  wait_url "$MLFLOW_S3_ENDPOINT_URL/moto-api/" || die "the S3 server did not start (see $HOME_DIR/s3.log)"
  python - "$S3_BUCKET" <<'EOF'
import os, sys, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"])
if sys.argv[1] not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
    s3.create_bucket(Bucket=sys.argv[1])
EOF
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid python -m mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" \
    --workers 1 --backend-store-uri "postgresql+psycopg2://facegan@127.0.0.1:$PG_PORT/mlflow" \
    --artifacts-destination "s3://$S3_BUCKET/artifacts" >"$HOME_DIR/mlflow.log" 2>&1 &
  echo $! >"$HOME_DIR/mlflow.pid"
  wait_url "http://127.0.0.1:$MLFLOW_PORT/health" || die "mlflow server did not start (see $HOME_DIR/mlflow.log)"
  echo "MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT  (PostgreSQL :$PG_PORT, artifacts s3://$S3_BUCKET at $MLFLOW_S3_ENDPOINT_URL)"
}

stop_group() {  # TERM, up to 20 s to exit (the server finishes its requests), then KILL
  kill -- -"$1" 2>/dev/null || return 0
  for _ in $(seq 40); do kill -0 -- -"$1" 2>/dev/null || return 0; sleep 0.5; done
  kill -9 -- -"$1" 2>/dev/null || true
}

stop() {
  if [ -f "$HOME_DIR/mlflow.pid" ]; then  # its own session (setsid): the server and its workers
    stop_group "$(cat "$HOME_DIR/mlflow.pid")"
    rm -f "$HOME_DIR/mlflow.pid"
  fi
  if [ -f "$HOME_DIR/s3.pid" ]; then
    kill "$(cat "$HOME_DIR/s3.pid")" 2>/dev/null || true
    rm -f "$HOME_DIR/s3.pid"
  fi
  if [ -f "$HOME_DIR/data/postmaster.pid" ]; then
    as_pg "$PG_BIN/pg_ctl" -D "$HOME_DIR/data" -w -m fast stop >/dev/null
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
