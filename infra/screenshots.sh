#!/usr/bin/env bash
# The MLflow UI as a user sees it, checked in a real browser: starts an `mlflow server` on
# 127.0.0.1 over a fresh store, runs a training job and a sweep into it, and saves headless
# Chromium screenshots of the run's overview, its charts with the sample images, its system
# metrics, the sweep's runs and the sweep parent (the README shows them).
#   apt-get install chromium                       # once (Debian's package)
#   bash infra/screenshots.sh                      # the smoke preset and sweep -> docs/screenshots
#   OUT=/tmp/shots bash infra/screenshots.sh --data.source=shards --data.path=data/celeba64/train
# Extra arguments go to both jobs (after the preset, so they win). Everything it starts lives
# under its own temp dir and is stopped by PID on exit; no machine-wide `ray stop`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-docs/screenshots}"
BROWSER="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
[ -n "$BROWSER" ] || { echo "error: no chromium on PATH (apt-get install chromium)" >&2; exit 2; }
PY="${PYTHON:-python}"
WORK="$(mktemp -d /tmp/fg-shots.XXXXXX)"
PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
URL="http://127.0.0.1:$PORT"

MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "$PY" -m mlflow server --host 127.0.0.1 --port "$PORT" \
  --workers 1 --backend-store-uri "sqlite:///$WORK/mlflow.db" --artifacts-destination "$WORK/artifacts" \
  --allowed-hosts "127.0.0.1:$PORT,mlflow.test:$PORT" --cors-allowed-origins "http://mlflow.test:$PORT" \
  >"$WORK/mlflow.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 120); do curl -sf "$URL/health" >/dev/null && break; sleep 1; done
curl -sf "$URL/health" >/dev/null || { echo "error: mlflow server did not start (see $WORK/mlflow.log)" >&2; exit 1; }

# The jobs start (and stop) their own local Ray under this temp dir; only 127.0.0.1 is used.
export MLFLOW_TRACKING_URI="$URL" RAY_AUTH_MODE=disabled RAY_TMPDIR="$WORK/ray"
"$PY" -m jobs.train --config configs/smoke.toml --run.storage_path="$WORK/runs" \
  --run.name=screenshots --eval.register_as=facegan-smoke "$@" | tee "$WORK/train.out"
"$PY" -m jobs.tune --config configs/smoke.toml --sweep configs/sweeps/smoke.toml \
  --run.storage_path="$WORK/runs" "$@" | tee "$WORK/tune.out"
RUN="$(sed -n 's/^run_id: //p' "$WORK/train.out" | tail -n1)"
PARENT="$(sed -n 's/^parent_run_id: //p' "$WORK/tune.out" | tail -n1)"
EXP="$("$PY" -c "import mlflow, sys; print(mlflow.MlflowClient('$URL').get_run(sys.argv[1]).info.experiment_id)" "$RUN")"

mkdir -p "$OUT"
# The browser reaches the server as mlflow.test (mapped to 127.0.0.1): on a localhost address
# MLflow 3.17's UI opens its AI-assistant panel over a third of every page. That origin is
# allowed as a host and for CORS (else the UI's POST searches are refused: "Request error").
shot() {  # name, URL fragment[, page height]: a fresh headless browser per page, time to fetch and draw
  "$BROWSER" --headless=new --no-sandbox --disable-gpu --hide-scrollbars --no-first-run \
    --user-data-dir="$WORK/chromium" --host-resolver-rules="MAP mlflow.test 127.0.0.1" \
    --window-size="1600,${3:-1100}" --virtual-time-budget=30000 \
    --screenshot="$OUT/$1.png" "http://mlflow.test:$PORT/#/$2" 2>>"$WORK/chromium.log" >/dev/null
  echo "wrote $OUT/$1.png  ($URL/#/$2)"
}
shot run-overview "experiments/$EXP/runs/$RUN"
shot run-charts "experiments/$EXP/runs/$RUN/model-metrics"
shot run-system-metrics "experiments/$EXP/runs/$RUN/system-metrics"
shot sweep-parent "experiments/$EXP/runs/$PARENT"
shot sweep-parent-artifacts "experiments/$EXP/runs/$PARENT/artifacts"
shot experiment-runs "experiments/$EXP/runs"
