#!/usr/bin/env python3
"""Deploy -> first Predict through the gateway, on a real stack started for
the run (its own etcd, auth, models service with the local runtime, gateway).

Each round creates a model and a version of half_plus_two (its SavedModel in
the tenant's storage), then sends a Predict through the gateway every 5 ms
until one succeeds. Figures per round:

- `endpoint`: CreateVersion sent -> the replica's endpoint AVAILABLE in etcd
  (the models-endpoint registry the gateway watches);
- `predict`: CreateVersion sent -> first successful Predict through the gateway;
- `serving->endpoint`: the replica's own health SERVING (polled every 5 ms on
  the address in its port file) -> its endpoint AVAILABLE in etcd: the cost
  of publishing a loaded replica, apart from TensorFlow's load time.

The first round pays the cold start of TensorFlow's files; "warm" figures are
the later rounds. Each model is deleted (and waited for) before the next.

    .venv/bin/python bench/bench_deploy.py [--rounds 5] [--json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import grpc  # noqa: E402

from cloudml.auth.v1 import auth_service_pb2 as auth_pb  # noqa: E402
from cloudml.auth.v1 import auth_service_pb2_grpc as auth_grpc  # noqa: E402
from cloudml.models.v1 import models_service_pb2 as pb  # noqa: E402
from cloudml.models.v1 import models_service_pb2_grpc as pb_grpc  # noqa: E402
from cloudml.tfs.tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2  # noqa: E402
from cloudml.tfs.tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402
from deploy.local.stack import AuthGatewayStack  # noqa: E402
from services.common.etcd import Etcd  # noqa: E402

AVAILABLE = pb.MODEL_VERSION_STATE_AVAILABLE


def request(model: str) -> predict_pb2.PredictRequest:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = model
    req.inputs["x"].CopyFrom(tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT, float_val=[3.0],
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1),
                                                            tensor_shape_pb2.TensorShapeProto.Dim(size=1)])))
    return req


def serving_time(replicas_dir: str, name: str, timeout: float) -> float:
    """time.monotonic() at which the replica of `name` first answers health SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    channels: dict[str, grpc.Channel] = {}
    try:
        while time.monotonic() < deadline:
            for entry in os.listdir(replicas_dir) if os.path.isdir(replicas_dir) else ():
                if not entry.startswith(f"models.bench.{name}.1."):
                    continue
                try:
                    with open(os.path.join(replicas_dir, entry, "port.json")) as f:
                        info = json.load(f)
                except (OSError, ValueError):
                    continue
                address = info.get("replica_address") or info.get("address")
                if not address:
                    continue
                channel = channels.get(address) or channels.setdefault(address, grpc.insecure_channel(address))
                try:
                    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                                        timeout=0.5).status
                except grpc.RpcError:
                    continue
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic()
            time.sleep(0.005)
    finally:
        for channel in channels.values():
            channel.close()
    raise TimeoutError(f"no replica of {name} SERVING")


async def endpoint_time(etcd_endpoint: str, prefix: str, timeout: float) -> float:
    """time.monotonic() at which an AVAILABLE endpoint first shows under `prefix`."""
    etcd = await Etcd.connect(etcd_endpoint)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            kvs, _, _ = await etcd.get_prefix(prefix)
            if any(pb.ReplicaEndpoint.FromString(kv.value).state == AVAILABLE for kv in kvs):
                return time.monotonic()
            await asyncio.sleep(0.005)
    finally:
        await etcd.close()
    raise TimeoutError(f"no AVAILABLE endpoint under {prefix}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    d = tempfile.mkdtemp(prefix="bench-deploy-")
    os.chmod(d, 0o755)  # replicas run as their tenant's user (with the platform as root): they must reach DIR
    stack = AuthGatewayStack(d, flags=["--log-level", "WARNING"])
    ok = False
    try:
        build = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "conformance", "half_plus_two.py"),
                                  os.path.join(d, "hp"), "--version", "1"], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        stack.start()
        data_dir = os.path.join(d, "data")
        models = stack.start_service("models", data_dir=data_dir, extra=["--stop-grace", "5"])
        out, err = build.communicate(timeout=180)
        assert build.returncode == 0, err
        saved_model = out.strip().splitlines()[-1]

        auth = auth_grpc.AuthServiceStub(grpc.insecure_channel(stack.auth.address))
        admin = (("authorization", "Bearer " + auth.IssueToken(auth_pb.IssueTokenRequest(
            access_key_id=stack.admin[0], secret_key=stack.admin[1])).token),)
        auth.CreateTenant(auth_pb.CreateTenantRequest(name="bench"), metadata=admin)
        key = auth.CreateAccessKey(auth_pb.CreateAccessKeyRequest(tenant="bench"), metadata=admin)
        md = (("authorization", "Bearer " + auth.IssueToken(auth_pb.IssueTokenRequest(
            access_key_id=key.access_key.access_key_id, secret_key=key.secret_key)).token),)
        stub = pb_grpc.ModelsServiceStub(grpc.insecure_channel(models.address))
        gateway = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(stack.gateway.address))

        rounds = []
        for i in range(args.rounds):
            name = f"hp{i}"
            path = os.path.join(data_dir, "storage", "bench", "models", name, "1")
            shutil.copytree(saved_model, path)
            stub.CreateModel(pb.CreateModelRequest(name=name), metadata=md, timeout=10)
            loop = asyncio.new_event_loop()
            watcher = loop.run_in_executor(None, lambda: asyncio.run(endpoint_time(
                stack.etcd.endpoint, f"/cloudml/models/endpoints/bench/{name}/", 120)))
            serving = loop.run_in_executor(None, serving_time, os.path.join(data_dir, "models", "replicas"),
                                           name, 120)
            start = time.monotonic()
            stub.CreateVersion(pb.CreateVersionRequest(model=name, model_version=pb.ModelVersion(
                version=1, model_uri="file://" + path, resources={"cpu_millis": 100, "memory_bytes": 2**30})),
                metadata=md, timeout=10)
            req = request(name)
            deadline = start + 120
            while True:
                try:
                    y = gateway.Predict(req, metadata=md, timeout=5).outputs["y"].float_val[0]
                    assert abs(y - 3.5) < 1e-6, y
                    break
                except grpc.RpcError as err_:
                    if time.monotonic() > deadline:
                        version = stub.GetVersion(pb.GetVersionRequest(model=name, version=1), metadata=md,
                                                  timeout=5).model_version
                        raise AssertionError(f"no Predict within 120 s: {err_.details()}; {version}") from None
                time.sleep(0.005)
            first = time.monotonic()
            seen = loop.run_until_complete(watcher)
            ready = loop.run_until_complete(serving)
            loop.close()
            rounds.append({"endpoint_s": seen - start, "predict_s": first - start,
                           "serving_to_endpoint_ms": (seen - ready) * 1000,
                           "endpoint_to_predict_ms": (first - seen) * 1000})
            print(f"round {i}: replica SERVING {ready - start:.3f} s, endpoint {seen - start:.3f} s "
                  f"(+{(seen - ready) * 1000:.0f} ms), first Predict {first - start:.3f} s "
                  f"(+{(first - seen) * 1000:.0f} ms)", flush=True)
            stub.DeleteModel(pb.DeleteModelRequest(name=name), metadata=md, timeout=10)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    stub.GetModel(pb.GetModelRequest(name=name), metadata=md, timeout=5)
                except grpc.RpcError as err_:
                    if err_.code() == grpc.StatusCode.NOT_FOUND:
                        break
                time.sleep(0.1)
        warm = rounds[1:] or rounds
        summary = {
            "rounds": rounds,
            "warm_predict_s_median": statistics.median(r["predict_s"] for r in warm),
            "warm_endpoint_s_median": statistics.median(r["endpoint_s"] for r in warm),
            "warm_serving_to_endpoint_ms_median": statistics.median(r["serving_to_endpoint_ms"] for r in warm),
            "warm_endpoint_to_predict_ms_median": statistics.median(r["endpoint_to_predict_ms"] for r in warm),
        }
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            print(f"warm deploy -> endpoint AVAILABLE: median {summary['warm_endpoint_s_median']:.3f} s")
            print(f"warm deploy -> first Predict through the gateway: median {summary['warm_predict_s_median']:.3f} s")
            print(f"replica SERVING -> endpoint AVAILABLE: median {summary['warm_serving_to_endpoint_ms_median']:.0f} ms")
            print(f"endpoint -> first Predict: median {summary['warm_endpoint_to_predict_ms_median']:.0f} ms")
        ok = True
    finally:
        stack.stop()  # the models service, then the replicas it leaves running by design, auth, etcd
        if ok:
            shutil.rmtree(d, ignore_errors=True)
        else:
            print(f"kept {d} for a post-mortem", file=sys.stderr)


if __name__ == "__main__":
    main()
