"""The gateway app: the platform's single front door.

gRPC (`--listen`, 8500 by default): every `cloudml.*.v1` RPC, authenticated
here and forwarded as raw bytes to its owning service (`proxy.Proxy`), and
TF Serving's PredictionService/ModelService routed to model-server replicas
(`predict.TfServingHandler`). With the native data plane (`--dataplane`, see
dataplane.py) that process owns the public port, answers repeat model calls
itself and relays everything else to this one, which then listens on loopback.
HTTP (`--rest-listen`, 8501 by default): TF Serving's REST API, probes and
metrics (`rest.RestServer`).
"""
from __future__ import annotations

import logging

from cloudml.auth.v1 import auth_service_pb2
from cloudml.tfs.tensorflow_serving.apis import model_service_pb2, prediction_service_pb2  # noqa: F401 (reflection)
from services.common.server import Platform, ServiceApp
from services.gateway.dataplane import ATTACH, NativeDataplane, choose_mode
from services.gateway.predict import (
    DEFAULT_MAX_REQUEST_BYTES,
    MODEL_SERVICE,
    PREDICTION_SERVICE,
    TFS_METHODS,
    PredictRouter,
    RoutingTable,
    TfServingHandler,
)
from services.gateway.proxy import Proxy
from services.gateway.rest import RestServer
from services.gateway.routes import platform_routes, service_names

log = logging.getLogger(__name__)

_AUTH = auth_service_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name


class GatewayApp(ServiceApp):
    # Calls that need no token pass through to the auth service unchecked;
    # TF Serving calls authenticate in their handler (public models need no token).
    # The data plane's Attach checks its own secret.
    public_methods = frozenset({f"/{_AUTH}/IssueToken", f"/{_AUTH}/WatchVerificationKeys", ATTACH}) | TFS_METHODS

    def __init__(self, platform: Platform):
        super().__init__(platform)
        self.routes = platform_routes()
        self.grpc_services = (*service_names(self.routes), PREDICTION_SERVICE, MODEL_SERVICE)
        self.proxy = Proxy(self.routes, platform.directory)
        self.table = RoutingTable(platform.etcd, platform.directory.channel_for)
        max_request_bytes = getattr(platform.settings.extra, "max_request_bytes", None) or DEFAULT_MAX_REQUEST_BYTES
        self.router = PredictRouter(self.table, platform.verifier, platform.metrics_registry, max_request_bytes)
        mode = choose_mode(getattr(platform.settings.extra, "dataplane", "auto"))
        self.dataplane = None
        if mode == "native":
            spin_us = getattr(platform.settings.extra, "dataplane_spin_us", None)
            owners = {route.method.split("/")[1]: route.owner for route in self.routes.values()}
            self.dataplane = NativeDataplane(self.table, self.router.metrics, platform.directory, platform.verifier,
                                             owners, self.public_methods - TFS_METHODS - {ATTACH},
                                             platform.server_metrics, max_request_bytes=max_request_bytes,
                                             **({"spin_us": spin_us} if spin_us is not None else {}))
            platform.verifier.listeners.append(self.table.changed)
            self.proxy.vouch = self.dataplane.vouch
        rest_listen = getattr(platform.settings.extra, "rest_listen", None)
        self.rest = RestServer(rest_listen, platform.metrics_registry, self.ready, self.router) if rest_listen else None
        self._started = False

    def add_to_server(self, server) -> None:
        secret = self.dataplane.secret if self.dataplane else None
        handlers = (self.proxy, TfServingHandler(self.router, secret))
        server.add_generic_rpc_handlers(handlers + ((self.dataplane.handler(),) if self.dataplane else ()))

    def front_door(self):
        return self.dataplane

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
