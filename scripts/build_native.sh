#!/usr/bin/env bash
# Builds the native data plane (services/common/native/dataplane/*.cc: the
# gateway's data plane and every model-server replica's front) into
# build/native/cloudml-dataplane, with Debian's gRPC C++ and
# protobuf (installed here if missing; needs root the first time), and
# build/native/cloudml-tfs-json, the REST JSON codec (dataplane/rest_json.cc)
# alone behind stdin/stdout for tests/unit/test_native_tfs_json.py.
# Idempotent: rebuilds only when the sources, the protos or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[build_native] %s\n' "$*" >&2; }

PACKAGES=(g++ pkg-config libgrpc++-dev libprotobuf-dev protobuf-compiler libnghttp2-dev)
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
SRC_DIR=services/common/native/dataplane
SRCS=("$SRC_DIR"/*.cc)
PROTOS=(protos/cloudml/internal/v1/dataplane.proto protos/cloudml/internal/v1/replica.proto)
BIN=$OUT/cloudml-dataplane
CHECK_SRC=services/common/native/tfs_json_check/main.cc
CHECK_BIN=$OUT/cloudml-tfs-json
want="$(cat "${SRCS[@]}" "$SRC_DIR"/*.h "$CHECK_SRC" "${PROTOS[@]}" "$0" | sha256sum | cut -d' ' -f1)"
if [ -x "$BIN" ] && [ -x "$CHECK_BIN" ] && [ -f "$OUT/.stamp" ] && [ "$(cat "$OUT/.stamp")" = "$want" ]; then
  exit 0
fi
log "compiling $BIN"
mkdir -p "$OUT/obj"
protoc --cpp_out="$OUT" -Iprotos "${PROTOS[@]}"
# One object per translation unit, as many at once as there are CPUs, then one link.
# shellcheck disable=SC2046
CXXFLAGS=(-O2 -std=c++17 -Wall -I"$OUT" $(pkg-config --cflags grpc++ protobuf absl_synchronization libnghttp2))
units=("${SRCS[@]}" "$OUT/cloudml/internal/v1/dataplane.pb.cc" "$OUT/cloudml/internal/v1/replica.pb.cc")
objs=() running=()
for src in "${units[@]}"; do
  obj="$OUT/obj/$(basename "${src%.cc}").o"
  objs+=("$obj")
  g++ "${CXXFLAGS[@]}" -c -o "$obj" "$src" &
  running+=($!)
  if [ ${#running[@]} -ge "$(nproc)" ]; then wait "${running[0]}"; running=("${running[@]:1}"); fi
done
for pid in "${running[@]}"; do wait "$pid"; done
# shellcheck disable=SC2046
g++ -O2 -o "$BIN.tmp" "${objs[@]}" $(pkg-config --libs grpc++ protobuf absl_synchronization libnghttp2) -lpthread
mv "$BIN.tmp" "$BIN"
# The codec's driver: its own main(), so not in $SRC_DIR; rest_json.o needs nothing else.
g++ -O2 -std=c++17 -Wall -o "$CHECK_BIN.tmp" "$CHECK_SRC" "$OUT/obj/rest_json.o"
mv "$CHECK_BIN.tmp" "$CHECK_BIN"
echo "$want" > "$OUT/.stamp"
