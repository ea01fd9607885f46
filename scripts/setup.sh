#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine (Python 3.11, root):
#   - etcd from Debian's etcd-server package,
#   - a virtualenv in .venv with the project (editable) and every dependency,
#     TensorFlow included (model servers, trainers and tests need it),
#   - Debian's chromium + chromium-driver for the browser tests (nothing
#     downloads a browser: Selenium is pointed at /usr/bin/chromium),
#   - Debian's nftables (a job's cluster ports kept to its tenant) and iproute2,
#   - the gateway's native data plane (scripts/build_native.sh: Debian's g++,
#     gRPC C++ and protobuf; compiled into build/native/),
#   - a real kube-apiserver and kubectl for the kubernetes runtime's tests
#     (scripts/build_kube_apiserver.sh: from Debian's source package, once,
#     cached outside the work tree in /var/cache/cloudml/kubernetes; ~8 min).
# Re-running it only checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*" >&2; }

# apt_need REQUIRED "COMMANDS" PACKAGES...: installs PACKAGES unless every
# command in COMMANDS is there; without root, says what to run (and stops if REQUIRED).
apt_need() {
  local required="$1" commands="$2" missing=0 c
  shift 2
  for c in $commands; do command -v "$c" >/dev/null 2>&1 || missing=1; done
  [ "$missing" = 1 ] || return 0
  if [ "$(id -u)" != 0 ]; then
    log "$* missing and this is not root: run 'apt-get install -y $*' as root"
    [ "$required" = required ] && exit 1
    return 0
  fi
  log "installing $* (apt)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

apt_need required "etcd" etcd-server
apt_need optional "chromium chromedriver" chromium chromium-driver
# nftables: with tenant isolation (root), the local runtime keeps a job's
# cluster ports to its tenant (services/common/runtime/port_guard.py);
# iproute2: the tests play a host outside the machine in a network namespace.
apt_need optional "nft ip" nftables iproute2

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if ! "$PYTHON" -m uv --version >/dev/null 2>&1 && ! command -v uv >/dev/null 2>&1; then
  log "installing uv (pip)"
  "$PYTHON" -m pip install -q --disable-pip-version-check uv
fi
UV="uv"
command -v uv >/dev/null 2>&1 || UV="$PYTHON -m uv"

if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  $UV venv -q .venv --python "$PYTHON"
fi

# Reinstall only when pyproject.toml changed since the last successful install.
stamp=.venv/.cloudml-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log "installing the project and its dependencies into .venv (TensorFlow is large: first time takes a few minutes)"
  $UV pip install -q --python .venv/bin/python -e ".[all]"
  echo "$want" > "$stamp"
fi
# Bytecode for every installed module, compiled once as root: tenant code
# (dev environments' JupyterLab and kernels, trainers, model servers) runs as
# users who cannot write __pycache__ into .venv, so without it each of their
# processes compiles what it imports (TensorFlow, Jupyter) from source again.
compiled=.venv/.cloudml-compiled
if [ ! -f "$compiled" ] || [ "$(cat "$compiled")" != "$want" ]; then
  log "compiling .venv's modules to bytecode (once per install)"
  .venv/bin/python -m compileall -q -j 0 .venv/lib/python3*/site-packages >/dev/null 2>&1 || \
    log "some modules did not compile (files of other Python versions): harmless"
  echo "$want" > "$compiled"
fi
bash scripts/build_native.sh
kube_bin="$(bash scripts/build_kube_apiserver.sh)"
log "ready: $(.venv/bin/python --version), etcd $(etcd --version 2>/dev/null | head -1 | awk '{print $3}'), kube-apiserver in $kube_bin"
