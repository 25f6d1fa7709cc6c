#!/usr/bin/env bash
# The whole cove test suite (what `make test` and CI run):
#   setup -> ruff (lint + format check) -> mypy -> throwaway PostgreSQL -> pytest
# Extra arguments are passed through to pytest, e.g. scripts/test.sh -k store -x
# Runs fine with CI=true and no stdin.
set -euo pipefail

cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*"; }

log "setup: scripts/setup.sh"
scripts/setup.sh </dev/null

LINT_DIRS=()
for d in src tests bench; do
  [[ -d "$d" ]] && LINT_DIRS+=("$d")
done
if ((${#LINT_DIRS[@]})); then
  log "lint: ruff check ${LINT_DIRS[*]}"
  .venv/bin/ruff check "${LINT_DIRS[@]}"
  log "lint: ruff format --check ${LINT_DIRS[*]}"
  .venv/bin/ruff format --check "${LINT_DIRS[@]}"
else
  log "lint: nothing to lint (no src/, tests/ or bench/)"
fi

log "typecheck: mypy"
.venv/bin/mypy

PG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/cove-pg.XXXXXX")"
cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  log "stopping throwaway PostgreSQL in $PG_DIR"
  scripts/pg.sh stop "$PG_DIR" </dev/null || true
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

log "starting throwaway PostgreSQL in $PG_DIR"
scripts/pg.sh start "$PG_DIR" </dev/null >/dev/null
COVE_TEST_PG_URL="$(scripts/pg.sh url "$PG_DIR")"
export COVE_TEST_PG_URL
log "COVE_TEST_PG_URL=$COVE_TEST_PG_URL"

log "pytest: .venv/bin/pytest -q -p no:cacheprovider --durations=25 tests $*"
set +e
# --durations: the slowest tests in every run's log (the suite must stay well under 20 min)
.venv/bin/pytest -q -p no:cacheprovider --durations=25 tests "$@" </dev/null
rc=$?
set -e

case "$rc" in
  0) log "tests passed" ;;
  5) log "FAILED: pytest collected no tests (exit 5)" ;;
  *) log "FAILED: pytest exited with status $rc" ;;
esac
exit "$rc"
