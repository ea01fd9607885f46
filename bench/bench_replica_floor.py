#!/usr/bin/env python3
"""Where a direct call to a half_plus_two replica goes (issue 14 goal 2).

The same handler (a model-server replica's own Predict work: parse the
PredictRequest, check it against the signature, run the session runner,
encode the PredictResponse) served three ways, each server in a process of its own, called at c=1 back to back:

    inproc    the handler called in the client's process (no server at all);
    grpc_aio  a grpc.aio server with a generic bytes-in/bytes-out Predict
              handler (what a model-server replica is), grpc.aio client;
    framed    an asyncio.Protocol on a Unix socket, a 4-byte length before
              each message both ways (the least a server process can be),
              asyncio streams client;

and the real thing, one model-server replica process (`python -m
services.models.model_server`, `--listen unix:...`, no native front) called
end to end both ways it serves:

    replica_grpc    its grpc.aio server (what gateways call today), grpc.aio
                    client;
    replica_frames  its framed-protocol socket (frames.py, frame.h: what the
                    data plane calls instead), asyncio streams client.

Per server: p50/p99 and the server process's CPU per call (its threads'
run time from /proc/<pid>/task/*/schedstat); rounds alternate. The
difference between grpc_aio and framed is what gRPC's Python server costs
per call on this machine, the floor any cheaper replica protocol starts
from; inproc is the handler's own cost. replica_grpc against replica_frames
is what the framed protocol saves a real replica (which also parses and
checks the ModelSpec, counts metrics, and runs each framed call as a task
with its deadline).

    .venv/bin/python bench/bench_replica_floor.py [--seconds 3] [--rounds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
PREDICT = "/tensorflow.serving.PredictionService/Predict"


def make_handler(path: str):
    """bytes -> bytes: a replica's own Predict work (services/models/model_server:
    parse, check against the signature, the session runner, the response bytes)."""
    from tensorflow_serving.apis import predict_pb2

    from services.models.model_server import predict, servable
    from services.models.model_server.tensors import model_spec_bytes

    model = servable.load(path)

    def handle(raw: bytes) -> bytes:
        request = predict_pb2.PredictRequest.FromString(raw)
        plan = predict.plan(model, request)
        outputs = model.runner(plan.signature, plan.feeds, plan.fetches, True)(plan.arrays)
        spec = model_spec_bytes(request.model_spec.name, 1, plan.signature.name)
        return predict.response_bytes(plan, outputs, spec, False)

    return handle


def serve(kind: str, path: str, address: str) -> None:
    handle = make_handler(path)

    async def grpc_main():
        import grpc

        async def predict(raw, context):
            return handle(raw)

        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "tensorflow.serving.PredictionService", {"Predict": grpc.unary_unary_rpc_method_handler(predict)}),))
        server.add_insecure_port(address)
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    async def framed_main():
        class Framed(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport, self.buffer = transport, b""

            def data_received(self, data):
                self.buffer += data
                while len(self.buffer) >= 4:
                    (n,) = struct.unpack(">I", self.buffer[:4])
                    if len(self.buffer) < 4 + n:
                        break
                    raw, self.buffer = self.buffer[4:4 + n], self.buffer[4 + n:]
                    out = handle(raw)
                    self.transport.write(struct.pack(">I", len(out)) + out)

        server = await asyncio.get_running_loop().create_unix_server(Framed, address)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(grpc_main() if kind == "grpc_aio" else framed_main())


def thread_cpu_ns(pid: int) -> int:
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total


async def grpc_turn(address: str, body: bytes, seconds: float) -> list[float]:
    import grpc

    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(PREDICT, request_serializer=None, response_deserializer=None)
        for _ in range(50):
            await call(body, timeout=10)
        out, stop = [], time.perf_counter() + seconds
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await call(body, timeout=10)
            out.append(time.perf_counter() - t)
        return out


async def framed_turn(address: str, body: bytes, seconds: float) -> list[float]:
    reader, writer = await asyncio.open_unix_connection(address)
    frame = struct.pack(">I", len(body)) + body

    async def one():
        writer.write(frame)
        (n,) = struct.unpack(">I", await reader.readexactly(4))
        await reader.readexactly(n)

    return await timed_turn(one, writer, seconds)


async def timed_turn(one, writer, seconds: float) -> list[float]:
    """50 warm-up calls of `one`, then its latencies for `seconds`; closes `writer`."""
    for _ in range(50):
        await one()
    out, stop = [], time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t = time.perf_counter()
        await one()
        out.append(time.perf_counter() - t)
    writer.close()
    return out


async def replica_frames_turn(address: str, body: bytes, seconds: float) -> list[float]:
    """Predict over a replica's framed protocol (frame.h): one CALL, its REPLY."""
    reader, writer = await asyncio.open_unix_connection(address[len("unix:"):])
    payload = struct.pack("<BQBqQ", 1, 1, 0, 0, 0) + body  # CALL id 1, Predict, no routed version or deadline
    frame = struct.pack("<I", len(payload)) + payload

    async def one():
        writer.write(frame)
        (n,) = struct.unpack("<I", await reader.readexactly(4))
        reply = await reader.readexactly(n)
        if reply[9:13] != bytes(4):  # the status code
            raise RuntimeError(f"the replica answered {reply!r}")

    return await timed_turn(one, writer, seconds)


def start_replica(path: str, directory: str) -> tuple[subprocess.Popen, dict]:
    """A model-server replica of the model at `path` on a Unix socket, SERVING; its port file."""
    port_file = os.path.join(directory, "replica.port")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.models.model_server", "--model-name", "hpt", "--version", "1",
         "--base-path", path, "--listen", f"unix:{directory}/replica.sock", "--native-front", "off",
         "--port-file", port_file, "--log-level", "WARNING"],
        cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with open(port_file) as f:
                info = json.load(f)
        except (OSError, ValueError):
            info = {}
        if "error" in info or proc.poll() is not None:
            raise RuntimeError(f"the replica failed: {info}")
        if "max_request_bytes" in info:  # written once AVAILABLE
            return proc, info
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the replica did not start")


def inproc_turn(handle, body: bytes, seconds: float) -> list[float]:
    for _ in range(50):
        handle(body)
    out, stop = [], time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t = time.perf_counter()
        handle(body)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        return serve(sys.argv[2], sys.argv[3], sys.argv[4])
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import numpy as np
    from tensorflow_serving.apis import predict_pb2

    from tests.conformance.half_plus_two import build_half_plus_two

    d = tempfile.mkdtemp(prefix="cloudml-bench-replica-floor-")
    path = build_half_plus_two(os.path.join(d, "hpt"), version=1)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "hpt"
    x = request.inputs["x"]
    x.dtype = 1
    x.tensor_shape.dim.add(size=1)
    x.tensor_content = np.array([1.0], "<f4").tobytes()
    body = request.SerializeToString()

    from deploy.local.etcd import free_port

    addresses = {"grpc_aio": f"127.0.0.1:{free_port()}", "framed": os.path.join(d, "framed.sock")}
    servers = {}
    for kind, address in addresses.items():
        proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, path, address], stdout=subprocess.PIPE,
                                text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        assert proc.stdout.readline().strip() == "ready"
        servers[kind] = proc
    replica, info = start_replica(path, d)
    servers["replica_grpc"] = servers["replica_frames"] = replica
    addresses.update(replica_grpc=info["address"], replica_frames=info["frame_address"])
    turns = {"grpc_aio": grpc_turn, "framed": framed_turn, "replica_grpc": grpc_turn,
             "replica_frames": replica_frames_turn}
    handle = make_handler(path)
    order = ["inproc", *turns]
    samples: dict[str, list[float]] = {kind: [] for kind in order}
    cpu: dict[str, list[float]] = {kind: [] for kind in turns}
    try:
        for r in range(args.rounds):
            for kind in order[r % len(order):] + order[:r % len(order)]:
                if kind == "inproc":
                    samples[kind] += inproc_turn(handle, body, args.seconds)
                    continue
                before = thread_cpu_ns(servers[kind].pid)
                turn = asyncio.run(turns[kind](addresses[kind], body, args.seconds))
                cpu[kind].append((thread_cpu_ns(servers[kind].pid) - before) / (len(turn) + 50) / 1000)
                samples[kind] += turn
    finally:
        for proc in set(servers.values()):
            proc.kill()
    results = {}
    for kind, values in samples.items():
        values.sort()
        results[kind] = {"calls": len(values), "p50_ms": round(values[len(values) // 2] * 1e3, 3),
                         "p99_ms": round(values[int(len(values) * 0.99)] * 1e3, 3)}
        if kind in cpu:
            results[kind]["server_cpu_us_per_call"] = round(statistics.median(cpu[kind]), 1)
    results["grpc_aio_minus_framed_p50_ms"] = round(results["grpc_aio"]["p50_ms"] - results["framed"]["p50_ms"], 3)
    results["grpc_aio_over_framed_server_cpu"] = round(results["grpc_aio"]["server_cpu_us_per_call"]
                                                      / results["framed"]["server_cpu_us_per_call"], 2)
    results["replica_grpc_minus_replica_frames_p50_ms"] = round(
        results["replica_grpc"]["p50_ms"] - results["replica_frames"]["p50_ms"], 3)
    results["replica_grpc_over_replica_frames_server_cpu"] = round(
        results["replica_grpc"]["server_cpu_us_per_call"] / results["replica_frames"]["server_cpu_us_per_call"], 2)
    results["load_average"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
