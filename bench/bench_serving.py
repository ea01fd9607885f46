#!/usr/bin/env python3
"""Serving figures (issues 4 and 15), side by side in one script.

Sections (`--sections`, default `pacing`; the README's tables name theirs):

pacing (default, ~1.5 min): half_plus_two at concurrency 1, one call at a
  time back to back and with 3 ms and 20 ms pauses between calls, and
  open-loop at 100 and 1,000 calls/s (calls sent on a fixed schedule, each
  without waiting for the previous one). Targets, same client and request:
    direct   the replica's Python server itself (what the gateway calls),
    front    the replica's public address: its native front, which relays
             (half_plus_two runs without batching),
    gateway  the gateway's gRPC port (its native data plane).
  Each pacing runs `--rounds` rounds, the targets in a rotated order each
  round, and each figure pools its target's calls over the rounds. Per
  pacing: p50/p99 per target and gateway / direct, front / direct (p50);
  the CPU the gateway's data plane (build/native/cloudml-dataplane,
  the gateway's child) used per gateway call while the gateway's turns ran
  (per-thread run time from /proc/<pid>/task/*/schedstat, in ns: utime +
  stime in /proc/<pid>/stat count 10 ms ticks; both are reported), the
  same for the replica's front per front call, and the data plane's CPU at
  idle (`--idle-seconds` with no calls, after the last pacing), and the
  cores the whole machine kept busy per pacing (far above ~1: others' load,
  and an unrepresentative run).
  `--spin-us N` starts the gateway with `--dataplane-spin-us N`, and
  `--dataplane-binary PATH` runs another build of the data plane in the
  gateway (the replica's front keeps the tree's), and `--h2-front off` the
  gateway's data plane without its HTTP/2 front (its gRPC server on the port).
  Replicas listen on Unix sockets, as the models service starts them, so
  they serve the framed protocol (dataplane/frame.h) too, and the gateway's
  data plane and the replica's front call them over it; `--frames off`
  turns that off on both sides (gRPC only, as before it). Each target's
  row also has the replica's Python process's CPU per call.

models: for half_plus_two and a 3-layer MLP (1,000-wide layers), at client
  concurrency 1 and 32: gRPC through the gateway vs. gRPC direct to one
  model-server replica's Python server vs. calling the loaded SavedModel
  in-process (the limit), REST through the gateway, and (half_plus_two) a
  bare byte-forwarding grpc.aio proxy (`bare_proxy.py`: what any Python hop
  costs). At concurrency 1 the targets take turns in bursts of 1,000 calls
  until each has had `--rounds` x `--seconds` / 2 seconds of calls, each
  figure pooling all its calls (shorter turns cost the three-process gateway
  path more than the direct one: bursts of 100 gave x1.21 where 1,000 gave
  x1.08-1.17, since every switch disturbs processes that ran steadily);
  every replica here runs without batching.

batching: the MLP at concurrency 32, batching on (max batch 32, 1 ms
  timeout) vs off, through the gateway and direct to each replica's public
  address (its native front: both replicas have one, so "direct" compares
  batching with the front on both sides), in alternating rounds.

Memory of the gateway (its Python process plus its native data plane) and
of the replicas, and the data plane's call counts (answered from its
decision cache vs sent to the Python gateway) close every run.

The platform pieces are the real processes (etcd, auth, gateway, model
servers); the routing record is written to etcd as the models service would,
so the figures isolate the Predict hot path. Requests are serialized once and
sent as bytes by a grpc.aio client, so client-side Python work stays small.

    .venv/bin/python bench/bench_serving.py [--sections pacing,models,batching] [--seconds 2] [--rounds 3]
                                            [--spin-us N] [--dataplane-binary PATH] [--h2-front on|off]
                                            [--frames on|off]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import aiohttp  # noqa: E402
import grpc  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from deploy.local.service_process import thread_cpu_ns  # noqa: E402

ADMIN = ("AKBENCHSERVEADMIN000", "bench-serve-admin")
SERVICE = ("AKBENCHSERVESVC00000", "bench-serve-service")
PREDICT = "/tensorflow.serving.PredictionService/Predict"


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def summary(latencies: list[float], elapsed: float) -> dict:
    return {"rps": round(len(latencies) / elapsed, 1), "p50_ms": round(pct(latencies, 0.5) * 1e3, 3),
            "p99_ms": round(pct(latencies, 0.99) * 1e3, 3)}


def build_mlp(directory: str) -> str:
    import tensorflow as tf

    class MLP(tf.Module):
        def __init__(self):
            super().__init__()
            rng = np.random.default_rng(0)
            dims = [256, 1000, 1000, 1000, 10]
            self.ws = [tf.Variable(rng.normal(0, 0.03, (a, b)).astype("float32")) for a, b in zip(dims, dims[1:])]
            self.bs = [tf.Variable(np.zeros(b, "float32")) for b in dims[1:]]

        @tf.function(input_signature=[tf.TensorSpec([None, 256], tf.float32, name="x")])
        def serve(self, x):
            h = x
            for i, (w, b) in enumerate(zip(self.ws, self.bs)):
                h = tf.matmul(h, w) + b
                if i < len(self.ws) - 1:
                    h = tf.nn.relu(h)
            return {"y": h}

    module = MLP()
    path = os.path.join(directory, "mlp", "1")
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    return path


def predict_bytes(name: str, inputs: dict[str, np.ndarray]) -> bytes:
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request.SerializeToString()


async def grpc_load(address: str, body: bytes, metadata, concurrency: int, seconds: float,
                    method: str = PREDICT) -> dict:
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        for _ in range(20):
            await call(body, metadata=metadata, timeout=10)
        stop = time.perf_counter() + seconds

        async def worker():
            while time.perf_counter() < stop:
                t = time.perf_counter()
                await call(body, metadata=metadata, timeout=10)
                latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return summary(latencies, time.perf_counter() - start)


async def rest_load(url: str, body: bytes, token: str, concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(10):
            async with session.post(url, data=body, headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
        stop = time.perf_counter() + seconds

        async def worker():
            while time.perf_counter() < stop:
                t = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return summary(latencies, time.perf_counter() - start)


def inprocess_load(fn, inputs: dict, concurrency: int, seconds: float) -> dict:
    import tensorflow as tf

    tensors = {k: tf.constant(v) for k, v in inputs.items()}
    for _ in range(20):
        fn(**tensors)
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    def worker():
        out = []
        while time.perf_counter() < stop:
            t = time.perf_counter()
            fn(**tensors)
            out.append(time.perf_counter() - t)
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for result in pool.map(lambda _: worker(), range(concurrency)):
            latencies.extend(result)
    return summary(latencies, time.perf_counter() - start)


def rss_mb(pid: int, children: bool = False) -> float:
    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)] if children else [proc]
    return round(sum(p.memory_info().rss for p in procs) / 2**20, 1)


async def interleaved_c1(targets: dict, body: bytes, seconds: float, burst: int = 1000) -> dict:
    """Concurrency 1 against several targets at once: bursts of `burst`
    sequential calls take turns until each target has had `seconds` of calls;
    each target's figures pool all its calls. Noise on this shared machine
    comes in bursts of a second or more, so turns this short put both sides
    of a ratio under the same noise."""
    channels = {name: grpc.aio.insecure_channel(address) for name, (address, _) in targets.items()}
    try:
        calls = {name: ch.unary_unary(PREDICT, request_serializer=None, response_deserializer=None)
                 for name, ch in channels.items()}
        for name, call in calls.items():
            for _ in range(50):
                await call(body, metadata=targets[name][1], timeout=10)
        latencies: dict[str, list[float]] = {name: [] for name in targets}
        spent = dict.fromkeys(targets, 0.0)
        while min(spent.values()) < seconds:
            for name, call in calls.items():
                metadata = targets[name][1]
                start = time.perf_counter()
                for _ in range(burst):
                    t = time.perf_counter()
                    await call(body, metadata=metadata, timeout=10)
                    latencies[name].append(time.perf_counter() - t)
                spent[name] += time.perf_counter() - start
        return {name: summary(latencies[name], spent[name]) for name in targets}
    finally:
        for ch in channels.values():
            await ch.close()


def alternating(runs: dict, rounds: int) -> dict:
    """Runs each named load in turn, `rounds` times; per name, the round with the median p50."""
    results: dict[str, list] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            results[name].append(run())
    return {name: sorted(rs, key=lambda r: r["p50_ms"])[len(rs) // 2] for name, rs in results.items()}


PACINGS = (  # (name, pause between calls at c=1 in s, or open-loop rate in calls/s; share of --seconds)
    ("back_to_back", ("pause", 0.0), 1),
    ("pause_3ms", ("pause", 0.003), 1),
    ("pause_20ms", ("pause", 0.020), 2),
    ("open_100_per_s", ("rate", 100), 2),
    ("open_1000_per_s", ("rate", 1000), 1),
)


def cpu_ns(pid: int) -> tuple[int, int]:
    """(run time of the process's threads in ns from schedstat, utime + stime in ns from stat)."""
    run = thread_cpu_ns(pid)
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return run, ticks * 10**9 // os.sysconf("SC_CLK_TCK")


def native_child(pid: int) -> int | None:
    for child in psutil.Process(pid).children():
        if os.path.basename(child.exe()) == "cloudml-dataplane":
            return child.pid
    return None


async def c1_turn(call, body: bytes, metadata, how: tuple, seconds: float, latencies: list[float]) -> int:
    """One target's turn: calls at concurrency 1 with a pause between them, or
    open-loop at a fixed rate; returns the number of calls."""
    kind, value = how

    async def one():
        t = time.perf_counter()
        await call(body, metadata=metadata, timeout=10)
        latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    if kind == "pause":
        n = 0
        while time.perf_counter() - start < seconds:
            await one()
            n += 1
            if value:
                await asyncio.sleep(value)
        return n
    n = int(value * seconds)
    tasks = []
    for i in range(n):
        delay = start + i / value - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return n


async def pacing_table(targets: dict, body: bytes, seconds: float, rounds: int, cpu_pids: dict,
                       idle_seconds: float, dataplane_pid: int, replica_pid: int) -> dict:
    """targets: name -> (address, metadata); cpu_pids: target name -> pid whose CPU its turns are charged;
    replica_pid: the replica's Python process, which every target's calls end at (its CPU per call too)."""
    channels = {name: grpc.aio.insecure_channel(address) for name, (address, _) in targets.items()}
    names = list(targets)
    try:
        calls = {name: ch.unary_unary(PREDICT, request_serializer=None, response_deserializer=None)
                 for name, ch in channels.items()}
        for name, call in calls.items():
            for _ in range(100):
                await call(body, metadata=targets[name][1], timeout=10)
        table = {}
        for pacing, how, share in PACINGS:
            latencies: dict[str, list[float]] = {name: [] for name in names}
            counts = dict.fromkeys(names, 0)
            cpu = {name: [0, 0] for name in cpu_pids}
            replica_cpu = dict.fromkeys(names, 0)
            wall = dict.fromkeys(names, 0.0)
            machine0, t0 = psutil.cpu_times(), time.perf_counter()
            for r in range(rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    pid = cpu_pids.get(name)
                    before = cpu_ns(pid) if pid else None
                    replica_before = cpu_ns(replica_pid)[0]
                    t = time.perf_counter()
                    counts[name] += await c1_turn(calls[name], body, targets[name][1], how,
                                                  seconds * share / rounds, latencies[name])
                    wall[name] += time.perf_counter() - t
                    replica_cpu[name] += cpu_ns(replica_pid)[0] - replica_before
                    if pid:
                        after = cpu_ns(pid)
                        cpu[name][0] += after[0] - before[0]
                        cpu[name][1] += after[1] - before[1]
            row = {name: {"calls": counts[name], "calls_per_s": round(counts[name] / wall[name], 1),
                          "p50_ms": round(pct(latencies[name], 0.5) * 1e3, 3),
                          "p99_ms": round(pct(latencies[name], 0.99) * 1e3, 3),
                          "replica_cpu_us_per_call": round(replica_cpu[name] / 1e3 / max(1, counts[name]), 1)}
                   for name in names}
            for name, (run, stat) in cpu.items():
                row[name]["cpu_us_per_call"] = round(run / 1e3 / max(1, counts[name]), 1)
                row[name]["cpu_us_per_call_stat"] = round(stat / 1e3 / max(1, counts[name]), 1)
                row[name]["cpu_cores"] = round(run / 1e9 / wall[name], 3)
            machine1 = psutil.cpu_times()
            # Everything that ran meanwhile, ours included: far above ~1 core means others' load.
            row["machine_busy_cores"] = round(sum(
                getattr(machine1, f) - getattr(machine0, f) for f in ("user", "nice", "system", "irq", "softirq")
            ) / (time.perf_counter() - t0), 2)
            for name in names:
                if name != "direct":
                    row[f"{name}_vs_direct_p50"] = round(row[name]["p50_ms"] / row["direct"]["p50_ms"], 3)
                    row[f"{name}_vs_direct_p99"] = round(row[name]["p99_ms"] / row["direct"]["p99_ms"], 3)
            table[pacing] = row
            print(f"{pacing}: {json.dumps(row)}", file=sys.stderr, flush=True)
        await asyncio.sleep(0.5)  # past any spinning window
        before = cpu_ns(dataplane_pid)
        await asyncio.sleep(idle_seconds)
        after = cpu_ns(dataplane_pid)
        table["dataplane_idle_cpu_percent"] = round((after[0] - before[0]) / 1e9 / idle_seconds * 100, 3)
        table["dataplane_idle_cpu_percent_stat"] = round((after[1] - before[1]) / 1e9 / idle_seconds * 100, 3)
        return table
    finally:
        for ch in channels.values():
            await ch.close()


def print_pacing(table: dict) -> None:
    print("\nhalf_plus_two at c=1 / open loop: p50 / p99 ms; ratio p50 to direct; data plane (front) CPU per call;"
          " the replica's Python process's CPU per call, direct / gateway")
    print(f"  {'pacing':16s} {'direct':>15s} {'front':>15s} {'gateway':>15s} {'gw/dir':>7s} {'fr/dir':>7s} "
          f"{'dp us/call':>10s} {'front us/call':>13s} {'replica us/call':>15s} {'machine':>7s}")
    for pacing, _, _ in PACINGS:
        row = table[pacing]
        cell = {name: f"{row[name]['p50_ms']:.3f} / {row[name]['p99_ms']:.3f}" for name in ("direct", "front", "gateway")}
        print(f"  {pacing:16s} {cell['direct']:>15s} {cell['front']:>15s} {cell['gateway']:>15s} "
              f"x{row['gateway_vs_direct_p50']:<6.3f} x{row['front_vs_direct_p50']:<6.3f} "
              f"{row['gateway']['cpu_us_per_call']:>10.1f} {row['front']['cpu_us_per_call']:>13.1f} "
              f"{row['direct']['replica_cpu_us_per_call']:>7.1f} / {row['gateway']['replica_cpu_us_per_call']:<5.1f} "
              f"{row['machine_busy_cores']:>7.2f}")
    print(f"  data plane at idle: {table['dataplane_idle_cpu_percent']:.3f} % of a core "
          "(machine: CPU cores busy meanwhile, all processes)")


BATCHING_ON = json.dumps({"enabled": True, "max_batch_size": 32, "batch_timeout_micros": 1000,
                          "max_enqueued_batches": 1000, "num_batch_threads": 2})
BATCHING_OFF = json.dumps({"enabled": False})


def bench_inputs() -> dict[str, np.ndarray]:
    """One example per request: half_plus_two's and the MLP's "x"."""
    return {"hpt": np.array([[1.0]], dtype=np.float32),
            "mlp": np.random.default_rng(1).normal(size=(1, 256)).astype(np.float32)}


class Platform:
    """The Predict path as the benchmarks measure it: etcd, auth and the
    gateway (`AuthGatewayStack`), one model-server replica per entry of
    `replicas` ((model name, SavedModel version directory, batching on?)),
    the routing records in etcd as the models service would publish them
    (so the figures isolate the hot path), and a tenant "bench" with an
    access key: `token`, and `md` its gRPC metadata. `gateway_env`: variables
    only the gateway (and auth) start with."""

    def __init__(self, directory: str, replicas: list[tuple[str, str, bool]], gateway_env: dict | None = None,
                 replica_flags: tuple[str, ...] = ()):
        from deploy.local.stack import AuthGatewayStack

        self.directory = directory
        self.replicas = replicas
        self.gateway_env = gateway_env or {}
        self.replica_flags = replica_flags
        self.stack = AuthGatewayStack(directory, admin=ADMIN, service=SERVICE, flags=["--log-level", "WARNING"])
        self.procs: list = []
        self.servers: dict = {}  # model name -> its replica's ServiceProcess
        self.own: dict[str, str] = {}  # model name -> the replica's Python server (what the gateway calls)
        self.token = ""
        self.md: tuple = ()

    def start(self) -> "Platform":
        from cloudml.auth.v1 import auth_service_pb2 as auth_pb
        from cloudml.auth.v1 import auth_service_pb2_grpc as auth_grpc
        from deploy.local.service_process import ServiceProcess, read_port_file

        saved = {key: os.environ.get(key) for key in self.gateway_env}
        os.environ.update({key: str(value) for key, value in self.gateway_env.items() if value is not None})
        try:  # only the gateway (and auth) see these
            self.stack.start()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        self.gateway, self.rest_port = self.stack.gateway, self.stack.rest_port
        for name, path, batching in self.replicas:
            port_file = os.path.join(self.directory, f"{name}.port")
            # On a Unix socket, as the models service starts replicas: the
            # replica then serves the framed protocol beside gRPC too.
            cmd = [sys.executable, "-m", "services.models.model_server", "--model-name", name, "--version", "1",
                   "--base-path", path, "--port-file", port_file, "--listen", f"unix:{self.directory}/{name}.sock",
                   "--batching-config", BATCHING_ON if batching else BATCHING_OFF, "--log-level", "WARNING",
                   *self.replica_flags]
            proc = ServiceProcess(name, cmd, port_file, log_path=os.path.join(self.directory, f"{name}.log"))
            self.procs.append(proc)
            self.servers[name] = proc.start().wait_serving(120)
        asyncio.run(self._routes(read_port_file))

        stub = auth_grpc.AuthServiceStub(grpc.insecure_channel(self.stack.auth.address))
        admin_md = (("authorization", "Bearer " + stub.IssueToken(
            auth_pb.IssueTokenRequest(access_key_id=ADMIN[0], secret_key=ADMIN[1])).token),)
        stub.CreateTenant(auth_pb.CreateTenantRequest(name="bench"), metadata=admin_md)
        key = stub.CreateAccessKey(auth_pb.CreateAccessKeyRequest(tenant="bench"), metadata=admin_md)
        self.token = stub.IssueToken(auth_pb.IssueTokenRequest(access_key_id=key.access_key.access_key_id,
                                                               secret_key=key.secret_key)).token
        self.md = (("authorization", f"Bearer {self.token}"),)
        time.sleep(1.0)  # the gateway's watch picks up the routes and endpoints
        # Each replica's Python server (what the gateway calls) and its public
        # address (its native front, when built).
        self.own = {name: read_port_file(proc.port_file).get("replica_address", proc.address)
                    for name, proc in self.servers.items()}
        return self

    async def _routes(self, read_port_file) -> None:
        from cloudml.models.v1 import models_service_pb2 as models_pb
        from services.common.etcd import Etcd
        from services.models import store

        client = await Etcd.connect(self.stack.etcd.endpoint)
        for name, proc in self.servers.items():
            # The endpoint the models service's reconciler would publish for this replica.
            info = read_port_file(proc.port_file)
            endpoint = store.make_endpoint(
                "bench", name, 1, f"{name}-0", info.get("replica_address", info["address"]),
                models_pb.MODEL_VERSION_STATE_AVAILABLE, info.get("coalesce_max", 0), info.get("frame_address", ""))
            # As the reconciler publishes them too: how long a call may wait for company, the request limit.
            endpoint.batch_timeout_micros = info.get("batch_timeout_micros", 0)
            endpoint.max_request_bytes = info.get("max_request_bytes", 0)
            await store.put_endpoint(client, endpoint)
            route = models_pb.ModelRoute(tenant="bench", model=name, versions=[
                models_pb.VersionRoute(version=1, state=models_pb.MODEL_VERSION_STATE_AVAILABLE)])
            await client.put(f"/cloudml/models/routes/bench/{name}", route.SerializeToString())
        await client.close()

    def check(self, bodies: dict[str, bytes]) -> None:
        """One Predict per model through the gateway (raises on an error status)."""
        with grpc.insecure_channel(self.gateway.address) as channel:
            call = channel.unary_unary(PREDICT, request_serializer=None, response_deserializer=None)
            for body in bodies.values():
                call(body, metadata=self.md, timeout=30)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", default="pacing", help="of pacing, models, batching")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="pacing: each target's calls per pacing (x2 at 20 ms and 100/s); models/batching: "
                             "each run (3 in the README's runs)")
    parser.add_argument("--rounds", type=int, default=3, help="pacing: rounds, the targets' order rotated each "
                        "round; models at c=1: each side gets rounds x seconds / 2 of calls; batching: "
                        "alternating rounds")
    parser.add_argument("--idle-seconds", type=float, default=2.0)
    parser.add_argument("--models", default="hpt,mlp", help="models section: which models' rows (hpt, mlp)")
    parser.add_argument("--h2-front", choices=("on", "off"), default=None,
                        help="the gateway's --dataplane-h2-front (its default: on)")
    parser.add_argument("--spin-us", type=int, default=None, help="the gateway's --dataplane-spin-us (its default: "
                        "the data plane's)")
    parser.add_argument("--dataplane-binary", default=None, help="the gateway's data-plane binary (default: the tree's)")
    parser.add_argument("--frames", choices=("on", "off"), default="on",
                        help="on (default): replicas serve the framed protocol (dataplane/frame.h) and the "
                             "gateway's data plane and each replica's front call them over it; off: gRPC only")
    args = parser.parse_args()
    sections = set(args.sections.split(","))

    import tensorflow as tf
    from tests.conformance.half_plus_two import build_half_plus_two

    d = tempfile.mkdtemp(prefix="cloudml-bench-serving-")
    hpt_path = build_half_plus_two(os.path.join(d, "half_plus_two"), version=1)
    mlp_path = build_mlp(d) if sections & {"models", "batching"} else None
    # Latency runs use replicas without batching (what one deploys for
    # latency); the batching comparison adds an MLP replica with it on.
    replicas = [("hpt", hpt_path, False)]
    if "models" in sections or "batching" in sections:
        replicas.append(("mlp", mlp_path, False))
    if "batching" in sections:
        replicas.append(("mlp-batch", mlp_path, True))
    platform = Platform(d, replicas, {"CLOUDML_DATAPLANE_SPIN_US": args.spin_us,
                                      "CLOUDML_DATAPLANE_BINARY": args.dataplane_binary,
                                      "CLOUDML_DATAPLANE_H2_FRONT": args.h2_front,
                                      "CLOUDML_DATAPLANE_FRAMES": args.frames}, replica_flags=("--frames", args.frames))

    try:
        platform.start()
        stack, gateway, rest_port = platform.stack, platform.gateway, platform.rest_port
        servers, own, token, md = platform.servers, platform.own, platform.token, platform.md
        inputs = bench_inputs()
        hpt_inputs, mlp_inputs = {"x": inputs["hpt"]}, {"x": inputs["mlp"]}
        results: dict = {}
        if "pacing" in sections:
            dataplane_pid = native_child(gateway.process.pid)
            front_pid = native_child(servers["hpt"].process.pid)
            if dataplane_pid is None or front_pid is None:
                raise SystemExit("the pacing section needs the native data plane and front (scripts/build_native.sh)")
            targets = {"direct": (own["hpt"], ()), "front": (servers["hpt"].address, ()),
                       "gateway": (gateway.address, md)}
            table = asyncio.run(pacing_table(targets, predict_bytes("hpt", hpt_inputs), args.seconds, args.rounds,
                                             {"gateway": dataplane_pid, "front": front_pid}, args.idle_seconds,
                                             dataplane_pid, servers["hpt"].process.pid))
            table["spin_us"] = args.spin_us
            results["hpt_c1_pacing"] = table

        # The floor of any Python hop: a bare byte-forwarding grpc.aio proxy.
        import subprocess
        bare = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "bare_proxy.py"), own["hpt"]],
                                stdout=subprocess.PIPE, text=True)
        bare_address = f"127.0.0.1:{bare.stdout.readline().strip()}"
        loaded = {}
        for model, inputs in (("hpt", hpt_inputs), ("mlp", mlp_inputs)):
            if "models" not in sections or model not in args.models.split(","):
                continue
            loaded[model] = tf.saved_model.load(hpt_path if model == "hpt" else mlp_path).signatures["serving_default"]
            body = predict_bytes(model, inputs)
            rest_body = json.dumps({"instances": inputs["x"].tolist()}).encode()
            for c in (1, 32):
                targets = {"direct_grpc": (own[model], ()), "gateway_grpc": (gateway.address, md)}
                if model == "hpt":
                    targets["bare_python_proxy_grpc"] = (bare_address, ())
                if c == 1:
                    row = asyncio.run(interleaved_c1(targets, body, args.rounds * args.seconds / 2))
                else:
                    row = {name: asyncio.run(grpc_load(address, body, metadata, c, args.seconds))
                           for name, (address, metadata) in targets.items()}
                row["gateway_rest"] = asyncio.run(rest_load(
                    f"http://127.0.0.1:{rest_port}/v1/models/{model}:predict", rest_body, token, c, args.seconds))
                row["in_process"] = inprocess_load(loaded[model], inputs, c, args.seconds)
                if model == "hpt":
                    row["bare_proxy_vs_direct_p50"] = round(
                        row["bare_python_proxy_grpc"]["p50_ms"] / row["direct_grpc"]["p50_ms"], 3)
                row["gateway_vs_direct_p50"] = round(row["gateway_grpc"]["p50_ms"] / row["direct_grpc"]["p50_ms"], 3)
                results[f"{model}_c{c}"] = row
        bare.kill()
        if "batching" in sections:
            loaded.setdefault("mlp", tf.saved_model.load(mlp_path).signatures["serving_default"])
            # Batching on vs off, MLP at c=32: the four runs alternate for
            # --rounds rounds, each figure the round with the median p50.
            on_body, off_body = predict_bytes("mlp-batch", mlp_inputs), predict_bytes("mlp", mlp_inputs)
            row = alternating({
                "off_gateway_grpc": lambda: asyncio.run(grpc_load(gateway.address, off_body, md, 32, args.seconds)),
                "on_gateway_grpc": lambda: asyncio.run(grpc_load(gateway.address, on_body, md, 32, args.seconds)),
                "off_direct_grpc": lambda: asyncio.run(grpc_load(servers["mlp"].address, off_body, (), 32,
                                                                 args.seconds)),
                "on_direct_grpc": lambda: asyncio.run(grpc_load(servers["mlp-batch"].address, on_body, (), 32,
                                                                args.seconds)),
            }, args.rounds)
            # The compute limit: the MLP in-process on whole batches of 32.
            batch32 = {"x": np.repeat(mlp_inputs["x"], 32, axis=0)}
            limit = inprocess_load(loaded["mlp"], batch32, 1, args.seconds)
            row["in_process_batch32_examples_per_s"] = round(limit["rps"] * 32, 1)
            for path in ("gateway", "direct"):
                row[f"throughput_ratio_on_off_{path}"] = round(
                    row[f"on_{path}_grpc"]["rps"] / row[f"off_{path}_grpc"]["rps"], 2)
            results["mlp_c32_batching"] = row
        results["gateway_dataplane_calls"] = stack.dataplane_calls()
        results["memory_mb"] = {"gateway_with_dataplane": rss_mb(gateway.process.pid, children=True),
                                "gateway_python": rss_mb(gateway.process.pid),
                                "gateway_dataplane": round(rss_mb(gateway.process.pid, children=True)
                                                           - rss_mb(gateway.process.pid), 1),
                                **{f"model_server_{name}_with_front": rss_mb(proc.process.pid, children=True)
                                   for name, proc in servers.items()}}
        print(json.dumps(results, indent=2))
        if "hpt_c1_pacing" in results:
            print_pacing(results["hpt_c1_pacing"])
    finally:
        platform.stop()


if __name__ == "__main__":
    main()
