"""The jobs service's etcd layout (everything under /cloudml/jobs/) and the
in-memory index that serves reads.

    jobs/<tenant>/<name>                       cloudml.jobs.v1.TrainJob, events inside
    held/<tenant>/<name>/<uid>                 JSON {owner_id, group}: the job holds (or
                                               may hold) quota and runtime capacity;
                                               written right after the quota is reserved,
                                               deleted once both are released
    metrics/<tenant>/<name>/<replica>/<metric>/<attempt>/<chunk>
                                               cloudml.jobs.v1.MetricSeries, at most
                                               CHUNK_POINTS points each, in arrival order
    ingest/<tenant>/<name>                     JSON {metrics file: bytes ingested}, written
                                               in the same transaction as the chunks
    election/<lease>                           the scheduler's leader election
    tensorboards/<tenant>/<name>               JSON, a TensorBoard (services/jobs/tensorboards.py)

Every write of a job record is a compare-and-swap on its mod_revision, so
the API handlers (any jobs process) and the scheduler (the leader) never
overwrite each other's changes.

`JobIndex` keeps every job record in memory by list-then-watch, with a
per-tenant sorted name list, so that ListJobs pages through 10,000 jobs
without ranging etcd. Writes made by this process are applied to it at once
(read-your-writes); the watch brings everyone else's, and an entry only ever
moves forward in mod_revision.
"""
from __future__ import annotations

import asyncio
import bisect
import json
import logging
from dataclasses import dataclass
from typing import Callable, Iterator
from urllib.parse import quote

from cloudml.jobs.v1 import jobs_service_pb2 as pb
from services.common import errors
from services.common.etcd import (
    KV,
    Etcd,
    Event,
    PrefixWatcher,
    cmp_absent,
    cmp_mod_revision,
    cmp_present,
    op_delete,
    op_get,
    op_put,
)

log = logging.getLogger(__name__)

PREFIX = "/cloudml/jobs/"
JOBS = PREFIX + "jobs/"
HELD = PREFIX + "held/"
METRICS = PREFIX + "metrics/"
INGEST = PREFIX + "ingest/"
ELECTION = PREFIX + "election/"
TENSORBOARDS = PREFIX + "tensorboards/"

# Points per stored metric chunk (~30 bytes each).
CHUNK_POINTS = 500


def job_key(tenant: str, name: str) -> str:
    return f"{JOBS}{tenant}/{name}"


def held_key(tenant: str, name: str, uid: str) -> str:
    return f"{HELD}{tenant}/{name}/{uid}"


def metrics_prefix(tenant: str, name: str) -> str:
    return f"{METRICS}{tenant}/{name}/"


def chunk_key(tenant: str, name: str, replica: str, metric: str, attempt: int, chunk: int) -> str:
    return f"{metrics_prefix(tenant, name)}{replica}/{quote(metric, safe='')}/{attempt:04d}/{chunk:05d}"


def ingest_key(tenant: str, name: str) -> str:
    return f"{INGEST}{tenant}/{name}"


def split_key(key: str, prefix: str) -> tuple[str, str]:
    """(tenant, name) of a jobs/ or held/ key."""
    tenant, _, name = key[len(prefix):].partition("/")
    return tenant, name


@dataclass(frozen=True)
class Held:
    """What a job may hold: its quota reservation and its runtime group."""

    tenant: str
    name: str
    uid: str
    owner_id: str
    group: str

    @property
    def key(self) -> str:
        return held_key(self.tenant, self.name, self.uid)

    def encode(self) -> bytes:
        return json.dumps({"owner_id": self.owner_id, "group": self.group}).encode()

    @classmethod
    def decode(cls, key: str, raw: bytes) -> "Held":
        tenant, name, uid = key[len(HELD):].split("/")
        data = json.loads(raw)
        return cls(tenant, name, uid, data["owner_id"], data["group"])


class Entry:
    __slots__ = ("job", "summary", "mod_revision", "create_revision")

    def __init__(self, job: pb.TrainJob, mod_revision: int, create_revision: int):
        self.job = job
        summary = pb.TrainJob()
        summary.CopyFrom(job)
        summary.ClearField("events")
        self.summary = summary
        self.mod_revision = mod_revision
        self.create_revision = create_revision


class JobIndex:
    """Every job record in memory, by tenant and name; kept current by a watch.

    `listeners` are called as `listener(key, job_or_None)` after each change
    (None: deleted). `changed` is an Event replaced after every change, for
    waiters that want to wake on any change (WatchJob).
    """

    def __init__(self, etcd: Etcd):
        self._tenants: dict[str, dict[str, Entry]] = {}
        self._names: dict[str, list[str]] = {}
        self._tombstones: dict[str, int] = {}
        self.listeners: list[Callable[[str, pb.TrainJob | None], None]] = []
        self.changed = asyncio.Event()
        self.watcher = PrefixWatcher(etcd, JOBS, self._reset, self._event)
        self._task: asyncio.Task | None = None

    def start(self) -> "JobIndex":
        self._task = asyncio.create_task(self.watcher.run(), name="jobs-index")
        return self

    async def wait_synced(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self.watcher.synced.wait(), timeout)

    @property
    def synced(self) -> bool:
        return self.watcher.synced.is_set()

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # --- reads ------------------------------------------------------------------------

    def get(self, tenant: str, name: str) -> Entry | None:
        return self._tenants.get(tenant, {}).get(name)

    def __len__(self) -> int:
        return sum(len(jobs) for jobs in self._tenants.values())

    def entries(self) -> Iterator[Entry]:
        for jobs in list(self._tenants.values()):
            yield from list(jobs.values())

    def page(self, tenant: str, states: frozenset[int], after: str, limit: int) -> tuple[list[pb.TrainJob], bool]:
        """Up to `limit` summaries of `tenant`'s jobs named after `after`, in
        name order, in one of `states` (all when empty); and whether more follow."""
        names = self._names.get(tenant, [])
        jobs = self._tenants.get(tenant, {})
        start = bisect.bisect_right(names, after) if after else 0
        found: list[pb.TrainJob] = []
        for i in range(start, len(names)):
            entry = jobs.get(names[i])
            if entry is None or (states and entry.job.state not in states):
                continue
            if len(found) == limit:
                return found, True
            found.append(entry.summary)
        return found, False

    # --- changes ----------------------------------------------------------------------

    def apply(self, key: str, value: bytes | None, mod_revision: int, create_revision: int = 0) -> None:
        """Applies one change (from the watch or from this process's own write)
        unless the index already has a newer one."""
        tenant, name = split_key(key, JOBS)
        jobs = self._tenants.get(tenant)
        current = jobs.get(name) if jobs else None
        if current is not None and current.mod_revision >= mod_revision:
            return
        if value is None:
            if current is None:
                self._tombstones[key] = max(self._tombstones.get(key, 0), mod_revision)
                return
            del jobs[name]
            names = self._names[tenant]
            i = bisect.bisect_left(names, name)
            if i < len(names) and names[i] == name:
                del names[i]
            self._tombstones[key] = mod_revision
            self._notify(key, None)
            return
        if self._tombstones.get(key, 0) >= mod_revision:
            return
        try:
            job = pb.TrainJob.FromString(value)
        except Exception:  # noqa: BLE001 - skip one bad record, keep the rest
            log.exception("cannot decode %s", key)
            return
        if jobs is None:
            jobs = self._tenants[tenant] = {}
            self._names[tenant] = []
        if current is None:
            bisect.insort(self._names[tenant], name)
            create_revision = create_revision or mod_revision
        else:
            create_revision = create_revision or current.create_revision
        jobs[name] = Entry(job, mod_revision, create_revision)
        self._notify(key, job)

    def _notify(self, key: str, job: pb.TrainJob | None) -> None:
        for listener in list(self.listeners):
            try:
                listener(key, job)
            except Exception:  # noqa: BLE001 - one listener must not break the index
                log.exception("job index listener failed")
        self.changed.set()
        self.changed = asyncio.Event()

    def _reset(self, kvs: dict[str, KV], revision: int) -> None:
        old = {(t, n) for t, jobs in self._tenants.items() for n in jobs}
        self._tenants, self._names, self._tombstones = {}, {}, {}
        for kv in sorted(kvs.values(), key=lambda kv: kv.key):
            self.apply(kv.key, kv.value, kv.mod_revision, kv.create_revision)
        for tenant, name in old:
            if self.get(tenant, name) is None:
                self._notify(job_key(tenant, name), None)
        if len(self._tombstones) > 10_000:
            self._tombstones.clear()

    def _event(self, event: Event) -> None:
        kv = event.kv
        self.apply(kv.key, None if event.deleted else kv.value, kv.mod_revision, kv.create_revision)
        # Tombstones only matter for writes racing the watch; old ones can go.
        if len(self._tombstones) > 10_000:
            horizon = kv.mod_revision - 1000
            self._tombstones = {k: r for k, r in self._tombstones.items() if r > horizon}


class Unchanged(Exception):
    """Raised by an update's mutate function to write nothing."""


class JobStore:
    """Reads and compare-and-swap writes of job records and their side keys."""

    def __init__(self, etcd: Etcd, index: JobIndex):
        self.etcd = etcd
        self.index = index

    # --- job records ------------------------------------------------------------------

    async def get(self, tenant: str, name: str) -> tuple[pb.TrainJob, KV] | None:
        kv = await self.etcd.get(job_key(tenant, name))
        if kv is None:
            return None
        self.index.apply(kv.key, kv.value, kv.mod_revision, kv.create_revision)
        return pb.TrainJob.FromString(kv.value), kv

    async def create(self, job: pb.TrainJob) -> tuple[bool, pb.TrainJob | None]:
        """Creates the record if absent: (True, None), else (False, existing)."""
        key = job_key(job.tenant, job.name)
        value = job.SerializeToString()
        ok, resp = await self.etcd.txn([cmp_absent(key)], [op_put(key, value)], [op_get(key)])
        if ok:
            self.index.apply(key, value, resp.header.revision, resp.header.revision)
            return True, None
        kvs = resp.responses[0].response_range.kvs
        if not kvs:  # deleted in between; let the caller retry
            raise errors.Conflict(f"job {job.name!r} changed while being created; retry")
        return False, pb.TrainJob.FromString(kvs[0].value)

    async def update(self, tenant: str, name: str, mutate: Callable[[pb.TrainJob], None],
                     *, attempts: int = 50) -> pb.TrainJob | None:
        """Read-modify-write of one record: `mutate(job)` changes it in place
        (or raises `Unchanged` to write nothing, or a typed error to abort).
        Returns the record as stored afterwards; None if there is no record."""
        key = job_key(tenant, name)
        current = await self.etcd.get(key)
        for attempt in range(attempts):
            if current is None:
                return None
            job = pb.TrainJob.FromString(current.value)
            try:
                mutate(job)
            except Unchanged:
                self.index.apply(key, current.value, current.mod_revision, current.create_revision)
                return job
            value = job.SerializeToString()
            ok, resp = await self.etcd.txn([cmp_mod_revision(key, current.mod_revision)], [op_put(key, value)],
                                           [op_get(key)])
            if ok:
                self.index.apply(key, value, resp.header.revision, current.create_revision)
                return job
            kvs = resp.responses[0].response_range.kvs
            current = KV.from_pb(kvs[0]) if kvs else None
            await asyncio.sleep(0.001 * attempt)
        raise errors.Conflict(f"too much contention updating job {name!r}; retry")

    async def delete(self, tenant: str, name: str, mod_revision: int) -> bool:
        """Deletes the record (if unchanged since `mod_revision`), its metric
        series and ingest offsets; the held marker stays until released."""
        key = job_key(tenant, name)
        ok, resp = await self.etcd.txn([cmp_mod_revision(key, mod_revision)], [op_delete(key)])
        if not ok:
            return False
        self.index.apply(key, None, resp.header.revision)
        await self.etcd.delete_prefix(metrics_prefix(tenant, name))
        await self.etcd.delete(ingest_key(tenant, name))
        return True

    # --- held markers -----------------------------------------------------------------

    async def put_held(self, held: Held) -> None:
        await self.etcd.put(held.key, held.encode())

    async def delete_held(self, held: Held) -> None:
        await self.etcd.delete(held.key)

    async def list_held(self) -> list[Held]:
        kvs, _, _ = await self.etcd.get_prefix(HELD)
        found = []
        for kv in kvs:
            try:
                found.append(Held.decode(kv.key, kv.value))
            except (ValueError, KeyError, TypeError):
                log.error("bad held marker %s; dropping it", kv.key)
                await self.etcd.delete(kv.key)
        return found

    # --- metric series ----------------------------------------------------------------

    async def metric_chunks(self, tenant: str, name: str) -> list[tuple[str, pb.MetricSeries]]:
        kvs, _, _ = await self.etcd.get_prefix(metrics_prefix(tenant, name))
        return [(kv.key, pb.MetricSeries.FromString(kv.value)) for kv in kvs]

    async def ingest_offsets(self, tenant: str, name: str) -> dict[str, int]:
        kv = await self.etcd.get(ingest_key(tenant, name))
        return json.loads(kv.value) if kv else {}

    async def write_metrics(self, tenant: str, name: str, chunks: dict[str, pb.MetricSeries],
                            offsets: dict[str, int]) -> None:
        """Puts changed chunks and the new offsets in one transaction, only
        while the job record exists (a deleted job gets no series back)."""
        ops = [op_put(key, series.SerializeToString()) for key, series in chunks.items()]
        ops.append(op_put(ingest_key(tenant, name), json.dumps(offsets, sort_keys=True).encode()))
        await self.etcd.txn([cmp_present(job_key(tenant, name))], ops)
