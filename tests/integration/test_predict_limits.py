"""Predict size limits, end to end with real processes: etcd, auth, a gateway
with its native data plane and one serving from Python, and a real
model-server replica of TF Serving's half_plus_two, called with the stock
TF Serving client (in a helper process: this file run as `--probe`) and
plain HTTP.

The replica runs with `--max-request-bytes-cap` of 4 MiB, so its own limit
(published in its endpoint record) is 4 MiB; a larger request is refused
with RESOURCE_EXHAUSTED (gRPC) / 413 (REST) by the gateway before it is sent,
and by the replica itself when called directly; the replica keeps serving.
The memory a request at the limit costs the replica (its peak RSS growth) is
measured against config.REQUEST_MEMORY_FACTOR.
"""
from __future__ import annotations

import gzip
import zlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MiB = 1024 * 1024
LIMIT = 4 * MiB


def _build(cmd):  # pragma: no cover - runs in the helper process
    import half_plus_two

    return {"path": half_plus_two.build_half_plus_two(cmd["dir"], cmd["version"])}


def _big(cmd):  # pragma: no cover - runs in the helper process
    """Predict with x = n zeros of shape [n, 1] (tensor_content), or a bogus TensorProto."""
    import grpc
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = cmd["model"]
    if cmd.get("shape"):  # a few values with a huge shape
        request.inputs["x"].dtype = 1
        request.inputs["x"].float_val.append(1.0)
        for d in cmd["shape"]:
            request.inputs["x"].tensor_shape.dim.add(size=d)
    else:
        request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.zeros((cmd["n"], 1), np.float32)))
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(cmd["address"]))
    metadata = [tuple(kv) for kv in cmd.get("metadata", [])] or None
    try:
        response = stub.Predict(request, timeout=30, metadata=metadata)
    except grpc.RpcError as err:
        return {"code": err.code().name, "details": err.details(), "bytes": request.ByteSize()}
    return {"code": "OK", "n": int(tf.make_ndarray(response.outputs["y"]).size), "bytes": request.ByteSize()}


if __name__ == "__main__" and "--probe" in sys.argv:
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests", "conformance")]
    from tests.conformance.stock_client import serve

    serve({"build": _build, "big": _big})
    sys.exit(0)

import grpc  # noqa: E402
import pytest  # noqa: E402

from cloudml.auth.v1 import auth_service_pb2 as auth_pb  # noqa: E402
from cloudml.auth.v1 import auth_service_pb2_grpc as auth_grpc  # noqa: E402
from cloudml.models.v1 import models_service_pb2 as models_pb  # noqa: E402
from deploy.local.stack import AuthGatewayStack  # noqa: E402
from services.models.model_server import config  # noqa: E402
from tests.conformance.stock_client import Probe  # noqa: E402
from tests.e2e.serving_platform import clean_env, wait_until  # noqa: E402

ADMIN = ("AKLIMITSADMIN0000000", "admin-secret")
SERVICE = ("AKLIMITSSERVICE00000", "service-secret")
MODEL = "half_plus_two"
AVAILABLE = models_pb.MODEL_VERSION_STATE_AVAILABLE


@pytest.fixture(scope="module")
def env(tmp_path_factory, etcd_server):
    work = tmp_path_factory.mktemp("limits")
    probe = Probe(__file__, str(work / "probe.log"), clean_env(), ROOT)
    stack = None
    replica = None
    try:
        base = probe.send(cmd="build", dir=str(work / "model"), version=1)["path"]
        stack = AuthGatewayStack(work, etcd_server.endpoint, admin=ADMIN, service=SERVICE).start()
        python_gateway, python_rest = stack.start_gateway("gwpy", env=dict(os.environ, CLOUDML_DATAPLANE="python"))
        port_file = str(work / "replica.port")
        replica = subprocess.Popen(
            [sys.executable, "-m", "services.models.model_server", "--model-name", MODEL, "--version", "1",
             "--base-path", base,
             "--port-file", port_file, "--max-request-bytes-cap", str(LIMIT)],
            cwd=ROOT, env=clean_env(), stdout=open(work / "replica.log", "w"), stderr=subprocess.STDOUT)
        ports = wait_until(lambda: _ready(port_file), 120, "the replica to load")
        assert ports["max_request_bytes"] == LIMIT, ports
        # Published as the models service's reconciler publishes it.
        stack.etcd.put(f"/cloudml/models/endpoints/admin/{MODEL}/1/r1", models_pb.ReplicaEndpoint(
            tenant="admin", model=MODEL, version=1, replica_id="r1", address=ports["address"], state=AVAILABLE,
            max_request_bytes=ports["max_request_bytes"]).SerializeToString())
        stack.etcd.put(f"/cloudml/models/routes/admin/{MODEL}", models_pb.ModelRoute(
            tenant="admin", model=MODEL, versions=[models_pb.VersionRoute(version=1, state=AVAILABLE)],
        ).SerializeToString())
        channel = grpc.insecure_channel(stack.gateway.address)
        token = auth_grpc.AuthServiceStub(channel).IssueToken(
            auth_pb.IssueTokenRequest(access_key_id=ADMIN[0], secret_key=ADMIN[1])).token
        metadata = [["authorization", f"Bearer {token}"]]
        env = {"probe": probe, "replica": replica, "direct": ports["address"], "metadata": metadata,
               "token": token, "gateways": {"native": stack.gateway.address, "python": python_gateway.address},
               "rest": {"native": stack.rest_port, "python": python_rest}, "pid": replica.pid}
        # Both gateways route once the endpoint record (with its limit) is in.
        for address in env["gateways"].values():
            wait_until(lambda a=address: _predict(env, a, 2)["code"] == "OK", 30, "the gateway to route")
        yield env
        channel.close()
    finally:
        if replica is not None:
            replica.terminate()
            replica.wait(20)
        if stack is not None:
            stack.stop()
        probe.close()


def _ready(port_file: str):
    try:
        with open(port_file) as f:
            ports = json.load(f)
    except (OSError, ValueError):
        return None
    if "error" in ports:
        raise AssertionError(f"the replica failed: {ports}")
    return ports if "max_request_bytes" in ports else None  # written once the model is loaded


def _predict(env, address, n=None, shape=None, metadata=True):
    return env["probe"].send(cmd="big", address=address, model=MODEL, n=n, shape=shape,
                             metadata=env["metadata"] if metadata else [])


def _rest(env, which, body: bytes, headers=None):
    request = urllib.request.Request(f"http://127.0.0.1:{env['rest'][which]}/v1/models/{MODEL}:predict",
                                     data=body, method="POST",
                                     headers={"Authorization": f"Bearer {env['token']}", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _alive(env):
    assert env["replica"].poll() is None, "the replica died"
    result = _predict(env, env["direct"], 3, metadata=False)
    assert result == {"code": "OK", "n": 3, "bytes": result["bytes"]}


def _vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("gateway", ["native", "python"])
def test_grpc_predict_over_the_limit_is_resource_exhausted_at_the_gateway(env, gateway):
    n = LIMIT // 4 + 1000  # floats: just over 4 MiB serialized
    result = _predict(env, env["gateways"][gateway], n)
    assert result["code"] == "RESOURCE_EXHAUSTED", result
    assert f"limit of {LIMIT} bytes" in result["details"], result
    # Far over the limit (the 40 MB request of the report) alike.
    assert _predict(env, env["gateways"][gateway], 10_000_000)["code"] == "RESOURCE_EXHAUSTED"
    _alive(env)


@pytest.mark.parametrize("gateway", ["native", "python"])
def test_grpc_predict_under_the_limit_works_through_the_gateway(env, gateway):
    n = LIMIT // 4 - 1000
    result = _predict(env, env["gateways"][gateway], n)
    assert result["code"] == "OK" and result["n"] == n, result
    assert result["bytes"] <= LIMIT


def test_direct_caller_over_the_limit_is_refused_by_the_replica(env):
    result = _predict(env, env["direct"], LIMIT // 4 + 1000, metadata=False)
    assert result["code"] == "RESOURCE_EXHAUSTED", result
    result = _predict(env, env["direct"], 10_000_000, metadata=False)
    assert result["code"] == "RESOURCE_EXHAUSTED", result
    _alive(env)


@pytest.mark.parametrize("target", ["direct", "native", "python"])
def test_huge_shape_with_one_value_is_invalid_argument(env, target):
    address = env["direct"] if target == "direct" else env["gateways"][target]
    for shape in ([1 << 40, 1], [1 << 62, 1 << 62], [LIMIT, 1]):
        result = _predict(env, address, shape=shape, metadata=target != "direct")
        assert result["code"] == "INVALID_ARGUMENT", (shape, result)
        assert result["details"].startswith("tensor parsing error: x"), result
    _alive(env)


def test_request_at_the_limit_costs_at_most_the_memory_factor(env):
    """Peak RSS growth of a request just under the limit, against REQUEST_MEMORY_FACTOR."""
    pid = env["pid"]
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _vm_hwm(pid)
    result = _predict(env, env["direct"], LIMIT // 4 - 1000, metadata=False)
    assert result["code"] == "OK", result
    growth = _vm_hwm(pid) - before
    print(f"request of {result['bytes']} bytes: peak RSS +{growth / MiB:.1f} MiB "
          f"(x{growth / result['bytes']:.2f}; REQUEST_MEMORY_FACTOR {config.REQUEST_MEMORY_FACTOR})")
    assert growth <= config.REQUEST_MEMORY_FACTOR * result["bytes"]


@pytest.mark.parametrize("gateway", ["native", "python"])
def test_rest_predict_over_the_limit_is_413(env, gateway):
    row = "[0.0]," * (LIMIT // 6 + 1000)
    body = ('{"instances": [' + row + "[0.0]]}").encode()
    assert len(body) > LIMIT
    status, doc = _rest(env, gateway, body)
    assert status == 413 and f"limit of {LIMIT} bytes" in doc["error"], (status, doc)
    # gzip: small on the wire, over the limit once decoded.
    packed = gzip.compress(body)
    assert len(packed) < LIMIT
    status, doc = _rest(env, gateway, packed, {"Content-Encoding": "gzip"})
    assert status == 413 and "error" in doc, (status, doc)
    # A body whose converted request is over the limit: 1,000,000 "0," rows
    # are ~2 MB of JSON and 4 MB of floats.
    body = ('{"instances": [' + "0," * (LIMIT // 4) + "0]}").encode()
    assert len(body) < LIMIT
    status, doc = _rest(env, gateway, body)
    assert status == 413 and "error" in doc, (status, doc)
    status, doc = _rest(env, gateway, b'{"instances": [[1.0], [2.0]]}')
    assert (status, doc) == (200, {"predictions": [[2.5], [3.0]]})
    _alive(env)


@pytest.mark.parametrize("gateway", ["native", "python"])
def test_rest_content_encodings(env, gateway):
    body = b'{"instances": [[1.0], [2.0]]}'
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    for encoding, packed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body)),
                             ("deflate", raw.compress(body) + raw.flush()), ("identity", body)):
        status, doc = _rest(env, gateway, packed, {"Content-Encoding": encoding})
        assert (status, doc) == (200, {"predictions": [[2.5], [3.0]]}), (encoding, status, doc)
    # A compression bomb: 1 GiB of zeros in ~1 MB; refused once LIMIT bytes are inflated.
    bomb = zlib.compressobj()
    packed = b"".join(bomb.compress(b"0" * (1 << 24)) for _ in range(64)) + bomb.flush()
    assert len(packed) < LIMIT
    started = time.monotonic()
    status, doc = _rest(env, gateway, packed, {"Content-Encoding": "deflate"})
    assert status == 413 and "error" in doc, (status, doc)
    assert time.monotonic() - started < 5
    for encoding, packed, want in (("deflate", b"\x00", 400), ("gzip", b"not gzip", 400),
                                   ("gzip", gzip.compress(body)[:-6], 400), ("br", body, 415)):
        status, doc = _rest(env, gateway, packed, {"Content-Encoding": encoding})
        assert status == want and "error" in doc, (encoding, packed, status, doc)
    _alive(env)


def test_rest_body_shorter_than_its_content_length_is_bounded(env):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", env["rest"]["native"]), timeout=30) as sock:
        sock.sendall(b"POST /v1/models/" + MODEL.encode() + b":predict HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + env["token"].encode() + b"\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"instances\": [")
        answer = sock.recv(65536)
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b'"error"' in answer
    assert elapsed < 10, elapsed


# --- fuzzing every REST path and gRPC method of the gateway ------------------------------

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from services.gateway.predict import TFS_METHODS  # noqa: E402
from services.gateway.routes import platform_routes  # noqa: E402

GRPC_METHODS = sorted(TFS_METHODS | set(platform_routes()))
REST_PATHS = [f"/v1/models/{MODEL}", f"/v1/models/{MODEL}/metadata", f"/v1/models/{MODEL}/versions/1",
              f"/v1/models/{MODEL}:predict", f"/v1/models/{MODEL}:classify", f"/v1/models/{MODEL}:regress",
              f"/v1/models/{MODEL}/versions/99999999999999999999999:predict",
              f"/v1/models/{MODEL}/labels/x:regress", "/v1/models", "/healthz", "/readyz", "/metrics",
              "/monitoring/prometheus/metrics", "/v1/models/%ED%A0%80:predict"]
JSON_BODIES = [b'{"instances": ["\\ud800"]}', b'{"inputs": {"x": [[1e400]]}}', b'{"instances": [[' * 200,
               b'{"signature_name": 5}', b'{"examples": [{"x": {"b64": "!!"}}]}', b'\xff\xfe', b"",
               b'{"instances": [{"b64": "AAAA"}]}', b'{"inputs": [[1], [2, 3]]}', b'[1]']
json_values = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                                      max_size=4), max_leaves=20)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


def _http(env, which, method, path, body, headers):
    request = urllib.request.Request(f"http://127.0.0.1:{env['rest'][which]}{path}", data=body, method=method,
                                     headers={"Authorization": f"Bearer {env['token']}", **headers})
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.mark.parametrize("gateway", ["native", "python"])
def test_fuzz_rest_never_answers_5xx(env, gateway):
    @FUZZ
    @given(path=st.sampled_from(REST_PATHS), method=st.sampled_from(["GET", "POST"]),
           body=st.one_of(st.binary(max_size=300), st.sampled_from(JSON_BODIES),
                          json_values.map(lambda v: json.dumps({"instances": v, "inputs": v}).encode())),
           encoding=st.sampled_from([None, "gzip", "deflate", "br", "identity", "x-unknown"]),
           packed=st.booleans())
    def check(path, method, body, encoding, packed):
        headers = {"Content-Type": "application/json"}
        if encoding:
            headers["Content-Encoding"] = encoding
            if packed and encoding in ("gzip", "deflate"):  # else the bytes as they are: not decodable
                body = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
        started = time.monotonic()
        status, answer = _http(env, gateway, method, path, body if method == "POST" else None, headers)
        assert status < 500 or (status == 503 and path == "/readyz"), (path, method, body, status, answer)
        if path.startswith("/v1/") and status >= 400:
            assert "error" in json.loads(answer), answer
        assert time.monotonic() - started < 10

    check()
    assert _http(env, gateway, "GET", f"/v1/models/{MODEL}", None, {})[0] == 200  # still answering
    _alive(env)


@pytest.mark.parametrize("gateway", ["native", "python"])
def test_fuzz_grpc_never_answers_internal(env, gateway):
    channel = grpc.insecure_channel(env["gateways"][gateway])
    routes = platform_routes()
    metadata = (("authorization", f"Bearer {env['token']}"),)

    @FUZZ
    @given(method=st.sampled_from(GRPC_METHODS),
           body=st.one_of(st.binary(max_size=200), st.sampled_from([b"\x0a\x0e\x0a\x0chalf_plus_two\xff\xff",
                                                                     b"\x0a\x0f\x0a\x0dhalf_plus_two\x22\x05",
                                                                     b"\x0a\xff\xff\xff\xff\x0f"])),
           with_token=st.booleans())
    def check(method, body, with_token):
        route = routes.get(method)
        kind = ((route.client_streaming, route.server_streaming) if route else (False, False))
        call = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                (True, False): channel.stream_unary, (True, True): channel.stream_stream}[kind](method)
        request = iter([body]) if kind[0] else body
        started = time.monotonic()
        try:
            result = call(request, timeout=5, metadata=metadata if with_token else ())
            if kind[1]:  # a stream may be endless by design (Watch*): its first message, or its end, answers
                try:
                    next(result)
                except StopIteration:
                    pass
                result.cancel()
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code = err.code()
        # Undecodable bytes are INVALID_ARGUMENT, never UNKNOWN or INTERNAL: the gateway's own methods
        # and every platform method it relays (the owning services' pipelines parse tolerantly).
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (method, body, code)
        assert code != grpc.StatusCode.DEADLINE_EXCEEDED, (method, body)  # answered, not hung
        assert time.monotonic() - started < 6

    check()
    channel.close()
    assert _predict(env, env["gateways"][gateway], 2)["code"] == "OK"  # still answering
    _alive(env)


def test_fuzz_replica_grpc_never_answers_internal_or_unknown(env):
    channel = grpc.insecure_channel(env["direct"])

    @FUZZ
    @given(method=st.sampled_from(sorted(TFS_METHODS) + ["/cloudml.internal.v1.ReplicaService/PredictBatch"]),
           body=st.binary(max_size=200))
    def check(method, body):
        try:
            channel.unary_unary(method)(body, timeout=5)
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code = err.code()
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                            grpc.StatusCode.DEADLINE_EXCEEDED), (method, body, code)

    check()
    channel.close()
    _alive(env)
