"""cloudml.models.v1.ModelsService over `ModelsCore`: check shape, call, respond."""
from __future__ import annotations

from cloudml.models.v1 import models_service_pb2 as pb
from cloudml.models.v1 import models_service_pb2_grpc as pb_grpc
from services.common import errors
from services.common.tokens import principal
from services.models.core import ModelsCore


class ModelsServicer(pb_grpc.ModelsServiceServicer):
    def __init__(self, core: ModelsCore):
        self.core = core

    async def CreateModel(self, request, context):
        model = await self.core.create_model(principal(), request.tenant, request.name, request.description,
                                             request.public)
        return pb.CreateModelResponse(model=model)

    async def GetModel(self, request, context):
        return pb.GetModelResponse(model=await self.core.get_model(principal(), request.tenant, request.name))

    async def ListModels(self, request, context):
        models, token = await self.core.list_models(principal(), request.tenant, request.page_size,
                                                    request.page_token)
        return pb.ListModelsResponse(models=models, next_page_token=token)

    async def UpdateModel(self, request, context):
        model = await self.core.update_model(principal(), request.tenant, request.name, request.model,
                                             list(request.update_mask.paths))
        return pb.UpdateModelResponse(model=model)

    async def DeleteModel(self, request, context):
        return pb.DeleteModelResponse(model=await self.core.delete_model(principal(), request.tenant, request.name))

    async def CreateVersion(self, request, context):
        version, created = await self.core.create_version(principal(), request.tenant, request.model,
                                                          request.model_version)
        return pb.CreateVersionResponse(model_version=version, created=created)

    async def GetVersion(self, request, context):
        version = await self.core.get_version(principal(), request.tenant, request.model, request.version)
        return pb.GetVersionResponse(model_version=version)

    async def ListVersions(self, request, context):
        versions, token = await self.core.list_versions(principal(), request.tenant, request.model,
                                                        request.page_size, request.page_token)
        return pb.ListVersionsResponse(model_versions=versions, next_page_token=token)

    async def DeleteVersion(self, request, context):
        version = await self.core.delete_version(principal(), request.tenant, request.model, request.version)
        return pb.DeleteVersionResponse(model_version=version)

    async def SetLabel(self, request, context):
        model = await self.core.set_label(principal(), request.tenant, request.model, request.label,
                                          request.version, request.allow_unavailable)
        return pb.SetLabelResponse(model=model)

    async def DeleteLabel(self, request, context):
        model = await self.core.delete_label(principal(), request.tenant, request.model, request.label)
        return pb.DeleteLabelResponse(model=model)

    async def ScaleVersion(self, request, context):
        version = await self.core.scale_version(principal(), request.tenant, request.model, request.version,
                                                request.min_replicas, request.max_replicas)
        return pb.ScaleVersionResponse(model_version=version)

    async def WatchModel(self, request, context):
        async for model, versions in self.core.watch_model(principal(), request.tenant, request.name):
            yield pb.WatchModelResponse(model=model, model_versions=versions)

    async def GetUploadLocation(self, request, context):
        uri = await self.core.upload_location(principal(), request.tenant, request.model, request.version)
        return pb.GetUploadLocationResponse(uri=uri)

    async def UploadModel(self, request_iterator, context):
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "header":
            raise errors.InvalidArgument("the first message must be the header (tenant, model)")

        async def chunks():
            async for message in request_iterator:
                if message.WhichOneof("part") != "chunk":
                    raise errors.InvalidArgument("only the first message may be a header; the others are chunks")
                yield message.chunk.path, message.chunk.data

        stored = await self.core.upload_model(principal(), first.header.tenant, first.header.model, chunks())
        return pb.UploadModelResponse(uri=stored.uri, size_bytes=stored.size_bytes, files=stored.files,
                                      sha256=stored.sha256)

    async def ExportVersion(self, request, context):
        export, created = await self.core.export_version(principal(), request.tenant, request.model,
                                                         request.version, request.format, request.options)
        return pb.ExportVersionResponse(export=export, created=created)

    async def GetExport(self, request, context):
        export = await self.core.get_export(principal(), request.tenant, request.model, request.version, request.id)
        return pb.GetExportResponse(export=export)

    async def ListExports(self, request, context):
        exports = await self.core.list_exports(principal(), request.tenant, request.model, request.version)
        return pb.ListExportsResponse(exports=exports)

    async def DownloadVersion(self, request, context):
        async for part in self.core.download(principal(), request.tenant, request.model, request.version,
                                             request.label, request.artifact, request.path, request.offset,
                                             request.manifest_only):
            if isinstance(part, pb.DownloadManifest):
                yield pb.DownloadVersionResponse(manifest=part)
            else:
                yield pb.DownloadVersionResponse(chunk=part)
