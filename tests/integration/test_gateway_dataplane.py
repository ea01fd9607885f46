"""The gateway's native data plane (services/common/native/dataplane/), as
real processes: a gateway with its data plane in front, a real etcd and auth
service, and stand-in replicas.

What is pinned here: repeat calls are answered from the data plane's decision
cache; every change the control plane sees (labels, replicas, revoked keys,
expired tokens) takes effect on that path at once; the control plane's own
stream is unreachable from callers; metrics count fast-path calls; the
gateway stops when its data plane dies (so its supervisor restarts both);
`--dataplane python` still serves everything without it. The routing rules
themselves run through the data plane in test_gateway_predict.py."""
from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request

import grpc
import psutil
import pytest

from cloudml.auth.v1 import auth_service_pb2 as auth_pb
from cloudml.auth.v1 import auth_service_pb2_grpc as auth_grpc
from cloudml.models.v1 import models_service_pb2 as models_pb
from cloudml.tfs.tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from deploy.local.service_process import ServiceProcess
from deploy.local.stack import AuthGatewayStack
from services.gateway.dataplane import binary_path
from tests.e2e.serving_platform import wait_until
from tests.integration.replicas import AVAILABLE, Replicas, predict, replica_of, versions

ADMIN = ("AKGWDATAPLANEADMIN00", "admin-secret")
SERVICE = ("AKGWDATAPLANESERVICE", "service-secret")


@pytest.fixture(scope="module")
def env(tmp_path_factory, etcd_server):
    assert os.access(binary_path(), os.X_OK), "the native data plane is not built: run scripts/build_native.sh"
    stack = AuthGatewayStack(tmp_path_factory.mktemp("gwdp"), etcd_server.endpoint, admin=ADMIN, service=SERVICE).start()
    channel = grpc.insecure_channel(stack.gateway.address)
    auth_stub = auth_grpc.AuthServiceStub(channel)
    admin_token = auth_stub.IssueToken(auth_pb.IssueTokenRequest(access_key_id=ADMIN[0], secret_key=ADMIN[1])).token
    admin_md = (("authorization", f"Bearer {admin_token}"),)
    auth_stub.CreateTenant(auth_pb.CreateTenantRequest(name="team-a"), metadata=admin_md)
    key = auth_stub.CreateAccessKey(auth_pb.CreateAccessKeyRequest(tenant="team-a"), metadata=admin_md)
    token = auth_stub.IssueToken(auth_pb.IssueTokenRequest(
        access_key_id=key.access_key.access_key_id, secret_key=key.secret_key)).token
    replicas = Replicas(stack.etcd)
    replicas.add("team-a", "linear", 1, "lin-1a")
    replicas.add("team-a", "linear", 2, "lin-2a")
    replicas.route(models_pb.ModelRoute(tenant="team-a", model="linear", labels={"stable": 1},
                                        default_version=1, versions=versions((1, AVAILABLE), (2, AVAILABLE))))
    md = (("authorization", f"Bearer {token}"),)
    for version, replica in ((1, "lin-1a"), (2, "lin-2a")):  # the gateway's watch catches up
        wait_routed(stack, md, f"linear/versions/{version}", replica)
    yield {"stack": stack, "channel": channel, "auth": auth_stub, "admin": admin_md,
           "replicas": replicas, "md": md}
    channel.close()
    replicas.close()
    stack.stop()


def wait_routed(stack, md, path: str, replica: str) -> None:
    """Polls a REST Predict to /v1/models/PATH until `replica` answers. REST is
    served by the gateway's Python process: the data plane's counters and
    decision cache stay as they were."""
    def routed():
        request = urllib.request.Request(f"{stack.rest}/v1/models/{path}:predict", method="POST",
                                         data=json.dumps({"instances": [1.0]}).encode())
        request.add_header("Authorization", md[0][1])
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read()) == {"predictions": [replica]}
    wait_until(routed, 10, f"{path} to route to {replica}", interval=0.02)


def metrics(stack) -> str:
    return urllib.request.urlopen(f"{stack.rest}/metrics", timeout=5).read().decode()


def eventually(check, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def assert_unauthenticated(call) -> None:
    """AssertionError (which eventually() retries) unless `call` fails UNAUTHENTICATED."""
    try:
        call()
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
    else:
        raise AssertionError("the revoked key's token still works")


def dataplane_process(gateway: ServiceProcess) -> psutil.Process:
    children = [p for p in psutil.Process(gateway.process.pid).children()
                if os.path.basename(p.exe()) == "cloudml-dataplane"]
    assert len(children) == 1, children
    return children[0]


def test_the_data_plane_owns_the_public_port(env):
    gateway = env["stack"].gateway
    port = int(gateway.address.rpartition(":")[2])
    plane = dataplane_process(gateway)
    assert port in {c.laddr.port for c in plane.net_connections() if c.status == psutil.CONN_LISTEN}
    assert port not in {c.laddr.port for c in psutil.Process(gateway.process.pid).net_connections()
                        if c.status == psutil.CONN_LISTEN}


def test_repeat_calls_take_the_fast_path_and_are_counted(env):
    stack = env["stack"]

    def reported():
        calls = stack.dataplane_calls()
        assert calls, "the data plane has not reported yet"
        return calls
    before = eventually(reported)
    for _ in range(20):
        assert replica_of(predict(env["channel"], env["md"], version=2)) == "lin-2a"

    def counted():
        after = stack.dataplane_calls()
        assert after["fast"] - before["fast"] >= 19, (before, after)
        assert after["control"] - before["control"] <= 1, (before, after)
        text = metrics(stack)
        line = re.search(r'cloudml_gateway_model_requests_total\{api="Predict",code="OK",model="linear",'
                         r'version="2"\} (\S+)', text)
        assert line and float(line.group(1)) >= 20, text
        assert 'cloudml_gateway_model_request_seconds_bucket{api="Predict",le="+Inf",model="linear",version="2"}' \
            in text
    eventually(counted)


def test_the_callers_deadline_holds_on_the_fast_path(env):
    stack, stub = env["stack"], prediction_service_pb2_grpc.PredictionServiceStub(env["channel"])
    before = eventually(lambda: stack.dataplane_calls() or (_ for _ in ()).throw(AssertionError("no report")))

    def request(sleep=None):
        req = predict_pb2.PredictRequest()
        req.model_spec.name = "linear"
        req.model_spec.version.value = 1
        if sleep is not None:
            req.inputs["sleep"].dtype = 1  # DT_FLOAT
            req.inputs["sleep"].float_val.append(sleep)
        return req

    stub.Predict(request(), metadata=env["md"], timeout=5)  # the decision is cached from here on
    resp = stub.Predict(request(sleep=0.0), metadata=env["md"], timeout=3)
    assert 0 < resp.outputs["time_remaining"].float_val[0] < 3.5  # the replica got the caller's deadline
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(request(sleep=2.0), metadata=env["md"], timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 1.0

    def counted():
        after = stack.dataplane_calls()
        assert after["fast"] - before["fast"] >= 2, (before, after)
    eventually(counted)


def test_a_response_from_another_version_sends_the_call_to_the_control_plane(env):
    """A Predict naming the model's own name, no label and no other version
    reaches the replica without the routed-version header (the replica
    resolves it alike); the data plane checks the served version in the
    response instead. A replica of another version on the route (a stale
    route) fails that check: the call goes through the control plane."""
    stack, replicas = env["stack"], env["replicas"]
    replicas.add("team-a", "stale", 1, "stale-1", answers_as=2)
    replicas.route(models_pb.ModelRoute(tenant="team-a", model="stale", versions=versions((1, AVAILABLE))))
    wait_routed(stack, env["md"], "stale", "stale-1")
    before = eventually(lambda: stack.dataplane_calls() or (_ for _ in ()).throw(AssertionError("no report")))
    for _ in range(6):
        predict(env["channel"], env["md"], name="stale")

    def counted():
        after = stack.dataplane_calls()
        assert after["control"] - before["control"] >= 6, (before, after)  # every call ended there
        assert after["fast"] - before["fast"] >= 2, (before, after)  # after each cached decision
    eventually(counted)


def test_label_move_takes_effect_at_once(env):
    channel, md, replicas = env["channel"], env["md"], env["replicas"]
    for _ in range(5):
        assert predict(channel, md, label="stable").model_spec.version.value == 1  # cached now
    replicas.route(models_pb.ModelRoute(tenant="team-a", model="linear", labels={"stable": 2},
                                        default_version=1, versions=versions((1, AVAILABLE), (2, AVAILABLE))))
    eventually(lambda: _assert_equal(predict(channel, md, label="stable").model_spec.version.value, 2), 2.0)
    assert {predict(channel, md, label="stable").model_spec.version.value for _ in range(20)} == {2}
    replicas.route(models_pb.ModelRoute(tenant="team-a", model="linear", labels={"stable": 1},
                                        default_version=1, versions=versions((1, AVAILABLE), (2, AVAILABLE))))
    eventually(lambda: _assert_equal(predict(channel, md, label="stable").model_spec.version.value, 1), 2.0)


def _assert_equal(a, b):
    assert a == b, (a, b)


def test_a_new_replica_gets_traffic_at_once(env):
    channel, md, replicas = env["channel"], env["md"], env["replicas"]
    for _ in range(5):
        assert replica_of(predict(channel, md, version=1)) == "lin-1a"
    replicas.add("team-a", "linear", 1, "lin-1b")
    eventually(lambda: _assert_equal(
        {replica_of(predict(channel, md, version=1)) for _ in range(30)}, {"lin-1a", "lin-1b"}), 3.0)


def test_revoked_key_is_refused_at_once(env):
    auth, channel = env["auth"], env["channel"]
    key = auth.CreateAccessKey(auth_pb.CreateAccessKeyRequest(tenant="team-a"), metadata=env["admin"])
    md = (("authorization", "Bearer " + auth.IssueToken(auth_pb.IssueTokenRequest(
        access_key_id=key.access_key.access_key_id, secret_key=key.secret_key)).token),)
    for _ in range(5):
        predict(channel, md, version=2)
    auth.RevokeAccessKey(auth_pb.RevokeAccessKeyRequest(tenant="team-a", access_key_id=key.access_key.access_key_id),
                         metadata=env["admin"])

    def refused():
        assert_unauthenticated(lambda: predict(channel, md, version=2))
    eventually(refused, 2.0)
    for _ in range(5):
        refused()


def test_expired_token_is_refused_on_the_fast_path(env):
    auth = env["auth"]
    key = auth.CreateAccessKey(auth_pb.CreateAccessKeyRequest(tenant="team-a"), metadata=env["admin"])
    md = (("authorization", "Bearer " + auth.IssueToken(auth_pb.IssueTokenRequest(
        access_key_id=key.access_key.access_key_id, secret_key=key.secret_key, ttl_seconds=2)).token),)
    for _ in range(3):
        predict(env["channel"], md, version=2)
    time.sleep(2.2)
    with pytest.raises(grpc.RpcError) as err:
        predict(env["channel"], md, version=2)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_control_stream_is_not_reachable_by_callers(env):
    attach = "/cloudml.internal.v1.Dataplane/Attach"
    call = env["channel"].stream_stream(attach)
    with pytest.raises(grpc.RpcError) as err:
        list(call(iter([b""]), metadata=env["admin"], timeout=5))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # Straight to the gateway process's loopback port, without the data plane's secret.
    upstream = dataplane_process(env["stack"].gateway).cmdline()
    address = upstream[upstream.index("--upstream") + 1]
    with grpc.insecure_channel(address) as inner:
        with pytest.raises(grpc.RpcError) as err:
            list(inner.stream_stream(attach)(iter([b""]), metadata=(("x-cloudml-dataplane", "guess"),), timeout=5))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_platform_calls_with_a_vouched_token_go_straight_to_their_service(env):
    stack, auth = env["stack"], env["auth"]
    key = auth.CreateAccessKey(auth_pb.CreateAccessKeyRequest(tenant="team-a"), metadata=env["admin"])
    md = (("authorization", "Bearer " + auth.IssueToken(auth_pb.IssueTokenRequest(
        access_key_id=key.access_key.access_key_id, secret_key=key.secret_key)).token),)
    before = stack.dataplane_calls().get("direct", 0)
    for _ in range(10):
        assert auth.WhoAmI(auth_pb.WhoAmIRequest(), metadata=md).tenant == "team-a"

    def relayed():
        calls = stack.dataplane_calls()
        assert calls.get("direct", 0) - before >= 9, calls
        handled = re.search(r'grpc_server_handled_total\{grpc_code="OK",grpc_method="WhoAmI",'
                            r'grpc_service="cloudml.auth.v1.AuthService"\} (\S+)', metrics(stack))
        assert handled and float(handled.group(1)) >= 10
    eventually(relayed)
    # A revoked key stops working at once on that path too.
    auth.RevokeAccessKey(auth_pb.RevokeAccessKeyRequest(tenant="team-a", access_key_id=key.access_key.access_key_id),
                         metadata=env["admin"])

    eventually(lambda: assert_unauthenticated(lambda: auth.WhoAmI(auth_pb.WhoAmIRequest(), metadata=md)), 2.0)


def test_streaming_platform_calls_are_relayed(env):
    stream = env["auth"].WatchVerificationKeys(auth_pb.WatchVerificationKeysRequest(), timeout=5)
    first = next(stream)
    stream.cancel()
    assert first.public_keys


def _second_gateway(stack: AuthGatewayStack, name: str, env_vars: dict) -> ServiceProcess:
    return stack.start_gateway(name, env_vars)[0]


def test_python_mode_serves_without_a_data_plane(env):
    gateway = _second_gateway(env["stack"], "gw-python", {"CLOUDML_DATAPLANE": "python"})
    try:
        assert not psutil.Process(gateway.process.pid).children()
        with grpc.insecure_channel(gateway.address) as channel:
            wait_until(lambda: replica_of(predict(channel, env["md"], version=2)) == "lin-2a", 10,
                       "the python-mode gateway to route linear v2", interval=0.02)
            assert replica_of(predict(channel, env["md"], version=2)) == "lin-2a"
            assert replica_of(predict(channel, env["md"], version=2)) == "lin-2a"
    finally:
        gateway.stop()


def test_gateway_stops_when_its_data_plane_dies(env):
    gateway = _second_gateway(env["stack"], "gw-native", {"CLOUDML_DATAPLANE": "native"})
    try:
        dataplane_process(gateway).send_signal(signal.SIGKILL)
        assert gateway.process.wait(15) == 1
        assert "native data plane exited" in open(gateway.log_path).read()
    finally:
        gateway.stop()


def test_gateway_with_its_data_plane_stops_promptly(env):
    gateway = _second_gateway(env["stack"], "gw-stop", {"CLOUDML_DATAPLANE": "native"})
    plane = dataplane_process(gateway)
    started = time.monotonic()
    gateway.stop()
    assert time.monotonic() - started < 3.0
    assert gateway.process.returncode == 0
    assert not plane.is_running() or plane.status() == psutil.STATUS_ZOMBIE
