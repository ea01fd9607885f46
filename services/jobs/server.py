"""The jobs service's app: the index, the core, the scheduler and the runtime."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys

from cloudml.jobs.v1 import jobs_service_pb2 as pb
from cloudml.jobs.v1 import jobs_service_pb2_grpc as pb_grpc
from services.common.confine import Confiner
from services.common.runtime.base import Amount, Runtime
from services.common.uploads import UploadLimits, Uploads
from services.common.server import Platform, ServiceApp
from services.jobs.core import Defaults, JobsCore
from services.jobs.envs import EnvCache
from services.jobs.observability import JobsMetrics
from services.common.quota import QuotaClient
from services.jobs.scheduler import Scheduler, SchedulerSettings
from services.jobs.servicer import JobsServicer
from services.jobs.store import JobIndex, JobStore

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["JobsService"].full_name


def runtime_state_dir(data_dir: str, runtime: str) -> str:
    """Shared by every service that places replicas on this runtime, so
    that they share (and account) the machine's capacity."""
    return os.path.join(data_dir, "runtime", runtime)


def make_runtime(name: str, data_dir: str, extra) -> Runtime:
    if name != "local":
        raise SystemExit(f"error: --runtime {name!r} is not available (only 'local')")
    from services.common.runtime.local import LocalRuntime

    total = None
    cpu, memory = getattr(extra, "capacity_cpu", None), getattr(extra, "capacity_memory", None)
    if cpu is not None or memory is not None:
        probe = LocalRuntime(runtime_state_dir(data_dir, name)).total()
        total = Amount(cpu if cpu is not None else probe.cpu_millis,
                       memory if memory is not None else probe.memory_bytes, probe.gpus)
    return LocalRuntime(runtime_state_dir(data_dir, name), total=total)


class JobsApp(ServiceApp):
    grpc_services = (SERVICE,)

    def __init__(self, platform: Platform):
        super().__init__(platform)
        settings = platform.settings
        extra = settings.extra
        if not settings.data_dir:
            raise SystemExit("error: the jobs service needs --data-dir")
        data_dir = os.path.abspath(settings.data_dir)
        self.runtime = make_runtime(getattr(extra, "runtime", "local"), data_dir, extra)
        self.index = JobIndex(platform.etcd)
        self.store = JobStore(platform.etcd, self.index)
        quota = QuotaClient(platform.directory, platform.identity)
        defaults = Defaults(
            cpu_millis=getattr(extra, "default_cpu", None) or Defaults.cpu_millis,
            memory_bytes=getattr(extra, "default_memory", None) or Defaults.memory_bytes,
            gpus=getattr(extra, "default_gpus", None) or Defaults.gpus,
        )
        metrics = JobsMetrics(platform.metrics_registry)
        storage = os.path.join(data_dir, "storage")
        schemes = getattr(extra, "allowed_uri_schemes", "") or ""
        uploads = Uploads(storage, getattr(self.runtime, "tenancy", None), UploadLimits.from_settings(extra))
        self.core = JobsCore(self.store, self.index, quota, self.runtime, data_dir, defaults, metrics=metrics,
                             confiner=Confiner(storage, schemes), uploads=uploads)
        tenancy = getattr(self.runtime, "tenancy", None)
        if tenancy is not None:  # tenant code must reach its own directories below the data dir
            tenancy.ensure_reachable(data_dir)
        envs = EnvCache(getattr(extra, "envs_dir", None) or os.path.join(data_dir, "envs"), getattr(extra, "base_python", None) or sys.executable,
                        install_args=tuple(getattr(extra, "install_arg", None) or ()), tenancy=tenancy)
        self.scheduler = Scheduler(
            platform.session, self.store, self.index, quota, self.runtime, envs,
            SchedulerSettings(data_dir=data_dir, instance=settings.instance,
                              stop_grace=getattr(extra, "stop_grace", 3.0), allowed_uri_schemes=schemes),
            metrics=metrics,
        )
        self._scheduler_task: asyncio.Task | None = None
        self._ready = False

    def add_to_server(self, server) -> None:
        pb_grpc.add_JobsServiceServicer_to_server(JobsServicer(self.core), server)

    async def start(self) -> None:
        if self.index._task is None:
            self.index.start()
        await self.index.wait_synced(30)
        if self._scheduler_task is None:
            self._scheduler_task = asyncio.create_task(self.scheduler.run(), name="jobs-scheduler")
        self._ready = True
        log.info("jobs: %d job record(s) loaded; runtime %s with %s", len(self.index), self.runtime.name,
                 self.runtime.total())

    def ready(self) -> bool:
        return self._ready

    async def stop(self) -> None:
        # Replica processes keep running: the next leader adopts them.
        if self._scheduler_task:
            self._scheduler_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._scheduler_task
        await self.index.stop()
