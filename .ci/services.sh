#!/usr/bin/env bash
# Real servers for the distributed tests (tests/test_distributed.py), loopback only:
#   - PostgreSQL from the Debian packages, a throwaway cluster with role and database "bench";
#   - `mlflow server` from the project's venv, with its own SQLite backend and served artifacts.
#
#   .ci/services.sh start   install if needed, start both, write $BENCH_SERVICES_DIR/env
#   .ci/services.sh stop    stop both (the state folder is kept for its logs)
#   . "$BENCH_SERVICES_DIR/env"   exports BENCH_TEST_POSTGRES_URL, BENCH_TEST_MLFLOW_URL, BENCH_REQUIRE_SERVICES=1
#
# Idempotent: `start` reuses servers it already started. Needs root (or sudo) only to install
# PostgreSQL; run as root, the database runs as the `postgres` user.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE="${BENCH_SERVICES_DIR:-/tmp/bench-services}"
VENV="${BENCH_VENV:-$PWD/.venv}"
PG_DATA="$STATE/pg"
MLFLOW_DIR="$STATE/mlflow"

# The port a server of ours uses (kept in the state folder), else $2 if free, else any free one.
pick_port() {
  local file="$STATE/$1.port" preferred="$2"
  if [ -f "$file" ]; then cat "$file"; return; fi
  python3 - "$preferred" >"$file" <<'PY'
import socket, sys
def free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return None
        return s.getsockname()[1]
print(free(int(sys.argv[1])) or free(0))
PY
  cat "$file"
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

# Run a command as the database owner: `postgres` when we are root (the server refuses root).
as_db() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

install_postgres() {
  if [ -x "$(pg_bin)/postgres" ]; then return; fi
  echo "services: installing PostgreSQL (Debian packages)"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql
}

start_postgres() {
  local bin; bin="$(pg_bin)"
  PG_PORT="$(pick_port pg "${BENCH_PG_PORT:-55432}")"
  if [ ! -f "$PG_DATA/PG_VERSION" ]; then
    as_db mkdir -p "$PG_DATA"
    as_db "$bin/initdb" -D "$PG_DATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 -E UTF8 >"$STATE/initdb.log"
  fi
  if ! as_db "$bin/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; then
    as_db "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_DATA/server.log" -w -t 60 start \
      -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DATA -c max_connections=200" >/dev/null
  fi
  local psql=("$bin/psql" -h "$PG_DATA" -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 -qtA)
  if [ ! -f "$STATE/pg_password" ]; then (umask 077; head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$STATE/pg_password"); fi
  PG_PASSWORD="$(cat "$STATE/pg_password")"
  if [ "$(as_db "${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname = 'bench'")" != 1 ]; then
    as_db "${psql[@]}" -c "CREATE ROLE bench LOGIN PASSWORD '$PG_PASSWORD'"
  else
    as_db "${psql[@]}" -c "ALTER ROLE bench PASSWORD '$PG_PASSWORD'"
  fi
  if [ "$(as_db "${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = 'bench'")" != 1 ]; then
    as_db "${psql[@]}" -c "CREATE DATABASE bench OWNER bench"
  fi
  echo "services: PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT (data $PG_DATA)"
}

start_mlflow() {
  MLFLOW_PORT="$(pick_port mlflow "${BENCH_MLFLOW_PORT:-5005}")"
  local url="http://127.0.0.1:$MLFLOW_PORT"
  if [ -f "$MLFLOW_DIR/server.pid" ] && kill -0 "$(cat "$MLFLOW_DIR/server.pid")" 2>/dev/null && curl -fsS "$url/health" >/dev/null 2>&1; then
    echo "services: mlflow server already at $url"; return
  fi
  if [ ! -x "$VENV/bin/mlflow" ]; then echo "services: $VENV/bin/mlflow not found; create the venv first" >&2; exit 1; fi
  mkdir -p "$MLFLOW_DIR/artifacts"
  # setsid: its own process group, so `stop` ends the server and its workers and nothing else.
  # No job runner (huey consumers for GenAI jobs): the tests do not use it.
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$VENV/bin/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 2 \
    --backend-store-uri "sqlite:///$MLFLOW_DIR/mlflow.db" \
    --serve-artifacts --artifacts-destination "$MLFLOW_DIR/artifacts" \
    >"$MLFLOW_DIR/server.log" 2>&1 </dev/null &
  echo $! >"$MLFLOW_DIR/server.pid"
  for _ in $(seq 1 300); do  # up to 5 min: a busy 2-core machine starts it slowly
    if curl -fsS "$url/health" >/dev/null 2>&1; then
      echo "services: mlflow server $("$VENV/bin/mlflow" --version | awk '{print $NF}') at $url (store $MLFLOW_DIR)"
      return
    fi
    if ! kill -0 "$(cat "$MLFLOW_DIR/server.pid")" 2>/dev/null; then break; fi
    sleep 1
  done
  echo "services: mlflow server did not start; its log:" >&2
  tail -n 30 "$MLFLOW_DIR/server.log" >&2
  exit 1
}

write_env() {
  (umask 077; cat >"$STATE/env" <<EOF
export BENCH_TEST_POSTGRES_URL='postgresql://bench:$PG_PASSWORD@127.0.0.1:$PG_PORT/bench'
export BENCH_TEST_MLFLOW_URL='http://127.0.0.1:$MLFLOW_PORT'
export BENCH_REQUIRE_SERVICES=1
EOF
  )
  echo "services: environment for the tests in $STATE/env"
}

stop() {
  if [ -f "$MLFLOW_DIR/server.pid" ]; then
    local pid; pid="$(cat "$MLFLOW_DIR/server.pid")"
    if kill -0 "$pid" 2>/dev/null; then kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"; fi
    rm -f "$MLFLOW_DIR/server.pid"
  fi
  if [ -f "$PG_DATA/PG_VERSION" ]; then
    as_db "$(pg_bin)/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null 2>&1 || true
  fi
  echo "services: stopped"
}

case "${1:-start}" in
  start)
    mkdir -p "$STATE"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$STATE" 2>/dev/null || true; chmod 755 "$STATE"; fi
    install_postgres; start_postgres; start_mlflow; write_env ;;
  stop) stop ;;
  *) echo "usage: $0 [start|stop]" >&2; exit 2 ;;
esac
