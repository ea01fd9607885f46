"""The gateway app: the platform's single front door.

gRPC (`--listen`, 8500 by default): every `cloudml.*.v1` RPC, authenticated
here and forwarded as raw bytes to its owning service (`proxy.Proxy`), and
TF Serving's PredictionService/ModelService routed to model-server replicas
(`predict.TfServingHandler`).
HTTP (`--rest-listen`, 8501 by default): probes and metrics (`rest.RestServer`).
"""
from __future__ import annotations

import logging

from cloudml.auth.v1 import auth_service_pb2
from cloudml.tfs.tensorflow_serving.apis import model_service_pb2, prediction_service_pb2  # noqa: F401 (reflection)
from services.common.server import Platform, ServiceApp
from services.gateway.predict import MODEL_SERVICE, PREDICTION_SERVICE, TFS_METHODS, PredictRouter, RoutingTable, TfServingHandler
from services.gateway.proxy import Proxy
from services.gateway.rest import RestServer
from services.gateway.routes import platform_routes, service_names

log = logging.getLogger(__name__)

_AUTH = auth_service_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name


class GatewayApp(ServiceApp):
    # Calls that need no token pass through to the auth service unchecked;
    # TF Serving calls authenticate in their handler (public models need no token).
    public_methods = frozenset({f"/{_AUTH}/IssueToken", f"/{_AUTH}/WatchVerificationKeys"}) | TFS_METHODS

    def __init__(self, platform: Platform):
        super().__init__(platform)
        self.routes = platform_routes()
        self.grpc_services = (*service_names(self.routes), PREDICTION_SERVICE, MODEL_SERVICE)
        self.proxy = Proxy(self.routes, platform.directory)
        self.table = RoutingTable(platform.etcd, platform.directory.channel_for)
        self.router = PredictRouter(self.table, platform.verifier, platform.metrics_registry)
        rest_listen = getattr(platform.settings.extra, "rest_listen", None)
        self.rest = RestServer(rest_listen, platform.metrics_registry, self.ready, self.router) if rest_listen else None
        self._started = False

    def add_to_server(self, server) -> None:
        server.add_generic_rpc_handlers((self.proxy, TfServingHandler(self.router)))

    async def start(self) -> None:
        await self.platform.directory.wait_synced(5)
        if not self.table.routes_mirror._task:
            self.table.start()
        await self.table.wait_synced(5)
        if self.rest and not self.rest.port:
            await self.rest.start()
        self._started = True

    def ready(self) -> bool:
        return self._started and bool(self.platform.directory.addresses("auth"))

    async def stop(self) -> None:
        await self.table.stop()
        if self.rest:
            await self.rest.stop()
