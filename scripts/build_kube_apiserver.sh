#!/usr/bin/env bash
# Builds a real kube-apiserver and kubectl from Debian's kubernetes source package, once,
# into a cache outside the work tree (see ../shared/KUBERNETES.md): the
# Kubernetes runtime's tests run against it the way envtest runs controllers'
# tests (etcd + kube-apiserver, no nodes). About 8 minutes on 2 cores the
# first time; afterwards it only prints the binaries' directory. Only the
# tools missing from the cache are compiled; runs are serialised by an flock.
#
#   scripts/build_kube_apiserver.sh      # prints the directory holding kube-apiserver and kubectl
#
# CLOUDML_KUBE_CACHE chooses the cache (default /var/cache/cloudml/kubernetes).
set -euo pipefail
CACHE="${CLOUDML_KUBE_CACHE:-/var/cache/cloudml/kubernetes}"
BIN_DIR="$CACHE/bin"
WORK="$CACHE/src"
TOOLS=(kube-apiserver kubectl)
log() { echo "[build_kube_apiserver] $*" >&2; }
missing_tools() { for t in "${TOOLS[@]}"; do [ -x "$BIN_DIR/$t" ] || echo "$t"; done; }
install_tool() {  # atomically: a reader never sees half a binary
  mkdir -p "$BIN_DIR"
  cp "$1" "$BIN_DIR/$2.tmp"
  mv "$BIN_DIR/$2.tmp" "$BIN_DIR/$2"
}

if [ -z "$(missing_tools)" ]; then
  if [ -d "$WORK" ]; then  # the source tree of a build that stopped before cleaning up (~2 GB)
    exec 9>"$CACHE/.lock"
    if flock -n 9; then rm -rf "$WORK"; fi
  fi
  echo "$BIN_DIR"
  exit 0
fi
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9

# A build that compiled a tool but stopped before installing it.
for t in $(missing_tools); do
  for built in "$WORK"/kubernetes-*/_output/bin/"$t"; do
    if [ -x "$built" ] && [ -s "$built" ]; then
      log "installing $t from an earlier build"
      install_tool "$built" "$t"
    fi
  done
done
mapfile -t todo < <(missing_tools)
if [ ${#todo[@]} -eq 0 ]; then echo "$BIN_DIR"; exit 0; fi

missing=()
for pkg in golang-go rsync jq dpkg-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} (apt)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Debian 12 ships no deb-src line: add one for the mirror the deb lines use.
SRC_LIST=/etc/apt/sources.list.d/cloudml-deb-src.sources
if ! grep -rqs "deb-src" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  log "adding a deb-src source for bookworm"
  cat > "$SRC_LIST" <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  apt-get update -qq
fi

tree=""
for d in "$WORK"/kubernetes-*/; do [ -L "$d/.go/src/k8s.io/kubernetes" ] && tree="$d"; done
if [ -z "$tree" ]; then
  rm -rf "$WORK"
  mkdir -p "$WORK"
  cd "$WORK"
  log "downloading Debian's kubernetes source package"
  apt-get source --download-only kubernetes >/dev/null 2>&1
  tar xzf kubernetes_*.orig.tar.gz
  tree="$(echo "$WORK"/kubernetes-*/)"
  mkdir -p "$tree/.go/src/k8s.io"
  ln -s ../../.. "$tree/.go/src/k8s.io/kubernetes"
fi
cd "$tree"
log "compiling ${todo[*]} (several minutes)"
what="$(printf 'cmd/%s ' "${todo[@]}")"
GOPATH=$PWD/.go CGO_ENABLED=0 HOME=$(mktemp -d) make WHAT="${what% }" >"$CACHE/build.log" 2>&1 || {
  rm -rf _output  # a failed build leaves an empty generator binary behind
  log "build failed; see $CACHE/build.log"
  exit 1
}
for t in "${todo[@]}"; do install_tool "_output/bin/$t" "$t"; done
cd "$CACHE"
rm -rf "$WORK"
echo "$BIN_DIR"
