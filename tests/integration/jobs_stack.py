"""A real jobs platform slice for tests and benchmarks: its own etcd, an auth
service and one or more jobs service processes on loopback, plus a small
synchronous client.

    stack = JobsStack(workdir, etcd_endpoint=etcd_server.endpoint).start()
    jobs = stack.start_jobs()            # python -m services.jobs ...
    client = stack.admin()               # JobsClient with the admin's token
    client.submit("j1", spec(client.upload(sdist), ...))
    client.wait("j1")
    stack.stop()

Trainer packages reach a job as a user's do: uploaded (JobsService/
UploadPackage) into the submitting tenant's storage, whose `file://` URI is
the spec's trainer_uri; the platform refuses local paths outside that
storage. `client.packages(built)` gives a tenant's view of packages built on
this machine, each uploaded on first use, once per tenant and stack.

Every stack has an etcd keyspace of its own: a key namespace on the
session's etcd (`etcd_endpoint`) or an etcd it starts, and the runtime's
state is per data dir, so tests that kill services never disturb others.
Trainer environments can be shared between stacks (`envs_dir`), so each
package is installed once per session.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import grpc

from cloudml.auth.v1 import auth_service_pb2 as auth_pb
from cloudml.auth.v1 import auth_service_pb2_grpc as auth_grpc
from cloudml.common.v1.resources_pb2 import Resources
from cloudml.jobs.v1 import jobs_service_pb2 as pb
from cloudml.jobs.v1 import jobs_service_pb2_grpc as pb_grpc
from deploy.local.service_process import ServiceProcess
from deploy.local.stack import Stack
from deploy.local.supervisor import stop_replicas  # noqa: F401 - tuner_stack and tests take it from here
from services.common.tokens import new_secret_key

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ADMIN_KEY = "AKJOBSTESTADMIN00000"
FINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}
MiB = 1 << 20
UPLOAD_CHUNK = 1 << 20


def build_packages(out_dir: str) -> dict[str, str]:
    """{example: sdist path} of every example trainer (examples/build_packages.py)."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "build_packages.py"), out_dir, "--json"],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"building the example packages failed:\n{result.stdout}{result.stderr}")
    return json.loads(result.stdout)


def replica_spec(kind: int, count: int = 1, cpu: int = 100, memory: int = 512 * MiB, gpus: int = 0) -> pb.ReplicaSpec:
    return pb.ReplicaSpec(type=kind, replica_count=count,
                          resources=Resources(cpu_millis=cpu, memory_bytes=memory, gpus=gpus))


def spec(package: str, module: str, args: list[str] | str = (), *, replicas: list[pb.ReplicaSpec] | None = None,
         **fields) -> pb.TrainJobSpec:
    """A TrainJobSpec; `package` a URI (an uploaded package's) or an absolute
    path; `args` as a list (job_args) or the seed's one string (job_args_line)."""
    uri = package if "://" in package else "file://" + package
    message = pb.TrainJobSpec(trainer_uri=uri, module_name=module, **fields)
    if isinstance(args, str):
        message.job_args_line = args
    else:
        message.job_args.extend(args)
    message.replica_specs.extend(replicas if replicas is not None else [replica_spec(pb.REPLICA_TYPE_MASTER)])
    return message


def upload_requests(path: str, tenant: str = "") -> Iterator[pb.UploadPackageRequest]:
    """An UploadPackage stream of the file at `path`, 1 MiB a message."""
    with open(path, "rb") as f:
        first = True
        while True:
            data = f.read(UPLOAD_CHUNK)
            if data or first:
                yield pb.UploadPackageRequest(tenant=tenant if first else "",
                                              file_name=os.path.basename(path) if first else "", data=data)
            if not data:
                return
            first = False


class UploadCache:
    """{(tenant, local path): stored URI} of one stack's uploads, so that each
    package goes up once per tenant (uploads are content-addressed: sending it
    again would give the same URI). Thread-safe."""

    def __init__(self):
        self._uris: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def get(self, tenant: str, path: str, upload) -> str:
        key = (tenant, os.path.abspath(path))
        with self._lock:
            if key not in self._uris:
                self._uris[key] = upload()
            return self._uris[key]


class TenantPackages(Mapping):
    """Packages built on this machine ({name: path}) as one tenant submits
    them: {name: URI in its storage}, each uploaded on first use."""

    def __init__(self, client: "JobsClient", built: Mapping[str, str]):
        self.client, self.built = client, built

    def __getitem__(self, name: str) -> str:
        return self.client.upload(self.built[name])

    def __iter__(self):
        return iter(self.built)

    def __len__(self) -> int:
        return len(self.built)


@dataclass
class JobsClient:
    """Sync JobsService and AuthService stubs acting as one principal."""

    channel: grpc.Channel
    auth_channel: grpc.Channel
    token: str
    tenant: str
    uploads: UploadCache = field(default_factory=UploadCache)

    def __post_init__(self):
        self.stub = pb_grpc.JobsServiceStub(self.channel)
        self.auth = auth_grpc.AuthServiceStub(self.auth_channel)

    @property
    def md(self):
        return (("authorization", f"Bearer {self.token}"),)

    def call(self, method: str, request, timeout: float = 20.0):
        return getattr(self.stub, method)(request, metadata=self.md, timeout=timeout)

    def submit(self, name: str, job_spec: pb.TrainJobSpec, tenant: str = "", validate_only: bool = False):
        return self.call("SubmitJob", pb.SubmitJobRequest(tenant=tenant, name=name, spec=job_spec,
                                                           validate_only=validate_only))

    def upload_package(self, path: str, tenant: str = "") -> pb.UploadPackageResponse:
        """UploadPackage of the file at `path`, every time (no cache)."""
        return self.stub.UploadPackage(upload_requests(path, tenant), metadata=self.md, timeout=60)

    def upload(self, path: str, tenant: str = "") -> str:
        """The URI of the package at `path` in the tenant's storage (default:
        this client's), uploaded once per tenant and stack."""
        tenant = tenant or self.tenant
        return self.uploads.get(tenant, path, lambda: self.upload_package(path, tenant).uri)

    def packages(self, built: Mapping[str, str]) -> TenantPackages:
        """`built` ({name: local path}) as this client's tenant submits them."""
        return TenantPackages(self, built)

    def get(self, name: str, tenant: str = "") -> pb.TrainJob:
        return self.call("GetJob", pb.GetJobRequest(tenant=tenant, name=name)).job

    def cancel(self, name: str, tenant: str = "") -> pb.TrainJob:
        return self.call("CancelJob", pb.CancelJobRequest(tenant=tenant, name=name)).job

    def wait(self, name: str, states=FINAL, timeout: float = 120.0, tenant: str = "") -> pb.TrainJob:
        """Polls GetJob until the job is in one of `states`."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(name, tenant)
            if job.state in states:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {name} still {pb.JobState.Name(job.state)} after {timeout}s: "
                                   f"{[(pb.JobState.Name(e.state), e.reason, e.message) for e in job.events]}")
            time.sleep(0.05)

    def logs(self, name: str, *, follow: bool = False, replicas=(), tail_lines: int = 0, timeout: float = 120.0,
             tenant: str = "") -> list[pb.LogLine]:
        request = pb.StreamLogsRequest(tenant=tenant, name=name, follow=follow, tail_lines=tail_lines,
                                       replicas=list(replicas))
        lines = []
        for response in self.stub.StreamLogs(request, metadata=self.md, timeout=timeout):
            lines.extend(response.lines)
        return lines

    def metrics(self, name: str, names=(), start_step: int = 0, tenant: str = "") -> list[pb.MetricSeries]:
        return list(self.call("GetJobMetrics", pb.GetJobMetricsRequest(
            tenant=tenant, name=name, metric_names=list(names), start_step=start_step)).series)

    def set_quota(self, tenant: str, **limits) -> None:
        self.auth.SetQuota(auth_pb.SetQuotaRequest(tenant=tenant, limits=Resources(**limits)),
                           metadata=self.md, timeout=10)

    def usage(self, tenant: str) -> Resources:
        return self.auth.GetQuota(auth_pb.GetQuotaRequest(tenant=tenant), metadata=self.md, timeout=10).usage


class JobsStack:
    """etcd (`etcd_endpoint`: a namespace on a shared one; default: its own),
    an auth service (the admin's key is the services' own too) and jobs
    services started one by one (`start_jobs`), with clients; a thin layer on
    the harness of deploy/local/stack.py (`harness`)."""

    def __init__(self, workdir: str, envs_dir: str | None = None, lease_ttl: int = 3, *,
                 etcd_endpoint: str | None = None):
        self.secret = new_secret_key()
        self.harness = Stack(workdir, etcd_endpoint=etcd_endpoint, admin=(ADMIN_KEY, self.secret), service=None,
                             lease_ttl=lease_ttl,
                             service_flags={"jobs": ["--envs-dir", envs_dir] if envs_dir else []})
        self.workdir = self.harness.workdir
        self._channels: list[grpc.Channel] = []
        self._uploads = UploadCache()

    def start(self) -> "JobsStack":
        self.harness.start()
        return self

    @property
    def etcd(self):
        return self.harness.etcd

    @property
    def auth(self) -> ServiceProcess:
        return self.harness.auth

    @property
    def gateway(self) -> ServiceProcess | None:
        return self.harness.gateway

    @property
    def jobs(self) -> list[ServiceProcess]:
        return self.harness.processes.setdefault("jobs", [])

    @property
    def credentials(self) -> str:
        return self.harness.credentials

    def start_jobs(self, data_dir: str | None = None, *, wait: bool = True, extra: list[str] = ()) -> ServiceProcess:
        return self.harness.start_service("jobs", f"jobs-{len(self.jobs)}", data_dir=data_dir, extra=extra,
                                          wait=60 if wait else None)

    def start_gateway(self) -> ServiceProcess:
        """The platform's gateway in front of this stack (for the CLI and SDK)."""
        return self.gateway or self.harness.start_gateway("gateway")[0]

    def cli_env(self) -> dict[str, str]:
        """Environment for `cloudml ...` as the admin, through the gateway."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDML_")}
        env.update(CLOUDML_ENDPOINT=self.start_gateway().address, CLOUDML_ACCESS_KEY=ADMIN_KEY,
                   CLOUDML_SECRET_KEY=self.secret, CLOUDML_CONFIG=os.path.join(self.workdir, "cli-config.json"))
        return env

    def _channel(self, address: str) -> grpc.Channel:
        channel = grpc.insecure_channel(address)
        self._channels.append(channel)
        return channel

    def client(self, jobs: ServiceProcess | None = None, *, tenant: str = "admin", access_key: str = ADMIN_KEY,
               secret: str | None = None) -> JobsClient:
        jobs = jobs or self.harness.alive("jobs")
        token = self.harness.issue_token((access_key, secret or self.secret))
        return JobsClient(self._channel(jobs.poll_address()), self._channel(self.auth.address), token, tenant,
                          self._uploads)

    def admin(self, jobs: ServiceProcess | None = None) -> JobsClient:
        return self.client(jobs)

    def new_tenant(self, prefix: str = "t", jobs: ServiceProcess | None = None) -> JobsClient:
        """Creates a tenant and returns a member client of it."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        access_key, secret = self.harness.create_tenant(name)
        return self.client(jobs, tenant=name, access_key=access_key, secret=secret)

    def storage(self, tenant: str, data_dir: str | None = None) -> str:
        """The tenant's storage on the jobs services of `data_dir` (default: the stack's)."""
        return os.path.join(data_dir or self.harness.data_dir, "storage", tenant)

    def stop(self) -> None:
        for channel in self._channels:
            channel.close()
        # Replicas outlive the jobs service by design; a test leaves none behind.
        self.harness.stop(replica_grace=1.0)
