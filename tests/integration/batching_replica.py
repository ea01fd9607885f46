"""A stand-in for a model-server replica with batching on, for the data
plane's coalescing tests: a real grpc.aio server (on a background event loop)
serving tensorflow.serving.PredictionService/Predict and
cloudml.internal.v1.ReplicaService/PredictBatch.

A request names itself with a string input "tag"; a tag that starts with
"slow" takes `slow_seconds`, any other no work. Every call and every
PredictBatch member is recorded as it arrives (`received`): its tag, how it
came (Predict or a group), the time left it carried (the member's own
timeout_micros, or the call's deadline) and its metadata. Each answer echoes
the tag as output "tag", and sets trailing metadata `x-echo` to the caller's
`x-tag` metadata, per member for a group, so a caller can tell that its
metadata and trailers were its own."""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import grpc

from cloudml.internal.v1 import replica_pb2
from cloudml.tfs.tensorflow_serving.apis import predict_pb2

PREDICT = "/tensorflow.serving.PredictionService/Predict"
PREDICT_BATCH = "/cloudml.internal.v1.ReplicaService/PredictBatch"


HOSTILE_TRAILERS = [("Bad Key", b"x"), ("x-newline", b"a\r\nx-injected: 1"), ("x-nul", b"a\x00b"),
                    ("grpc-status", b"0"), ("x-cloudml-route-bin", b"forged"), ("", b"empty key")]


@dataclass
class Received:
    tag: str
    how: str  # "predict" or "group"
    at: float  # time.monotonic()
    time_left: float | None  # seconds; None without a deadline
    metadata: dict
    group_size: int = 1


def request(tag: str, model: str = "m", version: int | None = None) -> predict_pb2.PredictRequest:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = model
    if version is not None:
        req.model_spec.version.value = version
    req.inputs["tag"].dtype = 7  # DT_STRING
    req.inputs["tag"].tensor_shape.dim.add(size=1)
    req.inputs["tag"].string_val.append(tag.encode())
    return req


def tag_of(response: predict_pb2.PredictResponse) -> str:
    return response.outputs["tag"].string_val[0].decode()


class BatchingReplica:
    def __init__(self, slow_seconds: float = 1.0, version: int = 1, host: str = "127.0.0.1"):
        self.slow_seconds = slow_seconds
        self.version = version
        self.received: list[Received] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(host), self.loop).result(10)
        self.address = f"127.0.0.1:{self.port}"

    def tags(self) -> list[str]:
        return [r.tag for r in list(self.received)]

    def get(self, tag: str) -> Received | None:
        return next((r for r in list(self.received) if r.tag == tag), None)

    def wait_received(self, tag: str, timeout: float = 5.0) -> Received:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.get(tag)
            if got is not None:
                return got
            time.sleep(0.002)
        raise AssertionError(f"{tag!r} never reached the replica (got {self.tags()})")

    async def _answer(self, raw: bytes) -> tuple[bytes, str]:
        req = predict_pb2.PredictRequest.FromString(raw)
        tag = req.inputs["tag"].string_val[0].decode()
        if tag.startswith("slow"):
            await asyncio.sleep(self.slow_seconds)
        resp = predict_pb2.PredictResponse()
        resp.model_spec.name = req.model_spec.name
        resp.model_spec.version.value = self.version
        resp.model_spec.signature_name = "serving_default"
        resp.outputs["tag"].dtype = 7
        resp.outputs["tag"].tensor_shape.dim.add(size=1)
        resp.outputs["tag"].string_val.append(tag.encode())
        return resp.SerializeToString(), tag

    @staticmethod
    def _tag(raw: bytes) -> str:
        return predict_pb2.PredictRequest.FromString(raw).inputs["tag"].string_val[0].decode()

    async def _predict(self, raw: bytes, context) -> bytes:
        metadata = {k: v for k, v in context.invocation_metadata()}
        self.received.append(Received(self._tag(raw), "predict", time.monotonic(), context.time_remaining(),
                                      metadata))
        answer, _ = await self._answer(raw)
        if "x-tag" in metadata:
            context.set_trailing_metadata((("x-echo", metadata["x-tag"]),))
        return answer

    async def _predict_batch(self, raw: bytes, context) -> bytes:
        batch = replica_pb2.PredictBatchRequest.FromString(raw)
        members = list(batch.members) or [replica_pb2.PredictMember(request=r) for r in batch.requests]
        now = time.monotonic()
        for m in members:
            self.received.append(Received(
                self._tag(m.request), "group", now, m.timeout_micros / 1e6 if m.timeout_micros else None,
                {e.key: e.value.decode() for e in m.metadata}, len(members)))

        async def one(m: replica_pb2.PredictMember) -> replica_pb2.PredictResult:
            answer, _ = await self._answer(m.request)
            echo = [replica_pb2.MetadataEntry(key="x-echo", value=e.value) for e in m.metadata if e.key == "x-tag"]
            # What a replica running tenant code could put there: keys and values that are not
            # valid gRPC metadata, and the hop's own headers. The data plane must drop them.
            hostile = [replica_pb2.MetadataEntry(key=k, value=v) for k, v in HOSTILE_TRAILERS]
            return replica_pb2.PredictResult(response=answer, trailers=echo + hostile)

        results = await asyncio.gather(*(one(m) for m in members))
        return replica_pb2.PredictBatchResponse(results=results).SerializeToString()

    async def _start(self, host: str) -> int:
        replica = self

        class Handler(grpc.GenericRpcHandler):
            def service(self, details):
                if details.method == PREDICT:
                    return grpc.unary_unary_rpc_method_handler(replica._predict)
                if details.method == PREDICT_BATCH:
                    return grpc.unary_unary_rpc_method_handler(replica._predict_batch)
                return None

        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((Handler(),))
        port = self.server.add_insecure_port(f"{host}:0")
        await self.server.start()
        return port

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
