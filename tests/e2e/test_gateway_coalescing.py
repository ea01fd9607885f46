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
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
import pytest

from cloudml.models.v1 import models_service_pb2 as models_pb
from cloudml.internal.v1 import replica_pb2
from cloudml.tfs.tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from deploy.local.service_process import ServiceProcess, read_port_file
from deploy.local.stack import AuthGatewayStack
from services.models import store

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ADMIN = ("AKCOALESCEADMIN00000", "admin-secret")
SERVICE = ("AKCOALESCESERVICE000", "service-secret")
AVAILABLE = models_pb.MODEL_VERSION_STATE_AVAILABLE
# Starts its own etcd namespace, auth, gateway and replica, and kills the replica's front.
pytestmark = pytest.mark.needs_local_platform


@pytest.fixture(scope="module")
def env(tmp_path_factory, etcd_server):
    d = tmp_path_factory.mktemp("coalesce")
    # The model is built in another process: this one never imports TensorFlow.
    path = subprocess.run(
        [sys.executable, "-c", "import sys; from tests.conformance.half_plus_two import build_half_plus_two; "
                               "print(build_half_plus_two(sys.argv[1], 1))", str(d / "hpt")],
        cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    stack = AuthGatewayStack(d, etcd_server.endpoint, admin=ADMIN, service=SERVICE).start()
    batching = {"enabled": True, "max_batch_size": 16, "batch_timeout_micros": 2000, "max_enqueued_batches": 1000}
    replica = ServiceProcess("hpt", [
        sys.executable, "-m", "services.models.model_server", "--model-name", "hpt", "--version", "1",
        "--base-path", path, "--port-file", str(d / "hpt.port"),
        "--batching-config", json.dumps(batching), "--metrics-listen", "127.0.0.1:0"],
        str(d / "hpt.port"), log_path=str(d / "hpt.log")).start().wait_serving(120)

    info = read_port_file(str(d / "hpt.port"))

    async def route():
        etcd = await stack.etcd.connect()
        # What the models service's reconciler publishes for a serving replica.
        endpoint = store.make_endpoint("team-c", "hpt", 1, "hpt-0", info.get("replica_address", info["address"]),
                                       AVAILABLE, info["coalesce_max"])
        endpoint.batch_timeout_micros = info["batch_timeout_micros"]
        await store.put_endpoint(etcd, endpoint)
        await etcd.put("/cloudml/models/routes/team-c/hpt", models_pb.ModelRoute(
            tenant="team-c", model="hpt", versions=[models_pb.VersionRoute(version=1, state=AVAILABLE)],
        ).SerializeToString())
        await etcd.close()
    asyncio.run(route())
    channel = grpc.insecure_channel(stack.gateway.address)
    token = stack.tenant_token("team-c")
    time.sleep(0.5)  # the gateway's watch catches up
    yield {"stack": stack, "channel": channel, "md": (("authorization", f"Bearer {token}"),), "replica": replica,
           "replica_info": read_port_file(str(d / "hpt.port"))}
    channel.close()
    replica.stop()
    stack.stop()


def request(xs: list[float], input_name: str = "x", dtype: int = 1) -> predict_pb2.PredictRequest:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "hpt"
    tensor = req.inputs[input_name]
    tensor.dtype = dtype  # 1: DT_FLOAT
    tensor.tensor_shape.dim.add(size=len(xs))
    tensor.tensor_shape.dim.add(size=1)
    tensor.float_val.extend(xs)
    return req


def predict(env, x: float, input_name: str = "x"):
    req = request([x], input_name)
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



def test_a_predict_batch_group_answers_each_member_as_its_own_predict(env):
    """PredictBatch straight to the replica: good members of several sizes
    (one over max_batch_size, so it runs alone), and bad members of each kind
    that Predict refuses, in one group. Each gets what Predict would answer."""
    members = [
        request([1.0]).SerializeToString(),
        request([2.0, 3.0]).SerializeToString(),
        request([4.0], input_name="nope").SerializeToString(),    # unknown input
        request([5.0], dtype=2).SerializeToString(),              # DT_DOUBLE, not the signature's dtype
        b"\xff\xff\xff",                                        # not a PredictRequest
        request([float(i) for i in range(17)]).SerializeToString(),  # 17 rows > max_batch_size 16
        request([6.0]).SerializeToString(),
    ]
    with grpc.insecure_channel(env["replica"].address) as channel:
        call = channel.unary_unary("/cloudml.internal.v1.ReplicaService/PredictBatch",
                                   request_serializer=replica_pb2.PredictBatchRequest.SerializeToString,
                                   response_deserializer=replica_pb2.PredictBatchResponse.FromString)
        answer = call(replica_pb2.PredictBatchRequest(requests=members, resolved_version=1), timeout=10)
        single = channel.unary_unary("/tensorflow.serving.PredictionService/Predict",
                                     request_serializer=predict_pb2.PredictRequest.SerializeToString,
                                     response_deserializer=predict_pb2.PredictResponse.FromString)
        errors = {}
        for i in (2, 3):
            try:
                single(predict_pb2.PredictRequest.FromString(members[i]), timeout=10,
                       metadata=(("x-cloudml-resolved-version", "1"),))
            except grpc.RpcError as err:
                errors[i] = (err.code().value[0], err.details())
        wrong_version = call(replica_pb2.PredictBatchRequest(requests=members[:1], resolved_version=2), timeout=10)

    results = list(answer.results)
    assert len(results) == len(members)
    outputs = {}
    for i in (0, 1, 5, 6):
        assert results[i].code == 0, (i, results[i])
        response = predict_pb2.PredictResponse.FromString(results[i].response)
        assert response.model_spec.name == "hpt" and response.model_spec.version.value == 1
        outputs[i] = list(response.outputs["y"].float_val)
    assert outputs == {0: [2.5], 1: [3.0, 3.5], 5: [0.5 * i + 2.0 for i in range(17)], 6: [5.0]}
    for i in (2, 3):  # the same code and message as the same request sent alone
        assert (results[i].code, results[i].message) == errors[i], (i, results[i], errors[i])
    assert results[4].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert wrong_version.results[0].code == grpc.StatusCode.NOT_FOUND.value[0]


def test_each_predict_batch_member_has_its_own_deadline_and_metadata(env):
    """PredictBatch straight to the real replica: a member whose time ran out
    is DEADLINE_EXCEEDED (and not run), the others are answered; a member's
    own metadata applies to it alone (here the routed-version header, which
    names a version this replica does not serve)."""
    assert env["replica_info"]["batch_timeout_micros"] == 2000  # what the endpoint publishes
    members = [
        replica_pb2.PredictMember(request=request([1.0]).SerializeToString(), timeout_micros=5_000_000),
        replica_pb2.PredictMember(request=request([2.0]).SerializeToString(), timeout_micros=1),
        replica_pb2.PredictMember(request=request([3.0]).SerializeToString()),
        replica_pb2.PredictMember(request=request([4.0]).SerializeToString(), metadata=[
            replica_pb2.MetadataEntry(key="x-cloudml-resolved-version", value=b"2")]),
    ]
    with grpc.insecure_channel(env["replica"].address) as channel:
        call = channel.unary_unary("/cloudml.internal.v1.ReplicaService/PredictBatch",
                                   request_serializer=replica_pb2.PredictBatchRequest.SerializeToString,
                                   response_deserializer=replica_pb2.PredictBatchResponse.FromString)
        answer = call(replica_pb2.PredictBatchRequest(members=members), timeout=10)
    codes = [r.code for r in answer.results]
    assert codes == [0, grpc.StatusCode.DEADLINE_EXCEEDED.value[0], 0, grpc.StatusCode.NOT_FOUND.value[0]], answer
    assert [predict_pb2.PredictResponse.FromString(answer.results[i].response).outputs["y"].float_val[0]
            for i in (0, 2)] == [2.5, 3.5]


def replica_metric(env, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{env['replica_info']['metrics']}/metrics", timeout=5).read()
    return sum(float(line.rpartition(" ")[2]) for line in text.decode().splitlines() if line.startswith(name + " "))


def test_direct_callers_of_a_batching_replica_are_coalesced_by_its_native_front(env):
    """The replica's port belongs to its native front (it has batching on);
    its own Python server listens on another loopback port, which is what it
    registers for gateways. Concurrent direct calls with the stock stub reach
    it in groups, and each caller gets exactly its own answer or error."""
    info = env["replica_info"]
    replica = psutil.Process(env["replica"].process.pid)
    fronts = [p for p in replica.children() if os.path.basename(p.exe()) == "cloudml-dataplane"]
    assert len(fronts) == 1, replica.children()
    port = int(info["address"].rpartition(":")[2])
    assert port in {c.laddr.port for c in fronts[0].net_connections() if c.status == psutil.CONN_LISTEN}
    assert info["replica_address"] != info["address"]

    groups_before = replica_metric(env, "cloudml_model_server_coalesced_group_calls_count")
    with grpc.insecure_channel(info["address"]) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

        def call(i: int):
            req = request([float(i)], input_name="nope" if i % 17 == 0 else "x")
            try:
                resp = stub.Predict(req, timeout=10)
            except grpc.RpcError as err:
                return ("error", err.code())
            return ("ok", resp.outputs["y"].float_val[0], resp.model_spec.name, resp.model_spec.version.value)

        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(call, range(1, 601)))
    for i, result in enumerate(results, start=1):
        expected = ("error", grpc.StatusCode.INVALID_ARGUMENT) if i % 17 == 0 else ("ok", 0.5 * i + 2.0, "hpt", 1)
        assert result == expected, (i, result)
    assert replica_metric(env, "cloudml_model_server_coalesced_group_calls_count") > groups_before

    # A direct call naming another model is still refused by the replica itself.
    with grpc.insecure_channel(info["address"]) as channel:
        req = request([1.0])
        req.model_spec.name = "other"
        with pytest.raises(grpc.RpcError) as err:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_replica_exits_when_its_native_front_dies(env):
    """Last in this module: it ends the replica. Its supervisor (the models
    service's reconciler) restarts it whole."""
    replica = psutil.Process(env["replica"].process.pid)
    front = next(p for p in replica.children() if os.path.basename(p.exe()) == "cloudml-dataplane")
    front.kill()
    assert env["replica"].process.wait(15) == 1
