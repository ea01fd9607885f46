"""A stand-in model-server replica that records, for each Predict, the deadline
it was given (`context.time_remaining()`), the hop that called it (its
`user-agent`: the gateway's Python process or its native data plane) and how
the call ended (answered, or cancelled while it slept). Used by the gateway's
deadline tests (test_gateway_deadlines.py).

A request names itself and its work in two inputs: `tag` (DT_STRING, one
value) and `sleep` (DT_FLOAT, seconds; 0 when absent)."""
from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import dataclass

import grpc

from cloudml.models.v1 import models_service_pb2 as models_pb
from cloudml.tfs.tensorflow.core.protobuf import meta_graph_pb2
from cloudml.tfs.tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2
from tests.integration.replicas import AVAILABLE, Replicas

PREDICT = "/tensorflow.serving.PredictionService/Predict"
METADATA = "/tensorflow.serving.PredictionService/GetModelMetadata"


@dataclass
class Call:
    """One call as the replica saw it (times are this process's time.monotonic())."""

    tag: str
    method: str
    user_agent: str
    time_remaining: float | None  # None: the call carried no deadline
    started: float
    ended: float | None = None
    outcome: str = "running"  # then "answered" or "cancelled"


def _first_float(tensor) -> float:
    """A DT_FLOAT tensor's first value, from float_val or tensor_content (the REST path's encoding)."""
    if tensor.float_val:
        return tensor.float_val[0]
    return struct.unpack_from("<f", tensor.tensor_content)[0]


class DeadlineReplica:
    """One replica of `tenant/model` version `version`, served on the event loop
    of `replicas` (a tests.integration.replicas.Replicas) and registered
    through its etcd session as the models service registers replicas."""

    def __init__(self, replicas: Replicas, tenant: str, model: str, version: int, replica_id: str):
        self.calls: list[Call] = []
        self._replicas = replicas
        self.address = replicas.run(self._start(tenant, model, version, replica_id))

    def call(self, tag: str) -> Call | None:
        """The Predict call tagged `tag`, if it has reached the replica."""
        return next((c for c in self.calls if c.tag == tag and c.method == PREDICT), None)

    async def _start(self, tenant: str, model: str, version: int, replica_id: str) -> str:
        calls = self.calls

        async def predict(raw: bytes, context) -> bytes:
            request = predict_pb2.PredictRequest.FromString(raw)
            tag = request.inputs["tag"].string_val[0].decode() if "tag" in request.inputs else ""
            sleep = _first_float(request.inputs["sleep"]) if "sleep" in request.inputs else 0.0
            call = Call(tag, PREDICT, dict(context.invocation_metadata()).get("user-agent", ""),
                        context.time_remaining(), time.monotonic())
            calls.append(call)
            try:
                await asyncio.sleep(sleep)
            except asyncio.CancelledError:  # grpc.aio cancels the handler when the call is cancelled or expires
                call.ended, call.outcome = time.monotonic(), "cancelled"
                raise
            call.ended, call.outcome = time.monotonic(), "answered"
            response = predict_pb2.PredictResponse()
            response.model_spec.name = request.model_spec.name
            response.model_spec.version.value = version
            response.model_spec.signature_name = request.model_spec.signature_name or "serving_default"
            response.outputs["tag"].dtype = 7  # DT_STRING
            response.outputs["tag"].tensor_shape.dim.add(size=1)
            response.outputs["tag"].string_val.append(tag.encode())
            return response.SerializeToString()

        async def metadata(raw: bytes, context) -> bytes:
            request = get_model_metadata_pb2.GetModelMetadataRequest.FromString(raw)
            calls.append(Call("", METADATA, dict(context.invocation_metadata()).get("user-agent", ""),
                              context.time_remaining(), time.monotonic(), time.monotonic(), "answered"))
            signature = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
            for name, dtype in (("sleep", 1), ("tag", 7)):  # DT_FLOAT, DT_STRING
                signature.inputs[name].name = f"{name}:0"
                signature.inputs[name].dtype = dtype
                signature.inputs[name].tensor_shape.dim.add(size=-1)
            signature.outputs["tag"].name = "tag_out:0"
            signature.outputs["tag"].dtype = 7
            signature.outputs["tag"].tensor_shape.dim.add(size=-1)
            signatures = get_model_metadata_pb2.SignatureDefMap()
            signatures.signature_def["serving_default"].CopyFrom(signature)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = request.model_spec.name
            response.model_spec.version.value = version
            response.metadata["signature_def"].Pack(signatures)
            return response.SerializeToString()

        handlers = {PREDICT: grpc.unary_unary_rpc_method_handler(predict),
                    METADATA: grpc.unary_unary_rpc_method_handler(metadata)}

        class Handler(grpc.GenericRpcHandler):
            def service(self, details):
                return handlers.get(details.method)

        server = grpc.aio.server()
        server.add_generic_rpc_handlers((Handler(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._replicas.servers[replica_id] = server  # stopped by replicas.close()
        address = f"127.0.0.1:{port}"
        endpoint = models_pb.ReplicaEndpoint(tenant=tenant, model=model, version=version, replica_id=replica_id,
                                             address=address, state=AVAILABLE)
        await self._replicas.session.keep(f"/cloudml/models/endpoints/{tenant}/{model}/{version}/{replica_id}",
                                          endpoint.SerializeToString())
        return address
