"""Finished jobs leave etcd: the archiver (leader only) and the jobs' view of
the archive (`services.common.archive`, kind "jobs").

A job that ended more than `retention_seconds` ago (found by its ended/ key,
`services.jobs.store`) is moved in three steps, each safe to be killed
after:

1. `write`: its metric series go to a blob, its record to a new part file
   of its tenant and creation day, then its name's pointer is written;
2. `remove`: its record, index keys, metric series and ingest offsets are
   deleted from etcd in one transaction, only if the record is unchanged
   since step 1 (mod_revision). If it was deleted meanwhile (DeleteJob), the
   pointer written in step 1 is taken back, so a deleted job never comes
   back from the archive.

Killed between 1 and 2, the job is live and archived at once (readers prefer
the live record and drop the archived duplicate); the next pass writes it
again and moves the pointer, which makes the first line invisible.

Its files under DIR/jobs/<tenant>/<name>/ (logs, metrics files) stay where
they are, so StreamLogs reads them as before; DeleteJob removes them.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Callable

from cloudml.jobs.v1 import jobs_service_pb2 as pb
from services.common.archive import Archive, ArchiveSettings, Archiver, Pointer, Position, Row
from services.common.etcd import KV
from services.jobs import policy
from services.jobs.store import JobStore, create_ns, summary_of

log = logging.getLogger(__name__)

KIND = "jobs"


def row_of(job: pb.TrainJob) -> Row:
    return Row(job.name, job.uid, create_ns(job), pb.JobState.Name(job.state), job.SerializeToString())


class JobArchive:
    """Archived jobs: reads for the core, writes for the archiver."""

    def __init__(self, archive: Archive):
        self.archive = archive

    async def get(self, tenant: str, name: str) -> pb.TrainJob | None:
        row = await self.archive.aget(KIND, tenant, name)
        return pb.TrainJob.FromString(row.record) if row else None

    async def page(self, tenant: str, states: frozenset[int], after: Position,
                   limit: int) -> tuple[list[pb.TrainJob], bool]:
        names = {pb.JobState.Name(s) for s in states}
        rows, more = await self.archive.apage(KIND, tenant, after, limit,
                                              lambda row: not names or row.state in names)
        return [summary_of(pb.TrainJob.FromString(row.record)) for row in rows], more

    async def metric_chunks(self, job: pb.TrainJob) -> list[pb.MetricSeries]:
        raw = await asyncio.to_thread(self.archive.blob, KIND, job.tenant, job.name, job.uid)
        return list(pb.GetJobMetricsResponse.FromString(raw).series) if raw else []

    async def remove(self, tenant: str, name: str, uid: str = "") -> bool:
        """Deletes an archived job (only the one of `uid`, when given)."""
        def remove() -> bool:
            pointer = self.archive.pointer(KIND, tenant, name)
            if pointer is None or (uid and pointer.uid != uid):
                return False
            return self.archive.unpoint(KIND, tenant, name, pointer)

        return await asyncio.to_thread(remove)

    def write(self, tenant: str, jobs: list[tuple[pb.TrainJob, list[pb.MetricSeries]]]) -> dict[str, Pointer]:
        """Blobs, one part per creation day, then the pointers (blocking)."""
        for job, chunks in jobs:
            if chunks:
                blob = pb.GetJobMetricsResponse(series=chunks).SerializeToString()
                self.archive.put_blob(KIND, tenant, job.name, job.uid, blob)
        where = self.archive.write(KIND, tenant, [row_of(job) for job, _ in jobs])
        for name, pointer in where.items():
            self.archive.point(KIND, tenant, name, pointer)
        return where


class JobArchiver(Archiver):
    what = "jobs archiver"

    def __init__(self, store: JobStore, archive: JobArchive, settings: ArchiveSettings, clock=time.time,
                 on_archived: Callable[[int], None] = lambda n: None):
        super().__init__(store, archive, settings, clock)
        self.on_archived = on_archived

    async def pass_once(self) -> int:
        """Archives every job that ended before the cutoff; returns how many."""
        cutoff = self.cutoff_ns()
        moved = 0
        while True:
            due = await self.due(cutoff)
            if not due:
                return moved
            written = await self.write(due)
            moved += await self.remove(written)
            if len(due) < self.settings.batch:
                return moved

    async def due(self, cutoff_ns: int) -> list[tuple[pb.TrainJob, KV]]:
        """Records to archive now (stale ended/ keys are dropped on the way)."""
        ended = await self.store.ended_before(cutoff_ns, self.settings.batch)
        found = []
        for (key, tenant, name), kv in zip(ended, await self.store.records([(t, n) for _, t, n in ended])):
            job = pb.TrainJob.FromString(kv.value) if kv is not None else None
            if job is None or not policy.is_final(job.state):
                await self.store.drop_key(key)
                continue
            found.append((job, kv))
        return found

    async def write(self, due: list[tuple[pb.TrainJob, KV]]) -> list[tuple[pb.TrainJob, KV, Pointer]]:
        """Step 1 for a batch: the archive holds each job (and points at it)."""
        by_tenant: dict[str, list[tuple[pb.TrainJob, list[pb.MetricSeries]]]] = defaultdict(list)
        for job, _ in due:
            chunks = [series for _, series in await self.store.metric_chunks(job.tenant, job.name)]
            by_tenant[job.tenant].append((job, chunks))
        where: dict[tuple[str, str], Pointer] = {}
        for tenant, jobs in by_tenant.items():
            for name, pointer in (await asyncio.to_thread(self.archive.write, tenant, jobs)).items():
                where[(tenant, name)] = pointer
        return [(job, kv, where[(job.tenant, job.name)]) for job, kv in due]

    async def remove(self, written: list[tuple[pb.TrainJob, KV, Pointer]]) -> int:
        """Step 2 for a batch: etcd forgets each job archived unchanged."""
        moved = 0
        for job, kv, pointer in written:
            if await self.store.remove_archived(job, kv.mod_revision):
                moved += 1
                continue
            current = (await self.store.records([(job.tenant, job.name)]))[0]
            if current is None or pb.TrainJob.FromString(current.value).uid != job.uid:
                # Deleted while being archived: it must not come back from the archive.
                await asyncio.to_thread(self.archive.archive.unpoint, KIND, job.tenant, job.name, pointer)
        self.on_archived(moved)
        return moved
