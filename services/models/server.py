"""The models service's app: the API servicer (every process) and the
deployment reconciler (only on the elected leader).

Files under the data directory (DIR):

    DIR/storage/<tenant>/models/<model>/<version>/   SavedModels the CLI uploads (GetUploadLocation)
    DIR/runtime/local/                               the local runtime's state (replica records, the machine's
                                                     capacity ledger), shared with the jobs service
    DIR/models/replicas/<runtime id>/                a replica's working directory: port.json, replica.log
    DIR/models/cache/<tenant>/<model>/<v>-<hash>/    SavedModels fetched from remote URIs
    DIR/models/exports/<runtime id>/                 an export process's working directory (the tenant's)
    DIR/models/artifacts/<tenant>/<model>/<v>/<id>/  exported artifacts (model.tflite), the platform's own
    DIR/archive/versions/<tenant>/<model>/           versions that ended (failed) more than --retention-seconds
                                                     ago, with their exports' records (archiver.py;
                                                     --archive-uri puts the archive elsewhere)

Replicas listen on Unix sockets outside DIR (paths must stay short):
/run/cloudml-<hash of DIR>/<tenant>/ (else under the temp dir), see
`Reconciler.socket_dir`.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

from cloudml.models.v1 import models_service_pb2 as pb
from cloudml.models.v1 import models_service_pb2_grpc as pb_grpc
from services.common.archive import Archive
from services.common.confine import Confiner
from services.common.uploads import Uploads
from services.common.runtime.factory import make_runtime
from services.common.server import Platform, ServiceApp
from services.models.archiver import VersionArchive, VersionArchiver
from services.models.store import ModelStore
from services.models.core import ModelsCore
from services.models.exports import ExportDriver, ExportSettings
from services.models.rules import Defaults
from services.common.quota import QuotaClient
from services.models.reconciler import Reconciler, ReconcilerMetrics, ReconcilerSettings
from services.models.servicer import ModelsServicer

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["ModelsService"].full_name


@dataclass(frozen=True)
class ModelsSettings:
    """The models service's own flags (`python -m services.models --help`), built in its __main__."""

    runtime: str = "local"
    #: kubernetes runtime: kubeconfig (None: in-cluster credentials), namespace, the model-server image,
    #: the storage's PersistentVolumeClaim, the port replicas serve on in their Pods
    kubeconfig: str | None = None
    namespace: str | None = None
    model_image: str = "cloudml/model-server:latest"
    storage_claim: str | None = None
    replica_port: int = 8500
    #: the platform's storage root (None: DIR/storage)
    storage_dir: str | None = None
    #: what a zero in a version's spec takes
    defaults: Defaults = Defaults()
    #: the local runtime's capacity (None: the machine's cores / physical memory - 1Gi)
    capacity_cpu: int | None = None
    capacity_memory: int | None = None
    stop_grace: float = ReconcilerSettings.stop_grace
    target_inflight: float = ReconcilerSettings.target_inflight
    scale_down_delay: float = ReconcilerSettings.scale_down_delay


class ModelsApp(ServiceApp):
    grpc_services = (SERVICE,)

    def __init__(self, platform: Platform, settings: ModelsSettings = ModelsSettings()):
        super().__init__(platform)
        common = platform.settings
        if not common.data_dir:
            raise SystemExit("error: the models service needs --data-dir")
        data_dir = os.path.abspath(common.data_dir)
        self.runtime = make_runtime(settings.runtime, data_dir, settings.capacity_cpu, settings.capacity_memory,
                                    kubeconfig=settings.kubeconfig, namespace=settings.namespace,
                                    image=settings.model_image, storage_claim=settings.storage_claim)
        tenancy = getattr(self.runtime, "tenancy", None)
        if tenancy is not None:  # replicas (tenant code) must reach their working directories below the data dir
            tenancy.ensure_reachable(data_dir)
        self.auth = QuotaClient(platform.directory, platform.identity)
        storage = settings.storage_dir or os.path.join(data_dir, "storage")
        self.store = ModelStore(platform.etcd)
        self.election = self.store.keys.election
        export_settings = ExportSettings(data_dir=data_dir)
        self.archive = VersionArchive(Archive(common.archive.root(data_dir)), export_settings.artifacts_dir)
        self.core = ModelsCore(
            platform.etcd, self.auth, self.runtime, storage_root=storage, store=self.store, archive=self.archive,
            defaults=settings.defaults, confiner=Confiner(storage, common.allowed_uri_schemes),
            uploads=Uploads(storage, getattr(self.runtime, "tenancy", None), common.uploads),
        )
        self.reconciler = Reconciler(
            platform.etcd, self.runtime, self.auth,
            ReconcilerSettings(
                data_dir=data_dir, stop_grace=settings.stop_grace, target_inflight=settings.target_inflight,
                scale_down_delay=settings.scale_down_delay, replica_port=settings.replica_port,
            ),
            metrics=ReconcilerMetrics(platform.metrics_registry), confiner=self.core.confiner, store=self.store,
        )
        self.exports = ExportDriver(platform.etcd, self.runtime, self.auth, export_settings,
                                    confiner=self.core.confiner, store=self.store)
        self.archiver = VersionArchiver(self.store, self.archive, common.archive, on_archived=self.reconciler.archived)
        self.leading = False

    def add_to_server(self, server) -> None:
        pb_grpc.add_ModelsServiceServicer_to_server(ModelsServicer(self.core), server)

    async def start(self) -> None:
        await self.platform.etcd.ping(timeout=2.0)

    def ready(self) -> bool:
        """NOT_SERVING until the runtime knows the cluster (kubernetes: listed)."""
        return self.runtime.synced

    async def lead(self) -> None:
        # Both loops end together when leadership is lost (or either fails).
        async with asyncio.TaskGroup() as group:
            group.create_task(self.reconciler.run(), name="models-reconciler")
            group.create_task(self.exports.run(), name="models-exports")
            group.create_task(self.archiver.run(), name="models-archiver")

    def leadership_changed(self, leading: bool) -> None:
        self.leading = leading
        self.reconciler.metrics.leader.set(1 if leading else 0)
