"""The jobs service's app: the index, the core, the scheduler and the runtime."""
from __future__ import annotations

import asyncio
import logging
import os
import sys
from dataclasses import dataclass

from cloudml.internal.v1 import pages_pb2 as pages_pb
from cloudml.internal.v1 import pages_pb2_grpc as pages_grpc
from cloudml.jobs.v1 import dev_environments_pb2 as dev_pb
from cloudml.jobs.v1 import dev_environments_pb2_grpc as dev_grpc
from cloudml.jobs.v1 import jobs_service_pb2 as pb
from cloudml.jobs.v1 import jobs_service_pb2_grpc as pb_grpc
from services.common.archive import Archive
from services.common.confine import Confiner
from services.common.etcd_maintenance import EtcdMaintenance, EtcdMaintenanceMetrics, EtcdMaintenanceSettings
from services.common.runtime.factory import make_runtime
from services.common.uploads import Uploads
from services.common.server import Platform, ServiceApp
from services.jobs.archiver import JobArchive, JobArchiver
from services.jobs.core import Defaults, JobsCore
from services.jobs.envs import EnvCache
from services.jobs.observability import JobsMetrics
from services.common.quota import QuotaClient
from services.jobs.scheduler import Scheduler, SchedulerSettings
from services.jobs.devenvs import DevEnvironments, DevEnvSettings
from services.jobs.servicer import DevEnvironmentServicer, JobsServicer, PageBackendsServicer
from services.jobs.tensorboards import TensorBoards, TensorBoardSettings
from services.jobs.store import ELECTION, JobIndex, JobStore

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["JobsService"].full_name
DEV = dev_pb.DESCRIPTOR.services_by_name["DevEnvironmentService"].full_name
PAGES = pages_pb.DESCRIPTOR.services_by_name["PageBackends"].full_name


@dataclass(frozen=True)
class JobsSettings:
    """The jobs service's own flags (`python -m services.jobs --help`), built in its __main__."""

    runtime: str = "local"
    #: kubernetes runtime: kubeconfig (None: in-cluster credentials), namespace, default trainer image
    kubeconfig: str | None = None
    namespace: str | None = None
    image: str | None = None
    #: kubernetes runtime: PersistentVolumeClaims of the storage and the package cache (kube_objects.PodVolumes)
    storage_claim: str | None = None
    package_cache_claim: str | None = None
    #: per-replica resources for amounts a spec leaves at zero
    defaults: Defaults = Defaults()
    #: the local runtime's capacity (None: the machine's cores / physical memory - 1Gi)
    capacity_cpu: int | None = None
    capacity_memory: int | None = None
    #: SIGTERM -> SIGKILL when replicas are stopped
    stop_grace: float = SchedulerSettings.stop_grace
    #: the interpreter trainer environments are built on (None: this one)
    base_python: str | None = None
    #: where trainer environments are cached (None: DIR/envs)
    envs_dir: str | None = None
    #: extra `uv pip install` arguments for trainer packages
    install_args: tuple[str, ...] = ()
    #: TensorBoards (services.jobs.tensorboards)
    max_tensorboards: int = TensorBoardSettings.max_per_tenant
    tensorboard_idle_seconds: float = TensorBoardSettings.idle_seconds
    tensorboard_cpu: int = TensorBoardSettings.cpu_millis
    tensorboard_memory: int = TensorBoardSettings.memory_bytes
    #: dev environments (services.jobs.devenvs)
    dev_idle_seconds: float = DevEnvSettings.idle_seconds
    dev_cpu: int = DevEnvSettings.cpu_millis
    dev_memory: int = DevEnvSettings.memory_bytes
    dev_port: int = DevEnvSettings.port
    #: the gateway's gRPC address for the kernels' config (None: DIR/credentials.json's "endpoint")
    gateway_endpoint: str | None = None
    #: compaction, defragmentation and size metrics of etcd (the leader runs them for the platform)
    etcd_maintenance: EtcdMaintenanceSettings = EtcdMaintenanceSettings()


class JobsApp(ServiceApp):
    grpc_services = (SERVICE, DEV, PAGES)
    election = ELECTION

    def __init__(self, platform: Platform, settings: JobsSettings = JobsSettings()):
        super().__init__(platform)
        common = platform.settings
        if not common.data_dir:
            raise SystemExit("error: the jobs service needs --data-dir")
        data_dir = os.path.abspath(common.data_dir)
        self.runtime = make_runtime(settings.runtime, data_dir, settings.capacity_cpu, settings.capacity_memory,
                                    kubeconfig=settings.kubeconfig, namespace=settings.namespace, image=settings.image,
                                    storage_claim=settings.storage_claim,
                                    package_cache_claim=settings.package_cache_claim)
        self.index = JobIndex(platform.etcd)
        self.store = JobStore(platform.etcd, self.index)
        quota = QuotaClient(platform.directory, platform.identity)
        metrics = JobsMetrics(platform.metrics_registry)
        storage = os.path.join(data_dir, "storage")
        schemes = common.allowed_uri_schemes
        uploads = Uploads(storage, getattr(self.runtime, "tenancy", None), common.uploads)
        self.archive = JobArchive(Archive(common.archive.root(data_dir)))
        self.core = JobsCore(self.store, self.index, quota, self.runtime, data_dir, settings.defaults,
                             metrics=metrics, confiner=Confiner(storage, schemes), uploads=uploads,
                             archive=self.archive)
        self.archiver = JobArchiver(self.store, self.archive, common.archive, on_archived=metrics.archived.inc)
        self.maintenance = EtcdMaintenance(platform.etcd, settings.etcd_maintenance,
                                           EtcdMaintenanceMetrics(platform.metrics_registry))
        metrics.live.set_function(lambda: len(self.index))
        tenancy = getattr(self.runtime, "tenancy", None)
        if tenancy is not None:  # tenant code must reach its own directories below the data dir
            tenancy.ensure_reachable(data_dir)
        envs = EnvCache(settings.envs_dir or os.path.join(data_dir, "envs"), settings.base_python or sys.executable,
                        install_args=settings.install_args, tenancy=tenancy)
        self.scheduler = Scheduler(
            self.store, self.index, quota, self.runtime, envs,
            SchedulerSettings(data_dir=data_dir, instance=common.instance, stop_grace=settings.stop_grace,
                              allowed_uri_schemes=schemes),
            metrics=metrics,
        )
        self.tensorboards = TensorBoards(
            platform.etcd, quota, self.runtime, Confiner(storage, schemes), self._job,
            TensorBoardSettings(data_dir=data_dir, python=sys.executable, cpu_millis=settings.tensorboard_cpu,
                                memory_bytes=settings.tensorboard_memory, max_per_tenant=settings.max_tensorboards,
                                idle_seconds=settings.tensorboard_idle_seconds, stop_grace=settings.stop_grace))
        endpoint, rest_endpoint = _gateway_endpoints(data_dir, settings.gateway_endpoint)
        self.devenvs = DevEnvironments(
            platform.etcd, quota, self.runtime,
            DevEnvSettings(data_dir=data_dir, python=sys.executable, endpoint=endpoint, rest_endpoint=rest_endpoint,
                           cpu_millis=settings.dev_cpu, memory_bytes=settings.dev_memory,
                           idle_seconds=settings.dev_idle_seconds, stop_grace=settings.stop_grace,
                           port=settings.dev_port))
        self._index_started = False
        self._ready = False

    async def _job(self, tenant: str, name: str):
        found = await self.core.find(tenant, name)
        return found[0] if found is not None else None

    def add_to_server(self, server) -> None:
        pb_grpc.add_JobsServiceServicer_to_server(JobsServicer(self.core, self.tensorboards), server)
        dev_grpc.add_DevEnvironmentServiceServicer_to_server(DevEnvironmentServicer(self.devenvs), server)
        pages_grpc.add_PageBackendsServicer_to_server(PageBackendsServicer(self.tensorboards, self.devenvs), server)

    async def start(self) -> None:
        if not self._index_started:
            self.index.start()
            self._index_started = True
        await self.index.wait_synced(30)
        self._ready = True
        log.info("jobs: %d live job(s) loaded; runtime %s with %s", len(self.index), self.runtime.name,
                 self.runtime.total())

    def ready(self) -> bool:
        return self._ready and self.runtime.synced

    async def lead(self) -> None:
        # All until this process stops leading (cancelled together).
        await self.store.ensure_index_keys()
        async with asyncio.TaskGroup() as group:
            group.create_task(self.archiver.run(), name="jobs-archiver")
            group.create_task(self.maintenance.run(), name="etcd-maintenance")
            group.create_task(self.scheduler.lead(), name="jobs-scheduler")
            group.create_task(self.tensorboards.lead(), name="jobs-tensorboards")
            group.create_task(self.devenvs.lead(), name="jobs-devenvs")

    async def stop(self) -> None:
        # The scheduler is already cancelled; replica processes keep running:
        # the next leader adopts them.
        await self.index.stop()


def _gateway_endpoints(data_dir: str, endpoint: str | None) -> tuple[str, str]:
    """The gateway's gRPC and REST addresses for kernels: the flag, else the
    local platform's DIR/credentials.json (only its endpoints are read)."""
    import json

    rest = ""
    if not endpoint:
        try:
            with open(os.path.join(data_dir, "credentials.json")) as f:
                data = json.load(f)
            endpoint, rest = data.get("endpoint", ""), data.get("rest_endpoint", "")
        except (OSError, ValueError, AttributeError):
            endpoint = ""
    return endpoint or "", rest or ""
