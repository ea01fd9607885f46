"""Server bootstrap shared by every service process.

A service's `__main__` parses the flags once (`parse_settings`: the common
`Settings`, plus the namespace it builds its own settings dataclass from),
then calls `run(settings, factory)` with a factory that builds its
`ServiceApp`. This module owns everything around the app:

- a `grpc.aio` server with the interceptor pipeline (observability, errors, auth),
  `grpc.health.v1` and reflection, bound on `--listen` (port 0 allowed: the
  bound port is written to `--port-file`);
- health NOT_SERVING until etcd answers and the app reports ready, and back
  to NOT_SERVING whenever etcd stops answering;
- an etcd session whose lease carries the registry entry, written once the
  service is ready (so a registration means "serving": callers switch to a
  restarted instance as soon as it can answer) and deleted first thing at
  shutdown (callers move on before the drain, not a lease TTL later);
- the token verifier, fed by the auth service's key stream (the auth service
  feeds its own);
- Prometheus metrics on `--metrics-listen`;
- for apps with an `election`, the campaign: the app's `lead()` runs only
  while this process leads (one leader per service, on the session's lease);
- SIGTERM/SIGINT: health off, registry entry deleted, `server.stop(grace)`,
  leader work cancelled, app stop, lease revoked.
"""
from __future__ import annotations

import abc
import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
import uuid
from dataclasses import dataclass, field
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from services.common import errors
from services.common.archive import ArchiveSettings
from services.common.etcd import Etcd
from services.common.etcd_concurrency import Election, Session, run_as_leader
from services.common.identity import ServiceIdentity, follow_verification_keys
from services.common.interceptors import ServerMetrics, ServerPipeline
from services.common.registry import Directory, deregister, register
from services.common.tokens import TokenVerifier
from services.common.uploads import UploadLimits
from services.common.aio import wait_event

log = logging.getLogger(__name__)

SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
)


@dataclass
class Settings:
    """What every service process is told at start; read once in __main__.
    A service's own flags go into its own settings dataclass, which its
    `__main__` builds and hands to its app."""

    service: str
    listen: str = "127.0.0.1:0"
    #: the host others reach this process at, registered with its port (None:
    #: the --listen host; in a Pod, its IP, since it listens on 0.0.0.0)
    advertise_host: str | None = None
    etcd: str = "127.0.0.1:2379"
    #: a key prefix every etcd key of this process goes under (services.common.etcd)
    etcd_namespace: str = ""
    port_file: str | None = None
    data_dir: str | None = None
    credentials_file: str | None = None
    metrics_listen: str | None = None
    log_level: str = "INFO"
    instance: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    lease_ttl: int = 10
    grace_seconds: float = 5.0
    #: remote URI schemes tenants may name besides file (services.common.confine)
    allowed_uri_schemes: str = ""
    uploads: UploadLimits = field(default_factory=UploadLimits)
    #: where finished objects are archived, and after how long (services.common.archive)
    archive: ArchiveSettings = field(default_factory=ArchiveSettings)


def parse_settings(
    service: str,
    argv: list[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[Settings, argparse.Namespace]:
    """The common settings, and the parsed namespace (the service's own flags,
    added by `add_arguments`, included) for the service's settings dataclass."""
    parser = argparse.ArgumentParser(prog=f"python -m services.{service}", description=f"Cloud-ML {service} service")
    parser.add_argument("--listen", default=os.environ.get("CLOUDML_LISTEN", Settings.listen),
                        help="host:port for gRPC (port 0 picks a free one)")
    parser.add_argument("--etcd", default=os.environ.get("CLOUDML_ETCD", Settings.etcd),
                        help="etcd client endpoint host:port")
    parser.add_argument("--etcd-namespace", default=os.environ.get("CLOUDML_ETCD_NAMESPACE", Settings.etcd_namespace),
                        help="keep every etcd key under this prefix (services on one etcd with different "
                             "namespaces never see each other's keys); default: none")
    parser.add_argument("--advertise-host", default=os.environ.get("CLOUDML_ADVERTISE_HOST") or None,
                        help="the host other services reach this one at (default: the --listen host)")
    parser.add_argument("--port-file", help="write the bound ports as JSON here once listening")
    parser.add_argument("--data-dir", help="the platform's data directory")
    parser.add_argument("--credentials-file",
                        help="JSON {access_key, secret_key} this service uses to call other services")
    parser.add_argument("--metrics-listen", default=None, help="host:port for Prometheus metrics (port 0 ok)")
    parser.add_argument("--log-level", default=os.environ.get("CLOUDML_LOG_LEVEL", Settings.log_level))
    parser.add_argument("--lease-ttl", type=int, default=Settings.lease_ttl, help="etcd session lease TTL, seconds")
    parser.add_argument("--allowed-uri-schemes",
                        default=os.environ.get("CLOUDML_ALLOWED_URI_SCHEMES", Settings.allowed_uri_schemes),
                        help="remote URI schemes tenants may name besides file (comma-separated, e.g. s3,https; "
                             "see services/common/confine.py)")
    parser.add_argument("--upload-max-bytes", type=int,
                        default=int(os.environ.get("CLOUDML_UPLOAD_MAX_BYTES", UploadLimits.max_upload_bytes)),
                        help="largest upload (UploadPackage, UploadModel), bytes")
    parser.add_argument("--tenant-storage-max-bytes", type=int,
                        default=int(os.environ.get("CLOUDML_TENANT_STORAGE_MAX_BYTES", UploadLimits.max_tenant_bytes)),
                        help="uploads are refused once a tenant's storage would exceed this, bytes")
    parser.add_argument("--archive-uri", default=os.environ.get("CLOUDML_ARCHIVE_URI", ArchiveSettings.uri),
                        help="fsspec URI where finished objects are archived (default: DIR/archive)")
    parser.add_argument("--retention-seconds", type=float, default=ArchiveSettings.retention_seconds,
                        help="objects that ended longer ago than this move from etcd to the archive (7 days)")
    parser.add_argument("--archive-seconds", type=float, default=ArchiveSettings.pass_seconds,
                        help="pause between the archiver's passes")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    settings = Settings(
        service=service, listen=args.listen, advertise_host=args.advertise_host, etcd=args.etcd, etcd_namespace=args.etcd_namespace,
        port_file=args.port_file,
        data_dir=args.data_dir, credentials_file=args.credentials_file,
        metrics_listen=args.metrics_listen, log_level=args.log_level.upper(),
        lease_ttl=args.lease_ttl, allowed_uri_schemes=args.allowed_uri_schemes or "",
        uploads=UploadLimits(max_upload_bytes=args.upload_max_bytes or UploadLimits.max_upload_bytes,
                             max_tenant_bytes=args.tenant_storage_max_bytes or UploadLimits.max_tenant_bytes),
        archive=ArchiveSettings(uri=args.archive_uri or "", retention_seconds=args.retention_seconds,
                                pass_seconds=args.archive_seconds),
    )
    return settings, args


@dataclass
class Platform:
    """What the bootstrap hands to a service app."""

    settings: Settings
    etcd: Etcd
    session: Session
    directory: Directory
    verifier: TokenVerifier
    identity: ServiceIdentity | None
    metrics_registry: CollectorRegistry
    server_metrics: ServerMetrics | None = None


class ServiceApp(abc.ABC):
    """A service's application object (built in its server.py)."""

    #: full gRPC service names, for health and reflection
    grpc_services: tuple[str, ...] = ()
    #: full method names ("/pkg.Service/Method") that need no token
    public_methods: frozenset[str] = frozenset()
    #: whether this app feeds the token verifier itself (the auth service)
    provides_verification_keys: bool = False
    #: the etcd prefix of the service's leader election, for apps with work
    #: only one process may do at a time (`lead()`); None: no election
    election: str | None = None

    def __init__(self, platform: Platform):
        self.platform = platform

    @abc.abstractmethod
    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Adds the service's servicers (or generic handlers) to the server."""

    def front_door(self):
        """A process to put in front of this one on the public port, or None.
        It has `async start(listen, upstream, on_failure) -> port`,
        `async stop()` and `failed`; this server then listens on loopback only."""
        return None

    async def start(self) -> None:
        """Loads state from etcd and starts loops; raises `errors.Unavailable`
        while etcd is down (the bootstrap retries)."""

    def ready(self) -> bool:
        return True

    async def lead(self) -> None:
        """The leader's work (apps with an `election`). Runs once `start()`
        has succeeded and this process leads; cancelled when it stops leading
        (the lease was lost) or the process stops, run again when it leads
        again; a return or an error resigns and campaigns again."""

    def leadership_changed(self, leading: bool) -> None:
        """Called as this process becomes (True) or stops being (False) the leader."""

    async def stop(self) -> None:
        """Stops loops; the server is already draining and `lead()` is over."""


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aetcd").setLevel(logging.WARNING)


def _write_port_file(path: str, ports: dict) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(ports, f)
    os.replace(tmp, path)


async def _retry_until_done(what: str, action, stop: asyncio.Event) -> bool:
    delay = 0.1
    while not stop.is_set():
        try:
            await action()
            return True
        except errors.Unavailable as err:
            log.info("%s waiting: %s", what, err.message)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - keep trying; the log says why
            log.exception("%s failed; retrying", what)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)
    return False


async def _campaign(app: ServiceApp, session: Session, instance: str) -> None:
    """Runs `app.lead()` while this process leads `app.election`; never returns."""
    while session.lease_id == 0:  # the bootstrap starts the session beside the app
        await asyncio.sleep(0.05)
    election = Election(session, app.election, instance.encode())
    await run_as_leader(election, app.lead, on_change=app.leadership_changed)


def trim_heap() -> None:
    """Gives the start-up's freed heap (imports, the first listing of etcd)
    back to the system: glibc keeps it otherwise (~1-3 MB of a service at
    rest). Elsewhere a no-op."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


async def serve(settings: Settings, factory: Callable[[Platform], ServiceApp]) -> None:
    metrics_registry = CollectorRegistry()
    etcd = await Etcd.connect(settings.etcd, namespace=settings.etcd_namespace)
    session = Session(etcd, ttl=settings.lease_ttl)
    directory = Directory(etcd).start()
    verifier = TokenVerifier()
    identity = None
    if settings.credentials_file:
        identity = ServiceIdentity.from_file(settings.credentials_file, directory)
    server_metrics = ServerMetrics(metrics_registry)
    platform = Platform(settings, etcd, session, directory, verifier, identity, metrics_registry, server_metrics)
    app = factory(platform)

    server = grpc.aio.server(
        interceptors=[ServerPipeline(server_metrics, verifier, app.public_methods)],
        options=SERVER_OPTIONS,
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    app.add_to_server(server)
    reflection.enable_server_reflection(
        (*app.grpc_services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    names = ("", *app.grpc_services)

    async def set_health(serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in names:
            await health_servicer.set(name, status)

    await set_health(False)
    front = app.front_door()
    port = server.add_insecure_port("127.0.0.1:0" if front else settings.listen)
    await server.start()
    stop = asyncio.Event()
    if front:
        port = await front.start(settings.listen, f"127.0.0.1:{port}", stop.set)
    host = settings.advertise_host or settings.listen.rpartition(":")[0] or "127.0.0.1"
    address = f"{host}:{port}"
    ports = {"grpc": port, "pid": os.getpid(), "address": address}
    if settings.metrics_listen:
        mhost, _, mport = settings.metrics_listen.rpartition(":")
        httpd, _ = start_http_server(int(mport), addr=mhost or "127.0.0.1", registry=metrics_registry)
        ports["metrics"] = httpd.server_port
    if settings.port_file:
        _write_port_file(settings.port_file, ports)
    log.info("%s listening on %s (instance %s)", settings.service, address, settings.instance)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    app_started = asyncio.Event()

    async def start_session() -> None:
        await session.start()

    registered = False

    async def register_once() -> None:
        nonlocal registered
        if not registered:
            await register(session, settings.service, settings.instance, address)
            registered = True

    leader: asyncio.Task | None = None

    async def start_app() -> None:
        nonlocal leader
        await app.start()
        if app.election and leader is None:
            leader = asyncio.create_task(_campaign(app, session, settings.instance), name=f"{settings.service}-leader")
        app_started.set()

    async def health_loop() -> None:
        serving = False
        while not stop.is_set():
            try:
                await etcd.ping(timeout=1.0)
                ok = app_started.is_set() and app.ready() and session.lease_id != 0 and verifier.loaded
                if ok:
                    await register_once()
            except errors.Unavailable:
                ok = False
            if ok != serving:
                serving = ok
                log.info("health: %s", "SERVING" if ok else "NOT_SERVING")
                await set_health(ok)
                if ok:
                    trim_heap()
            await wait_event(stop, 0.5 if ok else 0.1)

    tasks = [
        asyncio.create_task(_retry_until_done("etcd session", start_session, stop)),
        asyncio.create_task(_retry_until_done(f"{settings.service} start", start_app, stop)),
        asyncio.create_task(health_loop()),
    ]
    if not app.provides_verification_keys:
        tasks.append(asyncio.create_task(follow_verification_keys(directory, verifier)))

    await stop.wait()
    log.info("%s shutting down", settings.service)
    await set_health(False)
    if registered:
        with contextlib.suppress(errors.Unavailable, asyncio.TimeoutError):
            await asyncio.wait_for(deregister(session, settings.service, settings.instance), 2.0)
    if front:
        await front.stop()
    await server.stop(settings.grace_seconds)
    if leader is not None:
        leader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await leader
    with contextlib.suppress(Exception):
        await app.stop()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await directory.close()
    if session.lease_id:
        await session.close()
    await etcd.close()
    if front and front.failed:
        raise SystemExit(1)


def run(settings: Settings, factory: Callable[[Platform], ServiceApp]) -> None:
    """The body of every service's `__main__`."""
    configure_logging(settings.log_level)
    try:
        asyncio.run(serve(settings, factory))
    except KeyboardInterrupt:
        pass
