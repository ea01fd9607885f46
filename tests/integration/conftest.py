"""Fixtures for integration tests that talk to a real auth service process.

`auth_service` is one auth process for the whole session, on the session etcd
(`tests/conftest.py`). Its keys are global under `/cloudml/auth/`, so there is
one auth per etcd: tests share it and keep apart by using unique tenant names
(`new_tenant`). Tests that kill or restart etcd or auth start their own with
`start_auth` on their own `EtcdProcess`. Processes start through the
harness of `deploy/local/stack.py`. The jobs tests' trainer packages
(`built`) and environments (`envs_dir`), and the models tests'
half_plus_two SavedModel, are built once a session here.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field

import grpc
import pytest

from cloudml.auth.v1 import auth_service_pb2 as pb
from cloudml.auth.v1 import auth_service_pb2_grpc as pb_grpc
from deploy.local.service_process import ServiceProcess
from deploy.local.stack import EtcdTarget, auth_flags, start_service, write_bootstrap
from services.common.tokens import new_secret_key

ADMIN_ACCESS_KEY = "AKTESTADMIN000000000"


def start_auth(etcd: EtcdTarget | str, workdir: str, *, admin_secret: str, wait: bool = True,
               kek_file: str | None = None) -> ServiceProcess:
    """Starts `python -m services.auth` on 127.0.0.1:0 with a bootstrap admin key
    (and the key-encryption key `kek_file`, default WORKDIR/kek)."""
    os.makedirs(workdir, exist_ok=True)
    bootstrap = write_bootstrap(os.path.join(workdir, "bootstrap.json"), (ADMIN_ACCESS_KEY, admin_secret))
    return start_service("auth", etcd, workdir, extra=auth_flags(bootstrap, kek_file or os.path.join(workdir, "kek")),
                         wait=20 if wait else None)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class Client:
    """A sync AuthService stub acting as one principal."""

    stub: pb_grpc.AuthServiceStub
    access_key_id: str = ""
    secret_key: str = ""
    token: str = ""
    tenant: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def md(self):
        return bearer(self.token)

    def call(self, method: str, request, timeout: float = 10.0):
        return getattr(self.stub, method)(request, metadata=self.md, timeout=timeout)

    def login(self, ttl_seconds: int = 0, audience: str = "") -> "Client":
        self.token = self.stub.IssueToken(
            pb.IssueTokenRequest(
                access_key_id=self.access_key_id, secret_key=self.secret_key,
                ttl_seconds=ttl_seconds, audience=audience,
            ),
            timeout=10,
        ).token
        return self


@dataclass
class AuthService:
    process: ServiceProcess
    channel: grpc.Channel
    stub: pb_grpc.AuthServiceStub
    admin: Client
    admin_secret: str

    @property
    def address(self) -> str:
        return self.process.address

    def new_tenant(self, prefix: str = "t", description: str = "") -> Client:
        """Creates a uniquely named tenant and returns a logged-in member client of it."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.admin.call("CreateTenant", pb.CreateTenantRequest(name=name, description=description))
        return self.member_of(name)

    def as_key(self, access_key_id: str, secret_key: str, tenant: str = "") -> Client:
        """A logged-in client for an existing key (e.g. after a restart)."""
        return Client(self.stub, access_key_id, secret_key, tenant=tenant).login()

    def member_of(self, tenant: str, description: str = "") -> Client:
        created = self.admin.call("CreateAccessKey", pb.CreateAccessKeyRequest(tenant=tenant, description=description))
        return Client(self.stub, created.access_key.access_key_id, created.secret_key, tenant=tenant).login()


def connect(process: ServiceProcess, admin_secret: str) -> AuthService:
    channel = grpc.insecure_channel(process.address)
    stub = pb_grpc.AuthServiceStub(channel)
    admin = Client(stub, ADMIN_ACCESS_KEY, admin_secret, tenant="admin").login()
    return AuthService(process, channel, stub, admin, admin_secret)


class AuthLauncher:
    """Starts auth processes for one test (on an etcd or a namespace of its own) and stops them after it."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.secret = new_secret_key()
        self.processes: list[ServiceProcess] = []
        self.services: list[AuthService] = []

    def start(self, etcd: EtcdTarget | str, *, wait: bool = True) -> ServiceProcess:
        # A directory per process (port file, log); all share the admin key
        # and the key-encryption key.
        workdir = os.path.join(self.workdir, str(len(self.processes)))
        process = start_auth(etcd, workdir, admin_secret=self.secret, wait=wait,
                             kek_file=os.path.join(self.workdir, "kek"))
        self.processes.append(process)
        return process

    def connect(self, process: ServiceProcess) -> AuthService:
        service = connect(process, self.secret)
        self.services.append(service)
        return service

    def close(self) -> None:
        for service in self.services:
            service.channel.close()
        for process in self.processes:
            process.kill()


@pytest.fixture
def auth_launcher(tmp_path):
    launcher = AuthLauncher(str(tmp_path / "auth"))
    yield launcher
    launcher.close()


@pytest.fixture(scope="session")
def auth_service(etcd_server, tmp_path_factory):
    secret = new_secret_key()
    process = start_auth(etcd_server.endpoint, str(tmp_path_factory.mktemp("auth")), admin_secret=secret)
    service = connect(process, secret)
    yield service
    service.channel.close()
    process.stop()


@pytest.fixture(scope="module")
def kube_env(tmp_path_factory):
    """A real kube-apiserver (and its own etcd) for one test file, with an
    admin kubeconfig; tests play the kubelet (deploy/kubernetes/envtest.py).
    Fails, not skips, without the binary: scripts/setup.sh builds it."""
    from deploy.kubernetes.envtest import KubeEnv

    env = KubeEnv(str(tmp_path_factory.mktemp("kube"))).start()
    yield env
    env.stop()


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> dict[str, str]:
    """{example: sdist path} of the jobs tests' trainer packages, built once a
    session on this machine, outside any tenant's storage (test_tuner_service.py
    has its own)."""
    from tests.integration.jobs_stack import build_packages

    return build_packages(str(tmp_path_factory.mktemp("packages")))


@pytest.fixture(scope="session")
def envs_dir(tmp_path_factory) -> str:
    """The trainer environments every jobs stack of the session shares."""
    return str(tmp_path_factory.mktemp("envs"))


@pytest.fixture(scope="session")
def half_plus_two(tmp_path_factory) -> str:
    """TF Serving's half_plus_two v1 SavedModel, built once a session for the
    models tests' stacks (tests/integration/models_stack.py); read only."""
    from tests.integration.models_stack import build_half_plus_two

    return build_half_plus_two(str(tmp_path_factory.mktemp("half_plus_two")))
