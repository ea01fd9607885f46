"""Coalescing through the gateway, with real processes: etcd, auth, the
gateway with its native data plane, and a real model-server replica of
half_plus_two with server-side batching on.

Under concurrent load the data plane sends Predict calls to the batching
replica in groups (ReplicaService.PredictBatch); every caller must still get
exactly its own answer or its own error."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from cloudml.auth.v1 import auth_service_pb2 as auth_pb
from cloudml.auth.v1 import auth_service_pb2_grpc as auth_grpc
from cloudml.models.v1 import models_service_pb2 as models_pb
from cloudml.tfs.tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from deploy.local.service_process import ServiceProcess
from deploy.local.stack import AuthGatewayStack
from services.common.etcd import Etcd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ADMIN = ("AKCOALESCEADMIN00000", "admin-secret")
SERVICE = ("AKCOALESCESERVICE000", "service-secret")
AVAILABLE = models_pb.MODEL_VERSION_STATE_AVAILABLE


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("coalesce")
    # The model is built in another process: this one never imports TensorFlow.
    path = subprocess.run(
        [sys.executable, "-c", "import sys; from tests.conformance.half_plus_two import build_half_plus_two; "
                               "print(build_half_plus_two(sys.argv[1], 1))", str(d / "hpt")],
        cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    stack = AuthGatewayStack(d, admin=ADMIN, service=SERVICE).start()
    batching = {"enabled": True, "max_batch_size": 16, "batch_timeout_micros": 2000, "max_enqueued_batches": 1000}
    replica = ServiceProcess("hpt", [
        sys.executable, "-m", "services.models.model_server", "--model-name", "hpt", "--version", "1",
        "--base-path", path, "--port-file", str(d / "hpt.port"), "--etcd", stack.etcd.endpoint, "--tenant", "team-c",
        "--replica-id", "hpt-0", "--batching-config", json.dumps(batching)],
        str(d / "hpt.port"), log_path=str(d / "hpt.log")).start().wait_serving(120)

    async def route():
        etcd = await Etcd.connect(stack.etcd.endpoint)
        await etcd.put("/cloudml/models/routes/team-c/hpt", models_pb.ModelRoute(
            tenant="team-c", model="hpt", versions=[models_pb.VersionRoute(version=1, state=AVAILABLE)],
        ).SerializeToString())
        await etcd.close()
    asyncio.run(route())
    channel = grpc.insecure_channel(stack.gateway.address)
    auth = auth_grpc.AuthServiceStub(channel)
    admin = (("authorization", "Bearer " + auth.IssueToken(
        auth_pb.IssueTokenRequest(access_key_id=ADMIN[0], secret_key=ADMIN[1])).token),)
    auth.CreateTenant(auth_pb.CreateTenantRequest(name="team-c"), metadata=admin)
    key = auth.CreateAccessKey(auth_pb.CreateAccessKeyRequest(tenant="team-c"), metadata=admin)
    token = auth.IssueToken(auth_pb.IssueTokenRequest(access_key_id=key.access_key.access_key_id,
                                                      secret_key=key.secret_key)).token
    time.sleep(0.5)  # the gateway's watch catches up
    yield {"stack": stack, "channel": channel, "md": (("authorization", f"Bearer {token}"),)}
    channel.close()
    replica.stop()
    stack.stop()


def predict(env, x: float, input_name: str = "x"):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "hpt"
    tensor = req.inputs[input_name]
    tensor.dtype = 1  # DT_FLOAT
    tensor.tensor_shape.dim.add(size=1)
    tensor.tensor_shape.dim.add(size=1)
    tensor.float_val.append(x)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(env["channel"])
    return stub.Predict(req, metadata=env["md"], timeout=10)


def coalesced(stack) -> int:
    return stack.dataplane_calls().get("coalesced", 0)


def test_concurrent_calls_are_coalesced_and_each_gets_its_own_answer(env):
    before = coalesced(env["stack"])
    predict(env, 1.0)  # the first call goes through the Python gateway and is cached

    def call(i: int):
        if i % 17 == 0:  # a bad request among good ones: only it fails
            try:
                predict(env, float(i), input_name="nope")
            except grpc.RpcError as err:
                return ("error", err.code())
            return ("error", None)
        resp = predict(env, float(i))
        return ("ok", resp.outputs["y"].float_val[0], resp.model_spec.version.value)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, range(1, 801)))
    for i, result in enumerate(results, start=1):
        if i % 17 == 0:
            assert result == ("error", grpc.StatusCode.INVALID_ARGUMENT), (i, result)
        else:
            assert result == ("ok", 0.5 * i + 2.0, 1), (i, result)

    deadline = time.monotonic() + 5
    while coalesced(env["stack"]) - before == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert coalesced(env["stack"]) - before > 0, "no call was coalesced"

