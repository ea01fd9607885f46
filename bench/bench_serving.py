#!/usr/bin/env python3
"""Serving figures (issue 4), side by side in one script.

For `half_plus_two` and a 3-layer MLP (1,000-wide layers), at client
concurrency 1 and 32:
  - gRPC through the gateway vs. gRPC direct to one model-server replica vs.
    calling the loaded SavedModel in-process (the limit),
  - REST through the gateway,
  - MLP at concurrency 32 with server-side batching on (max batch 32, 1 ms
    timeout) vs. off, through the gateway and direct, in alternating rounds;
    every other row runs on replicas without batching,
plus resident memory of the gateway (its Python process plus its native data
plane) and of one model-server replica.

At concurrency 1 the gateway, direct and bare-proxy calls take turns in
bursts of 1,000 calls (about half a second) over one connection each, until
each has had `--rounds` x `--seconds` / 2 seconds of calls, and each figure
pools all its calls: a burst of noise on this shared machine lands on every
side alike. Shorter turns cost the three-process gateway path more than the
direct one (bursts of 100: x1.21 where 1,000 gave x1.08-1.17), since every
switch disturbs processes that were running steadily; a client at
concurrency 1 calls one target steadily. The bare byte-forwarding
grpc.aio proxy (`bare_proxy.py`) shows what any Python hop costs. The
gateway's data plane reports how many calls it answered from its decision
cache (fast) vs. sent to the Python gateway (control).

The platform pieces are the real processes (etcd, auth, gateway, model
servers); the routing record is written to etcd as the models service would,
so the figures isolate the Predict hot path. Requests are serialized once and
sent as bytes by a grpc.aio client, so client-side Python work stays small.

    .venv/bin/python bench/bench_serving.py [--seconds 3]
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


async def grpc_load(address: str, body: bytes, metadata, concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(PREDICT, request_serializer=None, response_deserializer=None)
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds for batching on vs off; at concurrency 1, each side gets rounds x seconds / 2 of calls")
    parser.add_argument("--models", default="hpt,mlp", help="which models' rows to run (hpt, mlp)")
    args = parser.parse_args()

    import tensorflow as tf
    from cloudml.auth.v1 import auth_service_pb2 as auth_pb
    from cloudml.auth.v1 import auth_service_pb2_grpc as auth_grpc
    from cloudml.models.v1 import models_service_pb2 as models_pb
    from deploy.local.service_process import ServiceProcess, read_port_file
    from deploy.local.stack import AuthGatewayStack
    from services.common.etcd import Etcd
    from services.models import store
    from tests.conformance.half_plus_two import build_half_plus_two

    d = tempfile.mkdtemp(prefix="cloudml-bench-serving-")
    hpt_path = build_half_plus_two(os.path.join(d, "half_plus_two"), version=1)
    mlp_path = build_mlp(d)
    stack = AuthGatewayStack(d, admin=ADMIN, service=SERVICE, flags=["--log-level", "WARNING"])
    procs: list[ServiceProcess] = []

    def start(proc: ServiceProcess) -> ServiceProcess:
        procs.append(proc)
        return proc.start().wait_serving(120)

    try:
        stack.start()
        etcd, auth, gateway, rest_port = stack.etcd, stack.auth, stack.gateway, stack.rest_port

        # Latency runs use replicas without batching (what one deploys for
        # latency); the batching comparison adds an MLP replica with it on.
        batching_on = json.dumps({"enabled": True, "max_batch_size": 32, "batch_timeout_micros": 1000,
                                  "max_enqueued_batches": 1000, "num_batch_threads": 2})
        batching_off = json.dumps({"enabled": False})
        servers = {}
        for name, path, batching in (("hpt", hpt_path, batching_off), ("mlp", mlp_path, batching_off),
                                     ("mlp-batch", mlp_path, batching_on)):
            port_file = os.path.join(d, f"{name}.port")
            cmd = [sys.executable, "-m", "services.models.model_server", "--model-name", name, "--version", "1",
                   "--base-path", path, "--port-file", port_file,
                   "--batching-config", batching, "--log-level", "WARNING"]
            servers[name] = start(ServiceProcess(name, cmd, port_file, log_path=os.path.join(d, f"{name}.log")))

        async def routes():
            client = await Etcd.connect(etcd.endpoint)
            for name in servers:
                # The endpoint the models service's reconciler would publish for this replica.
                info = read_port_file(servers[name].port_file)
                await store.put_endpoint(client, store.make_endpoint(
                    "bench", name, 1, f"{name}-0", info.get("replica_address", info["address"]),
                    models_pb.MODEL_VERSION_STATE_AVAILABLE, info.get("coalesce_max", 0)))
                route = models_pb.ModelRoute(tenant="bench", model=name, versions=[
                    models_pb.VersionRoute(version=1, state=models_pb.MODEL_VERSION_STATE_AVAILABLE)])
                await client.put(f"/cloudml/models/routes/bench/{name}", route.SerializeToString())
            await client.close()
        asyncio.run(routes())

        stub = auth_grpc.AuthServiceStub(grpc.insecure_channel(auth.address))
        admin_md = (("authorization", "Bearer " + stub.IssueToken(
            auth_pb.IssueTokenRequest(access_key_id=ADMIN[0], secret_key=ADMIN[1])).token),)
        stub.CreateTenant(auth_pb.CreateTenantRequest(name="bench"), metadata=admin_md)
        key = stub.CreateAccessKey(auth_pb.CreateAccessKeyRequest(tenant="bench"), metadata=admin_md)
        token = stub.IssueToken(auth_pb.IssueTokenRequest(access_key_id=key.access_key.access_key_id,
                                                          secret_key=key.secret_key)).token
        md = (("authorization", f"Bearer {token}"),)
        time.sleep(1.0)  # the gateway's watch picks up the routes and endpoints

        # The floor of any Python hop: a bare byte-forwarding grpc.aio proxy.
        import subprocess
        bare = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "bare_proxy.py"), servers["hpt"].address],
                                stdout=subprocess.PIPE, text=True)
        bare_address = f"127.0.0.1:{bare.stdout.readline().strip()}"

        hpt_inputs = {"x": np.array([[1.0]], dtype=np.float32)}
        mlp_inputs = {"x": np.random.default_rng(1).normal(size=(1, 256)).astype(np.float32)}
        loaded = {"hpt": tf.saved_model.load(hpt_path).signatures["serving_default"],
                  "mlp": tf.saved_model.load(mlp_path).signatures["serving_default"]}
        results: dict = {}
        for model, inputs in (("hpt", hpt_inputs), ("mlp", mlp_inputs)):
            if model not in args.models.split(","):
                continue
            body = predict_bytes(model, inputs)
            rest_body = json.dumps({"instances": inputs["x"].tolist()}).encode()
            for c in (1, 32):
                targets = {"direct_grpc": (servers[model].address, ()), "gateway_grpc": (gateway.address, md)}
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
        if "mlp" in args.models.split(","):
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
                                "model_server_mlp": rss_mb(servers["mlp"].process.pid),
                                "model_server_half_plus_two": rss_mb(servers["hpt"].process.pid)}
        print(json.dumps(results, indent=2))
    finally:
        for proc in reversed(procs):
            proc.stop()
        stack.stop()


if __name__ == "__main__":
    main()
