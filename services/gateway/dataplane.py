"""The gateway's native data plane: starting it, and its control stream.

`services/common/native/dataplane/` (built by `scripts/build_native.sh` into
`build/native/cloudml-dataplane`) owns the gateway's public gRPC port.
It answers repeat TF Serving calls itself, straight to replicas, from the
routing decisions this process hands it, and relays everything else here (see
the top of its main.cc for the whole design). This process stays the only
place where tokens are checked and routes resolved; the data plane only
repeats decisions, and only for the current routing generation.

Modes (`--dataplane`):
- `native`: the data plane is required; the gateway fails to start without it.
- `python`: no data plane; this process serves the public port itself.
- `auto` (default): native if the binary is built, else python with a warning.

Platform calls: the first call with a given `authorization` comes through
this process, which authenticates it as before and, on success, vouches for
the token in trailing metadata (`AuthDecision`: generation, expiry). The data
plane then relays later calls with that authorization, and calls to public
methods, straight to an instance of their owning service, from the instance
table this process streams; a revoked key or new signing key bumps the
generation, which empties its cache. Their counts come back in its reports and
are added to this process's `grpc_server_handled_total` (their latency is in
the owning services' `grpc_server_handling_seconds`, not the gateway's).

The data plane dies with this process (PR_SET_PDEATHSIG); if it dies on its
own, the gateway stops with an error and its supervisor restarts both.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
from typing import Callable

import grpc

from cloudml.internal.v1 import dataplane_pb2
from services.common.interceptors import ServerMetrics
from services.common.native import NativeProcess, binary_path, built
from services.common.native.protocol import ATTACH, AUTH_DECISION_HEADER, SECRET_ENV, SECRET_HEADER
from services.common.registry import Directory
from services.common.tokens import TokenVerifier, bearer_from_metadata
from services.gateway.model_metrics import BUCKETS, ModelRequestMetrics
from services.gateway.predict import DEFAULT_MAX_REQUEST_BYTES, RoutingTable

log = logging.getLogger(__name__)

# The data plane polls only while a replica's reply is due, and at most this
# long (its spin.h); 0 (the default) never polls: on the 2-CPU machine,
# loaded by others, polling did not pay for its CPU (README, "c=1 at
# realistic pacing").
DEFAULT_SPIN_US = 0


def choose_mode(requested: str) -> str:
    """'native' or 'python' for a requested mode; raises if native is required but missing."""
    is_built = built()
    if requested == "native" and not is_built:
        raise SystemExit(f"gateway: --dataplane native, but {binary_path()} is not built "
                         "(run scripts/build_native.sh)")
    if requested == "auto" and not is_built:
        log.warning("the native data plane is not built (%s; run scripts/build_native.sh): TF Serving calls "
                    "are served by this Python process, with ~0.4 ms more per call", binary_path())
        return "python"
    return "python" if requested == "python" else "native"


class NativeDataplane:
    """One data-plane process in front of this gateway, and its Attach stream."""

    def __init__(self, table: RoutingTable, metrics: ModelRequestMetrics, directory: Directory,
                 verifier: TokenVerifier, services: dict[str, str], public_methods: frozenset[str],
                 server_metrics: ServerMetrics | None, spin_us: int = DEFAULT_SPIN_US,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, h2_front: bool = True,
                 frames: bool = True):
        """`services`: full gRPC service name -> the platform service that owns it;
        `public_methods`: platform methods that need no token."""
        self.table = table
        self.verifier = verifier
        self.public_methods = public_methods
        self.metrics = metrics
        self.directory = directory
        self.services = services
        self.server_metrics = server_metrics
        self._relayed: dict[tuple[str, str, str], int] = {}
        self.spin_us = spin_us
        self.max_request_bytes = max_request_bytes
        self.h2_front = h2_front  # the public port spoken as HTTP/2 by the data plane itself (h2front.h)
        self.frames = frames  # routed calls over replicas' framed sockets (frame.h)
        self.secret = secrets.token_urlsafe(32)
        #: (public REST address, this process's REST server's private address) when the
        #: data plane owns the REST port too (set by the gateway app before start)
        self.rest: tuple[str, str] | None = None
        self.native = NativeProcess("the native data plane")
        self.failed = False
        self._streams: set[asyncio.Event] = set()  # one per open Attach stream
        table.listeners.append(self._on_change)
        directory.listeners.append(self._on_change)

    def _on_change(self, _generation: int | None = None) -> None:
        for event in self._streams:
            event.set()

    # --- the process ------------------------------------------------------------------

    async def start(self, listen: str, upstream: str, on_failure: Callable[[], None]) -> int:
        """Starts the data plane on `listen` in front of `upstream`; returns its port."""
        env = dict(os.environ, **{SECRET_ENV: self.secret})
        port = await self.native.start(["--listen", listen, "--upstream", upstream, "--spin-us", str(self.spin_us),
                                        "--max-request-bytes", str(self.max_request_bytes),
                                        "--h2-front", "on" if self.h2_front else "off",
                                        "--frames", "on" if self.frames else "off",
                                        *(("--rest-listen", self.rest[0], "--rest-upstream", self.rest[1])
                                          if self.rest else ())], env)
        log.info("native data plane (pid %d) on port %d, in front of %s", self.native.process.pid, port, upstream)

        def failed(code: int) -> None:
            self.failed = True
            log.error("the native data plane exited (%s); stopping the gateway so it restarts whole", code)
            on_failure()
        self.native.watch(failed)
        return port

    async def stop(self) -> None:
        """Stops taking calls on the public port; in-flight calls drain (5 s at most)."""
        await self.native.stop()

    # --- the Attach stream --------------------------------------------------------------

    def handler(self) -> grpc.GenericRpcHandler:
        plane = self

        class Handler(grpc.GenericRpcHandler):
            def service(self, details):
                if details.method == ATTACH:
                    return grpc.stream_stream_rpc_method_handler(
                        plane._attach, request_deserializer=dataplane_pb2.DataplaneReport.FromString,
                        response_serializer=dataplane_pb2.DataplaneControl.SerializeToString)
                return None

        return Handler()

    async def _attach(self, reports, context):
        if (SECRET_HEADER, self.secret) not in context.invocation_metadata():
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not this gateway's data plane")

        async def read_reports() -> None:
            async for report in reports:
                self.metrics.set_native(report)
                self._count_relays(report)

        reader = asyncio.create_task(read_reports())
        changed = asyncio.Event()
        self._streams.add(changed)
        try:
            sent = None
            while not reader.done():
                changed.clear()
                control = self._control()
                if control != sent:
                    sent = control
                    yield control
                waiter = asyncio.create_task(changed.wait())
                await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
        finally:
            self._streams.discard(changed)
            reader.cancel()

    def _control(self) -> dataplane_pb2.DataplaneControl:
        control = dataplane_pb2.DataplaneControl(generation=self.table.generation, latency_buckets=BUCKETS,
                                                 public_methods=sorted(self.public_methods))
        for service, owner in sorted(self.services.items()):
            control.services.add(service=service, addresses=self.directory.addresses(owner))
        return control

    def _count_relays(self, report: dataplane_pb2.DataplaneReport) -> None:
        """Adds what the data plane relayed since its last report to grpc_server_handled_total."""
        if self.server_metrics is None:
            return
        for relay in report.relays:
            key = (relay.service, relay.method, relay.code)
            delta = relay.count - self._relayed.get(key, 0)
            if delta > 0:
                self.server_metrics.handled.labels(*key).inc(delta)
            self._relayed[key] = relay.count

    def vouch(self, metadata) -> tuple:
        """Trailing metadata vouching for the token of a platform call that the
        data plane sent here and that succeeded; () for anyone else.
        Verified again now, so the generation and the verdict go together."""
        if (SECRET_HEADER, self.secret) not in metadata:
            return ()
        token = bearer_from_metadata(metadata)
        if token is None or not self.verifier.loaded:
            return ()
        try:
            principal = self.verifier.verify(token)
        except Exception:  # noqa: BLE001 - no verdict, no vouching
            return ()
        decision = dataplane_pb2.AuthDecision(generation=self.table.generation, expires_at=principal.expires_at)
        return ((AUTH_DECISION_HEADER, decision.SerializeToString()),)
