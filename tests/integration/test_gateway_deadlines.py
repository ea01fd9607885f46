"""The caller's deadline, as the replica sees it behind a real gateway.

A stand-in replica (deadline_replica.py) records each call's remaining time
(`context.time_remaining()`), which process called it (its user-agent) and
how the call ended. Every test runs against a gateway with its native data
plane in front (`CLOUDML_DATAPLANE=native`) and one without
(`CLOUDML_DATAPLANE=python`), for a token's first call and for a repeat call.
With the data plane, a first call goes through the gateway's Python process
(the control plane) and a repeat call straight from the data plane (the fast
path); the user-agent the replica sees says which hop called it, and each
test checks it, so a case cannot pass on the other path.

Why these fail against a gateway that does not propagate deadlines: a hop
that drops the caller's deadline calls the replica with none, and grpc then
gives the replica `time_remaining() is None` (checked), so the first test
fails; the replica would sleep its full 2 s and answer, so the expired-call
test fails (it requires the replica's call to end cancelled within 0.5 s of
the caller's deadline); a hop that keeps the replica's call after the caller
cancels fails the cancel test the same way. A hop that substitutes a fixed
deadline of its own fails the first test, which sends two different
timeouts and requires each, minus at most MARGIN, at the replica. (The old
test asserted only that the caller got DEADLINE_EXCEEDED, which the caller's
own gRPC library enforces.)"""
from __future__ import annotations

import json
import os
import time
import urllib.request
import uuid

import grpc
import pytest

from cloudml.auth.v1 import auth_service_pb2 as auth_pb
from cloudml.auth.v1 import auth_service_pb2_grpc as auth_grpc
from cloudml.models.v1 import models_service_pb2 as models_pb
from cloudml.tfs.tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from deploy.local.stack import AuthGatewayStack
from services.gateway.dataplane import binary_path
from services.gateway.rest import DEFAULT_TIMEOUT as REST_TIMEOUT
from tests.e2e.serving_platform import wait_until
from tests.integration.deadline_replica import DeadlineReplica
from tests.integration.replicas import AVAILABLE, Replicas, versions

ADMIN = ("AKGWDEADLINEADMIN000", "admin-secret")
SERVICE = ("AKGWDEADLINESERVICE0", "service-secret")
TENANT, MODEL = "team-a", "clock"
#: the most the gateway's hops may take off the caller's remaining time, in seconds
MARGIN = 1.0
#: user-agent prefixes of the hops that call replicas
PYTHON_HOP, NATIVE_HOP = "grpc-python-asyncio/", "cloudml-dataplane-h2"


@pytest.fixture(scope="module")
def platform(tmp_path_factory, etcd_server):
    assert os.access(binary_path(), os.X_OK), "the native data plane is not built: run scripts/build_native.sh"
    stack = AuthGatewayStack(tmp_path_factory.mktemp("gwdl"), etcd_server.endpoint, admin=ADMIN, service=SERVICE).start()
    channel = grpc.insecure_channel(stack.gateway.address)
    auth = auth_grpc.AuthServiceStub(channel)
    admin_md = (("authorization", "Bearer " + auth.IssueToken(
        auth_pb.IssueTokenRequest(access_key_id=ADMIN[0], secret_key=ADMIN[1])).token),)
    auth.CreateTenant(auth_pb.CreateTenantRequest(name=TENANT), metadata=admin_md)
    replicas = Replicas(stack.etcd)
    replica = DeadlineReplica(replicas, TENANT, MODEL, 1, "clock-1")
    replicas.route(models_pb.ModelRoute(tenant=TENANT, model=MODEL, versions=versions((1, AVAILABLE))))
    yield {"stack": stack, "auth": auth, "admin": admin_md, "replica": replica}
    channel.close()
    replicas.close()
    stack.stop()


@pytest.fixture(scope="module", params=["native", "python"])
def gateway(request, platform):
    """A gateway in the given --dataplane mode, once it routes to the replica."""
    mode = request.param
    process, rest_port = platform["stack"].start_gateway(f"gw-{mode}", {"CLOUDML_DATAPLANE": mode})
    channel = grpc.insecure_channel(process.address)
    md = fresh_token(platform)
    wait_until(lambda: predict(channel, md, "ready", timeout=2), 15, f"the {mode} gateway to route {MODEL}",
               interval=0.05)
    yield {"mode": mode, "channel": channel, "rest": f"http://127.0.0.1:{rest_port}"}
    channel.close()
    process.stop()


def fresh_token(platform) -> tuple[tuple[str, str], ...]:
    """Metadata with a token of a new access key: the data plane has no decision cached for it."""
    auth = platform["auth"]
    key = auth.CreateAccessKey(auth_pb.CreateAccessKeyRequest(tenant=TENANT), metadata=platform["admin"])
    token = auth.IssueToken(auth_pb.IssueTokenRequest(access_key_id=key.access_key.access_key_id,
                                                      secret_key=key.secret_key)).token
    return (("authorization", f"Bearer {token}"),)


def request_for(tag: str, sleep: float = 0.0) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.inputs["tag"].dtype = 7  # DT_STRING
    request.inputs["tag"].string_val.append(tag.encode())
    request.inputs["sleep"].dtype = 1  # DT_FLOAT
    request.inputs["sleep"].float_val.append(sleep)
    return request


def predict(channel, md, tag: str, sleep: float = 0.0, timeout: float | None = None):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
        request_for(tag, sleep), metadata=md, timeout=timeout)


def new_tag(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def caller(platform, gateway, path: str):
    """Metadata for a call on `path` ("first": a token's first call; "repeat":
    after one call with it), and the hop expected to call the replica."""
    md = fresh_token(platform)
    if path == "repeat":
        predict(gateway["channel"], md, new_tag("warm"), timeout=5)
    native_fast_path = gateway["mode"] == "native" and path == "repeat"
    return md, NATIVE_HOP if native_fast_path else PYTHON_HOP


def assert_remaining(call, timeout: float) -> None:
    """The replica saw the caller's `timeout`, less the hops' time (at most
    MARGIN). It may see a little more than `timeout`: gRPC sends a timeout
    rounded up to a coarser unit (a direct call with 60 s arrives with 60.1 s
    left, with 2 s: 2.009 s), once per hop."""
    assert call.time_remaining is not None, f"{call.user_agent} called the replica without a deadline"
    assert timeout - MARGIN < call.time_remaining <= timeout * 1.02 + 0.05, (timeout, call.time_remaining)


def assert_called_by(call, hop: str) -> None:
    assert call.user_agent.startswith(hop), f"expected the replica to be called by {hop!r}, got {call.user_agent!r}"


def ended(replica: DeadlineReplica, tag: str, timeout: float):
    """The replica's call `tag` once it has ended (answered or cancelled)."""
    return wait_until(lambda: (c := replica.call(tag)) is not None and c.outcome != "running" and c, timeout,
                      f"the replica's call {tag} to end", interval=0.01)


@pytest.mark.parametrize("path", ["first", "repeat"])
def test_the_replica_sees_the_callers_remaining_time(platform, gateway, path):
    replica = platform["replica"]
    for timeout in (2.0, 7.0):
        md, hop = caller(platform, gateway, path)
        tag = new_tag(f"remaining-{timeout:g}")
        predict(gateway["channel"], md, tag, timeout=timeout)
        call = replica.call(tag)
        assert_called_by(call, hop)
        assert_remaining(call, timeout)


@pytest.mark.parametrize("path", ["first", "repeat"])
def test_an_expired_call_is_cancelled_at_the_replica(platform, gateway, path):
    """0.3 s deadline, 2 s of work: the replica's call ends cancelled at the
    deadline, not answered 2 s later."""
    replica = platform["replica"]
    md, hop = caller(platform, gateway, path)
    tag = new_tag("expired")
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        predict(gateway["channel"], md, tag, sleep=2.0, timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    call = ended(replica, tag, 3.0)
    assert_called_by(call, hop)
    assert call.outcome == "cancelled", f"the replica {call.outcome} a call whose caller's deadline had passed"
    assert call.ended - start < 0.3 + 0.5, f"cancelled at the replica {call.ended - start:.3f} s after the call"


@pytest.mark.parametrize("path", ["first", "repeat"])
def test_a_cancelled_call_is_cancelled_at_the_replica(platform, gateway, path):
    """A caller that cancels (30 s deadline, 5 s of work): the gateway cancels
    the replica's call too, rather than letting it run to the end."""
    replica = platform["replica"]
    md, hop = caller(platform, gateway, path)
    tag = new_tag("cancel")
    future = prediction_service_pb2_grpc.PredictionServiceStub(gateway["channel"]).Predict.future(
        request_for(tag, sleep=5.0), metadata=md, timeout=30)
    running = wait_until(lambda: replica.call(tag), 5, f"the call {tag} to reach the replica", interval=0.01)
    assert_called_by(running, hop)
    assert_remaining(running, 30)
    cancelled_at = time.monotonic()
    future.cancel()
    call = ended(replica, tag, 6.0)
    assert call.outcome == "cancelled", f"the replica {call.outcome} a call its caller had cancelled"
    assert call.ended - cancelled_at < 0.5, f"cancelled at the replica {call.ended - cancelled_at:.3f} s after the caller"


def test_rest_predict_reaches_the_replica_with_the_gateways_rest_deadline(platform, gateway):
    """TF Serving's REST API has no deadline header; the gateway gives each
    REST call DEFAULT_TIMEOUT (services/gateway/rest.py), and the replica sees it."""
    replica = platform["replica"]
    md = fresh_token(platform)
    tag = new_tag("rest")
    body = json.dumps({"inputs": {"tag": [tag], "sleep": [0.0]}}).encode()
    request = urllib.request.Request(f"{gateway['rest']}/v1/models/{MODEL}:predict", data=body, method="POST")
    request.add_header("Authorization", md[0][1])
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200 and json.loads(response.read()) == {"outputs": [tag]}
    call = replica.call(tag)
    # A token's first REST call too is converted and sent by the native data
    # plane (it asks the Python gateway for the route alone: rest.cc Resolve).
    assert_called_by(call, NATIVE_HOP if gateway["mode"] == "native" else PYTHON_HOP)
    assert_remaining(call, REST_TIMEOUT)
