"""The replica side of the framed protocol (services/common/native/dataplane/frame.h,
normative): the data plane sends routed model calls over a Unix socket beside
the replica's gRPC one, without a gRPC hop.

Why: grpc.aio's Python server costs ~0.6 ms of CPU per call, most of a small
model's call; a length-prefixed Unix socket costs ~0.13 ms
(bench/bench_replica_floor.py). So each connection is an `asyncio.Protocol`
that parses frames straight out of the bytes `data_received` hands it
(`struct.unpack_from` on a buffer, no stream-reader awaits per frame), and
each CALL runs as a task through `Servicer.invoke`, the code path of the
gRPC handlers: same parsing and size checks, same `ServedModel` calls, same
errors and messages, same metrics.

Frames (little-endian): u32 length (of what follows), u8 kind, u64 id, then
the payload. CALL (1): u8 method (`METHODS`' index), i64 resolved_version
(0: none), u64 timeout_us (0: no deadline), the request. CANCEL (2): no
payload. REPLY (3, sent): u32 code, u32 message_length, message, the
response (code 0 only).

The peer is untrusted: a length over the limit (read again for each frame,
since `Servicer.max_request_bytes` tightens once the model is loaded), an
unknown kind or method, a payload of the wrong size for its kind, or a CALL
reusing the id of a call still in flight closes that connection and cancels
its calls; nothing is buffered beyond one frame of at most the limit. A
connection whose peer stops reading replies stops being read itself, so
replies cannot pile up without bound either.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import struct
from typing import TYPE_CHECKING

import grpc

from services.models.model_server.status import CANCEL_DEADLINE

if TYPE_CHECKING:  # servicer.py imports TensorFlow; this module stays importable without it
    from services.models.model_server.servicer import Servicer

log = logging.getLogger(__name__)

KIND_CALL, KIND_CANCEL, KIND_REPLY = 1, 2, 3
#: frame.h `Method`, in its order: a CALL's method byte indexes this.
METHODS = ("Predict", "Classify", "Regress", "MultiInference", "GetModelMetadata", "PredictBatch")
#: length, kind, id
PREFIX = struct.Struct("<IBQ")
#: method, resolved_version, timeout_us
CALL_HEADER = struct.Struct("<BqQ")
#: a whole REPLY's fixed part: length, kind, id, code, message_length
REPLY_HEAD = struct.Struct("<IBQII")
#: the kind and id, counted by the length
KIND_ID = PREFIX.size - 4
#: frame.h kMaxMessage: the data plane closes the connection on a longer status message
MAX_MESSAGE = 64 << 10
#: frame.h kBatchSlack
BATCH_SLACK = 128 << 10
#: replies at least this large are written in two parts rather than copied behind their header
_JOIN_MAX = 64 << 10

DEADLINE_MESSAGE = "Deadline Exceeded"
SHUTTING_DOWN = "The model server is shutting down"


def frame_limit(max_request_bytes: int) -> int:
    """The largest length a CALL may declare (frame.h): `max_request_bytes`
    plus BATCH_SLACK (a PredictBatch group's framing and its members'
    metadata: the data plane counts them against max_request_bytes but
    always lets one member in), behind the kind, the id and the call
    header. A single call over max_request_bytes still reaches
    `Servicer.parse`, which answers RESOURCE_EXHAUSTED as over gRPC."""
    return max_request_bytes + BATCH_SLACK + KIND_ID + CALL_HEADER.size


def status_bytes(message: str) -> bytes:
    """`message` as UTF-8, cut at a character boundary to at most MAX_MESSAGE bytes."""
    raw = message.encode("utf-8", "replace")
    if len(raw) > MAX_MESSAGE:
        raw = raw[:MAX_MESSAGE].decode("utf-8", "ignore").encode("utf-8")
    return raw


class _Call:
    """One CALL in flight on a connection."""

    __slots__ = ("id", "task", "timer")

    def __init__(self, call_id: int):
        self.id = call_id
        self.task: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None


class FrameConnection(asyncio.Protocol):
    """One data-plane connection: frames in, calls run as tasks, replies out.

    A call's entry leaves `calls` as soon as its outcome is decided (its
    reply written, its deadline's reply written, or a CANCEL), so a late
    finish never answers twice and the data plane may reuse the id."""

    def __init__(self, server: FrameServer):
        self.server = server
        self.servicer: Servicer = server.servicer
        self.rpcs = tuple(server.servicer.framed_rpcs[name] for name in METHODS)
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.calls: dict[int, _Call] = {}
        self.closed = False

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server.connections.add(self)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self._cancel_all()
        self.buffer = bytearray()

    def pause_writing(self) -> None:
        # The peer is not reading its replies: take no more calls until it does.
        if not self.closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.closed:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        buffer = self.buffer
        if buffer:
            buffer += data
            view = buffer
        else:
            view = data  # the common case: whole frames in one read, parsed in place
        size = len(view)
        offset = 0
        limit = frame_limit(self.servicer.max_request_bytes)
        while size - offset >= 4:
            (length,) = struct.unpack_from("<I", view, offset)
            if length > limit:
                return self._violation(f"a frame of {length} bytes (the limit is {limit})")
            if length < KIND_ID:
                return self._violation(f"a frame of {length} bytes, shorter than its kind and id")
            end = offset + 4 + length
            if end > size:
                break
            _, kind, call_id = PREFIX.unpack_from(view, offset)
            if kind == KIND_CALL:
                if length < KIND_ID + CALL_HEADER.size:
                    return self._violation(f"a CALL of {length} bytes, shorter than its header")
                method, routed, timeout_us = CALL_HEADER.unpack_from(view, offset + PREFIX.size)
                if method >= len(METHODS):
                    return self._violation(f"unknown method {method}")
                if call_id in self.calls:
                    return self._violation(f"a CALL with the id of call {call_id}, still in flight")
                start = offset + PREFIX.size + CALL_HEADER.size
                # One copy either way (the buffer is reused; a bytes chunk's slice is a copy already).
                raw = view[start:end] if view is data else bytes(memoryview(view)[start:end])
                self._start(call_id, self.rpcs[method], raw, routed or None, timeout_us)
            elif kind == KIND_CANCEL:
                if length != KIND_ID:
                    return self._violation(f"a CANCEL of {length} bytes (it has no payload)")
                self._cancel(call_id)
            else:
                return self._violation(f"unknown frame kind {kind}")
            if self.closed:  # a write failed along the way
                return
            offset = end
        if buffer:
            del buffer[:offset]
        elif offset < size:
            self.buffer = bytearray(memoryview(view)[offset:])

    # --- calls -------------------------------------------------------------------------------

    def _start(self, call_id: int, rpc, raw: bytes, routed: int | None, timeout_us: int) -> None:
        if self.server.closing:
            self._reply(call_id, grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN, b"")
            return
        call = _Call(call_id)
        self.calls[call_id] = call
        # The task's first step runs before any timer of this loop iteration,
        # so a call that completes without waiting is answered even with a
        # deadline shorter than the loop's turn.
        call.task = self.loop.create_task(self._run(call, rpc, raw, routed))
        if timeout_us:
            call.timer = self.loop.call_later(timeout_us / 1e6, self._expire, call)

    async def _run(self, call: _Call, rpc, raw: bytes, routed: int | None) -> None:
        try:
            code, message, body = await self.servicer.invoke(rpc, raw, routed)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - invoke maps the call's errors; this is a bug of ours
            log.exception("framed %s call failed", rpc.method)
            code, message, body = grpc.StatusCode.INTERNAL, f"Internal error in {rpc.method}", b""
        if self.calls.get(call.id) is call:
            del self.calls[call.id]
            if call.timer is not None:
                call.timer.cancel()
            self._reply(call.id, code, message, body)

    def _expire(self, call: _Call) -> None:
        """The call's deadline passed: answer DEADLINE_EXCEEDED and stop it."""
        if self.calls.get(call.id) is call:
            del self.calls[call.id]
            self._reply(call.id, grpc.StatusCode.DEADLINE_EXCEEDED, DEADLINE_MESSAGE, b"")
            call.task.cancel(CANCEL_DEADLINE)

    def _cancel(self, call_id: int) -> None:
        """CANCEL: the caller went away; stop the call, answer nothing (an
        unknown id is a call already answered)."""
        call = self.calls.pop(call_id, None)
        if call is not None:
            if call.timer is not None:
                call.timer.cancel()
            call.task.cancel()

    def _cancel_all(self) -> None:
        calls, self.calls = self.calls, {}
        for call in calls.values():
            if call.timer is not None:
                call.timer.cancel()
            call.task.cancel()

    def running(self) -> list[asyncio.Task]:
        return [call.task for call in self.calls.values()]

    def _reply(self, call_id: int, code: grpc.StatusCode, message: str, body: bytes) -> None:
        if self.closed:
            return
        text = status_bytes(message) if message else b""
        head = REPLY_HEAD.pack(REPLY_HEAD.size - 4 + len(text) + len(body), KIND_REPLY, call_id,
                               code.value[0], len(text))
        if len(body) < _JOIN_MAX:
            self.transport.write(head + text + body)
        else:
            self.transport.write(head + text)
            self.transport.write(body)

    def _violation(self, what: str) -> None:
        """The peer broke the protocol: close its connection, cancel its calls."""
        log.warning("closing a framed connection: %s", what)
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._cancel_all()
        self.buffer = bytearray()
        # abort(): a peer that broke the protocol (or does not read) gets no flush.
        self.transport.abort()


class FrameServer:
    """The framed protocol's listener on a Unix socket (mode 0600, beside the
    gRPC socket, so the same directory rules decide who reaches it)."""

    def __init__(self, servicer: Servicer, path: str):
        self.servicer = servicer
        self.path = path
        self.connections: set[FrameConnection] = set()
        #: set by `stop`: calls get UNAVAILABLE from then on
        self.closing = False
        self._server: asyncio.AbstractServer | None = None

    @property
    def address(self) -> str:
        return f"unix:{self.path}"

    async def start(self) -> None:
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)  # a stale socket of an earlier run
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            # Before listen(): nobody can connect while the file is looser.
            os.chmod(self.path, 0o600)
            self._server = await asyncio.get_running_loop().create_unix_server(
                lambda: FrameConnection(self), sock=sock)
        except BaseException:
            sock.close()
            raise

    async def stop(self, grace: float) -> None:
        """Drain: accept no more connections, answer new calls UNAVAILABLE,
        give the calls in flight `grace` seconds, then close every
        connection (cancelling what still runs; the data plane answers those
        calls UNAVAILABLE)."""
        self.closing = True
        if self._server is not None:
            self._server.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        running = [task for conn in self.connections for task in conn.running()]
        if running and grace > 0:
            await asyncio.wait(running, timeout=grace)
        for conn in list(self.connections):
            conn.close()
