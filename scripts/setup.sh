#!/usr/bin/env bash
# Idempotent developer / CI setup for cove.
#
#   - installs the Debian packages cove needs (only when something is missing)
#   - makes sure the Debian default PostgreSQL cluster is not left running by
#     the install (tests start their own throwaway server, see scripts/pg.sh)
#   - creates .venv and installs the project editable with its [dev] extras
#     (skipped when .venv/.cove-installed is newer than pyproject.toml)
#   - installs the web console's npm package (ghostty-web) with `npm ci`
#     (skipped when node_modules/.cove-npm-installed is newer than package-lock.json)
#
# Safe to run repeatedly, from any directory, with CI=true and no stdin.
set -euo pipefail

# Debian packages needed by cove (tests, images, the sandbox runtime, volumes).
APT_PACKAGES=(
  postgresql
  tmux
  curl
  ca-certificates
  # images (cove.image and its test fixtures): pull/inspect, build, a local registry
  skopeo
  umoci
  docker-registry
  busybox-static
  zstd # zstd-compressed layers when the Python module zstandard is absent
  apache2-utils # htpasswd -B: bcrypt password files for the private-registry tests
  # sandbox runtime (cove.runtime): bubblewrap namespaces, veth/bridge networking
  bubblewrap
  iproute2
  e2fsprogs # mkfs.ext4: volumes are ext4 filesystems in files, loop-mounted
  # the edge (cove.net): HAProxy is the real PROXY v2 peer in its tests and the reference
  # in bench/edge.py, beside iperf3 (the install must leave no system daemon running:
  # see stop_system_haproxy; iperf3's debconf question "start as a daemon" defaults to no)
  haproxy
  iperf3
  # microVM runtime (cove.runtime.microvm): QEMU (-M microvm, KVM or TCG) boots the host's Debian
  # kernel with its modules from /lib/modules; qemu-img makes the per-instance qcow2 overlays;
  # the guest init (guest/init.c) is built on demand with gcc
  qemu-system-x86
  qemu-utils
  linux-image-amd64
  # C: the guest init and the tests' small static helpers (tests/fixtures/udpecho.c)
  gcc
  make
  libc6-dev
  # the web console's browser tests (Playwright drives this Chromium; no browser download)
  chromium
)

cd "$(dirname "$0")/.."
REPO_ROOT="$(pwd)"
VENV="$REPO_ROOT/.venv"
STAMP="$VENV/.cove-installed"

export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_INPUT=1

log() { printf '==> %s\n' "$*"; }

# Run a command as root (directly if we are root, else via non-interactive sudo).
as_root() {
  if [[ "$(id -u)" -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo -n "$@"
  else
    echo "error: need root (or passwordless sudo) to run: $*" >&2
    return 1
  fi
}

pkg_installed() {
  local status
  status="$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)"
  [[ "$status" == *" ok installed" ]]
}

apt_install() {
  log "installing apt packages: $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
  as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q -o Dpkg::Use-Pty=0 --no-install-recommends "$@" </dev/null
}

# The postgresql package's postinst creates and starts a "main" cluster.
# Tests use their own throwaway server, so stop whatever the install started.
stop_system_postgres() {
  log "stopping the Debian default PostgreSQL cluster(s) started by the install"
  if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
    as_root systemctl stop postgresql.service </dev/null >/dev/null 2>&1 || true
  fi
  if command -v pg_lsclusters >/dev/null 2>&1; then
    local ver name _port status _rest
    while read -r ver name _port status _rest; do
      if [[ "$status" == online* ]]; then
        log "stopping PostgreSQL cluster $ver/$name"
        as_root pg_ctlcluster "$ver" "$name" stop </dev/null || true
      fi
    done < <(pg_lsclusters --no-header 2>/dev/null || true)
  fi
}

# The docker-registry package enables (and, where policy-rc.d allows, starts) a system
# registry on :5000. Tests run their own on a free port, so stop and disable that one.
stop_system_registry() {
  log "stopping and disabling the Debian docker-registry service (tests run their own)"
  if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
    as_root systemctl disable --now docker-registry.service </dev/null >/dev/null 2>&1 || true
  elif [[ -x /etc/init.d/docker-registry ]]; then
    as_root /etc/init.d/docker-registry stop </dev/null >/dev/null 2>&1 || true
  fi
  as_root update-rc.d docker-registry disable </dev/null >/dev/null 2>&1 || true
}

# The haproxy package enables and (where policy-rc.d allows) starts a system HAProxy with
# /etc/haproxy/haproxy.cfg. Tests and benchmarks run their own, so stop and disable that one.
stop_system_haproxy() {
  log "stopping and disabling the Debian haproxy service (tests run their own)"
  if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
    as_root systemctl disable --now haproxy.service </dev/null >/dev/null 2>&1 || true
  elif [[ -x /etc/init.d/haproxy ]]; then
    as_root /etc/init.d/haproxy stop </dev/null >/dev/null 2>&1 || true
  fi
  as_root update-rc.d haproxy disable </dev/null >/dev/null 2>&1 || true
  # whatever is still running from the system config (no systemd, no init script left)
  local pids
  pids="$(pgrep -f '^/usr/sbin/haproxy .*-f /etc/haproxy/haproxy.cfg' || true)"
  if [[ -n "$pids" ]]; then
    log "stopping the system haproxy: $pids"
    # shellcheck disable=SC2086
    as_root kill $pids </dev/null || true
  fi
}

# --- apt packages ------------------------------------------------------------
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  pkg_installed "$pkg" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  apt_install "${missing[@]}"
  for pkg in "${missing[@]}"; do
    if [[ "$pkg" == postgresql* ]]; then
      stop_system_postgres
      break
    fi
  done
  for pkg in "${missing[@]}"; do
    if [[ "$pkg" == docker-registry ]]; then
      stop_system_registry
    fi
    if [[ "$pkg" == haproxy ]]; then
      stop_system_haproxy
    fi
  done
else
  log "apt packages already installed: ${APT_PACKAGES[*]}"
fi

# --- virtualenv ----------------------------------------------------------------
if [[ -x "$VENV/bin/python" ]]; then
  log "virtualenv already exists: $VENV"
else
  log "creating virtualenv: $VENV"
  if ! python3 -m venv "$VENV"; then
    log "python3 -m venv failed (no ensurepip?); installing python3-venv and retrying"
    rm -rf "$VENV"
    apt_install python3-venv
    python3 -m venv "$VENV"
  fi
fi

# --- python dependencies -------------------------------------------------------
if [[ -f "$STAMP" && "$STAMP" -nt pyproject.toml ]]; then
  log "python dependencies up to date ($STAMP newer than pyproject.toml)"
else
  log "upgrading pip in $VENV"
  "$VENV/bin/pip" install -q --upgrade pip </dev/null
  log "installing cove editable with [dev] extras into $VENV"
  "$VENV/bin/pip" install -q -e '.[dev]' </dev/null
  touch "$STAMP"
fi

# --- the web console's browser-side package (npm) ---------------------------------
# ghostty-web (pinned in package.json, locked in package-lock.json) is served by the cove
# server from node_modules/. `npm ci` runs again only when the lock is newer than the stamp.
NPM_STAMP="$REPO_ROOT/node_modules/.cove-npm-installed"
if ! command -v npm >/dev/null 2>&1; then
  apt_install nodejs npm
fi
if [[ -f "$NPM_STAMP" && "$NPM_STAMP" -nt package-lock.json ]]; then
  log "npm packages up to date ($NPM_STAMP newer than package-lock.json)"
else
  log "installing the console's npm packages: npm ci"
  npm ci --ignore-scripts --no-audit --no-fund </dev/null
  touch "$NPM_STAMP"
fi

log "setup complete"
