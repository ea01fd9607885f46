"""The tuner service's app: the core (every process) and the driver (leader only)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from cloudml.tuner.v1 import tuner_service_pb2 as pb
from cloudml.tuner.v1 import tuner_service_pb2_grpc as pb_grpc
from services.common.confine import Confiner
from services.common.etcd import Election, run_as_leader
from services.common.server import Platform, ServiceApp
from services.tuner import algorithms
from services.tuner.clients import JobsClient, StudyQuota
from services.tuner.core import TunerCore
from services.tuner.driver import Driver, DriverSettings
from services.tuner.servicer import TunerServicer
from services.tuner.store import ELECTION, TunerStore

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["TunerService"].full_name


class TunerApp(ServiceApp):
    grpc_services = (SERVICE,)

    def __init__(self, platform: Platform):
        super().__init__(platform)
        settings = platform.settings
        algorithms.quiet_optuna()
        data_dir = os.path.abspath(settings.data_dir) if settings.data_dir else ""
        self.store = TunerStore(platform.etcd)
        self.jobs = JobsClient(platform.directory, platform.identity)
        confiner = (Confiner(os.path.join(data_dir, "storage"), getattr(settings.extra, "allowed_uri_schemes", "") or "")
                    if data_dir else None)
        self.core = TunerCore(self.store, self.jobs, StudyQuota(platform.directory, platform.identity), data_dir,
                              confiner=confiner)
        poll = getattr(settings.extra, "poll_seconds", 1.0)
        self.driver = Driver(platform.etcd, self.core, self.store, self.jobs, DriverSettings(poll_seconds=poll))
        self._leader_task: asyncio.Task | None = None
        self._ready = False

    def add_to_server(self, server) -> None:
        pb_grpc.add_TunerServiceServicer_to_server(TunerServicer(self.core), server)

    async def start(self) -> None:
        await self.platform.etcd.ping()
        if self._leader_task is None:
            self._leader_task = asyncio.create_task(self._lead(), name="tuner-leader")
        self._ready = True

    async def _lead(self) -> None:
        session = self.platform.session
        while session.lease_id == 0:  # the bootstrap starts the session beside the app
            await asyncio.sleep(0.05)
        election = Election(session, ELECTION, self.platform.settings.instance.encode())
        await run_as_leader(election, self.driver.run)

    def ready(self) -> bool:
        return self._ready

    async def stop(self) -> None:
        if self._leader_task:
            self._leader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._leader_task
