"""Stand-in model-server replicas: real gRPC servers, registered in etcd as
the models service's replicas are, that answer Predict and GetModelMetadata
with their own identity (used by the gateway's routing tests)."""
from __future__ import annotations

import asyncio
import collections
import threading

import grpc

from cloudml.models.v1 import models_service_pb2 as models_pb
from cloudml.tfs.tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from deploy.local.stack import EtcdTarget
from services.common.etcd_concurrency import Session

AVAILABLE = models_pb.MODEL_VERSION_STATE_AVAILABLE


class Replicas:
    """Stand-in model-server replicas in one background event loop."""

    def __init__(self, etcd: EtcdTarget):
        """`etcd`: where the gateway under test watches (a stack's `etcd`)."""
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: dict[str, grpc.aio.Server] = {}
        self.hits = collections.Counter()
        self.etcd = self.run(etcd.connect())
        self.session = self.run(Session(self.etcd, ttl=5).start())

    def run(self, coro, timeout=10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def add(self, tenant: str, model: str, version: int, replica: str, *, delay: float = 0.0,
            register_as: str | None = None, answers_as: int | None = None) -> str:
        """`answers_as`: the version its responses name (a replica of another
        version on a stale route); `version` by default."""
        hits = self.hits

        async def predict(request: bytes, context):
            req = predict_pb2.PredictRequest.FromString(request)
            hits[replica] += 1
            remaining = context.time_remaining()
            if delay:
                await asyncio.sleep(delay)
            if "sleep" in req.inputs:  # a caller's own delay, in seconds
                await asyncio.sleep(req.inputs["sleep"].float_val[0])
            resp = predict_pb2.PredictResponse()
            resp.model_spec.name = req.model_spec.name
            resp.model_spec.version.value = version if answers_as is None else answers_as
            resp.model_spec.signature_name = req.model_spec.signature_name or "serving_default"
            resp.outputs["replica"].dtype = 7  # DT_STRING
            resp.outputs["replica"].string_val.append(replica.encode())
            resp.outputs["replica"].tensor_shape.dim.add(size=1)
            if "sleep" in req.inputs and remaining is not None:  # the deadline it saw, seconds from its start
                resp.outputs["time_remaining"].dtype = 1  # DT_FLOAT
                resp.outputs["time_remaining"].float_val.append(remaining)
            return resp.SerializeToString()

        async def metadata(request: bytes, context):
            from cloudml.tfs.tensorflow.core.protobuf import meta_graph_pb2
            from cloudml.tfs.tensorflow_serving.apis import get_model_metadata_pb2
            req = get_model_metadata_pb2.GetModelMetadataRequest.FromString(request)
            sig = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
            sig.inputs["x"].name = "x:0"
            sig.inputs["x"].dtype = 1  # DT_FLOAT
            sig.inputs["x"].tensor_shape.dim.add(size=-1)
            sig.outputs["replica"].name = "r:0"
            sig.outputs["replica"].dtype = 7
            sigmap = get_model_metadata_pb2.SignatureDefMap()
            sigmap.signature_def["serving_default"].CopyFrom(sig)
            resp = get_model_metadata_pb2.GetModelMetadataResponse()
            resp.model_spec.name = req.model_spec.name
            resp.model_spec.version.value = version
            resp.metadata["signature_def"].Pack(sigmap)
            return resp.SerializeToString()

        class Handler(grpc.GenericRpcHandler):
            def service(self, details):
                if details.method == "/tensorflow.serving.PredictionService/Predict":
                    return grpc.unary_unary_rpc_method_handler(predict)
                if details.method == "/tensorflow.serving.PredictionService/GetModelMetadata":
                    return grpc.unary_unary_rpc_method_handler(metadata)
                return None

        async def start():
            server = grpc.aio.server()
            server.add_generic_rpc_handlers((Handler(),))
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            self.servers[replica] = server
            endpoint = models_pb.ReplicaEndpoint(tenant=tenant, model=model, version=version,
                                                 replica_id=replica, address=f"127.0.0.1:{port}", state=AVAILABLE)
            key = register_as or f"/cloudml/models/endpoints/{tenant}/{model}/{version}/{replica}"
            await self.session.keep(key, endpoint.SerializeToString())
            return key

        return self.run(start())

    def kill(self, replica: str) -> None:
        """Stops the server but leaves its registration (as a crash before the lease expires)."""
        self.run(self.servers.pop(replica).stop(0))

    def route(self, route: models_pb.ModelRoute) -> None:
        self.run(self.etcd.put(f"/cloudml/models/routes/{route.tenant}/{route.model}", route.SerializeToString()))

    def close(self):
        for server in self.servers.values():
            self.run(server.stop(0))
        self.run(self.session.close())
        self.run(self.etcd.close())
        self.loop.call_soon_threadsafe(self.loop.stop)


def versions(*pairs):
    return [models_pb.VersionRoute(version=v, state=s) for v, s in pairs]


def predict(channel, metadata, name="linear", version=None, label=None, timeout=5):
    """A Predict with the stock stub, naming `name` and a version or label."""
    req = predict_pb2.PredictRequest()
    req.model_spec.name = name
    if version is not None:
        req.model_spec.version.value = version
    if label:
        req.model_spec.version_label = label
    return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(req, metadata=metadata, timeout=timeout)


def replica_of(resp) -> str:
    """Which stand-in replica answered."""
    return resp.outputs["replica"].string_val[0].decode()
