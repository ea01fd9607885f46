"""The framed protocol (services/common/native/dataplane/frame.h) against real
model-server replicas: half_plus_two (y = 0.5x + 2) served by
`python -m services.models.model_server` processes on Unix sockets, as the
models service starts them, each with its native front if built.

    main  frames on, requests up to 4 MiB (so oversize frames are cheap);
    slow  batching with a 400 ms batch timeout: a lone Predict waits that
          long in the batcher (a slow call for deadlines, CANCEL, answers
          out of order and the SIGTERM drain, which ends the module);
    off   --frames off.

The client here encodes and decodes frames itself from frame.h (never with
frames.py's code), so the wire format is checked independently; each call
it makes is compared with the same call over the replica's gRPC server.
This process never imports TensorFlow: requests are built with the
project's copies of TF Serving's protos (cloudml.tfs).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import stat
import struct
import tempfile
import time
from dataclasses import dataclass

import grpc
import pytest

from cloudml.internal.v1 import replica_pb2
from cloudml.tfs.tensorflow.core.example import example_pb2
from cloudml.tfs.tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    inference_pb2,
    predict_pb2,
    regression_pb2,
)
from tests.conformance.model_server_replicas import Server

MODEL, VERSION = "hpt", 1
CAP = 4 << 20
BATCH_TIMEOUT = 0.4
SERVICE = "tensorflow.serving.PredictionService"

# --- frame.h, spelled out again here -----------------------------------------------------------

CALL, CANCEL, REPLY = 1, 2, 3
METHOD = {"Predict": 0, "Classify": 1, "Regress": 2, "MultiInference": 3, "GetModelMetadata": 4, "PredictBatch": 5}
CALL_HEADER = 1 + 8 + 8
BATCH_SLACK = 128 << 10
MAX_MESSAGE = 64 << 10
MAX_REPLY = (64 << 20) + 4096
OK, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND, RESOURCE_EXHAUSTED, UNAVAILABLE = 0, 3, 4, 5, 8, 14


def encode_call(call_id: int, method: int, request: bytes, resolved_version: int = 0, timeout_us: int = 0) -> bytes:
    payload = bytes([CALL]) + call_id.to_bytes(8, "little") + bytes([method]) \
        + resolved_version.to_bytes(8, "little", signed=True) + timeout_us.to_bytes(8, "little") + request
    return len(payload).to_bytes(4, "little") + payload


def encode_cancel(call_id: int) -> bytes:
    return (9).to_bytes(4, "little") + bytes([CANCEL]) + call_id.to_bytes(8, "little")


@dataclass(frozen=True)
class Reply:
    id: int
    code: int
    message: str
    body: bytes


class FrameClient:
    """The data plane's side of one connection, blocking."""

    def __init__(self, address: str):
        assert address.startswith("unix:")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(address[len("unix:"):])
        self.next_id = 1

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def call(self, method: str, request: bytes, **header) -> int:
        call_id, self.next_id = self.next_id, self.next_id + 1
        self.send(encode_call(call_id, METHOD[method], request, **header))
        return call_id

    def _read(self, n: int) -> bytes | None:
        out = bytearray()
        while len(out) < n:
            try:
                chunk = self.sock.recv(min(n - len(out), 1 << 20))
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            out += chunk
        return bytes(out)

    def reply(self, timeout: float = 10.0) -> Reply | None:
        """The next REPLY (checked as the data plane checks it); None if the
        connection closed; socket.timeout if none came in time."""
        self.sock.settimeout(timeout)
        head = self._read(4)
        if head is None:
            return None
        length = int.from_bytes(head, "little")
        assert 1 + 8 + 8 <= length <= MAX_REPLY, length
        frame = self._read(length)
        assert frame is not None, "the connection closed mid-frame"
        kind, call_id, code, message_length = struct.unpack_from("<BQII", frame)
        assert kind == REPLY and code <= 16 and message_length <= min(MAX_MESSAGE, length - 17)
        body = frame[17 + message_length:]
        assert code == OK or body == b""
        return Reply(call_id, code, frame[17:17 + message_length].decode("utf-8"), body)

    def roundtrip(self, method: str, request: bytes, **header) -> Reply:
        call_id = self.call(method, request, **header)
        reply = self.reply()
        assert reply is not None and reply.id == call_id, reply
        return reply

    def closed(self, timeout: float = 5.0) -> bool:
        """Whether the replica closed this connection (within `timeout`), answering nothing."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()


def grpc_call(address: str, method: str, request: bytes, resolved_version: int | None = None,
              timeout: float = 10.0) -> Reply:
    """The same call over the replica's gRPC server, as a Reply (id 0)."""
    metadata = (("x-cloudml-resolved-version", str(resolved_version)),) if resolved_version is not None else None
    with grpc.insecure_channel(address) as channel:
        service = "cloudml.internal.v1.ReplicaService" if method == "PredictBatch" else SERVICE
        call = channel.unary_unary(f"/{service}/{method}", request_serializer=None, response_deserializer=None)
        try:
            return Reply(0, OK, "", call(request, timeout=timeout, metadata=metadata))
        except grpc.RpcError as err:
            return Reply(0, err.code().value[0], err.details() or "", b"")


# --- requests ------------------------------------------------------------------------------


def predict(*xs: float, name: str = MODEL, **spec) -> bytes:
    r = predict_pb2.PredictRequest()
    r.model_spec.name = name
    for key, value in spec.items():
        if key == "version_label":
            r.model_spec.version_label = value
        else:
            setattr(r.model_spec, key, value)
    x = r.inputs["x"]
    x.dtype = 1  # DT_FLOAT
    x.tensor_shape.dim.add(size=len(xs))
    x.tensor_shape.dim.add(size=1)
    x.float_val.extend(xs)
    return r.SerializeToString()


def y_of(body: bytes) -> list[float]:
    return list(predict_pb2.PredictResponse.FromString(body).outputs["y"].float_val)


def _examples(target, *xs: float) -> None:
    for x in xs:
        example = example_pb2.Example()
        example.features.feature["x"].float_list.value.append(x)
        target.example_list.examples.append(example)


def classify(signature: str, *xs: float) -> bytes:
    r = classification_pb2.ClassificationRequest()
    r.model_spec.name, r.model_spec.signature_name = MODEL, signature
    _examples(r.input, *xs)
    return r.SerializeToString()


def regress(signature: str, *xs: float) -> bytes:
    r = regression_pb2.RegressionRequest()
    r.model_spec.name, r.model_spec.signature_name = MODEL, signature
    _examples(r.input, *xs)
    return r.SerializeToString()


def multi_inference(*tasks: tuple[str, str]) -> bytes:
    r = inference_pb2.MultiInferenceRequest()
    for signature, method in tasks:
        task = r.tasks.add()
        task.model_spec.name, task.model_spec.signature_name = MODEL, signature
        task.method_name = method
    _examples(r.input, 1.0, 3.0)
    return r.SerializeToString()


def metadata(name: str = MODEL, fields=("signature_def",)) -> bytes:
    r = get_model_metadata_pb2.GetModelMetadataRequest()
    r.model_spec.name = name
    r.metadata_field.extend(fields)
    return r.SerializeToString()


RESPONSES = {"Predict": predict_pb2.PredictResponse, "Classify": classification_pb2.ClassificationResponse,
             "Regress": regression_pb2.RegressionResponse, "MultiInference": inference_pb2.MultiInferenceResponse,
             "GetModelMetadata": get_model_metadata_pb2.GetModelMetadataResponse}

# --- the replicas --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def socket_dir():
    """A short directory for the sockets (pytest's are too long for a socket path)."""
    path = tempfile.mkdtemp(prefix="cml-fr-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def replicas(half_plus_two, socket_dir, tmp_path_factory):
    """Every replica of the module, started at once (their TensorFlow imports overlap)."""
    workdir = str(tmp_path_factory.mktemp("replica_frames"))
    common = ["--model-name", MODEL, "--version", str(VERSION), "--base-path", half_plus_two,
              "--memory-limit-bytes", "0"]
    batching = {"enabled": True, "max_batch_size": 64, "batch_timeout_micros": int(BATCH_TIMEOUT * 1e6),
                "num_batch_threads": 1}
    servers = {
        "main": Server("main", [*common, "--listen", f"unix:{socket_dir}/main.sock",
                                "--max-request-bytes-cap", str(CAP)], workdir),
        "slow": Server("slow", [*common, "--listen", f"unix:{socket_dir}/slow.sock",
                                "--batching-config", json.dumps(batching)], workdir),
        "off": Server("off", [*common, "--listen", f"unix:{socket_dir}/off.sock", "--frames", "off"], workdir),
    }
    for server in servers.values():
        server.start()
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def main(replicas):
    return replicas["main"].wait_serving()


@pytest.fixture(scope="module")
def slow(replicas):
    return replicas["slow"].wait_serving()


@pytest.fixture
def client(main):
    c = FrameClient(main.info["frame_address"])
    yield c
    c.close()


def handled(server: Server, method: str, code: str) -> float:
    """grpc_server_handled_total of PredictionService/`method` ending `code`."""
    labels = {f'grpc_service="{SERVICE}"', f'grpc_method="{method}"', f'grpc_code="{code}"'}
    found = [value for key, value in server.metrics().items()
             if key.startswith("grpc_server_handled_total{") and labels <= set(key[26:-1].split(","))]
    assert len(found) <= 1, found
    return found[0] if found else 0.0


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- the port file and the socket ---------------------------------------------------------


def test_port_file_names_the_frame_socket_beside_the_grpc_one(main, replicas, socket_dir):
    info = main.read_port_file()
    assert info["frame_address"] == f"unix:{socket_dir}/main.frame.sock"
    path = info["frame_address"][len("unix:"):]
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    grpc_mode = stat.S_IMODE(os.stat(main.server_address[len("unix:"):]).st_mode)
    assert stat.S_IMODE(mode) & ~grpc_mode == 0  # no looser than the gRPC socket
    assert info["max_request_bytes"] == CAP


def test_frames_off_has_no_socket_and_no_frame_address(replicas, socket_dir):
    off = replicas["off"].wait_serving()
    assert "frame_address" not in off.read_port_file()
    assert not os.path.exists(f"{socket_dir}/off.frame.sock")
    assert grpc_call(off.server_address, "Predict", predict(2.0)).code == OK


# --- calls answered as over gRPC -----------------------------------------------------------


def test_predict_answers_the_same_bytes_as_grpc(main, client):
    request = predict(1.0, 2.0, -4.0)
    framed = client.roundtrip("Predict", request)
    over_grpc = grpc_call(main.server_address, "Predict", request)
    assert framed.code == OK and framed.message == ""
    assert framed.body == over_grpc.body
    assert y_of(framed.body) == [2.5, 3.0, 0.0]


CASES = {
    "classify": ("Classify", classify("classify_x_to_y", 1.0, 3.0), OK),
    "regress": ("Regress", regress("regress_x_to_y", 1.0, 3.0), OK),
    "multi_inference": ("MultiInference", multi_inference(("classify_x_to_y", "tensorflow/serving/classify"),
                                                          ("regress_x_to_y", "tensorflow/serving/regress")), OK),
    "metadata": ("GetModelMetadata", metadata(), OK),
    "classify_with_a_predict_signature": ("Classify", classify("serving_default", 1.0), None),
    "regress_unknown_signature": ("Regress", regress("nope", 1.0), None),
    "multi_inference_no_tasks": ("MultiInference", multi_inference(), None),
    "metadata_no_field": ("GetModelMetadata", metadata(fields=()), None),
    "metadata_other_model": ("GetModelMetadata", metadata(name="other"), NOT_FOUND),
    "predict_unknown_label": ("Predict", predict(1.0, version_label="canary"), INVALID_ARGUMENT),
    "predict_unknown_signature": ("Predict", predict(1.0, signature_name="nope"), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_calls_answer_or_fail_exactly_as_over_grpc(main, client, case):
    method, request, expected = CASES[case]
    framed = client.roundtrip(method, request)
    over_grpc = grpc_call(main.server_address, method, request)
    assert (framed.code, framed.message) == (over_grpc.code, over_grpc.message)
    if expected is None:
        assert framed.code != OK and framed.message, framed
    else:
        assert framed.code == expected, framed
    assert RESPONSES[method].FromString(framed.body) == RESPONSES[method].FromString(over_grpc.body)
    if expected == OK:
        assert framed.body


@pytest.mark.parametrize("method", list(METHOD))
def test_a_body_that_is_not_the_request_is_invalid_argument_as_over_grpc(main, client, method):
    garbage = b"\xff\xff\xff\xff"
    framed = client.roundtrip(method, garbage)
    over_grpc = grpc_call(main.server_address, method, garbage)
    assert framed == Reply(framed.id, INVALID_ARGUMENT, over_grpc.message, b"")
    assert over_grpc.code == INVALID_ARGUMENT and over_grpc.message.startswith("Could not parse the ")


def test_resolved_version_is_the_gateways_routed_version(main, client):
    stale = predict(1.0)
    framed = client.roundtrip("Predict", stale, resolved_version=VERSION + 1)
    over_grpc = grpc_call(main.server_address, "Predict", stale, resolved_version=VERSION + 1)
    assert framed == Reply(framed.id, NOT_FOUND, f"Servable not found for request: Specific({MODEL}, {VERSION + 1})",
                           b"")
    assert (over_grpc.code, over_grpc.message) == (framed.code, framed.message)
    # Routed to the served version: the spec's label is not checked again, its name is echoed.
    routed = predict(6.0, name="renamed", version_label="stable")
    framed = client.roundtrip("Predict", routed, resolved_version=VERSION)
    over_grpc = grpc_call(main.server_address, "Predict", routed, resolved_version=VERSION)
    assert framed.code == OK and framed.body == over_grpc.body
    response = predict_pb2.PredictResponse.FromString(framed.body)
    assert (response.model_spec.name, response.model_spec.version.value) == ("renamed", VERSION)
    assert list(response.outputs["y"].float_val) == [5.0]
    # Without one (0), the replica resolves the spec itself, as over gRPC without the metadata.
    framed = client.roundtrip("Predict", routed)
    over_grpc = grpc_call(main.server_address, "Predict", routed)
    assert framed.code != OK and (framed.code, framed.message) == (over_grpc.code, over_grpc.message)


def test_many_interleaved_calls_on_one_connection_are_matched_by_id(main, client):
    before = handled(main, "Predict", "OK")
    rng = random.Random(14)
    calls = {}
    wire = bytearray()
    for i in range(200):
        call_id = rng.getrandbits(64)
        if i % 5 == 4:
            calls[call_id] = ("GetModelMetadata", None)
            wire += encode_call(call_id, METHOD["GetModelMetadata"], metadata())
        else:
            calls[call_id] = ("Predict", float(i))
            wire += encode_call(call_id, METHOD["Predict"], predict(float(i)))
    client.send(bytes(wire))
    replies = [client.reply() for _ in calls]
    assert sorted(r.id for r in replies) == sorted(calls)
    for reply in replies:
        method, x = calls[reply.id]
        assert reply.code == OK, reply
        if method == "Predict":
            assert y_of(reply.body) == [0.5 * x + 2]
        else:
            assert get_model_metadata_pb2.GetModelMetadataResponse.FromString(reply.body).model_spec.name == MODEL
    assert handled(main, "Predict", "OK") - before == 160  # counted as gRPC calls are


def test_request_sizes_are_answered_as_over_grpc_and_past_the_slack_close(main, client):
    limit = main.read_port_file()["max_request_bytes"]
    assert client.roundtrip("Predict", b"\xff" * limit) == Reply(client.next_id - 1, INVALID_ARGUMENT,
                                                                 "Could not parse the PredictRequest", b"")
    # Over the limit but within the slack a PredictBatch group's framing gets: refused as the gRPC server does.
    over = grpc_call(main.server_address, "Predict", b"\xff" * (limit + 1))
    assert over.code == RESOURCE_EXHAUSTED
    assert client.roundtrip("Predict", b"\xff" * (limit + 1)) == Reply(client.next_id - 1, RESOURCE_EXHAUSTED,
                                                                       over.message, b"")
    try:
        client.call("Predict", b"\xff" * (limit + BATCH_SLACK + 1))
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed on the length prefix, before the rest was sent
    else:
        assert client.closed()


# --- slow calls: out of order, deadlines, CANCEL -----------------------------------------------


def test_answers_out_of_order_are_matched_by_id(slow):
    c = FrameClient(slow.info["frame_address"])
    c.send(encode_call(2**64 - 1, METHOD["Predict"], predict(1.0))
           + encode_call(7, METHOD["GetModelMetadata"], metadata())
           + encode_call(0, METHOD["Predict"], predict(3.0)))
    first = c.reply()
    assert first.id == 7 and first.code == OK  # the metadata does not wait out the batch timeout
    rest = {r.id: r for r in (c.reply(), c.reply())}
    assert y_of(rest[2**64 - 1].body) == [2.5] and y_of(rest[0].body) == [3.5]
    c.close()


def test_deadline_exceeded_when_the_call_outlives_timeout_us(slow):
    before = handled(slow, "Predict", "DEADLINE_EXCEEDED")
    c = FrameClient(slow.info["frame_address"])
    start = time.monotonic()
    reply = c.roundtrip("Predict", predict(1.0), timeout_us=50_000)
    elapsed = time.monotonic() - start
    assert (reply.code, reply.message, reply.body) == (DEADLINE_EXCEEDED, "Deadline Exceeded", b"")
    assert 0.045 <= elapsed < BATCH_TIMEOUT, elapsed
    # Within its deadline the same call is answered.
    reply = c.roundtrip("Predict", predict(1.0), timeout_us=5_000_000)
    assert reply.code == OK and y_of(reply.body) == [2.5]
    assert handled(slow, "Predict", "DEADLINE_EXCEEDED") - before == 1
    c.close()


def test_cancel_stops_the_call_and_it_is_not_answered(slow):
    before = handled(slow, "Predict", "CANCELLED")
    c = FrameClient(slow.info["frame_address"])
    cancelled = c.call("Predict", predict(1.0))
    time.sleep(0.05)
    c.send(encode_cancel(cancelled))
    asked = c.call("GetModelMetadata", metadata())
    assert c.reply().id == asked
    with pytest.raises(socket.timeout):
        c.reply(timeout=BATCH_TIMEOUT + 0.4)
    assert handled(slow, "Predict", "CANCELLED") - before == 1
    c.close()


# --- hostile peers -------------------------------------------------------------------------


def _hostile(limit: int) -> dict[str, bytes]:
    call_id = (5).to_bytes(8, "little")
    return {
        "oversize_length": (limit + 1).to_bytes(4, "little") + bytes([CALL]) + call_id,
        "unknown_kind": (9).to_bytes(4, "little") + bytes([9]) + call_id,
        "reply_from_the_peer": (17).to_bytes(4, "little") + bytes([REPLY]) + call_id + bytes(8),
        "unknown_method": encode_call(5, 6, predict(1.0)),
        "truncated_call_header": (9 + CALL_HEADER - 1).to_bytes(4, "little") + bytes([CALL]) + call_id
        + bytes(CALL_HEADER - 1),
        "cancel_with_a_payload": (10).to_bytes(4, "little") + bytes([CANCEL]) + call_id + b"\x00",
        "zero_length": bytes(4) + bytes(32),
        "garbage_http": b"GET /v1/models/hpt HTTP/1.1\r\nHost: replica\r\n\r\n",
    }


@pytest.mark.parametrize("case", list(_hostile(0)))
def test_a_hostile_frame_closes_only_its_connection(main, client, case):
    frame = _hostile(main.read_port_file()["max_request_bytes"] + BATCH_SLACK + 1 + 8 + CALL_HEADER)[case]
    assert client.roundtrip("Predict", predict(1.0)).code == OK  # a bystander, open before
    hostile = FrameClient(main.info["frame_address"])
    hostile.send(frame)
    assert hostile.closed(), case
    hostile.close()
    assert main.proc.poll() is None
    assert y_of(client.roundtrip("Predict", predict(2.0)).body) == [3.0]
    assert y_of(grpc_call(main.server_address, "Predict", predict(4.0)).body) == [4.0]
    fresh = FrameClient(main.info["frame_address"])
    assert fresh.roundtrip("Predict", predict(0.0)).code == OK
    fresh.close()


def test_an_oversize_frame_is_not_buffered(main, client):
    """A length prefix claiming 4 GiB closes the connection before its bytes
    are read: streaming 64 MiB behind it fails, and the replica's resident
    memory does not grow by anything like it."""
    pid = main.info["pid"]
    before = resident_bytes(pid)
    hostile = FrameClient(main.info["frame_address"])
    sent = 0
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        hostile.send((2**32 - 1).to_bytes(4, "little") + bytes([CALL]) + bytes(8))
        chunk = bytes(1 << 20)
        for _ in range(64):
            hostile.send(chunk)
            sent += len(chunk)
    hostile.close()
    assert sent < 16 << 20  # what the kernel's socket buffers took before the close
    assert resident_bytes(pid) - before < 16 << 20
    assert client.roundtrip("Predict", predict(1.0)).code == OK


# --- drain (last: it stops the slow replica) ----------------------------------------------


def test_sigterm_drains_the_call_in_flight_refuses_new_ones_and_removes_the_socket(slow):
    path = slow.info["frame_address"][len("unix:"):]
    c = FrameClient(slow.info["frame_address"])
    in_flight = c.call("Predict", predict(8.0))  # waits out the batch timeout
    time.sleep(0.05)
    slow.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while os.path.exists(path):  # the frame server stops with the gRPC server (no --drain-delay)
        assert time.monotonic() < deadline, "the frame socket is still there"
        time.sleep(0.01)
    late = c.call("Predict", predict(1.0))
    replies = {r.id: r for r in (c.reply(), c.reply())}
    assert (replies[late].code, replies[late].message) == (UNAVAILABLE, "The model server is shutting down")
    assert replies[in_flight].code == OK and y_of(replies[in_flight].body) == [6.0]
    assert c.closed(timeout=10)
    assert slow.proc.wait(20) == 0
    c.close()


def test_a_predict_batch_group_answers_each_member_as_over_grpc(main, client):
    """The data plane's coalesced groups (frame.h kPredictBatch): a result per
    member, each checked on its own, the same as ReplicaService.PredictBatch."""
    group = replica_pb2.PredictBatchRequest(resolved_version=VERSION, members=[
        replica_pb2.PredictMember(request=predict(1.0), timeout_micros=5_000_000),
        replica_pb2.PredictMember(request=b"\xff\xff\xff"),
        replica_pb2.PredictMember(request=predict(2.0, 3.0),
                                  metadata=[replica_pb2.MetadataEntry(key="x-tag", value=b"t")]),
    ]).SerializeToString()
    framed = client.roundtrip("PredictBatch", group)
    over_grpc = grpc_call(main.server_address, "PredictBatch", group)
    assert framed.code == over_grpc.code == OK
    results = replica_pb2.PredictBatchResponse.FromString(framed.body).results
    assert results == replica_pb2.PredictBatchResponse.FromString(over_grpc.body).results
    assert [r.code for r in results] == [OK, INVALID_ARGUMENT, OK]
    assert y_of(results[0].response) == [2.5] and y_of(results[2].response) == [3.0, 3.5]
