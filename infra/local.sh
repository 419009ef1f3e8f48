#!/usr/bin/env bash
# A local Ray head and MLflow server on 127.0.0.1, for `ray job submit` on one machine.
#   infra/local.sh start   # head on :6379, dashboard/jobs on :8265, MLflow on :5000
#   infra/local.sh stop
# State lives under $FACEGAN_HOME (default ./.facegan). Token auth is off here by default, for a
# machine nobody else can reach: Ray 2.60's gcs_server and raylet listen on all interfaces ('::')
# even with --node-ip-address=127.0.0.1 (measured), so on a reachable machine run
# RAY_AUTH_MODE=token infra/local.sh start (or firewall the ports).
set -euo pipefail
HOME_DIR="${FACEGAN_HOME:-$PWD/.facegan}"
export RAY_TMPDIR="${RAY_TMPDIR:-/tmp/facegan-ray}"  # the same for start and stop
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
# Jobs reach the head through its dashboard agent's port; every Ray on a machine defaults to
# 52365, so with another Ray running here (a plain `python -m jobs.train` starts one) set another.
AGENT_PORT="${RAY_AGENT_PORT:-52365}"

case "${1:-}" in
  start)
    mkdir -p "$HOME_DIR"
    ray start --head --node-ip-address=127.0.0.1 --port=6379 \
      --dashboard-host=127.0.0.1 --dashboard-port=8265 --include-dashboard=true --disable-usage-stats \
      --dashboard-agent-listen-port="$AGENT_PORT"
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false nohup mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" \
      --workers 1 --backend-store-uri "sqlite:///$HOME_DIR/mlflow.db" \
      --artifacts-destination "$HOME_DIR/mlartifacts" >"$HOME_DIR/mlflow.log" 2>&1 &
    echo $! >"$HOME_DIR/mlflow.pid"
    echo "Ray jobs:  http://127.0.0.1:8265   MLflow: http://127.0.0.1:$MLFLOW_PORT"
    echo "submit:    ray job submit --address http://127.0.0.1:8265 --working-dir . \\"
    echo "             --runtime-env-json '{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"http://127.0.0.1:$MLFLOW_PORT\"}}' \\"
    echo "             -- python -m jobs.train --config configs/smoke.toml \\"
    echo "             --run.storage_path=$PWD/runs --data.path=$PWD/data/generated64/train"
    ;;
  stop)
    ray stop
    if [ -f "$HOME_DIR/mlflow.pid" ]; then
      kill "$(cat "$HOME_DIR/mlflow.pid")" 2>/dev/null || true
      rm -f "$HOME_DIR/mlflow.pid"
    fi
    ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
