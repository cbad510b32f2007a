#!/usr/bin/env bash
# Local MLflow and Prefect servers with their UIs, on loopback (`make services`, `make services-stop`).
#
#   scripts/services.sh start     # MLflow http://127.0.0.1:5000, Prefect http://127.0.0.1:4200
#   scripts/services.sh status
#   scripts/services.sh stop      # by the PIDs in .services/*.pid
#
# MLflow keeps its runs and registry in the project's mlflow.db (sqlite, the same store the commands use
# without a server) and proxied artifacts in mlartifacts/; Prefect keeps its state in .prefect/. PIDs and
# logs go to .services/. Environment: MLFLOW_PORT, PREFECT_PORT, SERVICES_HOST (default 127.0.0.1),
# SERVICES_ROOT (project folder, default this repository), VENV (default .venv). Telemetry is off.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
ROOT=$(cd "${SERVICES_ROOT:-$REPO}" && pwd)
VENV=${VENV:-$REPO/.venv}
[[ $VENV = /* ]] || VENV=$REPO/$VENV
BIN=$VENV/bin
DIR=$ROOT/.services
HOST=${SERVICES_HOST:-127.0.0.1}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
PREFECT_PORT=${PREFECT_PORT:-4200}
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_HOME=${PREFECT_HOME:-$ROOT/.prefect}

pid_of() { [[ -f $DIR/$1.pid ]] && cat "$DIR/$1.pid"; }
alive() { local pid; pid=$(pid_of "$1") && [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; }
port_busy() { "$BIN/python" -c "import socket,sys; s=socket.socket(); sys.exit(0 if s.connect_ex(('$HOST', $1)) == 0 else 1)"; }

wait_up() {  # name url: poll until HTTP 200, or fail with the log's tail when the server exits or 120 s pass
  local name=$1 url=$2 i
  for i in $(seq 240); do
    if "$BIN/python" -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('$url', timeout=2).status == 200 else 1)" 2>/dev/null; then
      return 0
    fi
    if ! alive "$name"; then break; fi
    sleep 0.5
  done
  echo "error: $name did not come up at $url; last lines of $DIR/$name.log:" >&2
  tail -n 30 "$DIR/$name.log" >&2 || true
  stop_one "$name" >/dev/null
  return 1
}

start_one() {  # name port health-url command...: its own session (PID = process group), so stop ends its children too
  local name=$1 port=$2 url=$3
  shift 3
  if alive "$name"; then echo "$name already running (pid $(pid_of "$name"))"; return 0; fi
  if port_busy "$port"; then echo "error: $HOST:$port is in use; set ${name^^}_PORT to a free port" >&2; return 1; fi
  mkdir -p "$DIR"
  (cd "$ROOT" && exec setsid "$@" >"$DIR/$name.log" 2>&1 </dev/null) &
  echo $! >"$DIR/$name.pid"
  wait_up "$name" "$url"
  echo "$name started (pid $(pid_of "$name"), log $DIR/$name.log)"
}

stop_one() {
  local name=$1 pid i
  pid=$(pid_of "$name") || { echo "$name not running"; return 0; }
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "$name stopped (pid $pid)"
  else
    echo "$name not running (stale pid $pid)"
  fi
  rm -f "$DIR/$name.pid"
}

urls() {
  echo "MLflow UI:  http://$HOST:$MLFLOW_PORT    export MLFLOW_TRACKING_URI=http://$HOST:$MLFLOW_PORT"
  echo "Prefect UI: http://$HOST:$PREFECT_PORT    export PREFECT_API_URL=http://$HOST:$PREFECT_PORT/api"
}

case "${1:-}" in
  start)
    [[ -x $BIN/mlflow && -x $BIN/prefect ]] || { echo "error: $BIN has no mlflow/prefect: run \`make install\`" >&2; exit 1; }
    start_one mlflow "$MLFLOW_PORT" "http://$HOST:$MLFLOW_PORT/health" \
      "$BIN/mlflow" server --workers 1 --host "$HOST" --port "$MLFLOW_PORT" \
      --backend-store-uri "sqlite:///$ROOT/mlflow.db" --artifacts-destination "$ROOT/mlartifacts"
    start_one prefect "$PREFECT_PORT" "http://$HOST:$PREFECT_PORT/api/health" \
      env -u PREFECT_API_URL "$BIN/prefect" server start --host "$HOST" --port "$PREFECT_PORT" --analytics-off
    urls
    ;;
  stop)
    stop_one prefect
    stop_one mlflow
    ;;
  status)
    for name in mlflow prefect; do
      if alive "$name"; then echo "$name running (pid $(pid_of "$name"))"; else echo "$name not running"; fi
    done
    urls
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
