"""The gateway app: the platform's single front door.

gRPC (`--listen`, 8500 by default): every `cloudml.*.v1` RPC, authenticated
here and forwarded as raw bytes to its owning service (`proxy.Proxy`), and
TF Serving's PredictionService/ModelService routed to model-server replicas
(`predict.TfServingHandler`). With the native data plane (`--dataplane`, see
dataplane.py) that process owns the public port, answers repeat model calls
itself and relays everything else to this one, which then listens on loopback.
HTTP (`--rest-listen`, 8501 by default): TF Serving's REST API, probes and
metrics (`rest.RestServer`). With the native data plane (and
`--dataplane-rest on`, the default) that process owns the REST port too: it
answers repeat predict calls itself (JSON converted in C++) and relays every
other request to this one, which then listens on a Unix socket in a
directory of its own.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

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
from services.gateway.console import Console
from services.gateway.pages import BrowserPages
from services.gateway.rest import RestServer
from services.gateway.routes import platform_routes, service_names

log = logging.getLogger(__name__)

_AUTH = auth_service_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name


@dataclass(frozen=True)
class GatewaySettings:
    """The gateway's own flags (`python -m services.gateway --help`), built in its __main__."""

    #: host:port for the HTTP API (None: no HTTP API)
    rest_listen: str | None = "127.0.0.1:8501"
    #: who serves the gRPC port: "native", "python" or "auto" (see dataplane.py)
    dataplane: str = "auto"
    #: the most the data plane polls for a replica's due reply, microseconds (None: its default, 0)
    dataplane_spin_us: int | None = None
    #: the data plane's HTTP/2 front on the public port (False: its gRPC server owns the port)
    dataplane_h2_front: bool = True
    #: the data plane owns the REST port too (False: this process serves it, as with --dataplane python)
    dataplane_rest: bool = True
    #: the data plane's HTTP/2 front calls replicas over their framed sockets (False: always gRPC)
    dataplane_frames: bool = True
    #: platform-wide cap on a model call's request size, bytes (see predict.py)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES


class GatewayApp(ServiceApp):
    # Calls that need no token pass through to the auth service unchecked;
    # TF Serving calls authenticate in their handler (public models need no token).
    # The data plane's Attach checks its own secret.
    public_methods = frozenset({f"/{_AUTH}/IssueToken", f"/{_AUTH}/WatchVerificationKeys",
                                f"/{_AUTH}/RedeemLoginLink", ATTACH}) | TFS_METHODS

    def __init__(self, platform: Platform, settings: GatewaySettings = GatewaySettings()):
        super().__init__(platform)
        self.routes = platform_routes()
        self.grpc_services = (*service_names(self.routes), PREDICTION_SERVICE, MODEL_SERVICE)
        self.proxy = Proxy(self.routes, platform.directory)
        self.table = RoutingTable(platform.etcd, platform.directory.channel_for)
        max_request_bytes = settings.max_request_bytes
        self.router = PredictRouter(self.table, platform.verifier, platform.metrics_registry, max_request_bytes)
        mode = choose_mode(settings.dataplane)
        self.dataplane = None
        if mode == "native":
            spin_us = settings.dataplane_spin_us
            owners = {route.method.split("/")[1]: route.owner for route in self.routes.values()}
            self.dataplane = NativeDataplane(self.table, self.router.metrics, platform.directory, platform.verifier,
                                             owners, self.public_methods - TFS_METHODS - {ATTACH},
                                             platform.server_metrics, max_request_bytes=max_request_bytes,
                                             h2_front=settings.dataplane_h2_front,
                                             frames=settings.dataplane_frames,
                                             **({"spin_us": spin_us} if spin_us is not None else {}))
            platform.verifier.listeners.append(self.table.changed)
            self.proxy.vouch = self.dataplane.vouch
        rest_listen = settings.rest_listen
        self._rest_dir = None
        secret = None
        if rest_listen and self.dataplane and settings.dataplane_rest:
            # Only this process and its data plane can reach the socket (0700 directory).
            self._rest_dir = tempfile.mkdtemp(prefix="cloudml-gateway-rest-")
            upstream = f"unix:{os.path.join(self._rest_dir, 'rest.sock')}"
            self.dataplane.rest = (rest_listen, upstream)
            rest_listen, secret = upstream, self.dataplane.secret
        self.rest = RestServer(rest_listen, platform.metrics_registry, self.ready, self.router,
                               BrowserPages(platform.verifier, platform.directory),
                               Console(platform.verifier, platform.directory), secret) if rest_listen else None
        self._table_started = False
        self._started = False

    def add_to_server(self, server) -> None:
        secret = self.dataplane.secret if self.dataplane else None
        handlers = (self.proxy, TfServingHandler(self.router, secret))
        server.add_generic_rpc_handlers(handlers + ((self.dataplane.handler(),) if self.dataplane else ()))

    def front_door(self):
        return self.dataplane

    async def start(self) -> None:
        await self.platform.directory.wait_synced(5)
        if not self._table_started:
            self.table.start()
            self._table_started = True
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
        if self._rest_dir:
            shutil.rmtree(self._rest_dir, ignore_errors=True)
