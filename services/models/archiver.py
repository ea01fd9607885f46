"""Ended model versions leave etcd: the archiver (leader only) and the models
service's view of the archive (`services.common.archive`, kind "versions").

A version has ended when it is END: it failed to load and the reconciler
gave up, so nothing serves it or ever will (every other state is live: it
serves, may serve, or is being deleted and disappears by itself). Its
ended/ key (store.py), written in the transaction that moved it to END,
says since when. Once that is more than `retention_seconds` ago, and nothing
refers to it any more (no replica record or endpoint is left, the model is
not being deleted and none of its labels, its default_version or its
traffic split names it, each of its exports is final and holds nothing), it
moves as one record: the version and its exports' records. Their artifacts
stay in the platform's directory (DIR/models/artifacts/), still read
through those records.

The move is the jobs' (`services.jobs.archiver`): write the line and the
pointer, then delete the etcd keys (the version, its exports, its ended/
key) in one transaction under the mod_revisions of the version, the model,
the model's counter and each export (`ModelStore.remove_archived`). A
DeleteVersion or DeleteModel in between wins: the pointer is taken back.
Killed in between, the version is live and archived at once; readers prefer
the live record, and the next pass moves it again.

Archived versions are partitioned by model: the archive's tenant is
`<tenant>/<model>` and the name the version number in 19 digits, so name
order is version order and a model's versions list from one directory. A
line carries the model's create time; versions left by an earlier model of
the same name (a DeleteModel killed before it removed them) are never shown.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Callable

from cloudml.models.v1 import models_service_pb2 as pb
from services.common.archive import Archive, ArchiveSettings, Archiver, Pointer, Row
from services.models.export_records import ExportRecord
from services.models.store import ModelStore, VersionSnapshot

log = logging.getLogger(__name__)

KIND = "versions"
S = pb.ModelVersionState


def partition(tenant: str, model: str) -> str:
    return f"{tenant}/{model}"


def name_of(number: int) -> str:
    return f"{number:019d}"


def model_create_ns(model: pb.Model) -> int:
    return model.create_time.ToNanoseconds()


@dataclass
class ArchivedVersion:
    """One archived version: the record and its exports' records (JSON, export_records.py)."""

    version: pb.ModelVersion
    exports: list[bytes]
    #: the create time of the model it belongs to
    model_create_ns: int

    def row(self) -> Row:
        v = self.version
        created = v.create_time.ToNanoseconds()
        document = {"version": base64.b64encode(v.SerializeToString()).decode(),
                    "model_create_ns": self.model_create_ns, "exports": [e.decode() for e in self.exports]}
        return Row(name_of(v.version), str(created), created, S.Name(v.state),
                   json.dumps(document, sort_keys=True).encode())

    @classmethod
    def decode(cls, row: Row) -> "ArchivedVersion":
        data = json.loads(row.record)
        return cls(pb.ModelVersion.FromString(base64.b64decode(data["version"])),
                   [e.encode() for e in data["exports"]], int(data["model_create_ns"]))

    def export(self, ident: str) -> bytes | None:
        return next((raw for raw in self.exports if ExportRecord.decode(raw).id == ident), None)


class VersionArchive:
    """Archived versions: reads for the core, writes for the archiver.
    `artifacts_dir`: where exports' artifacts live (removed with their version)."""

    def __init__(self, archive: Archive, artifacts_dir: str | None = None):
        self.archive = archive
        self.artifacts_dir = os.path.realpath(artifacts_dir) if artifacts_dir else None

    async def get(self, model: pb.Model, number: int) -> ArchivedVersion | None:
        """The archived version `number` of this model (not of an earlier one of its name)."""
        row = await self.archive.aget(KIND, partition(model.tenant, model.name), name_of(number))
        found = ArchivedVersion.decode(row) if row else None
        return found if found is not None and found.model_create_ns == model_create_ns(model) else None

    async def page(self, model: pb.Model, after: int, limit: int) -> tuple[list[pb.ModelVersion], bool]:
        """Up to `limit` archived versions of the model numbered after `after`; and whether more follow."""
        mine = model_create_ns(model)
        rows, more = await self.archive.apage_by_name(
            KIND, partition(model.tenant, model.name), name_of(after) if after else "", limit,
            lambda row: ArchivedVersion.decode(row).model_create_ns == mine)
        return [ArchivedVersion.decode(row).version for row in rows], more

    async def remove(self, model: pb.Model, number: int) -> ArchivedVersion | None:
        """Deletes an archived version of this model and its artifacts; None if there is none."""
        found = await self.get(model, number)
        if found is None:
            return None
        if await asyncio.to_thread(self.archive.unpoint, KIND, partition(model.tenant, model.name), name_of(number)):
            await asyncio.to_thread(self._remove_artifacts, found)
        return found

    async def remove_all(self, tenant: str, model: str) -> int:
        """Deletes every archived version under the model's name (whichever model they belonged to)."""
        where = partition(tenant, model)

        def remove() -> int:
            removed = 0
            for name in self.archive.names(KIND, where):
                row = self.archive.get(KIND, where, name)
                if self.archive.unpoint(KIND, where, name):
                    removed += 1
                    if row is not None:
                        self._remove_artifacts(ArchivedVersion.decode(row))
            return removed

        return await asyncio.to_thread(remove)

    def _remove_artifacts(self, found: ArchivedVersion) -> None:
        if self.artifacts_dir is None:
            return
        for raw in found.exports:
            path = ExportRecord.decode(raw).artifact_path
            if not path:
                continue
            directory = os.path.realpath(os.path.dirname(path))
            if os.path.commonpath([directory, self.artifacts_dir]) == self.artifacts_dir != directory:
                shutil.rmtree(directory, ignore_errors=True)

    def write(self, tenant: str, model: str, versions: list[ArchivedVersion]) -> dict[int, Pointer]:
        """One part per creation day, then the pointers (blocking); where each went, by number."""
        where = partition(tenant, model)
        pointers = self.archive.write(KIND, where, [v.row() for v in versions])
        for name, pointer in pointers.items():
            self.archive.point(KIND, where, name, pointer)
        return {int(name): pointer for name, pointer in pointers.items()}


def names_version(model: pb.Model, number: int) -> bool:
    """Whether a label, the default version or the traffic split names `number`."""
    return (number in model.labels.values() or model.default_version == number
            or any(t.version == number for t in model.traffic_split))


@dataclass
class _Due:
    ended_key: str
    snap: VersionSnapshot
    archived: ArchivedVersion


class VersionArchiver(Archiver):
    what = "versions archiver"
    store: ModelStore
    archive: VersionArchive

    def __init__(self, store: ModelStore, archive: VersionArchive, settings: ArchiveSettings, clock=time.time,
                 on_archived: Callable[[pb.ModelVersion], None] = lambda version: None):
        super().__init__(store, archive, settings, clock)
        #: called for each version moved (the reconciler forgets it and its working directories)
        self.on_archived = on_archived

    async def pass_once(self) -> int:
        """Archives every version due (ended/ keys read in pages of `batch`); returns how many."""
        cutoff = self.cutoff_ns()
        moved, after = 0, ""
        while True:
            ended, more = await self.store.ended_before(cutoff, after, self.settings.batch)
            if not ended:
                return moved
            after = ended[-1][0]
            due = [d for d in [await self._due(key, value) for key, value in ended] if d is not None]
            moved += await self._remove(await self._write(due))
            if not more:
                return moved

    async def _due(self, key: str, value: bytes) -> _Due | None:
        """The version an ended/ key names, if it can move now; a stale key is dropped."""
        _, tenant, model, number = self.store.keys.parse_ended(key)
        snap = await self.store.version_snapshot(tenant, model, number)
        version = pb.ModelVersion.FromString(snap.version.value) if snap.version else None
        if (version is None or version.state != S.MODEL_VERSION_STATE_END or version.HasField("delete_time")
                or str(version.create_time.ToNanoseconds()).encode() != value):
            await self.store.delete_key(key)  # deleted, being deleted, or created again since
            return None
        record = pb.Model.FromString(snap.model.value) if snap.model else None
        if (record is None or record.HasField("delete_time") or names_version(record, number) or snap.replicas
                or snap.endpoints):
            return None  # still referred to: a later pass looks again
        exports = [ExportRecord.decode(kv.value) for kv in snap.exports]
        if any(not e.terminal or e.holds for e in exports):
            return None
        return _Due(key, snap, ArchivedVersion(version, [kv.value for kv in snap.exports], model_create_ns(record)))

    async def _write(self, due: list[_Due]) -> list[tuple[_Due, Pointer]]:
        """Step 1 for a batch: the archive holds each version (and points at it)."""
        by_model: dict[tuple[str, str], list[_Due]] = {}
        for d in due:
            by_model.setdefault((d.archived.version.tenant, d.archived.version.model), []).append(d)
        written = []
        for (tenant, model), items in by_model.items():
            where = await asyncio.to_thread(self.archive.write, tenant, model, [d.archived for d in items])
            written += [(d, where[d.archived.version.version]) for d in items]
        return written

    async def _remove(self, written: list[tuple[_Due, Pointer]]) -> int:
        """Step 2 for a batch: etcd forgets each version archived unchanged."""
        moved, touched = 0, set()
        for d, pointer in written:
            version = d.archived.version
            if await self.store.remove_archived(d.snap, d.ended_key):
                moved += 1
                touched.add((version.tenant, version.model))
                self.on_archived(version)
                continue
            now = await self.store.version_snapshot(version.tenant, version.model, version.version)
            current = pb.ModelVersion.FromString(now.version.value) if now.version else None
            model = pb.Model.FromString(now.model.value) if now.model else None
            if (current is None or current.create_time != version.create_time or current.HasField("delete_time")
                    or model is None or model.HasField("delete_time")
                    or model_create_ns(model) != d.archived.model_create_ns):
                # Deleted while being archived: it must not come back from the archive.
                await asyncio.to_thread(self.archive.archive.unpoint, KIND, partition(version.tenant, version.model),
                                        name_of(version.version), pointer)
        for tenant, model in sorted(touched):
            await self.store.publish_route(tenant, model)
        return moved
