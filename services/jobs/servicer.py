"""cloudml.jobs.v1.JobsService over `JobsCore`: check shape, call, respond."""
from __future__ import annotations

from cloudml.internal.v1 import pages_pb2 as pages_pb
from cloudml.internal.v1 import pages_pb2_grpc as pages_grpc
from cloudml.jobs.v1 import jobs_service_pb2 as pb
from cloudml.jobs.v1 import jobs_service_pb2_grpc as pb_grpc
from cloudml.jobs.v1 import dev_environments_pb2 as dev_pb
from cloudml.jobs.v1 import dev_environments_pb2_grpc as dev_grpc
from cloudml.jobs.v1 import tensorboards_pb2 as tb_pb
from services.common import errors
from services.common.tokens import principal
from services.jobs.core import JobsCore
from services.jobs.records import seconds
from services.jobs.devenvs import DevEnvironments
from services.jobs.tensorboards import TensorBoards
from services.jobs.tfconfig import ROLES, Replica


def _replica(message: pb.ReplicaId, field: str) -> Replica:
    if message.type not in ROLES:
        raise errors.InvalidArgument(f"{field}.type must be MASTER, CHIEF, PS, WORKER or EVALUATOR")
    if message.index < 0:
        raise errors.InvalidArgument(f"{field}.index must not be negative")
    return Replica(message.type, message.index)


class JobsServicer(pb_grpc.JobsServiceServicer):
    def __init__(self, core: JobsCore, tensorboards: TensorBoards | None = None):
        self.core = core
        self.tensorboards = tensorboards

    async def SubmitJob(self, request, context):
        job, created = await self.core.submit(principal(), request.tenant, request.name, request.spec,
                                              request.validate_only)
        return pb.SubmitJobResponse(job=job, created=created)

    async def GetJob(self, request, context):
        return pb.GetJobResponse(job=await self.core.get(principal(), request.tenant, request.name))

    async def ListJobs(self, request, context):
        jobs, token = await self.core.list(principal(), request.tenant, list(request.states), request.page_size,
                                           request.page_token)
        return pb.ListJobsResponse(jobs=jobs, next_page_token=token)

    async def CancelJob(self, request, context):
        return pb.CancelJobResponse(job=await self.core.cancel(principal(), request.tenant, request.name))

    async def DeleteJob(self, request, context):
        await self.core.delete(principal(), request.tenant, request.name)
        return pb.DeleteJobResponse()

    async def StreamLogs(self, request, context):
        replicas = [_replica(r, f"replicas[{i}]") for i, r in enumerate(request.replicas)]
        async for lines in self.core.stream_logs(principal(), request.tenant, request.name, replicas,
                                                 request.follow, request.tail_lines):
            yield pb.StreamLogsResponse(lines=lines)

    async def GetJobMetrics(self, request, context):
        series = await self.core.get_metrics(principal(), request.tenant, request.name, list(request.metric_names),
                                             request.start_step)
        return pb.GetJobMetricsResponse(series=series)

    async def WatchJob(self, request, context):
        async for job in self.core.watch(principal(), request.tenant, request.name):
            yield pb.WatchJobResponse(job=job)

    async def UploadPackage(self, request_iterator, context):
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.file_name:
            raise errors.InvalidArgument("file_name is required in the first message")

        async def chunks():
            yield first.data
            async for message in request_iterator:
                if (message.tenant and message.tenant != first.tenant) or (
                        message.file_name and message.file_name != first.file_name):
                    raise errors.InvalidArgument("tenant and file_name may only be set in the first message")
                yield message.data

        stored = await self.core.upload_package(principal(), first.tenant, first.file_name, chunks())
        return pb.UploadPackageResponse(uri=stored.uri, size_bytes=stored.size_bytes, sha256=stored.sha256)

    async def ReportMetrics(self, request, context):
        replica = _replica(request.replica, "replica") if request.HasField("replica") else None
        wall = seconds(request.wall_time) if request.HasField("wall_time") else 0.0
        await self.core.report_metrics(principal(), request.tenant, request.job_name, replica, request.attempt,
                                       request.step, dict(request.metrics), wall)
        return pb.ReportMetricsResponse()

    # --- TensorBoards (services.jobs.tensorboards) ---

    async def CreateTensorBoard(self, request, context):
        board = await self.tensorboards.create(principal(), request.tenant, request.name, request.logdir, request.job,
                                               request.runs)
        return tb_pb.CreateTensorBoardResponse(tensorboard=board)

    async def GetTensorBoard(self, request, context):
        return tb_pb.GetTensorBoardResponse(
            tensorboard=await self.tensorboards.get(principal(), request.tenant, request.name))

    async def ListTensorBoards(self, request, context):
        return tb_pb.ListTensorBoardsResponse(tensorboards=await self.tensorboards.list(principal(), request.tenant))

    async def DeleteTensorBoard(self, request, context):
        await self.tensorboards.delete(principal(), request.tenant, request.name)
        return tb_pb.DeleteTensorBoardResponse()


class DevEnvironmentServicer(dev_grpc.DevEnvironmentServiceServicer):
    """cloudml.jobs.v1.DevEnvironmentService over `DevEnvironments`."""

    def __init__(self, devenvs: DevEnvironments):
        self.devenvs = devenvs

    async def CreateDevEnvironment(self, request, context):
        env = await self.devenvs.create(principal(), request.tenant, request.name, request.resources, request.image)
        return dev_pb.CreateDevEnvironmentResponse(dev_environment=env)

    async def GetDevEnvironment(self, request, context):
        return dev_pb.GetDevEnvironmentResponse(
            dev_environment=await self.devenvs.get(principal(), request.tenant, request.name))

    async def ListDevEnvironments(self, request, context):
        return dev_pb.ListDevEnvironmentsResponse(
            dev_environments=await self.devenvs.list(principal(), request.tenant))

    async def StopDevEnvironment(self, request, context):
        return dev_pb.StopDevEnvironmentResponse(
            dev_environment=await self.devenvs.stop(principal(), request.tenant, request.name))

    async def StartDevEnvironment(self, request, context):
        return dev_pb.StartDevEnvironmentResponse(
            dev_environment=await self.devenvs.start(principal(), request.tenant, request.name))

    async def DeleteDevEnvironment(self, request, context):
        await self.devenvs.delete(principal(), request.tenant, request.name)
        return dev_pb.DeleteDevEnvironmentResponse()


class PageBackendsServicer(pages_grpc.PageBackendsServicer):
    """cloudml.internal.v1.PageBackends for the gateway: where a TensorBoard or a notebook server listens."""

    def __init__(self, tensorboards: TensorBoards, devenvs: DevEnvironments | None = None):
        self.tensorboards = tensorboards
        self.devenvs = devenvs

    async def ResolvePage(self, request, context):
        if request.kind == "tensorboard":
            address = await self.tensorboards.resolve(principal(), request.tenant, request.name)
            return pages_pb.ResolvePageResponse(address=address, cache_seconds=2)
        if request.kind == "dev" and self.devenvs is not None:
            address, authorization = await self.devenvs.resolve(principal(), request.tenant, request.name)
            return pages_pb.ResolvePageResponse(address=address, cache_seconds=2, authorization=authorization)
        raise errors.NotFound(f"no {request.kind!r} pages here")
