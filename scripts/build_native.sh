#!/usr/bin/env bash
# Builds the gateway's native data plane (services/common/native/dataplane/dataplane.cc)
# into build/native/cloudml-gateway-dataplane, with Debian's gRPC C++ and
# protobuf (installed here if missing; needs root the first time).
# Idempotent: rebuilds only when the sources or the proto changed.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[build_native] %s\n' "$*" >&2; }

PACKAGES=(g++ pkg-config libgrpc++-dev libprotobuf-dev protobuf-compiler)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    log "missing Debian packages: ${missing[*]}; install them as root (apt-get install -y ${missing[*]})"; exit 1
  fi
  log "installing ${missing[*]} (apt)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

OUT=build/native
SRC=services/common/native/dataplane/dataplane.cc
PROTOS=(protos/cloudml/gateway/v1/dataplane.proto protos/cloudml/models/v1/replica.proto)
BIN=$OUT/cloudml-gateway-dataplane
want="$(cat "$SRC" "${PROTOS[@]}" "$0" | sha256sum | cut -d' ' -f1)"
if [ -x "$BIN" ] && [ -f "$OUT/.stamp" ] && [ "$(cat "$OUT/.stamp")" = "$want" ]; then
  exit 0
fi
log "compiling $BIN"
mkdir -p "$OUT"
protoc --cpp_out="$OUT" -Iprotos "${PROTOS[@]}"
# shellcheck disable=SC2046
g++ -O2 -std=c++17 -Wall -o "$BIN.tmp" "$SRC" "$OUT/cloudml/gateway/v1/dataplane.pb.cc" \
  "$OUT/cloudml/models/v1/replica.pb.cc" -I"$OUT" \
  $(pkg-config --cflags --libs grpc++ protobuf absl_synchronization) -lpthread
mv "$BIN.tmp" "$BIN"
echo "$want" > "$OUT/.stamp"
