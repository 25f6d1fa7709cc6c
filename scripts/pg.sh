#!/usr/bin/env bash
# Throwaway PostgreSQL server for tests, independent of the system cluster.
#
#   scripts/pg.sh start DIR   init + start a server in DIR, print its URL
#   scripts/pg.sh stop DIR    stop it (immediate) and remove DIR
#   scripts/pg.sh url DIR     print the URL of the server in DIR
#
# Layout of DIR: data/ (PGDATA), sock/ (unix socket), log, port, url,
# .cove-pg (marker: `stop` only removes directories that carry it).
# The URL goes to stdout; progress messages go to stderr.
set -euo pipefail

PG_USER=postgres
DB_NAME=cove_test
DB_ROLE=cove

log() { printf '==> %s\n' "$*" >&2; }
die() {
  printf 'pg.sh: error: %s\n' "$*" >&2
  exit 1
}
usage() {
  echo "usage: $0 start|stop|url DIR" >&2
  exit 2
}

# Highest installed PostgreSQL version's bin dir.
pg_bindir() {
  local d best="" bestv=0 v
  for d in /usr/lib/postgresql/*/bin; do
    [[ -x "$d/initdb" ]] || continue
    v="$(basename "$(dirname "$d")")"
    [[ "$v" =~ ^[0-9]+$ ]] || continue
    if ((v > bestv)); then
      bestv=$v
      best=$d
    fi
  done
  [[ -n "$best" ]] || die "no /usr/lib/postgresql/*/bin/initdb found (run scripts/setup.sh)"
  echo "$best"
}

# Run a PostgreSQL binary as the postgres user (initdb/postgres refuse root),
# from / so an unreadable cwd does not matter.
as_pg() {
  if [[ "$(id -un)" == "$PG_USER" ]]; then
    (cd / && "$@")
  else
    (cd / && runuser -u "$PG_USER" -- "$@")
  fi
}

free_port() {
  python3 - <<'EOF'
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
EOF
}

# Make every ancestor of $1 traversable by the postgres user (e.g. a 0700
# mktemp dir or /root). Only the search (x) bit for "other" is added.
ensure_traversable() {
  local p ancestors=() i
  p="$(dirname "$1")"
  while [[ "$p" != "/" ]]; do
    ancestors+=("$p")
    p="$(dirname "$p")"
  done
  # Walk top-down, so each check only fails because of that directory itself.
  for ((i = ${#ancestors[@]} - 1; i >= 0; i--)); do
    p="${ancestors[i]}"
    if ! as_pg test -x "$p" 2>/dev/null; then
      log "granting o+x on $p so the $PG_USER user can reach the cluster dir"
      chmod o+x "$p"
    fi
  done
}

is_running() {
  local dir=$1
  [[ -f "$dir/data/PG_VERSION" ]] || return 1
  as_pg "$BIN/pg_ctl" status -D "$dir/data" >/dev/null 2>&1
}

make_url() {
  echo "postgresql+psycopg://${DB_ROLE}@127.0.0.1:$1/${DB_NAME}"
}

psql_admin() {
  local port=$1
  shift
  "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U "$PG_USER" -d postgres "$@"
}

cmd_start() {
  local dir=$1 port attempt
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd -P)"
  [[ "$dir" != "/" ]] || die "refusing to use / as the cluster dir"

  if is_running "$dir" && [[ -f "$dir/url" ]]; then
    log "PostgreSQL already running in $dir"
    cat "$dir/url"
    return 0
  fi

  touch "$dir/.cove-pg"
  ensure_traversable "$dir"
  if [[ "$(id -u)" -eq 0 ]]; then
    chown "$PG_USER:$PG_USER" "$dir" "$dir/.cove-pg"
  fi
  chmod 0700 "$dir"

  if [[ ! -f "$dir/data/PG_VERSION" ]]; then
    log "initdb ($BIN) in $dir/data"
    as_pg mkdir -p "$dir/sock"
    as_pg "$BIN/initdb" -D "$dir/data" -U "$PG_USER" -A trust -E UTF8 --locale=C \
      --no-sync >"$dir/initdb.log" 2>&1 || {
      cat "$dir/initdb.log" >&2
      die "initdb failed"
    }
    as_pg tee "$dir/data/pg_hba.conf" >/dev/null <<'EOF'
# cove throwaway test cluster: trust, local socket and 127.0.0.1 only
local   all   all                  trust
host    all   all   127.0.0.1/32   trust
EOF
    as_pg tee -a "$dir/data/postgresql.conf" >/dev/null <<EOF

# --- cove throwaway test cluster ---
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir/sock'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
EOF
  fi

  # Pick a free port; retry if somebody grabs it between probing and binding.
  local started=0
  for attempt in 1 2 3 4 5; do
    port="$(free_port)"
    log "starting PostgreSQL on 127.0.0.1:$port (attempt $attempt)"
    if as_pg "$BIN/pg_ctl" start -w -t 60 -D "$dir/data" -l "$dir/log" \
      -o "-p $port" >/dev/null; then
      started=1
      break
    fi
    if ! grep -qiE 'could not (bind|create listen)|address already in use' "$dir/log" 2>/dev/null; then
      break
    fi
  done
  if ((started == 0)); then
    tail -n 30 "$dir/log" >&2 2>/dev/null || true
    die "pg_ctl start failed (log: $dir/log)"
  fi
  # Persist the port so a restart of the same DIR (pg_ctl start without -o)
  # reuses it.
  as_pg sed -i "/^port = /d" "$dir/data/postgresql.conf"
  echo "port = $port" | as_pg tee -a "$dir/data/postgresql.conf" >/dev/null
  echo "$port" >"$dir/port"

  if ! psql_admin "$port" -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$DB_ROLE'" | grep -q 1; then
    log "creating role $DB_ROLE"
    psql_admin "$port" -c "CREATE ROLE $DB_ROLE LOGIN SUPERUSER"
  fi
  if ! psql_admin "$port" -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'" | grep -q 1; then
    log "creating database $DB_NAME"
    psql_admin "$port" -c "CREATE DATABASE $DB_NAME OWNER $DB_ROLE"
  fi

  make_url "$port" >"$dir/url"
  cat "$dir/url"
}

cmd_stop() {
  local dir=$1
  if [[ ! -d "$dir" ]]; then
    log "nothing to stop: $dir does not exist"
    return 0
  fi
  dir="$(cd "$dir" && pwd -P)"
  [[ "$dir" != "/" ]] || die "refusing to remove /"
  if [[ -f "$dir/data/PG_VERSION" ]]; then
    log "stopping PostgreSQL in $dir"
    as_pg "$BIN/pg_ctl" stop -D "$dir/data" -m immediate -w >/dev/null 2>&1 || true
  fi
  if [[ -e "$dir/.cove-pg" || -z "$(ls -A "$dir")" ]]; then
    log "removing $dir"
    rm -rf "$dir"
  else
    log "not removing $dir: no .cove-pg marker (not created by pg.sh start)"
  fi
}

cmd_url() {
  local dir=$1
  [[ -f "$dir/url" ]] || die "no url in $dir (server not started?)"
  cat "$dir/url"
}

[[ $# -eq 2 ]] || usage
BIN="$(pg_bindir)"
case "$1" in
  start) cmd_start "$2" ;;
  stop) cmd_stop "$2" ;;
  url) cmd_url "$2" ;;
  *) usage ;;
esac
