"""A stand-in for the gateway's control plane, for tests of the native data
plane in gateway mode: it serves Dataplane.Attach (streaming generations) and
answers forwarded Predict calls itself ("control"), returning a RouteDecision
to the current generation's one replica address, so the next call with the
same key takes the data plane's fast path. `extra` serves more methods (the
data plane relays every other call here)."""
from __future__ import annotations

import asyncio
import threading

import grpc

from cloudml.internal.v1 import dataplane_pb2
from cloudml.tfs.tensorflow_serving.apis import predict_pb2


class ControlPlane:
    """Streams generations on Attach; answers forwarded Predict calls itself
    with the current generation's RouteDecision (one address)."""

    def __init__(self, extra: dict | None = None):
        self.extra = extra or {}  # method -> grpc handler, served besides
        self.generation = 1
        self.address = ""
        self.frame = ""  # the replica's framed socket, published beside its address when set
        self.batching = (0, 0)  # the replica's coalesce_max and batch_timeout_micros
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.streams: list[asyncio.Queue] = []
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    def change(self, address: str, frame: str = "", coalesce_max: int = 0, batch_timeout_micros: int = 0) -> int:
        """A replica endpoint change: a new generation routing to `address`
        (and its framed socket `frame`, if given; a batching replica's
        coalesce_max and batch timeout)."""

        def apply():
            self.generation += 1
            self.address = address
            self.frame = frame
            self.batching = (coalesce_max, batch_timeout_micros)
            for q in self.streams:
                q.put_nowait(self.generation)
        self.loop.call_soon_threadsafe(apply)
        return self.generation + 1

    async def _attach(self, requests, context):
        q: asyncio.Queue = asyncio.Queue()
        self.streams.append(q)
        q.put_nowait(self.generation)

        async def drain():
            async for _ in requests:
                pass
        reader = asyncio.ensure_future(drain())
        try:
            while True:
                generation = await q.get()
                yield dataplane_pb2.DataplaneControl(generation=generation).SerializeToString()
        finally:
            reader.cancel()
            self.streams.remove(q)

    async def _predict(self, raw: bytes, context):
        decision = dataplane_pb2.RouteDecision(generation=self.generation, model="m")
        decision.choices.add(version=1, weight=1.0, addresses=[self.address],
                             frame_addresses=[self.frame] if self.frame else [],
                             coalesce_max=self.batching[0], batch_timeout_micros=self.batching[1])
        context.set_trailing_metadata((("x-cloudml-route-bin", decision.SerializeToString()),))
        _ = raw
        response = predict_pb2.PredictResponse()
        response.outputs["tag"].dtype = 7  # DT_STRING
        response.outputs["tag"].string_val.append(b"control")
        return response.SerializeToString()

    async def _start(self) -> int:
        plane = self

        class Handler(grpc.GenericRpcHandler):
            def service(self, details):
                if details.method == "/cloudml.internal.v1.Dataplane/Attach":
                    return grpc.stream_stream_rpc_method_handler(plane._attach)
                if details.method == "/tensorflow.serving.PredictionService/Predict":
                    return grpc.unary_unary_rpc_method_handler(plane._predict)
                return plane.extra.get(details.method)

        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((Handler(),))
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def close(self):
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
