"""A stand-in for a replica's framed socket (services/common/native/dataplane/frame.h),
for the data plane's tests: a Unix-socket server on a background thread that
decodes CALL and CANCEL frames with its own reader (written from the spec,
not from the platform's code) and answers as the tag of the Predict request
says (tags as tests/integration/batching_replica.py's):

- "slow...": after `slow_seconds`;
- "error:<code>:<message>": that status;
- "hostile:<what>": bytes a replica running tenant code could send instead
  of a REPLY (HOSTILE below), after which it keeps the connection open;
- "stray": first a REPLY to an id that is not in flight, then the answer;
- anything else: at once, the tag echoed as output "tag" and the model
  version `version`.

A PredictBatch CALL (method 5, the data plane's coalesced group) is
recorded member by member (`Call.group`: the group's size; `timeout_us`
and `metadata` the member's own) and answered when its slowest member is,
each member's result per its tag ("hostile:" tags: a PredictBatchResponse
with the wrong number of results), with trailer `x-echo` set to the
member's `x-tag` metadata plus trailers no replica may send (HOSTILE_TRAILERS).

Every frame is recorded (`calls`, `cancels`), and so is each connection
the data plane closed (`closed`)."""
from __future__ import annotations

import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

from cloudml.internal.v1 import replica_pb2
from cloudml.tfs.tensorflow_serving.apis import predict_pb2
from tests.integration.batching_replica import HOSTILE_TRAILERS, Received

CALL, CANCEL, REPLY = 1, 2, 3

# Replies that are not valid: each must make the data plane close the connection.
HOSTILE = {
    "huge": struct.pack("<I", 0xFFFFFFF0) + b"\x03",  # claims ~4 GiB
    "kind": struct.pack("<IBQII", 17, 9, 0, 0, 0),     # unknown kind
    "code": None,                                      # code 99 (built per call: needs its id)
    "message": None,                                   # message length past the frame
    "short": struct.pack("<IBQ", 9, REPLY, 0),         # a REPLY without its code
    "garbage": b"GET / HTTP/1.1\r\n\r\n",
}


@dataclass
class Call:
    id: int
    method: int
    resolved_version: int
    timeout_us: int
    tag: str
    at: float
    group: int = 0  # the size of the PredictBatch group it came in (0: alone)
    metadata: dict | None = None


def reply(frame_id: int, code: int = 0, message: bytes = b"", body: bytes = b"") -> bytes:
    payload = struct.pack("<BQII", REPLY, frame_id, code, len(message)) + message + body
    return struct.pack("<I", len(payload)) + payload


class FrameReplica:
    def __init__(self, path: str, slow_seconds: float = 1.0, version: int = 1):
        self.path = path
        self.address = f"unix:{path}"
        self.slow_seconds = slow_seconds
        self.version = version
        self.calls: list[Call] = []
        self.cancels: list[int] = []
        self.closed = 0  # connections the peer closed
        self.connections = 0
        if os.path.exists(path):
            os.unlink(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(16)
        self._stop = False
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def tags(self) -> list[str]:
        return [c.tag for c in list(self.calls)]

    # --- as BatchingReplica records calls (tests written for either) ---

    def get(self, tag: str) -> Received | None:
        call = next((c for c in list(self.calls) if c.tag == tag), None)
        if call is None:
            return None
        return Received(call.tag, "group" if call.group else "predict", call.at,
                        call.timeout_us / 1e6 if call.timeout_us else None, call.metadata or {}, call.group or 1)

    def wait_received(self, tag: str, timeout: float = 5.0) -> Received:
        return self.wait(lambda: self.get(tag), f"{tag!r} arrives", timeout)

    def wait(self, predicate, what: str, timeout: float = 5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = predicate()
            if got:
                return got
            time.sleep(0.002)
        raise AssertionError(f"never: {what} (calls {self.tags()}, cancels {self.cancels}, closed {self.closed})")

    def call(self, tag: str) -> Call:
        return self.wait(lambda: next((c for c in list(self.calls) if c.tag == tag), None), f"{tag!r} arrives")

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            self._open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        lock = threading.Lock()

        def send(data: bytes) -> None:
            with lock:
                try:
                    conn.sendall(data)
                except OSError:
                    pass

        buf = b""
        while True:
            try:
                data = conn.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                self.closed += 1
                conn.close()
                return
            buf += data
            while len(buf) >= 4:
                (length,) = struct.unpack_from("<I", buf)
                if len(buf) < 4 + length:
                    break
                frame, buf = buf[4:4 + length], buf[4 + length:]
                kind, frame_id = struct.unpack_from("<BQ", frame)
                if kind == CANCEL:
                    self.cancels.append(frame_id)
                    continue
                assert kind == CALL, kind
                method, version, timeout_us = struct.unpack_from("<BqQ", frame, 9)
                if method == 5:
                    self._group(send, frame_id, version, replica_pb2.PredictBatchRequest.FromString(frame[9 + 17:]))
                    continue
                request = predict_pb2.PredictRequest.FromString(frame[9 + 17:])
                tag = request.inputs["tag"].string_val[0].decode()
                self.calls.append(Call(frame_id, method, version, timeout_us, tag, time.monotonic()))
                threading.Thread(target=self._answer, args=(send, frame_id, request, tag), daemon=True).start()

    def _group(self, send, frame_id: int, version: int, batch: replica_pb2.PredictBatchRequest) -> None:
        members = []
        for m in batch.members:
            request = predict_pb2.PredictRequest.FromString(m.request)
            tag = request.inputs["tag"].string_val[0].decode()
            metadata = {e.key: e.value.decode() for e in m.metadata}
            self.calls.append(Call(frame_id, 5, batch.resolved_version, m.timeout_micros, tag, time.monotonic(),
                                   len(batch.members), metadata))
            members.append((request, tag, metadata))

        def answer() -> None:
            if any(tag.startswith("slow") for _, tag, _ in members):
                time.sleep(self.slow_seconds)
            results = []
            for request, tag, metadata in members:
                trailers = [replica_pb2.MetadataEntry(key="x-echo", value=metadata["x-tag"].encode())] \
                    if "x-tag" in metadata else []
                trailers += [replica_pb2.MetadataEntry(key=k, value=v) for k, v in HOSTILE_TRAILERS]
                if tag.startswith("error:"):
                    _, code, message = tag.split(":", 2)
                    results.append(replica_pb2.PredictResult(code=int(code), message=message, trailers=trailers))
                else:
                    results.append(replica_pb2.PredictResult(response=self._response(request, tag),
                                                             trailers=trailers))
            if any(tag.startswith("hostile:") for _, tag, _ in members):
                results.append(replica_pb2.PredictResult())
            send(reply(frame_id, 0, b"", replica_pb2.PredictBatchResponse(results=results).SerializeToString()))

        threading.Thread(target=answer, daemon=True).start()

    def _response(self, request: predict_pb2.PredictRequest, tag: str) -> bytes:
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = self.version
        response.outputs["tag"].dtype = 7
        response.outputs["tag"].tensor_shape.dim.add(size=1)
        response.outputs["tag"].string_val.append(tag.encode())
        return response.SerializeToString()

    def _answer(self, send, frame_id: int, request: predict_pb2.PredictRequest, tag: str) -> None:
        if tag.startswith("slow"):
            time.sleep(self.slow_seconds)
        if tag.startswith("error:"):
            _, code, message = tag.split(":", 2)
            return send(reply(frame_id, int(code), message.encode()))
        if tag.startswith("hostile:"):
            what = tag.split(":", 1)[1]
            if what == "code":
                return send(reply(frame_id, 99, b"x"))
            if what == "message":
                return send(struct.pack("<IBQII", 17 + 4, REPLY, frame_id, 2, 1000) + b"abcd")
            return send(HOSTILE[what])
        if tag == "stray":
            send(reply(frame_id + 1000, 0, b"", b"not for anyone"))
        send(reply(frame_id, 0, b"", self._response(request, tag)))

    def close(self) -> None:
        self._stop = True
        self.listener.close()
        for conn in self._open:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if os.path.exists(self.path):
            os.unlink(self.path)
