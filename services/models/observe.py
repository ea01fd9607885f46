"""Observing replicas, for the reconciler (a mixin of `Reconciler`): their
sockets, port files and health, and the endpoints/ entries it publishes
for them.

Replica endpoints
-----------------
A replica is tenant code (a SavedModel's ops read and write files), so it
never reaches etcd, and only the platform reaches it: the reconciler starts
it listening on a Unix socket, `unix:<socket_dir(tenant)>/<replica id>.sock`
(its metrics on `<replica id>.metrics.sock`; with the native front, its
Python server on `<replica id>.server.sock`), in a directory of mode 0700
per tenant under a per-platform directory (`/run/cloudml-<hash of the data
dir>`, else under the temp dir), short enough for the 107-byte limit of
socket paths. No TCP port is opened.

The reconciler publishes `endpoints/<tenant>/<model>/<version>/<replica id>`
(`ReplicaEndpoint`) for the gateways itself:
- AVAILABLE as soon as the replica's health turns SERVING (it does once the
  model is loaded and warmed up; the port file then holds `coalesce_max` and
  `max_request_bytes`, copied into the record). The address is the one the
  reconciler chose (the `.server.sock` one when the port file says the front
  took the public one), never an address the replica names, and published
  as the platform's own hard link to that socket (`<root>/.platform/`,
  `services.common.sockets.pin_socket`): the tenant's directory is the
  tenant's, so anything running as the tenant could otherwise rename a
  symbolic link to another tenant's socket into its place. The replica's
  framed socket (`.frame.sock`, dataplane/frame.h) is published the same
  way beside it (`frame_address`) when the port file names that path;
- UNLOADING before the reconciler sends SIGTERM (gateways stop routing to it
  while it drains; the replica's `--drain-delay` covers their reaction), or
  when the replica's health turns NOT_SERVING on its own;
- deleted once its process is gone: a dead replica (kill -9, crash) is seen
  by its `runtime.wait()` task within ~50 ms, and its entry is the first
  thing removed.

Entries carry no lease, so a models service killed (even for good) leaves
them as they are: gateways keep routing to live replicas, and nothing goes
stale while no process leads, except the entry of a replica that dies in
that gap (gateways retry such calls once, on another replica). Every pass
deletes entries that no replica record accounts for; a new leader adopts the
running replicas (their records hold their addresses), watches their health
again and rewrites their entries only where they differ. Writes of one
replica's entry are serialized, and AVAILABLE is never written once the
replica is marked `stopping`.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloudml.models.v1 import models_service_pb2 as pb
from services.common.runtime.base import ReplicaPhase, ReplicaStatus
from services.common.sockets import pinned_address, tenant_socket_dir, unpin_socket
from services.models import store

log = logging.getLogger(__name__)

S = pb.ModelVersionState
PORT_FILE = "port.json"
# A port file is a few hundred bytes; a replica (tenant code) may write anything there.
PORT_FILE_MAX = 64 * 1024
# Bounds on what a replica reports for its endpoint record.
COALESCE_MAX_LIMIT = 1 << 16
SERVING = health_pb2.HealthCheckResponse.SERVING
#: How often a replica's readiness is read from the runtime's cache (kubernetes).
READY_POLL = 0.05

@dataclass
class _Observed:
    """What a pass derived for one replica."""

    state: int
    address: str = ""
    message: str = ""
    code: int = 0

def error_code(port: dict) -> int:
    """The status code of a load error: the port file's "code" when the model
    server wrote one, else a leading "CODE_NAME: " of the message, else UNKNOWN."""
    code = port.get("code")
    if isinstance(code, int) and 0 < code < 17:
        return code
    if isinstance(code, str) and code.upper() in _CODES:
        return _CODES[code.upper()]
    head = str(port.get("error", "")).split(":", 1)[0].strip().upper()
    return _CODES.get(head, 2)

_CODES = {name: number for number, name in enumerate((
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"))}

def read_port_file(path: str) -> dict:
    """The replica's port file (written by tenant code in its own working
    directory): never through a link it planted, at most PORT_FILE_MAX bytes."""
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            data = json.loads(f.read(PORT_FILE_MAX))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}

def _count(value, limit: int) -> int:
    """A non-negative int a replica reported, within `limit` (0 if it is not one)."""
    return min(value, limit) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

def _same_endpoint(a: pb.ReplicaEndpoint, b: pb.ReplicaEndpoint) -> bool:
    """Equal but for register_time."""
    a2, b2 = pb.ReplicaEndpoint(), pb.ReplicaEndpoint()
    a2.CopyFrom(a)
    b2.CopyFrom(b)
    a2.ClearField("register_time")
    b2.ClearField("register_time")
    return a2 == b2


class ReplicaObserver:
    """What the reconciler knows of its replicas beyond their records: port
    files, health streams, endpoints/ entries. Uses the `Reconciler`'s state
    (`settings`, `runtime`, `store`, `keys`, `replicas`, `statuses`,
    `endpoints`, `_ports`, `_waiting`, `_monitors`, `_endpoint_locks`) and
    `wake()`."""

    def socket_dir(self, tenant: str) -> str:
        """The directory of `tenant`'s replica sockets, created if missing
        (`services.common.sockets.tenant_socket_dir`). Blocking (it may
        create the tenant's account): run it on a thread."""
        return tenant_socket_dir(self.settings.socket_root, tenant, getattr(self.runtime, "tenancy", None))

    @staticmethod
    def _socket_path(record: store.ReplicaRecord, role: str = "") -> str:
        """`<dir>/<replica id>.sock` (the public address), `.server.sock` (the
        Python server behind a native front; the model server's own naming
        rule, server_address()), `.frame.sock` (its framed socket,
        frame_address()), `.metrics.sock`."""
        base = record.address[len("unix:"):-len(".sock")]
        return f"{base}.{role}.sock" if role else f"{base}.sock"

    def _serving_address(self, record: store.ReplicaRecord, port: dict) -> str:
        """The address gateways call: the replica's Python server itself (behind
        a native front, its `.server.sock`: gateways coalesce already), else
        its public one. Only ever one of the two addresses chosen for it."""
        server = f"unix:{self._socket_path(record, 'server')}"
        return server if port.get("replica_address") == server else record.address

    def _frame_address(self, record: store.ReplicaRecord, port: dict) -> str:
        """The replica's framed socket (frame.h) if its port file names the one
        path the reconciler expects (`<dir>/<replica id>.frame.sock`): the port
        file is written by tenant code, which must not point gateways
        anywhere else. "" otherwise (gRPC only)."""
        if not record.address.startswith("unix:"):
            return ""
        frame = f"unix:{self._socket_path(record, 'frame')}"
        return frame if port.get("frame_address") == frame else ""

    def _remove_sockets(self, record: store.ReplicaRecord) -> None:
        if not record.address.startswith("unix:"):
            return
        # (`.sock.grpc`: its native front's private gRPC socket, dataplane/main.cc.)
        paths = [self._socket_path(record, role) for role in ("", "server", "frame", "metrics")]
        for path in paths + [f"{paths[0]}.grpc"]:
            unpin_socket(self.settings.socket_root, path)
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)

    async def _pinned(self, record: store.ReplicaRecord, address: str) -> str | None:
        """The address gateways and this service call a replica's socket by:
        for `unix:PATH` in the tenant's directory, the platform's own link to
        the socket there (`services.common.sockets.pin_socket`: the tenant can
        rename entries in its directory, not in the platform's), or None if
        PATH is not a socket of the tenant's user; any other address as is."""
        pinned = await pinned_address(address, self.settings.socket_root, record.tenant,
                                      getattr(self.runtime, "tenancy", None))
        if pinned is None:
            log.warning("replica %s: %s is not a socket of its tenant's; not published", record.runtime_id, address)
        return pinned

    def _monitor(self, record: store.ReplicaRecord) -> None:
        """Follows a started replica's health until it ends or is stopped."""
        if self.runtime.reports_readiness:
            task = self._monitors.get(record.key)
            if task is None or task.done():
                self._monitors[record.key] = asyncio.create_task(self._watch_ready(record),
                                                                 name=f"ready:{record.runtime_id}")
            return
        if not record.address.startswith("unix:"):
            return  # started by an older release: it registers itself
        task = self._monitors.get(record.key)
        if task is None or task.done():
            self._monitors[record.key] = asyncio.create_task(self._watch_health(record),
                                                             name=f"health:{record.runtime_id}")

    def _stop_monitor(self, record: store.ReplicaRecord) -> None:
        task = self._monitors.pop(record.key, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _live(self, record: store.ReplicaRecord) -> bool:
        status = self.statuses.get(record.runtime_id)
        return (self.replicas.get(record.key) is record and not record.stopping
                and (status is None or not status.ended))

    async def _watch_health(self, record: store.ReplicaRecord) -> None:
        """Until the replica drains (SERVING, then NOT_SERVING: a model server
        never serves again after that) or ends. The stream is closed then: an
        open call would hold the replica's shutdown for its whole grace."""
        port_path = os.path.join(record.workdir, PORT_FILE)
        while self._live(record):
            port = read_port_file(port_path)
            if port.get("error"):
                return  # it exits; the pass reads the error
            if not port.get("address"):
                await asyncio.sleep(0.05)  # still importing TensorFlow
                continue
            address = await self._pinned(record, self._serving_address(record, port))
            if address is None:
                await asyncio.sleep(0.2)
                continue
            try:
                if await self._follow_health(record, address, port_path):
                    return
            except grpc.aio.AioRpcError as err:
                log.debug("health of %s: %s", record.runtime_id, err.code().name)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep watching
                log.exception("watching the health of replica %s", record.runtime_id)
            await asyncio.sleep(0.2)

    async def _watch_ready(self, record: store.ReplicaRecord) -> None:
        """A replica on a runtime that reports readiness (a Pod: its readiness
        probe asks the model server's gRPC health): AVAILABLE at the address
        the runtime reports while it is ready, UNLOADING while it is not (a
        Pod may become ready again). Reads the runtime's cache of the
        cluster: no call per check."""
        while self._live(record):
            status = await self.runtime.status(record.runtime_id)
            if status.ended:
                return
            try:
                if status.ready and status.address:
                    await self._set_endpoint(record, S.MODEL_VERSION_STATE_AVAILABLE, status.address)
                elif self._endpoint_state(record) == S.MODEL_VERSION_STATE_AVAILABLE:
                    await self._set_endpoint(record, S.MODEL_VERSION_STATE_UNLOADING)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep watching (etcd unavailable for a moment)
                log.exception("publishing the endpoint of replica %s", record.runtime_id)
            await asyncio.sleep(READY_POLL)

    async def _follow_health(self, record: store.ReplicaRecord, address: str, port_path: str) -> bool:
        """One Health.Watch stream (the replica pushes every change at once);
        True once the replica drains."""
        async with grpc.aio.insecure_channel(address) as channel:
            call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            async for reply in call:
                if reply.status == SERVING:
                    port = read_port_file(port_path)
                    frame = self._frame_address(record, port)
                    await self._set_endpoint(record, S.MODEL_VERSION_STATE_AVAILABLE, address,
                                             _count(port.get("coalesce_max"), COALESCE_MAX_LIMIT),
                                             _count(port.get("max_request_bytes"), 1 << 62),
                                             _count(port.get("batch_timeout_micros"), (1 << 32) - 1),
                                             (await self._pinned(record, frame) or "") if frame else "")
                elif record.available or self._endpoint_state(record) == S.MODEL_VERSION_STATE_AVAILABLE:
                    await self._set_endpoint(record, S.MODEL_VERSION_STATE_UNLOADING)
                    call.cancel()
                    return True
        return False

    async def _set_endpoint(self, record: store.ReplicaRecord, state: int | None, address: str = "",
                            coalesce_max: int = 0, max_request_bytes: int = 0,
                            batch_timeout_micros: int = 0, frame_address: str = "") -> None:
        """Writes the replica's endpoints/ entry: AVAILABLE (only while the
        replica is live), UNLOADING (only over an entry there is), or None:
        deleted. One replica's writes never interleave."""
        key = self.keys.endpoint(record.tenant, record.model, record.version, record.replica_id)
        lock = self._endpoint_locks.setdefault(record.key, asyncio.Lock())
        async with lock:
            current = self.endpoints.items.get(key)
            if state is None:
                await self.store.delete_key(key)
                self.endpoints.items.pop(key, None)
                self._endpoint_locks.pop(record.key, None)
                return
            if state == S.MODEL_VERSION_STATE_AVAILABLE:
                if not self._live(record):
                    return
                endpoint = store.make_endpoint(record.tenant, record.model, record.version, record.replica_id,
                                               address, state, coalesce_max, frame_address)
                if max_request_bytes and "max_request_bytes" in pb.ReplicaEndpoint.DESCRIPTOR.fields_by_name:
                    endpoint.max_request_bytes = max_request_bytes
                endpoint.batch_timeout_micros = batch_timeout_micros
                if current is not None and _same_endpoint(current, endpoint):
                    return
            else:
                if current is None or current.state == state:
                    return
                endpoint = pb.ReplicaEndpoint()
                endpoint.CopyFrom(current)
                endpoint.state = state
            await self.store.put_endpoint(endpoint)
            self.endpoints.items[key] = endpoint
            log.info("endpoint of replica %s: %s %s", record.runtime_id,
                     S.Name(state)[len("MODEL_VERSION_STATE_"):], endpoint.address)
        self.wake()

    def _endpoint(self, record: store.ReplicaRecord) -> pb.ReplicaEndpoint | None:
        return self.endpoints.items.get(self.keys.endpoint(record.tenant, record.model, record.version,
                                                           record.replica_id))

    def _endpoint_state(self, record: store.ReplicaRecord) -> int:
        endpoint = self._endpoint(record)
        return endpoint.state if endpoint is not None else S.MODEL_VERSION_STATE_UNSPECIFIED

    def _port_info(self, record: store.ReplicaRecord) -> dict:
        info = self._ports.get(record.key)
        if info is None or not (info.get("address") or info.get("error")):
            info = read_port_file(os.path.join(record.workdir, PORT_FILE))
            self._ports[record.key] = info
        return info

    def _observe(self, record: store.ReplicaRecord) -> _Observed:
        endpoint = self._endpoint(record)
        status = self.statuses.get(record.runtime_id)
        waiting = self._waiting.get(record.key, "")
        if not record.started:
            return _Observed(S.MODEL_VERSION_STATE_START, message=waiting)
        port = self._port_info(record)
        address = endpoint.address if endpoint is not None else record.address
        if status is None or status.ended:
            message = port.get("error") or self._exit_message(status)
            return _Observed(S.MODEL_VERSION_STATE_END, address, message,
                             0 if record.stopping else (error_code(port) if port.get("error") else 2))
        if record.stopping:
            return _Observed(S.MODEL_VERSION_STATE_UNLOADING, address)
        if endpoint is not None:
            return _Observed(endpoint.state, address)
        return _Observed(S.MODEL_VERSION_STATE_LOADING, address)

    @staticmethod
    def _exit_message(status: ReplicaStatus | None) -> str:
        if status is None or status.phase == ReplicaPhase.UNKNOWN:
            return "the runtime lost the replica's process"
        return f"replica exited with code {status.exit_code} ({status.reason or 'Error'})"
