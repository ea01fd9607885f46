"""The tuner's calls to other services: the jobs API (trials run as train
jobs of the study's tenant) and the auth service's quota (the `studies`
reservation).

Every call carries the tuner's own token (`ServiceIdentity`, an admin-tenant
key, so it may act in the study's tenant) and a deadline; failures come back
as typed errors (`errors.from_rpc_error`). The core and the driver depend on
these small interfaces only, so they can be exercised with fakes.
"""
from __future__ import annotations

from typing import AsyncIterator

import grpc

from cloudml.common.v1 import resources_pb2
from cloudml.jobs.v1 import jobs_service_pb2 as jobs_pb
from cloudml.jobs.v1 import jobs_service_pb2_grpc as jobs_grpc
from services.common import errors
from services.common.identity import ServiceIdentity
from services.common.quota import QuotaClient, ServiceCaller
from services.common.registry import Directory

CALL_TIMEOUT = 10.0


class JobsClient(ServiceCaller):
    def __init__(self, directory: Directory, identity: ServiceIdentity | None):
        super().__init__(directory, identity, "jobs", timeout=CALL_TIMEOUT)

    async def submit(self, tenant: str, name: str, spec: jobs_pb.TrainJobSpec,
                     validate_only: bool = False) -> tuple[jobs_pb.TrainJob, bool]:
        resp = await self.call(jobs_grpc.JobsServiceStub, "SubmitJob", jobs_pb.SubmitJobRequest(
            tenant=tenant, name=name, spec=spec, validate_only=validate_only))
        return resp.job, resp.created

    async def get(self, tenant: str, name: str) -> jobs_pb.TrainJob:
        return (await self.call(jobs_grpc.JobsServiceStub, "GetJob",
                                 jobs_pb.GetJobRequest(tenant=tenant, name=name))).job

    async def cancel(self, tenant: str, name: str) -> jobs_pb.TrainJob | None:
        """Cancels a job; None when there is no such job."""
        try:
            resp = await self.call(jobs_grpc.JobsServiceStub, "CancelJob",
                                    jobs_pb.CancelJobRequest(tenant=tenant, name=name))
        except errors.NotFound:
            return None
        return resp.job

    async def metrics(self, tenant: str, name: str, metric: str) -> list[jobs_pb.MetricSeries]:
        resp = await self.call(jobs_grpc.JobsServiceStub, "GetJobMetrics", jobs_pb.GetJobMetricsRequest(
            tenant=tenant, name=name, metric_names=[metric]))
        return list(resp.series)

    async def watch(self, tenant: str, name: str) -> AsyncIterator[jobs_pb.TrainJob]:
        """The job's snapshots until it is final (the stream has no deadline:
        it lasts as long as the job)."""
        stub = jobs_grpc.JobsServiceStub(self.directory.channel(self.service))
        call = stub.WatchJob(jobs_pb.WatchJobRequest(tenant=tenant, name=name), metadata=await self.metadata())
        try:
            async for resp in call:
                yield resp.job
        except grpc.aio.AioRpcError as err:
            raise errors.from_rpc_error(err) from err
        finally:
            call.cancel()


class StudyQuota(QuotaClient):
    """The auth service's quota, as the tuner uses it."""

    async def reserve_study(self, tenant: str, owner_id: str) -> bool:
        """Holds one `studies` unit; True when this call made the reservation.
        ResourceExhausted (quota 0), QuotaBusy (all in use), NotFound (tenant)."""
        return await self.reserve(tenant, owner_id, resources_pb2.Resources(studies=1))
