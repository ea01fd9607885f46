"""The tuner service's app: the core (every process) and the driver (leader only)."""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

from cloudml.tuner.v1 import tuner_service_pb2 as pb
from cloudml.tuner.v1 import tuner_service_pb2_grpc as pb_grpc
from services.common.archive import Archive
from services.common.confine import Confiner
from services.common.server import Platform, ServiceApp
from services.tuner.archiver import StudyArchive, StudyArchiver
from services.tuner.clients import JobsClient, StudyQuota
from services.tuner.core import TunerCore
from services.tuner.driver import Driver, DriverSettings
from services.tuner.servicer import TunerServicer
from services.tuner.store import ELECTION, TunerStore

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["TunerService"].full_name


@dataclass(frozen=True)
class TunerSettings:
    """The tuner service's own flags (`python -m services.tuner --help`), built in its __main__."""

    #: how often the driver reads running trials' metrics for early stopping
    poll_seconds: float = DriverSettings.poll_seconds


class TunerApp(ServiceApp):
    grpc_services = (SERVICE,)
    election = ELECTION

    def __init__(self, platform: Platform, settings: TunerSettings = TunerSettings()):
        super().__init__(platform)
        common = platform.settings
        data_dir = os.path.abspath(common.data_dir) if common.data_dir else ""
        self.store = TunerStore(platform.etcd)
        self.jobs = JobsClient(platform.directory, platform.identity)
        confiner = Confiner(os.path.join(data_dir, "storage"), common.allowed_uri_schemes) if data_dir else None
        # Without a data dir (and no --archive-uri) nothing is archived: studies stay in etcd.
        archive = StudyArchive(Archive(common.archive.root(data_dir))) if data_dir or common.archive.uri else None
        self.archiver = StudyArchiver(self.store, archive, common.archive) if archive else None
        self.core = TunerCore(self.store, self.jobs, StudyQuota(platform.directory, platform.identity), data_dir,
                              confiner=confiner, archive=archive)
        self.driver = Driver(platform.etcd, self.core, self.store, self.jobs,
                             DriverSettings(poll_seconds=settings.poll_seconds))
        self._ready = False

    def add_to_server(self, server) -> None:
        pb_grpc.add_TunerServiceServicer_to_server(TunerServicer(self.core), server)

    async def start(self) -> None:
        await self.platform.etcd.ping()
        self._ready = True

    async def lead(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self.driver.run(), name="tuner-driver")
            if self.archiver:
                group.create_task(self.archiver.run(), name="tuner-archiver")

    def ready(self) -> bool:
        return self._ready
