"""The platform started piece by piece, for tests and benchmarks that must
reach, configure or kill each process; `cloudml-platform` is the way to run
the whole platform.

    stack = Stack(workdir, etcd_endpoint=shared).start("models", "gateway")
    ... stack.gateway.address, stack.auth.address, stack.rest_port, stack.issue_token() ...
    jobs = stack.start_service("jobs", extra=["--stop-grace", "5"])
    async with stack.etcd.client() as etcd: ...     # this stack's keys, as its services see them
    stack.stop()

etcd: a `Stack` starts one of its own (DIR/etcd), or, given `etcd_endpoint`
(the tests' session etcd), runs its services under a key namespace of their
own on that one (`--etcd-namespace`, a fresh `/cloudml-test/<hex>` unless
`namespace` says otherwise; "" for the whole keyspace). Stacks on one etcd
under different namespaces never see each other; a stack whose test kills
or restarts etcd needs its own.

Keys: the bootstrap admin (`admin`) and the key the services call each other
with (`service`; None: the admin's own), both of tenant admin. Every file of
a process is DIR/<name>.port and DIR/<name>.log.

`AuthGatewayStack` is the etcd + auth + gateway slice the gateway's tests and
benches use.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import urllib.request
import uuid
from dataclasses import dataclass, field

from deploy.local.etcd import EtcdProcess, free_port
from deploy.local.service_process import ServiceProcess, service_command

ADMIN = ("AKSTACKADMIN00000000", "stack-admin-secret")
SERVICE = ("AKSTACKSERVICE000000", "stack-service-secret")
#: services that take --data-dir (their runtime state and tenants' storage live there)
DATA_SERVICES = ("jobs", "models", "tuner")


def fresh_namespace() -> str:
    return f"/cloudml-test/{uuid.uuid4().hex[:12]}"


@dataclass
class EtcdTarget:
    """Where a stack keeps its state: an etcd endpoint, the key namespace on
    it, and the etcd process when the stack started it itself."""

    endpoint: str
    namespace: str = ""
    process: EtcdProcess | None = None

    async def connect(self):
        """A `services.common.etcd.Etcd` in this namespace (close it after use)."""
        from services.common.etcd import Etcd  # noqa: PLC0415 - keeps aetcd out of CLI-only imports

        return await Etcd.connect(self.endpoint, namespace=self.namespace)

    @contextlib.asynccontextmanager
    async def client(self):
        etcd = await self.connect()
        try:
            yield etcd
        finally:
            await etcd.close()

    def get_prefix(self, prefix: str) -> dict[str, bytes]:
        """{key: value} under `prefix`, from synchronous code."""
        async def read():
            async with self.client() as etcd:
                kvs, _, _ = await etcd.get_prefix(prefix)
            return {kv.key: kv.value for kv in kvs}

        return asyncio.run(read())

    def put(self, key: str, value: bytes) -> None:
        """Writes one key, from synchronous code."""
        async def write():
            async with self.client() as etcd:
                await etcd.put(key, value)

        asyncio.run(write())

    def delete_prefix(self, prefix: str) -> int:
        """Deletes every key under `prefix`, from synchronous code."""
        async def delete():
            async with self.client() as etcd:
                return await etcd.delete_prefix(prefix)

        return asyncio.run(delete())


def as_target(etcd: EtcdTarget | str) -> EtcdTarget:
    return etcd if isinstance(etcd, EtcdTarget) else EtcdTarget(etcd)


def write_json_file(path: str, data) -> str:
    """Writes `data` to `path`, readable by this user only (keys are secrets)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    return path


def write_bootstrap(path: str, *keys: tuple[str, str]) -> str:
    """The auth service's --bootstrap-file: each (access key, secret) a key of tenant admin."""
    return write_json_file(path, {"keys": [{"access_key": k, "secret_key": s, "tenant": "admin"} for k, s in keys]})


def auth_flags(bootstrap: str, kek_file: str) -> list[str]:
    return ["--bootstrap-file", bootstrap, "--key-encryption-key-file", kek_file]


def start_service(service: str, etcd: EtcdTarget | str, workdir: str, name: str | None = None, *,
                  listen: str = "127.0.0.1:0", data_dir: str | None = None, credentials_file: str | None = None,
                  extra: list[str] | tuple[str, ...] = (), env: dict | None = None,
                  wait: float | None = 30.0) -> ServiceProcess:
    """`python -m services.<service>` on `etcd` (DIR/<name>.port, DIR/<name>.log);
    waits up to `wait` seconds until it is SERVING (None: returns at once)."""
    target, name = as_target(etcd), name or service
    port_file = os.path.join(workdir, f"{name}.port")
    command = service_command(service, target.endpoint, port_file, listen=listen, data_dir=data_dir,
                              credentials_file=credentials_file, etcd_namespace=target.namespace, extra=extra)
    process = ServiceProcess(service, command, port_file, log_path=os.path.join(workdir, f"{name}.log"),
                             env=env).start()
    return process.wait_serving(wait) if wait else process


@dataclass
class Stack:
    workdir: str
    #: a running etcd to share (None: start one of its own in DIR/etcd)
    etcd_endpoint: str | None = None
    #: the key namespace on a shared etcd (None: a fresh one; "": none)
    namespace: str | None = None
    admin: tuple[str, str] = ADMIN
    #: the services' own key (None: they use the admin's)
    service: tuple[str, str] | None = SERVICE
    #: extra flags for every service, e.g. ["--log-level", "WARNING"]
    flags: list[str] = field(default_factory=list)
    #: --lease-ttl of jobs, models and tuner (None: their default)
    lease_ttl: int | None = None
    #: flags of each service beyond `flags`, e.g. {"models": ["--stop-grace", "10"]}
    service_flags: dict[str, list[str]] = field(default_factory=dict)
    etcd: EtcdTarget | None = None
    auth: ServiceProcess | None = None
    gateway: ServiceProcess | None = None
    rest_port: int = 0
    #: every service process started, by service, in start order
    processes: dict[str, list[ServiceProcess]] = field(default_factory=dict)
    _started: list[ServiceProcess] = field(default_factory=list)

    def __post_init__(self):
        self.workdir = str(self.workdir)

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    @property
    def kek_file(self) -> str:
        """The auth service's key-encryption key (any further auth process on this etcd needs it)."""
        return self.path("kek")

    @property
    def credentials(self) -> str:
        """The services' credentials file ({access_key, secret_key})."""
        return self.path("service-credentials.json")

    @property
    def data_dir(self) -> str:
        """The default --data-dir of jobs, models and tuner."""
        return self.path("data")

    # --- start-up -------------------------------------------------------------------------

    def start(self, *services: str, auth: bool = True) -> "Stack":
        """etcd (or the namespace on a shared one), auth (unless `auth` is
        False: the admin key then belongs to an auth service already on that
        etcd), then `services` in order, each SERVING before the next."""
        os.makedirs(self.workdir, exist_ok=True)
        if self.etcd is None:
            if self.etcd_endpoint:
                namespace = fresh_namespace() if self.namespace is None else self.namespace
                self.etcd = EtcdTarget(self.etcd_endpoint, namespace)
            else:
                process = EtcdProcess(self.path("etcd"), log_path=None).start()
                self.etcd = EtcdTarget(process.endpoint, self.namespace or "", process)
        write_json_file(self.credentials, dict(zip(("access_key", "secret_key"), self.service or self.admin)))
        if auth:
            keys = [self.admin] + ([self.service] if self.service and self.service != self.admin else [])
            bootstrap = write_bootstrap(self.path("bootstrap.json"), *keys)
            self.auth = self.start_service("auth", extra=auth_flags(bootstrap, self.kek_file))
        for service in services:
            if service == "gateway":
                self.start_gateway()
            else:
                self.start_service(service, wait=60)
        return self

    def start_service(self, service: str, name: str | None = None, *, data_dir: str | None = None,
                      extra: list[str] | tuple[str, ...] = (), env: dict | None = None, listen: str = "127.0.0.1:0",
                      wait: float | None = 30.0) -> ServiceProcess:
        """One more process of `service` on this stack's etcd (files DIR/<name>.*;
        default name: the service's, then <service>-<n>). Jobs, models and tuner
        get a data dir (default DIR/data), the services' key and --lease-ttl."""
        started = self.processes.setdefault(service, [])
        name = name or (service if not started else f"{service}-{len(started)}")
        flags = [*self.flags, *self.service_flags.get(service, ()), *extra]
        if service in DATA_SERVICES:
            data_dir = data_dir or self.data_dir
            if self.lease_ttl is not None:
                flags = ["--lease-ttl", str(self.lease_ttl), *flags]
        process = start_service(service, self.etcd, self.workdir, name, listen=listen, data_dir=data_dir,
                                credentials_file=None if service == "auth" else self.credentials,
                                extra=flags, env=env, wait=wait)
        started.append(process)
        self._started.append(process)
        return process

    def start_gateway(self, name: str = "gw", env: dict | None = None) -> tuple[ServiceProcess, int]:
        """A gateway (files DIR/<name>.port, .log) on this etcd; returns it and
        its REST port. The first one is `gateway` / `rest_port`."""
        rest_port = free_port()
        gateway = self.start_service("gateway", name, listen=f"127.0.0.1:{free_port()}", env=env,
                                     extra=["--rest-listen", f"127.0.0.1:{rest_port}"])
        if self.gateway is None:
            self.gateway, self.rest_port = gateway, rest_port
        return gateway, rest_port

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def alive(self, service: str) -> ServiceProcess:
        """The newest running process of `service`."""
        return next(p for p in reversed(self.processes.get(service, [])) if p.alive())

    # --- keys and tokens --------------------------------------------------------------------

    def _auth_call(self, method: str, request, token: str = ""):
        import grpc  # noqa: PLC0415

        from cloudml.auth.v1 import auth_service_pb2_grpc as pb_grpc  # noqa: PLC0415

        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        address = self.auth.address if self.auth else self.gateway.address
        with grpc.insecure_channel(address) as channel:
            return getattr(pb_grpc.AuthServiceStub(channel), method)(request, metadata=metadata, timeout=10)

    def issue_token(self, key: tuple[str, str] | None = None, ttl_seconds: int = 0) -> str:
        """A token of `key` (default: the admin's)."""
        from cloudml.auth.v1 import auth_service_pb2 as pb  # noqa: PLC0415

        access_key, secret = key or self.admin
        return self._auth_call("IssueToken", pb.IssueTokenRequest(access_key_id=access_key, secret_key=secret,
                                                                   ttl_seconds=ttl_seconds)).token

    def create_tenant(self, tenant: str) -> tuple[str, str]:
        """Creates `tenant` and an access key of it (as the admin); returns the key."""
        from cloudml.auth.v1 import auth_service_pb2 as pb  # noqa: PLC0415

        admin = self.issue_token()
        self._auth_call("CreateTenant", pb.CreateTenantRequest(name=tenant), admin)
        created = self._auth_call("CreateAccessKey", pb.CreateAccessKeyRequest(tenant=tenant), admin)
        return created.access_key.access_key_id, created.secret_key

    def tenant_token(self, tenant: str) -> str:
        """Creates `tenant` and an access key of it and returns a token of that key."""
        return self.issue_token(self.create_tenant(tenant))

    def dataplane_calls(self) -> dict[str, int]:
        """The gateway data plane's call counts by path (cloudml_gateway_dataplane_calls_total)."""
        text = urllib.request.urlopen(f"{self.rest}/metrics", timeout=5).read().decode()
        return {m.group(1): int(float(m.group(2)))
                for m in re.finditer(r'cloudml_gateway_dataplane_calls_total\{path="(\w+)"\} (\S+)', text)}

    # --- shut-down ---------------------------------------------------------------------------

    def data_dirs(self) -> set[str]:
        """Every data dir a process of this stack ran on."""
        dirs = set()
        for process in self._started:
            if "--data-dir" in process.command:
                dirs.add(process.command[process.command.index("--data-dir") + 1])
        return dirs

    def stop(self, replica_grace: float = 2.0) -> None:
        """Everything in reverse start order, with the runtime's replicas (they
        outlive their services by design) once jobs and models are down, then
        etcd; on a shared etcd the namespace's keys go."""
        from deploy.local.supervisor import stop_replicas  # noqa: PLC0415

        for process in reversed(self._started):
            if process.service != "auth":
                process.stop()
        for data_dir in sorted(self.data_dirs()):
            stop_replicas(data_dir, replica_grace)
        for process in self.processes.get("auth", []):
            process.stop()
        if self.etcd is None:
            return
        if self.etcd.process is not None:
            self.etcd.process.stop()
        elif self.etcd.namespace:
            with contextlib.suppress(Exception):
                self.etcd.delete_prefix("")


class AuthGatewayStack(Stack):
    """etcd, auth and a gateway (`start()`), for the gateway's tests and benches."""

    def start(self, *services: str, auth: bool = True) -> "AuthGatewayStack":
        return super().start(*services, "gateway", auth=auth)
