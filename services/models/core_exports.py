"""The exports and downloads of the models service's API (a mixin of
`ModelsCore`): ExportVersion, GetExport, ListExports and DownloadVersion.
No gRPC here, as in core.py.

An export is a record in etcd (export_records.py) that the export driver
(exports.py, on the leader) carries out; the API only checks, creates and
reads records. Downloads read the version's SavedModel where the version's
model_uri confines it (the tenant's own storage), or an artifact from the
platform's own copy, through `downloads.TreeReader`.
"""
from __future__ import annotations

import os
from typing import AsyncIterator

from cloudml.models.v1 import models_service_pb2 as pb
from services.common import errors, validation
from services.common.tokens import Principal
from services.models.downloads import TreeReader
from services.models.export_records import E, ExportRecord, check_options, export_id

S = pb.ModelVersionState


class ExportsAPI:
    """Uses `ModelsCore`'s `_tenant`, `_model`, `_find_version`, `store`, `confiner`, `clock`."""

    trees: TreeReader

    async def _live_version(self, tenant: str, model: str, number: int) -> pb.ModelVersion:
        version, _ = await self._live_found(tenant, model, number)
        return version

    async def _live_found(self, tenant: str, model: str, number: int) -> tuple[pb.ModelVersion, object | None]:
        """A version not being deleted, live or archived (then also its
        `archiver.ArchivedVersion`, whose exports are read only: an archived
        version exports nothing new)."""
        version, archived = await self._find_version(tenant, model, number)
        if version.HasField("delete_time"):
            raise errors.FailedPrecondition(f"version {number} of model {model!r} is being deleted")
        return version, archived

    async def _export_record(self, version: pb.ModelVersion, archived, ident: str) -> bytes | None:
        """One export record of a version by id (None: none), from etcd or the archived line."""
        if not ident or "/" in ident:
            return None
        if archived is not None:
            return archived.export(ident)
        return await self.store.get_export(version.tenant, version.model, version.version, ident)

    def _local_model(self, version: pb.ModelVersion) -> tuple[str, str]:
        """(root, relative) of the version's SavedModel in its tenant's storage."""
        where = self.confiner.check(version.tenant, version.model_uri, "model_version.model_uri")
        if not where.local:
            raise errors.FailedPrecondition(
                f"version {version.version} of model {version.model!r} is served from {version.model_uri}, "
                "not the platform's storage: fetch it from there")
        return where.root, where.relative

    # --- exports -------------------------------------------------------------------

    async def export_version(self, caller: Principal, tenant: str, model: str, number: int, fmt: int,
                             options: pb.ExportOptions) -> tuple[pb.Export, bool]:
        tenant = await self._tenant(caller, tenant)
        optimization, signature = check_options(fmt, options)
        version, archived = await self._live_found(tenant, model, number)
        ident = export_id(optimization, signature)
        existing = await self._export_record(version, archived, ident)
        if existing is not None:
            return ExportRecord.decode(existing).to_pb(), False
        if version.state != S.MODEL_VERSION_STATE_AVAILABLE:
            state = S.Name(version.state)[len("MODEL_VERSION_STATE_"):]
            raise errors.FailedPrecondition(
                f"version {number} of model {model!r} is {state}, not AVAILABLE: only a version that loaded "
                "can be exported")
        self._local_model(version)
        now = self.clock()
        record = ExportRecord(tenant=tenant, model=model, version=number, id=ident, optimization=optimization,
                              signature=signature, created=now, updated=now, source=version.model_uri)
        if await self.store.create_export(record):
            return record.to_pb(), True
        raw = await self.store.get_export(tenant, model, number, ident)  # made meanwhile by another call
        return ExportRecord.decode(raw).to_pb(), False

    async def get_export(self, caller: Principal, tenant: str, model: str, number: int, ident: str) -> pb.Export:
        tenant = await self._tenant(caller, tenant)
        version, archived = await self._live_found(tenant, model, number)
        raw = await self._export_record(version, archived, ident)
        if raw is None:
            raise errors.NotFound(f"export {ident!r} of version {number} of model {model!r} not found")
        return ExportRecord.decode(raw).to_pb()

    async def list_exports(self, caller: Principal, tenant: str, model: str, number: int) -> list[pb.Export]:
        tenant = await self._tenant(caller, tenant)
        _, archived = await self._live_found(tenant, model, number)
        raws = archived.exports if archived is not None else await self.store.list_exports(tenant, model, number)
        return [ExportRecord.decode(raw).to_pb() for raw in raws]

    # --- downloads -----------------------------------------------------------------

    async def download(self, caller: Principal, tenant: str, model: str, number: int, label: str, artifact: str,
                       path: str, offset: int, manifest_only: bool) -> AsyncIterator[pb.DownloadManifest |
                                                                                    pb.DownloadChunk]:
        """The manifest, then (unless `manifest_only`) the chunks."""
        tenant = await self._tenant(caller, tenant)
        validation.check_model_name(model, "model")
        if bool(number) == bool(label):
            raise errors.InvalidArgument("name either a version or a label")
        if number < 0:
            raise errors.InvalidArgument(f"version must be >= 1 (got {number})")
        if label:
            found, _ = await self._model(tenant, model)
            if label not in found.labels:
                raise errors.NotFound(f"model {model!r} has no label {label!r}")
            number = found.labels[label]
        version, archived = await self._live_found(tenant, model, number)
        if artifact:
            raw = await self._export_record(version, archived, artifact)
            if raw is None:
                raise errors.NotFound(f"version {number} of model {model!r} has no artifact {artifact!r} "
                                      "(see ListExports)")
            record = ExportRecord.decode(raw)
            if record.state != E.EXPORT_STATE_SUCCEEDED:
                state = E.Name(record.state)[len("EXPORT_STATE_"):]
                raise errors.FailedPrecondition(f"export {artifact!r} is {state}, not SUCCEEDED"
                                                + (f": {record.message}" if record.message else ""))
            root, relative = os.path.dirname(record.artifact_path), ""
        else:
            root, relative = self._local_model(version)
        manifest = await self.trees.manifest(root, relative)
        yield pb.DownloadManifest(
            version=number, artifact=artifact, size_bytes=manifest.size, sha256=manifest.sha256,
            files=[pb.ManifestFile(path=f.path, size_bytes=f.size, sha256=f.sha256) for f in manifest.files])
        if manifest_only:
            return
        async for rel, at, data in self.trees.chunks(root, relative, manifest, path, offset):
            yield pb.DownloadChunk(path=rel, offset=at, data=data)
