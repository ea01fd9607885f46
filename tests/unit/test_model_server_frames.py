"""frames.FrameServer's own layer: the wire format, deadlines, CANCEL, the
frame limit, status-message bounds and drain, over a stand-in servicer whose
calls wait as long as a test needs. (This process may not import TensorFlow
or TF Serving's protos, see tests/conformance/stock_client.py; the real
replica behind the framed protocol, with its real Servicer, is covered by
tests/integration/test_replica_frames.py.) The client encodes and decodes
frames itself, from frame.h."""
from __future__ import annotations

import asyncio
import os
import re
import struct
import tempfile
from dataclasses import dataclass

import grpc
import pytest

from services.models.model_server.frames import BATCH_SLACK, MAX_MESSAGE, METHODS, FrameServer
from services.models.model_server.status import CANCEL_DEADLINE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FRAME_H = os.path.join(ROOT, "services", "common", "native", "dataplane", "frame.h")
OK, INVALID_ARGUMENT, DEADLINE_EXCEEDED, UNAVAILABLE = 0, 3, 4, 14


@dataclass(frozen=True)
class Rpc:
    method: str


class StandIn:
    """What FrameServer uses of a Servicer (max_request_bytes,
    prediction_rpcs, invoke). A request's bytes say what its call does:
    b"slow" waits until `release` is set (recording how it was cancelled),
    b"loud" fails with a status message longer than a REPLY may carry,
    anything else is echoed with its method and routed version."""

    def __init__(self):
        self.max_request_bytes = 1 << 20
        self.framed_rpcs = {name: Rpc(name) for name in METHODS}
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.cancelled: list[tuple] = []  # each cancellation's arguments
        self.finished = 0

    async def invoke(self, rpc, raw, routed):
        if raw == b"slow":
            self.started.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError as err:
                self.cancelled.append(err.args)
                raise
            self.finished += 1
        if raw == b"loud":
            return grpc.StatusCode.INVALID_ARGUMENT, "é" * MAX_MESSAGE, b""  # two bytes each in UTF-8
        return grpc.StatusCode.OK, "", f"{rpc.method} {routed} ".encode() + bytes(raw)


def call_frame(call_id: int, body: bytes, method: int = 0, routed: int = 0, timeout_us: int = 0) -> bytes:
    payload = struct.pack("<BQBqQ", 1, call_id, method, routed, timeout_us) + body
    return struct.pack("<I", len(payload)) + payload


def cancel_frame(call_id: int) -> bytes:
    return struct.pack("<IBQ", 9, 2, call_id)


async def read_reply(reader, timeout: float = 5.0):
    """(id, code, message, body), or None if the connection closed."""
    try:
        (length,) = struct.unpack("<I", await asyncio.wait_for(reader.readexactly(4), timeout))
        frame = await asyncio.wait_for(reader.readexactly(length), timeout)
    except asyncio.IncompleteReadError:
        return None
    kind, call_id, code, message_length = struct.unpack_from("<BQII", frame)
    assert kind == 3 and code <= 16 and message_length <= MAX_MESSAGE
    message = frame[17:17 + message_length].decode()
    return call_id, code, message, frame[17 + message_length:]


class Harness:
    def __init__(self, directory: str):
        self.servicer = StandIn()
        self.frames = FrameServer(self.servicer, os.path.join(directory, "r.frame.sock"))

    async def connect(self):
        return await asyncio.open_unix_connection(self.frames.path)


def run(test):
    async def go():
        with tempfile.TemporaryDirectory(prefix="cml-fu-", dir="/tmp") as directory:
            h = Harness(directory)
            await h.frames.start()
            try:
                await test(h)
            finally:
                await h.frames.stop(0)
    asyncio.run(go())


def constant(name: str) -> int:
    """A `constexpr size_t` of frame.h, evaluated (they are sums and shifts of literals)."""
    match = re.search(rf"constexpr size_t {name} = ([^;]+);", open(FRAME_H).read())
    return eval(match.group(1), {})  # noqa: S307 - a literal expression of our own header


def test_constants_match_frame_h():
    from services.models.model_server import frames

    text = open(FRAME_H).read()
    assert frames.PREFIX.size == constant("kPrefix") and frames.CALL_HEADER.size == constant("kCallHeader")
    assert frames.REPLY_HEAD.size - frames.PREFIX.size == constant("kReplyHeader")
    assert frames.MAX_MESSAGE == constant("kMaxMessage")
    assert frames.BATCH_SLACK == constant("kBatchSlack")
    kinds = re.search(r"enum Kind : uint8_t \{ kCall = (\d+), kCancel = (\d+), kReply = (\d+) \}", text)
    assert (frames.KIND_CALL, frames.KIND_CANCEL, frames.KIND_REPLY) == tuple(map(int, kinds.groups()))
    methods = re.search(r"enum Method : uint8_t \{([^}]+)\}", text).group(1)
    assert [(f"k{name}", i) for i, name in enumerate(METHODS)] == [
        (k.strip(), int(v)) for k, v in (m.split("=") for m in methods.split(","))]


def test_socket_is_owner_only():
    async def test(h):
        assert os.stat(h.frames.path).st_mode & 0o777 == 0o600
    run(test)


def test_methods_and_routed_versions_reach_the_servicer_whole_even_byte_by_byte():
    async def test(h):
        reader, writer = await h.connect()
        wire = b"".join(call_frame(100 + i, b"req%d" % i, method=i, routed=[0, 7, -3, 2**62, 1, 5][i])
                        for i in range(len(METHODS)))
        for i in range(len(wire)):  # one byte per read: frames straddle reads
            writer.write(wire[i:i + 1])
            await writer.drain()
            await asyncio.sleep(0)
        replies = sorted([await read_reply(reader) for _ in METHODS])
        assert replies == [(100, OK, "", b"Predict None req0"), (101, OK, "", b"Classify 7 req1"),
                           (102, OK, "", b"Regress -3 req2"), (103, OK, "", f"MultiInference {2**62} req3".encode()),
                           (104, OK, "", b"GetModelMetadata 1 req4"), (105, OK, "", b"PredictBatch 5 req5")]
        writer.close()
    run(test)


def test_deadline_answers_deadline_exceeded_and_cancels_the_call():
    async def test(h):
        reader, writer = await h.connect()
        loop = asyncio.get_running_loop()
        start = loop.time()
        writer.write(call_frame(11, b"slow", timeout_us=50_000))
        assert await read_reply(reader) == (11, DEADLINE_EXCEEDED, "Deadline Exceeded", b"")
        assert 0.045 <= loop.time() - start < 1.0
        await asyncio.sleep(0.01)
        # Cancelled so that Servicer.invoke counts it as DEADLINE_EXCEEDED.
        assert h.servicer.cancelled == [(CANCEL_DEADLINE,)] and h.servicer.finished == 0
        # The connection serves on; a call within its deadline is answered once.
        writer.write(call_frame(12, b"fast", timeout_us=5_000_000))
        assert await read_reply(reader) == (12, OK, "", b"Predict None fast")
        with pytest.raises(asyncio.TimeoutError):
            await read_reply(reader, timeout=0.2)
        writer.close()
    run(test)


def test_cancel_stops_the_call_and_nothing_answers_it():
    async def test(h):
        reader, writer = await h.connect()
        writer.write(call_frame(21, b"slow"))
        await asyncio.wait_for(h.servicer.started.wait(), 5)
        (task,) = [t for conn in h.frames.connections for t in conn.running()]
        writer.write(cancel_frame(21) + cancel_frame(999))  # an unknown id: already answered, ignored
        await asyncio.sleep(0.05)
        assert task.cancelled() and h.servicer.cancelled == [()]
        h.servicer.release.set()
        with pytest.raises(asyncio.TimeoutError):
            await read_reply(reader, timeout=0.3)
        # A call cancelled in the same read as its CALL never runs; the id may be reused at once.
        writer.write(call_frame(22, b"slow") + cancel_frame(22) + call_frame(21, b"fast"))
        assert await read_reply(reader) == (21, OK, "", b"Predict None fast")
        with pytest.raises(asyncio.TimeoutError):
            await read_reply(reader, timeout=0.3)
        assert h.servicer.finished == 0
        writer.close()
    run(test)


def test_frame_limit_follows_max_request_bytes_as_it_changes():
    async def test(h):
        h.servicer.max_request_bytes = 100
        reader, writer = await h.connect()
        writer.write(call_frame(1, b"a" * (100 + BATCH_SLACK)))  # the servicer answers an oversize request
        assert (await read_reply(reader))[:2] == (1, OK)
        writer.write(call_frame(2, b"a" * (101 + BATCH_SLACK)))
        assert await read_reply(reader) is None  # closed, unanswered
        h.servicer.max_request_bytes = 200  # as once the model is loaded
        reader, writer = await h.connect()
        writer.write(call_frame(3, b"a" * (101 + BATCH_SLACK)))
        assert (await read_reply(reader))[:2] == (3, OK)
        writer.close()
    run(test)


def test_a_status_message_is_cut_to_the_replys_bound():
    async def test(h):
        reader, writer = await h.connect()
        writer.write(call_frame(31, b"loud"))
        call_id, code, message, body = await read_reply(reader)
        assert (call_id, code, body) == (31, INVALID_ARGUMENT, b"")
        assert message == "é" * (MAX_MESSAGE // 2)
        writer.close()
    run(test)


def test_drain_finishes_calls_in_flight_and_refuses_new_ones():
    async def test(h):
        reader, writer = await h.connect()
        writer.write(call_frame(41, b"slow"))
        await asyncio.wait_for(h.servicer.started.wait(), 5)
        stopping = asyncio.create_task(h.frames.stop(5.0))
        await asyncio.sleep(0.05)
        assert not os.path.exists(h.frames.path)  # no new connections
        writer.write(call_frame(42, b"fast"))
        assert await read_reply(reader) == (42, UNAVAILABLE, "The model server is shutting down", b"")
        h.servicer.release.set()
        assert await read_reply(reader) == (41, OK, "", b"Predict None slow")
        await asyncio.wait_for(stopping, 5)
        assert await read_reply(reader) is None  # then the connection closes
    run(test)


def test_drain_cancels_what_outlives_the_grace():
    async def test(h):
        reader, writer = await h.connect()
        writer.write(call_frame(51, b"slow"))
        await asyncio.wait_for(h.servicer.started.wait(), 5)
        await h.frames.stop(0.1)
        assert await read_reply(reader) is None
        await asyncio.sleep(0.01)
        assert h.servicer.cancelled == [()] and h.servicer.finished == 0
    run(test)


def test_a_call_reusing_an_id_in_flight_closes_the_connection_and_cancels_its_calls():
    async def test(h):
        reader, writer = await h.connect()
        writer.write(call_frame(61, b"slow"))
        await asyncio.wait_for(h.servicer.started.wait(), 5)
        writer.write(call_frame(61, b"fast"))
        assert await read_reply(reader) is None
        await asyncio.sleep(0.01)
        assert h.servicer.cancelled == [()] and not h.frames.connections
    run(test)
