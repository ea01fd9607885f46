"""The REST port on the native data plane (issue 14, services/common/native/dataplane/rest.h),
end to end with real processes: etcd, auth, two gateways on one etcd (one
whose data plane owns the REST port, one whose Python process serves it,
`--dataplane-rest off`), and a real model-server replica of TF Serving's
half_plus_two (TensorFlow), called over plain HTTP.

What is checked: the same request (predict, classify, regress) gets the same
status and the same bytes from both gateways, first call (the data plane asks
the Python gateway for the route alone, then converts it in C++, or relays
what its codec declines) and repeat calls (converted in C++, proven by the
data plane's `rest` call counter), errors included; what a hostile caller might try on the new port (forged
platform headers, another tenant's cached route, a revoked token, heads and
bodies that never end, pipelining); and that everything that is not a
predict call still works through the relay.
"""
from __future__ import annotations

import base64
import gzip
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
import pytest

from cloudml.auth.v1 import auth_service_pb2 as auth_pb
from cloudml.auth.v1 import auth_service_pb2_grpc as auth_grpc
from cloudml.internal.v1 import dataplane_pb2
from cloudml.models.v1 import models_service_pb2 as models_pb
from deploy.local.stack import AuthGatewayStack
from services.common.native.protocol import REST_DECISION_HEADER, REST_RESOLVE_HEADER, SECRET_HEADER
from tests.e2e.serving_platform import clean_env, wait_until
from tests.integration.test_predict_limits import _ready  # the replica's port file, once its model is loaded

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ADMIN = ("AKRESTNATIVEADMIN000", "admin-secret")
SERVICE = ("AKRESTNATIVESERVICE0", "service-secret")
MODEL = "half_plus_two"
BATCHED = "half_plus_two_batched"  # the same SavedModel on a replica with batching on
AVAILABLE = models_pb.MODEL_VERSION_STATE_AVAILABLE


@pytest.fixture(scope="module")
def env(tmp_path_factory, etcd_server, half_plus_two):
    work = tmp_path_factory.mktemp("rest-native")
    stack = AuthGatewayStack(work, etcd_server.endpoint, admin=ADMIN, service=SERVICE).start()
    replica = batch_replica = None
    try:
        _, python_rest = stack.start_gateway("gwpy", env=dict(os.environ, CLOUDML_DATAPLANE_REST="off"))
        # A data plane without its HTTP/2 front (gRPC's server on the gRPC port) still owns REST.
        # (Frames off there too: its REST calls to the batching replica are coalesced by its gRPC side.)
        h2off, h2off_rest = stack.start_gateway("gwh2off", env=dict(os.environ, CLOUDML_DATAPLANE_H2_FRONT="off",
                                                                    CLOUDML_DATAPLANE_FRAMES="off"))
        port_file = str(work / "replica.port")
        replica = subprocess.Popen(
            [sys.executable, "-m", "services.models.model_server", "--model-name", MODEL, "--version", "1",
             "--base-path", half_plus_two, "--port-file", port_file, "--max-request-bytes-cap", str(4 << 20)],
            cwd=ROOT, env=clean_env(), stdout=open(work / "replica.log", "w"), stderr=subprocess.STDOUT)
        batch_port_file = str(work / "batch.port")
        batching = json.dumps({"enabled": True, "max_batch_size": 32, "batch_timeout_micros": 2000,
                               "max_enqueued_batches": 100, "num_batch_threads": 2})
        batch_replica = subprocess.Popen(
            [sys.executable, "-m", "services.models.model_server", "--model-name", BATCHED, "--version", "1",
             "--base-path", half_plus_two, "--port-file", batch_port_file, "--batching-config", batching,
             # On a Unix socket, as the models service starts replicas: it has a framed socket too.
             "--listen", f"unix:{work}/batch.sock"],
            cwd=ROOT, env=clean_env(), stdout=open(work / "batch.log", "w"), stderr=subprocess.STDOUT)
        ports = wait_until(lambda: _ready(port_file), 120, "the replica to load")
        batch_ports = wait_until(lambda: _ready(batch_port_file), 120, "the batching replica to load")
        channel = grpc.insecure_channel(stack.gateway.address)
        auth = auth_grpc.AuthServiceStub(channel)
        token = auth.IssueToken(auth_pb.IssueTokenRequest(access_key_id=ADMIN[0], secret_key=ADMIN[1])).token
        admin_md = (("authorization", f"Bearer {token}"),)
        auth.CreateTenant(auth_pb.CreateTenantRequest(name="other"), metadata=admin_md)
        key = auth.CreateAccessKey(auth_pb.CreateAccessKeyRequest(tenant="other"), metadata=admin_md)
        other = auth.IssueToken(auth_pb.IssueTokenRequest(access_key_id=key.access_key.access_key_id,
                                                          secret_key=key.secret_key)).token
        stack.etcd.put(f"/cloudml/models/endpoints/admin/{MODEL}/1/r1", models_pb.ReplicaEndpoint(
            tenant="admin", model=MODEL, version=1, replica_id="r1", address=ports["address"], state=AVAILABLE,
            max_request_bytes=ports["max_request_bytes"]).SerializeToString())
        stack.etcd.put(f"/cloudml/models/routes/admin/{MODEL}", models_pb.ModelRoute(
            tenant="admin", model=MODEL, labels={"stable": 1},
            versions=[models_pb.VersionRoute(version=1, state=AVAILABLE)]).SerializeToString())
        # The batching replica as the models service publishes it: its own server's address and how
        # many calls it takes at once (the data plane coalesces up to that).
        stack.etcd.put(f"/cloudml/models/endpoints/admin/{BATCHED}/1/r1", models_pb.ReplicaEndpoint(
            tenant="admin", model=BATCHED, version=1, replica_id="r1",
            address=batch_ports.get("replica_address", batch_ports["address"]), state=AVAILABLE,
            max_request_bytes=batch_ports["max_request_bytes"],
            coalesce_max=batch_ports["coalesce_max"], frame_address=batch_ports["frame_address"]).SerializeToString())
        stack.etcd.put(f"/cloudml/models/routes/admin/{BATCHED}", models_pb.ModelRoute(
            tenant="admin", model=BATCHED,
            versions=[models_pb.VersionRoute(version=1, state=AVAILABLE)]).SerializeToString())
        env = {"stack": stack, "ports": {"native": stack.rest_port, "python": python_rest, "h2off": h2off_rest},
               "h2off": h2off, "token": token,
               "other": other, "auth": auth, "admin_md": admin_md, "key": key}
        for which in env["ports"]:
            wait_until(lambda w=which: call(env, w, b'{"instances": [1.0]}')[0] == 200, 30, "the gateway to route")
        yield env
        channel.close()
    finally:
        for process in (replica, batch_replica):
            if process is not None:
                process.terminate()
                process.wait(20)
        stack.stop()


def call(env, which, body: bytes | None, path=f"/v1/models/{MODEL}:predict", token="", headers=None,
         method="POST"):
    """(status, body bytes, headers) of one request on a new connection."""
    token = env["token"] if token == "" else token
    request = urllib.request.Request(f"http://127.0.0.1:{env['ports'][which]}{path}", data=body, method=method,
                                     headers={**({"Authorization": f"Bearer {token}"} if token else {}),
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers


def rest_calls(env) -> int:
    return env["stack"].dataplane_calls().get("rest", 0)


def wait_rest_calls(env, at_least: int) -> int:
    """The data plane reports about once a second."""
    def reported():
        n = rest_calls(env)
        return (n,) if n >= at_least else None
    return wait_until(reported, 10, f"the data plane to report {at_least} REST calls")[0]


def settled_rest_calls(env) -> int:
    """The data plane's REST call count once its reports (about one a second) stop changing."""
    last = rest_calls(env)
    for _ in range(10):
        time.sleep(1.2)
        now = rest_calls(env)
        if now == last:
            return now
        last = now
    raise AssertionError("the data plane's REST call count did not settle")


#: Bodies and paths answered alike by TF Serving's REST API on both gateways.
CASES = [
    (b'{"instances": [1.0, 2.0, 5.0]}', None),
    (b'{"instances": [[1.0], [2.5]]}', None),
    (b'{"inputs": [1.0, 2.0]}', None),
    (b'{"inputs": {"x": [[3.0], [-7.25]]}}', None),
    (b'{"instances": [{"x": 1.5}, {"x": 2}]}', None),
    (b'{"signature_name": "serving_default", "instances": [0.1, 1e-7, 123456789]}', None),
    (b'{"instances": [1, 2, 3]}', f"/v1/models/{MODEL}/versions/1:predict"),
    (b'{"instances": [0.5]}', f"/v1/models/{MODEL}/labels/stable:predict"),
    (b'{"instances": [0.5]}', f"/v1/models/{MODEL}/LABELS/stable:PREDICT/"),
    (b'{"instances": [0.5]}', f"/V1/MODELS/{MODEL}:predict"),
    (b' \n {"instances":[7]} ', None),
    # Errors: answered by the Python gateway on both (the codec declines them).
    (b'{"instances": ["a"]}', None),
    (b'{"instances": [[1.0], [2.0, 3.0]]}', None),
    (b'{"instances": []}', None),
    (b'{"inputs": [1.0], "instances": [1.0]}', None),
    (b'{"instances": [16777217]}', None),
    (b'{"instances": [1.0]', None),
    (b'{"instances": [1.0]} x', None),
    (b'[1, 2]', None),
    (b'{"signature_name": 7, "instances": [1.0]}', None),
    (b'{"signature_name": "nope", "instances": [1.0]}', None),
    (b'{"instances": [1.0]}', f"/v1/models/{MODEL}/versions/9:predict"),
    (b'{"instances": [1.0]}', f"/v1/models/{MODEL}/labels/nope:predict"),
    (b'{"instances": [1.0]}', "/v1/models/missing:predict"),
    (b'{"instances": [NaN, Infinity]}', None),
    # Classify and regress (half_plus_two's tf.Example signatures).
    (b'{"signature_name": "classify_x_to_y", "examples": [{"x": 1.0}, {"x": [2.5]}]}',
     f"/v1/models/{MODEL}:classify"),
    (b'{"signature_name": "regress_x_to_y", "examples": [{"x": 3.0}]}', f"/v1/models/{MODEL}:regress"),
    (b'{"signature_name": "regress_x_to_y", "context": {"x": 1.0}, "examples": [{}]}',
     f"/v1/models/{MODEL}/labels/stable:regress"),
    (b'{"signature_name": "regress_x_to_y", "examples": [{"x": "a"}]}', f"/v1/models/{MODEL}:regress"),
    (b'{"signature_name": "regress_x_to_y", "examples": [1]}', f"/v1/models/{MODEL}:regress"),
    (b'{"examples": [{"x": 1.0}]}', f"/v1/models/{MODEL}:classify"),
]


def test_answers_are_byte_for_byte_the_same_on_both_paths(env):
    before = wait_rest_calls(env, 0)
    fast = 0
    for body, path in CASES:
        path = path or f"/v1/models/{MODEL}:predict"
        python = call(env, "python", body, path)[:2]
        first = call(env, "native", body, path)[:2]   # may be relayed (no decision yet)
        second = call(env, "native", body, path)[:2]  # converted in C++ when the codec takes it
        assert first == python, (body, path, first, python)
        assert second == python, (body, path, second, python)
        fast += python[0] == 200
    # Every successful repeat call was answered by the data plane itself.
    assert wait_rest_calls(env, before + fast) >= before + fast


def test_ordinary_predict_is_answered_natively(env):
    call(env, "native", b'{"instances": [1.0]}')
    before = wait_rest_calls(env, 0)
    for _ in range(20):
        status, body, headers = call(env, "native", b'{"instances": [1.0, 3.0]}')
        assert status == 200 and body == b'{\n    "predictions": [2.5, 3.5\n    ]\n}'
        assert headers["Content-Type"] == "application/json"
    assert wait_rest_calls(env, before + 20) >= before + 20


def test_a_tokens_first_call_is_converted_natively_too(env):
    """No cached route for a new token: the data plane asks the Python gateway
    for the route alone (no body) and converts the call itself."""
    for path in (f"/v1/models/{MODEL}:predict", f"/v1/models/{MODEL}/labels/stable:predict"):
        token = env["stack"].issue_token(ADMIN)
        before = settled_rest_calls(env)
        status, body, _ = call(env, "native", b'{"instances": [1.0, 3.0]}', path=path, token=token)
        assert status == 200 and body == b'{\n    "predictions": [2.5, 3.5\n    ]\n}'
        wait_rest_calls(env, before + 1)
        assert settled_rest_calls(env) == before + 1, path
    token = env["stack"].issue_token(ADMIN)
    before = settled_rest_calls(env)
    body = b'{"signature_name": "regress_x_to_y", "examples": [{"x": 3.0}]}'
    assert call(env, "native", body, path=f"/v1/models/{MODEL}:regress", token=token)[:2] == \
        call(env, "python", body, path=f"/v1/models/{MODEL}:regress", token=token)[:2]
    wait_rest_calls(env, before + 1)
    assert settled_rest_calls(env) == before + 1


def test_the_route_question_is_the_data_planes_alone(env):
    """A caller's own route question gets an ordinary answer: the data plane
    drops the header, and the Python gateway heeds it only with the data
    plane's secret."""
    for which in ("native", "python", "h2off"):
        for headers in ({REST_RESOLVE_HEADER: "1"}, {REST_RESOLVE_HEADER: "1", SECRET_HEADER: "guess"}):
            token = env["stack"].issue_token(ADMIN)
            status, body, answer = call(env, which, b'{"instances": [1.0]}', token=token, headers=headers)
            assert (status, body) == (200, b'{\n    "predictions": [2.5\n    ]\n}'), (which, headers)
            assert REST_DECISION_HEADER not in answer


def _numpy_loaded(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as maps:
        return "_multiarray_umath" in maps.read()


def test_the_python_gateway_converts_only_what_the_codec_declines(env):
    """Its JSON codec (and numpy, ~11 MB) loads only for a call the data
    plane's codec leaves to it, not for a token's first call."""
    gateway, rest = env["stack"].start_gateway("gwlean")
    lean = {**env, "ports": {"lean": rest}}
    try:
        token = env["stack"].issue_token(ADMIN)
        wait_until(lambda: call(lean, "lean", b'{"instances": [1.0]}', token=token)[0] == 200, 30,
                   "the new gateway to route")
        for path in (f"/v1/models/{MODEL}/versions/1:predict", f"/v1/models/{MODEL}"):
            assert call(lean, "lean", b'{"instances": [1.0]}' if ":" in path else None, path=path,
                        method="POST" if ":" in path else "GET", token=env["stack"].issue_token(ADMIN))[0] == 200
        assert not _numpy_loaded(gateway.process.pid)
        status, body, _ = call(lean, "lean", b'{"instances": ["a"]}', token=token)  # declined: Python answers
        assert (status, body) == call(env, "python", b'{"instances": ["a"]}')[:2] and status == 400
        assert _numpy_loaded(gateway.process.pid)
    finally:
        gateway.stop()


def test_pipelined_requests_and_expect_continue_on_one_connection(env):
    body = b'{"instances": [2.0]}'
    head = (f"POST /v1/models/{MODEL}:predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {env['token']}\r\n"
            f"Content-Length: {len(body)}\r\n").encode()
    with socket.create_connection(("127.0.0.1", env["ports"]["native"]), timeout=10) as sock:
        # Three requests in one write: a predict, a status call (relayed), a predict.
        status = f"GET /v1/models/{MODEL} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {env['token']}\r\n\r\n"
        sock.sendall(head + b"\r\n" + body + status.encode() + head + b"\r\n" + body)
        answers = read_answers(sock, 3)
        assert [a[0] for a in answers] == [200, 200, 200]
        assert answers[0][1] == answers[2][1] == b'{\n    "predictions": [3.0\n    ]\n}'
        assert b"AVAILABLE" in answers[1][1]
        # Expect: 100-continue: the interim answer first, then the body is sent.
        sock.sendall(head + b"Expect: 100-continue\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        assert read_answers(sock, 1)[0][:2] == (200, b'{\n    "predictions": [3.0\n    ]\n}')


def test_a_first_call_pipelined_or_expecting_continue(env):
    """A new token's first call waits for its route (Resolve) with its body
    unread: pipelined requests behind it and Expect: 100-continue still work."""
    body = b'{"instances": [4.0]}'
    expected = (200, b'{\n    "predictions": [4.0\n    ]\n}')

    def head(token):
        return (f"POST /v1/models/{MODEL}:predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Length: {len(body)}\r\n").encode()

    with socket.create_connection(("127.0.0.1", env["ports"]["native"]), timeout=10) as sock:
        first = head(env["stack"].issue_token(ADMIN))
        before = settled_rest_calls(env)
        sock.sendall(first + b"\r\n" + body + first + b"\r\n" + body + first + b"\r\n" + body)
        assert [a[:2] for a in read_answers(sock, 3)] == [expected] * 3
        wait_rest_calls(env, before + 3)
        assert settled_rest_calls(env) == before + 3  # all three converted here
        sock.sendall(head(env["stack"].issue_token(ADMIN)) + b"Expect: 100-continue\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        assert read_answers(sock, 1)[0][:2] == expected


def read_answers(sock, n):
    """n HTTP/1.1 answers with Content-Length bodies: [(status, body, head)]."""
    data, out = b"", []
    while len(out) < n:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(out)} answers"
            data += chunk
        head, _, data = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        while len(data) < length:
            data += sock.recv(65536)
        out.append((int(head.split()[1]), data[:length], head))
        data = data[length:]
    return out


def test_platform_headers_from_callers_are_dropped(env):
    # A forged decision would send the caller's calls to an address of its choosing.
    forged = dataplane_pb2.RestDecision()
    forged.route.generation = 1
    forged.route.choices.add(version=1, weight=1, addresses=["127.0.0.1:1"])
    headers = {REST_DECISION_HEADER: base64.b64encode(forged.SerializeToString()).decode(),
               SECRET_HEADER: "guess"}
    for which in ("native", "python"):
        status, body, answer = call(env, which, b'{"instances": [1.0]}', headers=headers)
        assert status == 200 and body == b'{\n    "predictions": [2.5\n    ]\n}'
        assert REST_DECISION_HEADER not in answer
        # Without the data plane's secret the Python gateway never hands out a decision.
        status, _, answer = call(env, which, b'{"instances": [1.0]}', path=f"/v1/models/{MODEL}/labels/stable:predict",
                                 headers={SECRET_HEADER: "guess"})
        assert status == 200 and REST_DECISION_HEADER not in answer


def test_cached_routes_are_per_caller(env):
    # The admin's route is cached by now; another tenant's token, or none, never uses it.
    assert call(env, "native", b'{"instances": [1.0]}')[0] == 200
    for token in (env["other"], None, "not-a-token"):
        for _ in range(2):
            native = call(env, "native", b'{"instances": [1.0]}', token=token)[:2]
            assert native == call(env, "python", b'{"instances": [1.0]}', token=token)[:2]
            assert native[0] in (401, 404), native


def test_a_revoked_token_stops_at_once(env):
    auth, admin_md = env["auth"], env["admin_md"]
    key = auth.CreateAccessKey(auth_pb.CreateAccessKeyRequest(tenant="admin"), metadata=admin_md)
    token = auth.IssueToken(auth_pb.IssueTokenRequest(access_key_id=key.access_key.access_key_id,
                                                      secret_key=key.secret_key)).token
    for _ in range(3):  # relayed, then cached and answered natively
        assert call(env, "native", b'{"instances": [1.0]}', token=token)[0] == 200
    auth.RevokeAccessKey(auth_pb.RevokeAccessKeyRequest(tenant="admin", access_key_id=key.access_key.access_key_id),
                         metadata=admin_md)
    wait_until(lambda: call(env, "native", b'{"instances": [1.0]}', token=token)[0] == 401, 10,
               "the revoked token to be refused")
    for _ in range(3):
        assert call(env, "native", b'{"instances": [1.0]}', token=token)[0] == 401


def test_bodies_heads_and_sizes_a_hostile_caller_sends(env):
    big = b'{"instances": [' + b"1.0, " * 2_000_000 + b"1.0]}"
    compressed = gzip.compress(b'{"instances": [1.0]}')
    for which in ("native", "python"):
        # Larger than the model's limit: 413 from the Python gateway, unconverted.
        status, body, _ = call(env, which, big)
        assert status == 413 and b"larger than this model's limit" in body, (which, status, body[:200])
        status, body, _ = call(env, which, compressed, headers={"Content-Encoding": "gzip"})
        assert (status, body) == (200, b'{\n    "predictions": [2.5\n    ]\n}')
    port = env["ports"]["native"]
    # A body that never comes: 408 within the Python gateway's 5 s (native: read here).
    call(env, "native", b'{"instances": [1.0]}')
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall((f"POST /v1/models/{MODEL}:predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {env['token']}"
                      f"\r\nContent-Length: 100\r\n\r\n{{").encode())
        started = time.monotonic()
        status, body, _ = read_answers(sock, 1)[0]
        assert status == 408 and b"did not arrive within 5 seconds" in body
        assert time.monotonic() - started < 8
        assert sock.recv(100) == b""  # and the connection is closed
    # A head larger than 64 KiB: 400, closed.
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nX-Filler: " + b"a" * (70 << 10))
        status, body, _ = read_answers(sock, 1)[0]
        assert status == 400 and b"64 KiB" in body
        assert sock.recv(100) == b""


def test_everything_else_goes_through_the_relay(env):
    for path in ("/healthz", "/readyz", f"/v1/models/{MODEL}", f"/v1/models/{MODEL}/metadata", "/v1/models",
                 "/nope"):
        native = call(env, "native", None, path=path, method="GET")
        python = call(env, "python", None, path=path, method="GET")
        assert native[:2] == python[:2], (path, native[:2], python[:2])
    # The metrics page, much larger than one read: streamed through.
    status, body, _ = call(env, "native", None, path="/metrics", method="GET")
    assert status == 200 and b"cloudml_gateway_dataplane_calls_total" in body


def test_calls_to_a_batching_replica_are_coalesced(env):
    path = f"/v1/models/{BATCHED}:predict"
    assert call(env, "native", b'{"instances": [1.0]}', path)[:2] == call(env, "python", b'{"instances": [1.0]}', path)[:2]
    calls = env["stack"].dataplane_calls
    before = wait_until(lambda: (calls(),), 10, "a report")[0]

    def one(i: int):
        x = float(i % 7)
        return call(env, "native", json.dumps({"instances": [x]}).encode(), path)[:2], x

    with ThreadPoolExecutor(16) as pool:
        for (status, body), x in pool.map(one, range(160)):
            assert status == 200 and json.loads(body) == {"predictions": [x / 2 + 2]}
    # Converted here, then grouped by the HTTP/2 front into PredictBatch calls over the replica's framed socket.
    after = wait_until(lambda: (lambda now: now if now.get("rest", 0) >= before.get("rest", 0) + 150 and
                                now.get("coalesced", 0) > before.get("coalesced", 0) else None)(calls()),
                       10, "the data plane to report coalesced REST calls")
    assert after["coalesced"] > before.get("coalesced", 0)
    assert after["framed"] - before.get("framed", 0) >= 150


def test_http_1_0_callers_keep_alive_only_when_they_ask(env):
    body = b'{"instances": [2.0]}'
    head = (f"POST /v1/models/{MODEL}:predict HTTP/1.0\r\nAuthorization: Bearer {env['token']}\r\n"
            f"Content-Length: {len(body)}\r\n").encode()
    call(env, "native", body)  # the route is cached
    before = wait_rest_calls(env, 0)
    with socket.create_connection(("127.0.0.1", env["ports"]["native"]), timeout=10) as sock:
        for _ in range(2):  # ApacheBench's `ab -k`
            sock.sendall(head + b"Connection: keep-alive\r\n\r\n" + body)
            status, answer, raw = read_answers(sock, 1)[0]
            assert (status, answer) == (200, b'{\n    "predictions": [3.0\n    ]\n}')
            assert b"connection: keep-alive" in raw.lower()
        sock.sendall(head + b"\r\n" + body)  # no keep-alive: answered, then closed
        assert read_answers(sock, 1)[0][:2] == (200, b'{\n    "predictions": [3.0\n    ]\n}')
        assert sock.recv(100) == b""
    assert wait_rest_calls(env, before + 3) >= before + 3


def _dataplane(env):
    gateway = psutil.Process(env["stack"].gateway.process.pid)
    return next(c for c in gateway.children() if os.path.basename(c.exe()) == "cloudml-dataplane")


def test_garbage_and_abandoned_calls_leave_the_port_serving(env):
    dataplane = _dataplane(env)
    call(env, "native", b'{"instances": [1.0]}')
    fds, rss = dataplane.num_fds(), dataplane.memory_info().rss
    rng = random.Random(7)
    port = env["ports"]["native"]
    good = (f"POST /v1/models/{MODEL}:predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {env['token']}\r\n"
            f"Content-Length: 20\r\n\r\n" + '{"instances": [1.0]}').encode()
    sends = [
        lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000))),  # noise
        lambda: good[:rng.randrange(1, len(good))],                                 # cut anywhere
        lambda: good.replace(b"Content-Length: 20", b"Content-Length: 99999999"),  # a body that never comes
        lambda: good * rng.randrange(2, 20),                                        # pipelined, then dropped
        lambda: bytearray(good).replace(b"1.0", bytes([rng.randrange(256)]) * 3),  # a mangled body
        lambda: b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n" + b"x" * 100,
        lambda: b"POST /v1/models/x:predict HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        lambda: b"GET /v1/models HTTP/1.1\r\n" + b"X: " + b"y" * 9000 + b"\r\n\r\n",
    ]
    for i in range(240):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(bytes(sends[i % len(sends)]()))
            if i % 3 == 0:  # read a little of the answer, or none, then go away mid-call
                sock.settimeout(0.05)
                try:
                    sock.recv(10)
                except OSError:
                    pass
    # The same process, answering as before; its connections closed, its memory flat.
    assert _dataplane(env).pid == dataplane.pid
    assert call(env, "native", b'{"instances": [1.0]}')[:2] == (200, b'{\n    "predictions": [2.5\n    ]\n}')
    wait_until(lambda: dataplane.num_fds() <= fds + 2, 15, "the data plane to close the connections it was left with")
    assert dataplane.memory_info().rss < rss + 4 * 2**20


def test_rest_is_native_without_the_http2_front_too(env):
    path = f"/v1/models/{BATCHED}:predict"

    # Its own data plane's counter (the stack's helper reads the first gateway's).
    def native_rest() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{env['ports']['h2off']}/metrics", timeout=5).read().decode()
        found = re.search(r'cloudml_gateway_dataplane_calls_total\{path="rest"\} ([0-9.e+]+)', text)
        return float(found.group(1)) if found else 0.0

    def settled() -> float:
        """The figure once two reads 1.5 s apart agree (the data plane reports about once a second)."""
        def same_twice():
            first = native_rest()
            time.sleep(1.5)
            return (first,) if native_rest() == first else None
        return wait_until(same_twice, 15, "the data plane's figures to settle")[0]

    python = {p: call(env, "python", b'{"instances": [1.0, 2.0]}', p)[:2] for p in (f"/v1/models/{MODEL}:predict", path)}
    # The first call per path may take the Python path (whether the route is
    # still cached from the fixture's depends on what ran before): not counted.
    for p, answer in python.items():
        assert call(env, "h2off", b'{"instances": [1.0, 2.0]}', p)[:2] == answer
    before = settled()
    for p, answer in python.items():
        assert [call(env, "h2off", b'{"instances": [1.0, 2.0]}', p)[:2] for _ in range(2)] == [answer] * 2
    wait_until(lambda: native_rest() >= before + 4, 10, "the h2-off data plane to report 4 more native REST calls")
    assert settled() == before + 4  # the repeat calls, two per path, were answered natively
