"""Finished studies leave etcd with their trials: the archiver (leader only)
and the tuner's view of the archive (`services.common.archive`, kind
"studies").

A study is archived once it is final, its `studies` quota is returned, none
of its trials is pending or running, and it ended more than
`retention_seconds` ago. It moves as one record: the study, every trial
(with the sampler's attributes and stop flag), the trials' job specs and
the curves of succeeded trials; the sampler state is dropped (a final study
suggests nothing). The move is the jobs' (`services.jobs.archiver`): write
the line and the pointer, then delete the etcd keys under the study's
mod_revision; a DeleteStudy in between wins (the pointer is taken back).

Studies list by name, so archived ones are read through the name pointers
(`Archive.page_by_name`: one `ls` of the tenant's names, then one read per
listed study). The trial jobs are the jobs service's, archived by it.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
from dataclasses import dataclass

from cloudml.tuner.v1 import tuner_service_pb2 as pb
from services.common.archive import Archive, Archiver, Pointer, Row
from services.common.etcd import KV
from services.tuner.store import JOBSPECS, STUDIES, StudyRecord, TrialRecord, TunerStore, active_trials

log = logging.getLogger(__name__)

KIND = "studies"
FINAL = frozenset({pb.STUDY_STATE_SUCCEEDED, pb.STUDY_STATE_FAILED, pb.STUDY_STATE_CANCELLED})


@dataclass
class ArchivedStudy:
    record: StudyRecord
    trials: list[TrialRecord]


def _kv(raw: str) -> KV:
    return KV("", raw.encode(), 0, 0, 0, 0)


class StudyArchive:
    def __init__(self, archive: Archive):
        self.archive = archive

    @staticmethod
    def decode(row: Row) -> ArchivedStudy:
        data = json.loads(row.record)
        return ArchivedStudy(StudyRecord.decode(_kv(data["study"])), [TrialRecord.decode(_kv(t)) for t in data["trials"]])

    async def get(self, tenant: str, name: str) -> ArchivedStudy | None:
        row = await self.archive.aget(KIND, tenant, name)
        return self.decode(row) if row else None

    async def page(self, tenant: str, after: str, limit: int) -> tuple[list[pb.Study], bool]:
        rows, more = await self.archive.apage_by_name(KIND, tenant, after, limit)
        # Only the studies: their trials stay encoded.
        return [StudyRecord.decode(_kv(json.loads(row.record)["study"])).study for row in rows], more

    async def remove(self, tenant: str, name: str) -> bool:
        return await asyncio.to_thread(self.archive.unpoint, KIND, tenant, name)

    def write(self, tenant: str, studies: list[tuple[StudyRecord, list[TrialRecord], dict, dict]]) -> dict[str, Pointer]:
        rows = []
        for record, trials, jobspecs, curves in studies:
            study = record.study
            document = {"study": record.encode().decode(), "trials": [t.encode().decode() for t in trials],
                        "jobspecs": jobspecs, "curves": curves}
            rows.append(Row(study.name, str(study.create_time.ToNanoseconds()), study.create_time.ToNanoseconds(),
                            pb.StudyState.Name(study.state), json.dumps(document, sort_keys=True).encode()))
        where = self.archive.write(KIND, tenant, rows)
        for name, pointer in where.items():
            self.archive.point(KIND, tenant, name, pointer)
        return where


def due(record: StudyRecord, cutoff_ns: int) -> bool:
    study = record.study
    return (study.state in FINAL and record.released and active_trials(study.trial_counts) == 0
            and study.HasField("end_time") and study.end_time.ToNanoseconds() < cutoff_ns)


class StudyArchiver(Archiver):
    what = "studies archiver"
    store: TunerStore
    archive: StudyArchive

    async def pass_once(self) -> int:
        """Archives every due study (the studies are read in pages of `batch`)."""
        cutoff = self.cutoff_ns()
        moved, start = 0, None
        etcd = self.store.etcd
        while True:
            kvs, _, more = await etcd.get_prefix(STUDIES, start=start, limit=self.settings.batch)
            records = [StudyRecord.decode(kv) for kv in kvs]
            candidates = [r for r in records if due(r, cutoff)]
            if candidates:
                moved += await self.remove(await self.write(candidates))
            if not more or not kvs:
                return moved
            start = kvs[-1].key + "\0"

    async def write(self, candidates: list[StudyRecord]) -> list[tuple[StudyRecord, Pointer]]:
        """Step 1: each study with its trials, job specs and curves is archived and pointed at."""
        by_tenant: dict[str, list] = {}
        for record in candidates:
            study = record.study
            snap = await self.store.snapshot(study.tenant, study.name)
            if snap is None or snap.record.mod_revision != record.mod_revision:
                continue  # changed or gone since the scan; the next pass sees it again
            specs, _, _ = await self.store.etcd.get_prefix(f"{JOBSPECS}{study.tenant}/{study.name}/")
            jobspecs = {kv.key.rsplit("/", 1)[1]: base64.b64encode(kv.value).decode() for kv in specs}
            curves = {str(n): c for n, c in (await self.store.curves(study.tenant, study.name)).items()}
            by_tenant.setdefault(study.tenant, []).append((snap.record, snap.trials, jobspecs, curves))
        written = []
        for tenant, studies in by_tenant.items():
            where = await asyncio.to_thread(self.archive.write, tenant, studies)
            written += [(record, where[record.study.name]) for record, *_ in studies]
        return written

    async def remove(self, written: list[tuple[StudyRecord, Pointer]]) -> int:
        """Step 2: etcd forgets each study archived unchanged."""
        moved = 0
        for record, pointer in written:
            study = record.study
            if await self.store.delete_study(study.tenant, study.name, record.mod_revision):
                moved += 1
                continue
            current = await self.store.get_study(study.tenant, study.name)
            if current is None or current.study.create_time != study.create_time:
                await asyncio.to_thread(self.archive.archive.unpoint, KIND, study.tenant, study.name, pointer)
        return moved

