"""The gateway's HTTP listener (TF Serving's REST port, 8501 by default).

Serves liveness and readiness probes and Prometheus metrics (also at TF
Serving's `/monitoring/prometheus/metrics` path). Errors are JSON
`{"error": "..."}` with an HTTP status, as TF Serving answers.
"""
from __future__ import annotations

import logging
from typing import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class RestServer:
    def __init__(self, listen: str, registry: CollectorRegistry, ready: Callable[[], bool]):
        self.listen = listen
        self.registry = registry
        self.ready = ready
        self.app = web.Application(middlewares=[self._errors])
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/monitoring/prometheus/metrics", self._metrics)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @web.middleware
    async def _errors(self, request, handler):
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return json_error(exc.status, exc.reason or "error")

    async def _healthz(self, request):
        return web.json_response({"status": "ok"})

    async def _readyz(self, request):
        if self.ready():
            return web.json_response({"status": "ready"})
        return json_error(503, "not ready: etcd or the platform services are unreachable")

    async def _metrics(self, request):
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> None:
        host, _, port = self.listen.rpartition(":")
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host or "127.0.0.1", int(port), reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        log.info("REST listening on %s:%d", host, self.port)

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()
