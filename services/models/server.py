"""The models service's app: the API servicer (every process) and the
deployment reconciler (only on the elected leader).

Files under the data directory (DIR):

    DIR/storage/<tenant>/models/<model>/<version>/   SavedModels the CLI uploads (GetUploadLocation)
    DIR/runtime/local/                               the local runtime's state (replica records, the machine's
                                                     capacity ledger), shared with the jobs service
    DIR/models/replicas/<runtime id>/                a replica's working directory: port.json, replica.log
    DIR/models/cache/<tenant>/<model>/<v>-<hash>/    SavedModels fetched from remote URIs

Replicas listen on Unix sockets outside DIR (paths must stay short):
/run/cloudml-<hash of DIR>/<tenant>/ (else under the temp dir), see
`Reconciler.socket_dir`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from cloudml.models.v1 import models_service_pb2 as pb
from cloudml.models.v1 import models_service_pb2_grpc as pb_grpc
from services.common.confine import Confiner
from services.common.etcd import Election, run_as_leader
from services.common.uploads import UploadLimits, Uploads
from services.common.runtime.base import Amount, Runtime
from services.common.server import Platform, ServiceApp
from services.models import store
from services.models.core import Defaults, ModelsCore
from services.common.quota import QuotaClient
from services.models.reconciler import Reconciler, ReconcilerMetrics, ReconcilerSettings
from services.models.servicer import ModelsServicer

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["ModelsService"].full_name


def runtime_state_dir(data_dir: str, kind: str) -> str:
    """The runtime's state, shared with the jobs service (the same path as
    `services.jobs.server.runtime_state_dir`): one capacity ledger for the
    machine, so train jobs and model replicas never over-commit it together.
    Each service adopts only its own replicas ("models.*" here)."""
    return os.path.join(data_dir, "runtime", kind)


def make_runtime(kind: str, data_dir: str, extra) -> Runtime:
    if kind != "local":
        raise SystemExit(f"error: runtime {kind!r} is not available (only 'local')")
    from services.common.runtime.local import LocalRuntime  # noqa: PLC0415

    state_dir = runtime_state_dir(data_dir, kind)
    total = None
    cpu, memory = getattr(extra, "capacity_cpu", None), getattr(extra, "capacity_memory", None)
    if cpu is not None or memory is not None:
        probe = LocalRuntime(state_dir).total()
        total = Amount(cpu if cpu is not None else probe.cpu_millis,
                       memory if memory is not None else probe.memory_bytes, probe.gpus)
    return LocalRuntime(state_dir, total=total)


class ModelsApp(ServiceApp):
    grpc_services = (SERVICE,)

    def __init__(self, platform: Platform):
        super().__init__(platform)
        settings = platform.settings
        extra = settings.extra
        if not settings.data_dir:
            raise SystemExit("error: the models service needs --data-dir")
        data_dir = os.path.abspath(settings.data_dir)
        self.runtime = make_runtime(extra.runtime, data_dir, extra)
        tenancy = getattr(self.runtime, "tenancy", None)
        if tenancy is not None:  # replicas (tenant code) must reach their working directories below the data dir
            tenancy.ensure_reachable(data_dir)
        self.auth = QuotaClient(platform.directory, platform.identity)
        storage = extra.storage_dir or os.path.join(data_dir, "storage")
        self.core = ModelsCore(
            platform.etcd, self.auth, self.runtime, storage_root=storage,
            defaults=Defaults(cpu_millis=extra.default_cpu_millis, memory_bytes=extra.default_memory_bytes),
            confiner=Confiner(storage, getattr(extra, "allowed_uri_schemes", "") or ""),
            uploads=Uploads(storage, getattr(self.runtime, "tenancy", None), UploadLimits.from_settings(extra)),
        )
        self.reconciler = Reconciler(
            platform.etcd, self.runtime, self.auth,
            ReconcilerSettings(
                data_dir=data_dir, stop_grace=extra.stop_grace, target_inflight=extra.target_inflight,
                scale_down_delay=extra.scale_down_delay,
            ),
            metrics=ReconcilerMetrics(platform.metrics_registry), confiner=self.core.confiner,
        )
        self.leading = False
        self._leader_task: asyncio.Task | None = None

    def add_to_server(self, server) -> None:
        pb_grpc.add_ModelsServiceServicer_to_server(ModelsServicer(self.core), server)

    async def start(self) -> None:
        await self.platform.etcd.ping(timeout=2.0)
        if self._leader_task is None:
            self._leader_task = asyncio.create_task(self._lead(), name="models-leader")

    async def _lead(self) -> None:
        session = self.platform.session
        while not session.lease_id:  # the bootstrap starts the session beside the app
            await asyncio.sleep(0.05)
        election = Election(session, store.ELECTION, self.platform.settings.instance.encode())

        def changed(leading: bool) -> None:
            self.leading = leading
            self.reconciler.metrics.leader.set(1 if leading else 0)

        await run_as_leader(election, self.reconciler.run, on_change=changed)

    async def stop(self) -> None:
        if self._leader_task is not None:
            self._leader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._leader_task
