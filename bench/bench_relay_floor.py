#!/usr/bin/env python3
"""The data plane's CPU per relayed call against the floor of the gRPC
library it is built on (issue 15).

Relays in front of one stand-in replica (a grpc.aio server on a Unix socket
answering Predict with a few bytes), called at concurrency 1 by a grpc.aio
client, in rotated turns per round:
    direct   the stand-in itself,
    dp       the data plane in replica front mode (build/native/cloudml-dataplane,
             `--spin-us 0` unless --spin-us): its HTTP/2 front (h2front.h),
    dp_grpc  the same with `--h2-front off`: its gRPC server relays,
    floor    bench/relay_floor/relay.cc: the least an async relay on the same
             gRPC does (built here with Debian's g++ and gRPC into /tmp),
    echo     the same program answering by itself: one server call alone,
    bytes    bench/relay_floor/bytes.c: a relay that copies bytes and parses
             nothing (no HTTP/2, no gRPC): the floor of any relay process.
Per target: p50 (and its ratio to direct) and the CPU its process used per
call, from its threads' schedstat run time.

    .venv/bin/python bench/bench_relay_floor.py [--pause 0.003] [--calls 400] [--rounds 4] [--spin-us 0]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import grpc  # noqa: E402

from deploy.local.service_process import thread_cpu_ns  # noqa: E402
from services.common.native import binary_path  # noqa: E402

PREDICT = "/tensorflow.serving.PredictionService/Predict"
BODY = b"\x0a\x05\x0a\x03hpt"  # model_spec.name = "hpt"


def build(source_name: str, out_name: str, command: list[str]) -> str:
    """Builds bench/relay_floor/SOURCE into the temp directory once per change."""
    source = os.path.join(ROOT, "bench", "relay_floor", source_name)
    out = os.path.join(tempfile.gettempdir(), out_name)
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(source):
        subprocess.run([*command[:1], "-O2", "-o", out, source, *command[1:]], check=True)
    return out


def build_floor() -> str:
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "grpc++", "protobuf", "absl_synchronization"],
                           check=True, capture_output=True, text=True).stdout.split()
    return build("relay.cc", "cloudml-relay-floor", ["g++", "-std=c++17", *flags, "-lpthread"])


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pause", type=float, default=0.003, help="seconds between calls")
    parser.add_argument("--calls", type=int, default=400, help="per target and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--spin-us", type=int, default=0)
    args = parser.parse_args()

    directory = tempfile.mkdtemp(prefix="cloudml-relay-floor-")
    socket = f"unix:{directory}/replica.sock"
    server = grpc.aio.server()

    async def predict(request, context):
        return b"\x0a\x00"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "tensorflow.serving.PredictionService", {"Predict": grpc.unary_unary_rpc_method_handler(predict)}),))
    server.add_insecure_port(socket)
    await server.start()

    floor = build_floor()
    commands = {"dp": [binary_path(), "--coalesce-max", "0", "--spin-us", str(args.spin_us)],
                "dp_grpc": [binary_path(), "--coalesce-max", "0", "--spin-us", str(args.spin_us), "--h2-front", "off"],
                "floor": [floor], "echo": [floor, "--echo", "1"],
                "bytes": [build("bytes.c", "cloudml-relay-bytes", ["cc"])]}
    procs, channels = {}, {"direct": grpc.aio.insecure_channel(socket)}
    for name, command in commands.items():
        procs[name] = subprocess.Popen([*command, "--listen", "127.0.0.1:0", "--front-for", socket],
                                       stdout=subprocess.PIPE, text=True)
        channels[name] = grpc.aio.insecure_channel(f"127.0.0.1:{int(procs[name].stdout.readline())}")
    try:
        calls = {name: ch.unary_unary(PREDICT, request_serializer=None, response_deserializer=None)
                 for name, ch in channels.items()}
        for call in calls.values():
            for _ in range(50):
                await call(BODY, timeout=10)
        names = list(calls)
        latencies = {name: [] for name in names}
        cpu = {name: 0 for name in names}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                before = thread_cpu_ns(procs[name].pid) if name in procs else 0
                for _ in range(args.calls):
                    t = time.perf_counter()
                    await calls[name](BODY, timeout=10)
                    latencies[name].append(time.perf_counter() - t)
                    if args.pause:
                        await asyncio.sleep(args.pause)
                if name in procs:
                    cpu[name] += thread_cpu_ns(procs[name].pid) - before
        n = args.calls * args.rounds
        p50 = {name: sorted(v)[len(v) // 2] for name, v in latencies.items()}
        print(json.dumps({name: {"p50_ms": round(p50[name] * 1e3, 3), "vs_direct": round(p50[name] / p50["direct"], 3),
                                 "cpu_us_per_call": round(cpu[name] / n / 1e3, 1) if name in procs else None}
                          for name in names}, indent=1))
    finally:
        for p in procs.values():
            p.terminate()
            p.wait()
        await server.stop(0)


if __name__ == "__main__":
    asyncio.run(main())
