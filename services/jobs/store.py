"""The jobs service's etcd layout (everything under /cloudml/jobs/), the
in-memory index of live jobs, and the archive of finished ones.

    jobs/<tenant>/<name>                       cloudml.jobs.v1.TrainJob, events inside
    order/<tenant>/<create ns, 19 digits>/<name>
                                               empty; the job in creation order (ListJobs
                                               ranges it with a limit), written and deleted
                                               in the record's own transactions
    ended/<end ns, 19 digits>/<tenant>/<name>  empty; a finished job by end time, written in
                                               the transaction that finishes it (the
                                               archiver ranges what ended before the cutoff)
    held/<tenant>/<name>/<uid>                 JSON {owner_id, group}: the job holds (or
                                               may hold) quota and runtime capacity;
                                               written right after the quota is reserved,
                                               deleted once both are released
    metrics/<tenant>/<name>/<replica>/<metric>/<attempt>/<chunk>
                                               cloudml.jobs.v1.MetricSeries, at most
                                               CHUNK_POINTS points each, in arrival order
    ingest/<tenant>/<name>                     JSON {metrics file: bytes ingested}, written
                                               in the same transaction as the chunks
    meta/index                                 "2" once every record has its order/ended keys
    election/<lease>                           the scheduler's leader election
    tensorboards/<tenant>/<name>               JSON, a TensorBoard (services/jobs/tensorboards.py)

Every write of a job record is a compare-and-swap on its mod_revision, so
the API handlers (any jobs process) and the scheduler (the leader) never
overwrite each other's changes.

Memory holds live work only: `JobIndex` keeps the jobs that have not ended
(QUEUED .. CANCELLING), by list-then-watch of jobs/ (listed in pages, so a
week of finished records never sits in memory at once); a job leaves it when
it ends. ListJobs pages from etcd (order/ ranged with a limit, then the
records in one transaction) merged with the archive (`services.common.archive`,
kind "jobs"), where the archiver (`services.jobs.archiver`) moves jobs that
ended more than the retention period ago. Writes made by this process are
applied to the index at once (read-your-writes); the watch brings everyone
else's, and an entry only ever moves forward in mod_revision.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Callable, Iterator
from urllib.parse import quote

from cloudml.jobs.v1 import jobs_service_pb2 as pb
from services.common import errors
from services.common.archive import Position
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
    op_delete_prefix,
    op_put,
)
from services.jobs import policy

log = logging.getLogger(__name__)

PREFIX = "/cloudml/jobs/"
JOBS = PREFIX + "jobs/"
HELD = PREFIX + "held/"
METRICS = PREFIX + "metrics/"
INGEST = PREFIX + "ingest/"
ORDER = PREFIX + "order/"
ENDED = PREFIX + "ended/"
INDEX_VERSION = PREFIX + "meta/index"
ELECTION = PREFIX + "election/"
TENSORBOARDS = PREFIX + "tensorboards/"

# Points per stored metric chunk (~30 bytes each).
CHUNK_POINTS = 500


def job_key(tenant: str, name: str) -> str:
    return f"{JOBS}{tenant}/{name}"


def create_ns(job: pb.TrainJob) -> int:
    return job.create_time.ToNanoseconds()


def order_key(tenant: str, created_ns: int, name: str) -> str:
    return f"{ORDER}{tenant}/{created_ns:019d}/{name}"


def ended_key(job: pb.TrainJob) -> str:
    return f"{ENDED}{job.end_time.ToNanoseconds():019d}/{job.tenant}/{job.name}"


def split_ended(key: str) -> tuple[int, str, str]:
    """(end ns, tenant, name) of an ended/ key."""
    end, tenant, name = key[len(ENDED):].split("/")
    return int(end), tenant, name


def summary_of(job: pb.TrainJob) -> pb.TrainJob:
    """A job as ListJobs shows it: without its events."""
    summary = pb.TrainJob()
    summary.CopyFrom(job)
    summary.ClearField("events")
    return summary


def record_ops(job: pb.TrainJob, value: bytes | None = None) -> list:
    """The puts of a new job record and its order/ (and, finished, ended/) keys."""
    ops = [op_put(job_key(job.tenant, job.name), value if value is not None else job.SerializeToString()),
           op_put(order_key(job.tenant, create_ns(job), job.name), b"")]
    if policy.is_final(job.state):
        ops.append(op_put(ended_key(job), b""))
    return ops


def removal_ops(job: pb.TrainJob) -> list:
    """The deletes of a job record, its index keys, metric series and ingest offsets."""
    ops = [op_delete(job_key(job.tenant, job.name)), op_delete(order_key(job.tenant, create_ns(job), job.name)),
           op_delete_prefix(metrics_prefix(job.tenant, job.name)), op_delete(ingest_key(job.tenant, job.name))]
    if policy.is_final(job.state):
        ops.append(op_delete(ended_key(job)))
    return ops


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
    __slots__ = ("job", "mod_revision", "create_revision")

    def __init__(self, job: pb.TrainJob, mod_revision: int, create_revision: int):
        self.job = job
        self.mod_revision = mod_revision
        self.create_revision = create_revision


def _live(kv: KV) -> bool:
    try:
        return not policy.is_final(pb.TrainJob.FromString(kv.value).state)
    except Exception:  # noqa: BLE001 - apply() logs the bad record
        return True


class JobIndex:
    """The live (not yet ended) job records in memory, by tenant and name;
    kept current by a watch. A job leaves the index when it ends.

    `listeners` are called as `listener(key, job_or_None)` after each change
    (None: deleted; a finished job is passed once, as it leaves). `changed`
    is an Event replaced after every change, for waiters that want to wake on
    any change (WatchJob).
    """

    def __init__(self, etcd: Etcd, page: int = 1000):
        self._tenants: dict[str, dict[str, Entry]] = {}
        self._tombstones: dict[str, int] = {}
        self.listeners: list[Callable[[str, pb.TrainJob | None], None]] = []
        self.changed = asyncio.Event()
        self.watcher = PrefixWatcher(etcd, JOBS, self._reset, self._event, keep=_live, page=page)
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

    # --- changes ----------------------------------------------------------------------

    def apply(self, key: str, value: bytes | None, mod_revision: int, create_revision: int = 0) -> None:
        """Applies one change (from the watch or from this process's own write)
        unless the index already has a newer one."""
        tenant, name = split_key(key, JOBS)
        jobs = self._tenants.get(tenant)
        current = jobs.get(name) if jobs else None
        if current is not None and current.mod_revision >= mod_revision:
            return
        if self._tombstones.get(key, 0) >= mod_revision:
            return
        job = None
        if value is not None:
            try:
                job = pb.TrainJob.FromString(value)
            except Exception:  # noqa: BLE001 - skip one bad record, keep the rest
                log.exception("cannot decode %s", key)
                return
        if job is None or policy.is_final(job.state):
            # Gone, or ended: out of memory; the tombstone keeps older events out.
            self._tombstones[key] = mod_revision
            if current is not None:  # it leaves memory here: tell the listeners (the scheduler, watches)
                del jobs[name]
                if not jobs:
                    del self._tenants[tenant]
                self._notify(key, job)
            return
        if jobs is None:
            jobs = self._tenants[tenant] = {}
        if current is None:
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
        self._tenants, self._tombstones = {}, {}
        for kv in sorted(kvs.values(), key=lambda kv: kv.key):
            self.apply(kv.key, kv.value, kv.mod_revision, kv.create_revision)
        for tenant, name in old:
            if self.get(tenant, name) is None:
                self._notify(job_key(tenant, name), None)

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
        ok, resp = await self.etcd.txn([cmp_absent(key)], record_ops(job, value), [op_get(key)])
        if ok:
            self.index.apply(key, value, resp.header.revision, resp.header.revision)
            return True, None
        kvs = resp.responses[0].response_range.kvs
        if not kvs:  # deleted in between; let the caller retry
            raise errors.Conflict(f"job {job.name!r} changed while being created; retry")
        return False, pb.TrainJob.FromString(kvs[0].value)

    async def remove_new(self, job: pb.TrainJob, mod_revision: int) -> bool:
        """Takes back a record just created (if unchanged since)."""
        key = job_key(job.tenant, job.name)
        ok, resp = await self.etcd.txn([cmp_mod_revision(key, mod_revision)], removal_ops(job))
        if ok:
            self.index.apply(key, None, resp.header.revision)
        return ok

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
            ops = [op_put(key, value)]
            if policy.is_final(job.state) and not policy.is_final(pb.TrainJob.FromString(current.value).state):
                ops.append(op_put(ended_key(job), b""))  # it ends: the archiver finds it by end time
            ok, resp = await self.etcd.txn([cmp_mod_revision(key, current.mod_revision)], ops, [op_get(key)])
            if ok:
                self.index.apply(key, value, resp.header.revision, current.create_revision)
                return job
            kvs = resp.responses[0].response_range.kvs
            current = KV.from_pb(kvs[0]) if kvs else None
            await asyncio.sleep(0.001 * attempt)
        raise errors.Conflict(f"too much contention updating job {name!r}; retry")

    async def delete(self, job: pb.TrainJob, mod_revision: int) -> bool:
        """Deletes the record (if unchanged since `mod_revision`), its index
        keys, metric series and ingest offsets, in one transaction; the held
        marker stays until released."""
        key = job_key(job.tenant, job.name)
        ok, resp = await self.etcd.txn([cmp_mod_revision(key, mod_revision)], removal_ops(job))
        if ok:
            self.index.apply(key, None, resp.header.revision)
        return ok

    async def positions(self, tenant: str, after: Position, limit: int) -> tuple[list[Position], bool]:
        """Up to `limit` (create ns, name) of `tenant`'s records in etcd after
        `after`, in that order, from the order/ keys alone; and whether more follow."""
        start = order_key(tenant, after[0], after[1]) + "\0" if after != (0, "") else None
        kvs, _, more = await self.etcd.get_prefix(f"{ORDER}{tenant}/", start=start, limit=limit, keys_only=True)
        found = []
        for kv in kvs:
            created, name = kv.key.rsplit("/", 2)[1:]
            found.append((int(created), name))
        return found, more

    async def summaries(self, tenant: str, names: list[str]) -> dict[str, pb.TrainJob]:
        """{name: summary} of those of `names` whose records are in etcd."""
        found = {}
        for name, kv in zip(names, await self.etcd.get_many([job_key(tenant, n) for n in names])):
            if kv is not None:
                found[name] = summary_of(pb.TrainJob.FromString(kv.value))
        return found

    async def page(self, tenant: str, states: frozenset[int], after: Position,
                   limit: int) -> tuple[list[pb.TrainJob], bool]:
        """Up to `limit` summaries of `tenant`'s records in etcd created after
        position `after` (create ns, name), in that order, in one of `states`
        (all when empty); and whether more follow. Ranges order/ with a limit
        and reads the records in one transaction per batch: never the whole
        tenant."""
        prefix = f"{ORDER}{tenant}/"
        start = order_key(tenant, after[0], after[1]) + "\0" if after != (0, "") else None
        found: list[pb.TrainJob] = []
        batch = min(max(limit + 1, 16), 1000)
        while True:
            kvs, _, more = await self.etcd.get_prefix(prefix, start=start, limit=batch, keys_only=True)
            names = [kv.key.rsplit("/", 1)[1] for kv in kvs]
            for name, record in zip(names, await self.etcd.get_many([job_key(tenant, n) for n in names])):
                if record is None:
                    continue  # deleted or archived since the range
                job = pb.TrainJob.FromString(record.value)
                if states and job.state not in states:
                    continue
                if len(found) == limit:
                    return found, True
                found.append(summary_of(job))
            if not more or not kvs:
                return found, False
            start = kvs[-1].key + "\0"

    # --- the archiver's side ----------------------------------------------------------

    async def ended_before(self, cutoff_ns: int, limit: int) -> list[tuple[str, str, str]]:
        """(ended/ key, tenant, name) of up to `limit` jobs that ended before
        `cutoff_ns`, oldest first."""
        kvs, _, _ = await self.etcd.get_prefix(ENDED, limit=limit, keys_only=True)
        due = []
        for kv in kvs:
            end, tenant, name = split_ended(kv.key)
            if end >= cutoff_ns:
                break
            due.append((kv.key, tenant, name))
        return due

    async def records(self, keys: list[tuple[str, str]]) -> list[KV | None]:
        return await self.etcd.get_many([job_key(t, n) for t, n in keys])

    async def drop_key(self, key: str) -> None:
        """Drops an ended/ key whose record is gone."""
        await self.etcd.delete(key)

    async def remove_archived(self, job: pb.TrainJob, mod_revision: int) -> bool:
        """Deletes an archived job's etcd keys, only if the record is still the
        one archived (same mod_revision)."""
        return await self.delete(job, mod_revision)

    async def ensure_index_keys(self, page: int = 500) -> int:
        """Writes the order/ and ended/ keys of records that lack them (records
        stored before those keys existed), once per etcd; returns how many."""
        if await self.etcd.get(INDEX_VERSION) is not None:
            return 0
        written, start = 0, None
        while True:
            kvs, _, more = await self.etcd.get_prefix(JOBS, start=start, limit=page)
            jobs = [(kv, pb.TrainJob.FromString(kv.value)) for kv in kvs]
            wanted = [(kv, [op.request_put.key.decode() for op in record_ops(job, kv.value)[1:]]) for kv, job in jobs]
            present = await self.etcd.get_many([key for _, keys in wanted for key in keys])
            i = 0
            for kv, keys in wanted:
                missing = [key for key, found in zip(keys, present[i:i + len(keys)]) if found is None]
                i += len(keys)
                if missing:
                    await self.etcd.txn([cmp_mod_revision(kv.key, kv.mod_revision)], [op_put(k, b"") for k in missing])
                    written += 1
            if not more or not kvs:
                break
            start = kvs[-1].key + "\0"
        await self.etcd.put(INDEX_VERSION, b"2")
        return written

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
