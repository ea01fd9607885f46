"""The gateway app: the platform's single front door.

gRPC (`--listen`, 8500 by default): every `cloudml.*.v1` RPC, authenticated
here and forwarded as raw bytes to its owning service (`proxy.Proxy`).
HTTP (`--rest-listen`, 8501 by default): probes and metrics (`rest.RestServer`).
"""
from __future__ import annotations

import logging

from cloudml.auth.v1 import auth_service_pb2
from services.common.server import Platform, ServiceApp
from services.gateway.proxy import Proxy
from services.gateway.rest import RestServer
from services.gateway.routes import platform_routes, service_names

log = logging.getLogger(__name__)

_AUTH = auth_service_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name


class GatewayApp(ServiceApp):
    # Calls that need no token pass through to the auth service unchecked.
    public_methods = frozenset({f"/{_AUTH}/IssueToken", f"/{_AUTH}/WatchVerificationKeys"})

    def __init__(self, platform: Platform):
        super().__init__(platform)
        self.routes = platform_routes()
        self.grpc_services = service_names(self.routes)
        self.proxy = Proxy(self.routes, platform.directory)
        rest_listen = getattr(platform.settings.extra, "rest_listen", None)
        self.rest = RestServer(rest_listen, platform.metrics_registry, self.ready) if rest_listen else None
        self._started = False

    def add_to_server(self, server) -> None:
        server.add_generic_rpc_handlers((self.proxy,))

    async def start(self) -> None:
        await self.platform.directory.wait_synced(5)
        if self.rest and not self.rest.port:
            await self.rest.start()
        self._started = True

    def ready(self) -> bool:
        return self._started and bool(self.platform.directory.addresses("auth"))

    async def stop(self) -> None:
        if self.rest:
            await self.rest.stop()
