"""cloudml.tuner.v1.TunerService over `TunerCore`: check shape, call, respond."""
from __future__ import annotations

from cloudml.tuner.v1 import tuner_service_pb2 as pb
from cloudml.tuner.v1 import tuner_service_pb2_grpc as pb_grpc
from services.common import errors
from services.common.tokens import principal
from services.tuner.core import TunerCore


class TunerServicer(pb_grpc.TunerServiceServicer):
    def __init__(self, core: TunerCore):
        self.core = core

    async def CreateStudy(self, request, context):
        if not request.HasField("spec"):
            raise errors.InvalidArgument("spec is required")
        study, created = await self.core.create_study(principal(), request.tenant, request.name, request.spec)
        return pb.CreateStudyResponse(study=study, created=created)

    async def GetStudy(self, request, context):
        return pb.GetStudyResponse(study=await self.core.get_study(principal(), request.tenant, request.name))

    async def ListStudies(self, request, context):
        studies, token = await self.core.list_studies(principal(), request.tenant, list(request.states),
                                                      request.page_size, request.page_token)
        return pb.ListStudiesResponse(studies=studies, next_page_token=token)

    async def CancelStudy(self, request, context):
        return pb.CancelStudyResponse(study=await self.core.cancel_study(principal(), request.tenant, request.name))

    async def DeleteStudy(self, request, context):
        await self.core.delete_study(principal(), request.tenant, request.name)
        return pb.DeleteStudyResponse()

    async def ListTrials(self, request, context):
        trials, token = await self.core.list_trials(principal(), request.tenant, request.study, list(request.states),
                                                    request.page_size, request.page_token)
        return pb.ListTrialsResponse(trials=trials, next_page_token=token)

    async def GetTrial(self, request, context):
        trial = await self.core.get_trial(principal(), request.tenant, request.study, request.number)
        return pb.GetTrialResponse(trial=trial)

    async def ShouldStopTrial(self, request, context):
        stop, reason = await self.core.should_stop_trial(principal(), request.tenant, request.study, request.number)
        return pb.ShouldStopTrialResponse(should_stop=stop, reason=reason)

    async def SuggestTrials(self, request, context):
        trials = await self.core.suggest_trials(principal(), request.tenant, request.study, request.count,
                                                request.client_id)
        return pb.SuggestTrialsResponse(trials=trials)
