"""The scheduler: admits queued jobs and drives started ones (leader only).

Every jobs process campaigns in the election under /cloudml/jobs/election/
(the bootstrap does, `ServiceApp.election`); only the leader runs
`Scheduler.lead()`, the others stand by (and serve the API). Losing the lease
cancels the leader's loops at once without touching any replica process: the
next leader adopts them.

Queue policy
------------
Queued jobs are considered in order of priority (higher first), then
submission (the etcd create revision of the record: strict FIFO across
processes). A job is admitted when its tenant's quota (auth service Reserve,
owner "jobs/<name>/<uid>", every replica's cpu/memory/gpus plus one
train_job) and the runtime's capacity (`Runtime.reserve`, the whole group)
both hold every replica at once (gang admission). A job that does not fit is
skipped and later, smaller jobs may start ahead of it (backfill), with one
guard against starving it: once the first job that waits has waited longer
than `starvation_seconds`, nothing after it may take what it waits for (no
later job of its tenant when it waits for quota; no later job at all when it
waits for capacity). A pass runs when a job is queued, when a job ends and
releases, and every `pass_seconds` (quota may be freed by other services).
A waiting job records QuotaExceeded or Unschedulable once per episode.

Driving a job
-------------
One `JobRunner` task per started job (`services.jobs.runner`), from
PREPARING to its final state; it returns the job's quota and capacity
through `Scheduler.release`.

Adoption (a new leader, after a crash or a failover)
----------------------------------------------------
`runtime.adopt()` restores the runtime's view; then every job the records
show as PREPARING, RUNNING, RESTARTING or CANCELLING gets a runner again,
which resumes from the stored state (see `services.jobs.runner`).
Replicas of no active job are stopped, and quota and capacity held for jobs
that are no longer active (held markers, reservations) are returned. Quota
and capacity are always released after the final state is written, and a
held marker stays until both are released, so no crash can leak them.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass

from cloudml.common.v1 import resources_pb2
from cloudml.jobs.v1 import jobs_service_pb2 as pb
from services.common import errors
from services.common.runtime.base import Amount, CapacityBusy, ReplicaStatus, Runtime, Unschedulable
from services.jobs import policy, records
from services.jobs.envs import EnvCache
from services.jobs.observability import JobsMetrics
from services.jobs.runner import JobRunner, held_of, truncate
from services.jobs.store import Held, JobIndex, JobStore, Unchanged, job_key
from services.common.aio import wait_event

log = logging.getLogger(__name__)

RESOURCE_FIELDS = ("cpu_millis", "memory_bytes", "gpus", "train_jobs")


@dataclass
class SchedulerSettings:
    data_dir: str
    instance: str = ""
    # SIGTERM -> SIGKILL grace when the platform stops replicas.
    stop_grace: float = 3.0
    starvation_seconds: float = 60.0
    ingest_seconds: float = 1.0
    pass_seconds: float = 2.0
    release_seconds: float = 5.0
    # Pause before a restarted attempt: restart_backoff * 2^(attempt-1), capped.
    restart_backoff: float = 0.2
    restart_backoff_max: float = 10.0
    # Remote URI schemes tenants may name (services.common.confine).
    allowed_uri_schemes: str = ""


def _dominates(need: resources_pb2.Resources, busy: resources_pb2.Resources) -> bool:
    """True when `need` is at least `busy` in every field: if busy did not fit
    the quota now, neither does need."""
    return all(getattr(need, f) >= getattr(busy, f) for f in RESOURCE_FIELDS)


class Scheduler:
    def __init__(self, store: JobStore, index: JobIndex, quota, runtime: Runtime,
                 envs: EnvCache, settings: SchedulerSettings, clock=time.time, metrics: JobsMetrics | None = None):
        self.store = store
        self.index = index
        self.quota = quota
        self.runtime = runtime
        self.envs = envs
        self.tenancy = envs.tenancy
        self.settings = settings
        self.clock = clock
        self.metrics = metrics or JobsMetrics()
        self.leading = False
        self.runners: dict[str, JobRunner] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._admitting: set[str] = set()
        self._queued: set[str] = set()
        self._wake = asyncio.Event()
        self._last_quota_message = ""
        index.listeners.append(self._on_change)

    # --- leadership ---------------------------------------------------------------------

    def _on_change(self, key: str, job: pb.TrainJob | None) -> None:
        if not self.leading:
            return
        runner = self.runners.get(key)
        if runner is not None:
            runner.poke(job)
        if job is None or policy.is_final(job.state):
            self._queued.discard(key)
            self._wake.set()
        elif job.state == pb.JOB_STATE_QUEUED and key not in self._queued:
            self._queued.add(key)
            self._wake.set()

    async def lead(self) -> None:
        """Schedules until cancelled (this process stopped leading)."""
        log.info("scheduler: leading (instance %s)", self.settings.instance)
        await self.index.wait_synced()
        self.leading = True
        releaser = None
        try:
            await self._take_over()
            releaser = asyncio.create_task(self._release_loop(), name="jobs-releaser")
            while True:
                self._wake.clear()
                try:
                    await self._schedule_pass()
                except errors.Unavailable as err:
                    log.info("scheduling pass interrupted: %s", err.message)
                await wait_event(self._wake, self.settings.pass_seconds)
        finally:
            self.leading = False
            if releaser:
                releaser.cancel()
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, *([releaser] if releaser else []), return_exceptions=True)
            self.runners.clear()
            self._tasks.clear()
            self._queued.clear()
            log.info("scheduler: no longer leading")

    # --- take-over after a restart or failover ---------------------------------------------

    async def _take_over(self) -> None:
        # The runtime's state dir is shared with other services (model
        # servers): only replicas of train jobs are ours to judge.
        adopted = [s for s in await self.runtime.adopt() if s.replica_id.startswith("jobs.")]
        by_group: dict[str, list[ReplicaStatus]] = defaultdict(list)
        for status in adopted:
            by_group[status.group].append(status)
        active_groups = set()
        resumed = 0
        for entry in list(self.index.entries()):
            job = entry.job
            key = job_key(job.tenant, job.name)
            if job.state == pb.JOB_STATE_QUEUED:
                self._queued.add(key)
            if job.state in policy.ACTIVE:
                active_groups.add(records.group_of(job))
                running = sum(1 for s in by_group.get(records.group_of(job), ()) if not s.ended)
                self._spawn(job, recovered=f"taken over by scheduler {self.settings.instance}: "
                                           f"{running} replica process(es) still running")
                resumed += 1
        orphans = [s for group, statuses in by_group.items() if group not in active_groups for s in statuses]
        for status in orphans:
            with contextlib.suppress(Exception):
                if not status.ended:
                    log.warning("stopping replica %s of no active job", status.replica_id)
                    await self.runtime.stop(status.replica_id, self.settings.stop_grace)
                await self.runtime.forget(status.replica_id)
        await self._release_stale()
        await self._release_leaked_reservations()
        log.info("scheduler: took over %d active job(s), %d adopted replica(s), %d orphan(s) stopped",
                 resumed, len(adopted), len(orphans))

    def _is_active(self, tenant: str, name: str, uid: str) -> bool:
        entry = self.index.get(tenant, name)
        return entry is not None and entry.job.uid == uid and entry.job.state in policy.ACTIVE

    async def _release_stale(self) -> None:
        """Releases what held markers say is held by jobs no longer active."""
        for held in await self.store.list_held():
            key = job_key(held.tenant, held.name)
            if key in self._admitting or (key in self.runners and self.runners[key].job.uid == held.uid):
                continue
            if not self._is_active(held.tenant, held.name, held.uid):
                await self.release(held)

    async def _release_leaked_reservations(self) -> None:
        """A reservation made just before a crash, with no held marker yet."""
        tenants = {e.job.tenant for e in self.index.entries() if e.job.state == pb.JOB_STATE_QUEUED}
        held = {(h.tenant, h.name, h.uid) for h in await self.store.list_held()}
        for tenant in sorted(tenants):
            try:
                reservations = await self.quota.reservations(tenant)
            except errors.CloudMLError as err:
                log.info("cannot list reservations of %s: %s", tenant, err.message)
                continue
            for reservation in reservations:
                parsed = records.parse_owner_id(reservation.owner_id)
                if parsed is None:
                    continue
                name, uid = parsed
                if self._is_active(tenant, name, uid) or (tenant, name, uid) in held:
                    continue
                if job_key(tenant, name) in self._admitting:
                    continue
                log.warning("releasing leaked reservation %s of tenant %s", reservation.owner_id, tenant)
                with contextlib.suppress(errors.CloudMLError):
                    await self.quota.release(tenant, reservation.owner_id)

    async def _release_loop(self) -> None:
        rounds = 0
        while True:
            await asyncio.sleep(self.settings.release_seconds)
            rounds += 1
            try:
                await self._release_stale()
                if rounds % 12 == 0:
                    await self._release_leaked_reservations()
            except errors.CloudMLError as err:
                log.info("release pass interrupted: %s", err.message)
            except Exception:  # noqa: BLE001 - keep releasing whatever happens
                log.exception("release pass failed")

    async def release(self, held: Held) -> bool:
        """Returns a job's quota and capacity, then drops its held marker.
        False (marker kept, retried later) when the auth service is unreachable."""
        try:
            await self.quota.release(held.tenant, held.owner_id)
        except errors.CloudMLError as err:
            log.info("cannot release quota of %s/%s yet: %s", held.tenant, held.name, err.message)
            return False
        try:
            self.runtime.release(held.group)
        except Exception:  # noqa: BLE001 - the marker stays; retried
            log.exception("cannot release runtime group %s", held.group)
            return False
        await self.store.delete_held(held)
        self._wake.set()
        return True

    # --- the queue -----------------------------------------------------------------------

    async def _schedule_pass(self) -> None:
        queued = [e for e in self.index.entries() if e.job.state == pb.JOB_STATE_QUEUED]
        self.metrics.queued.set(len(queued))
        self.metrics.active.set(len(self.runners))
        if not queued:
            return
        queued.sort(key=lambda e: (-e.job.spec.priority, e.create_revision))
        now = self.clock()
        free = self.runtime.free()
        capacity_blocked = False
        blocked_tenants: set[str] = set()
        busy: dict[str, list[tuple[resources_pb2.Resources, str]]] = defaultdict(list)
        for entry in queued:
            if not self.leading:
                return
            job = entry.job
            key = job_key(job.tenant, job.name)
            if key in self.runners or key in self._admitting or job.tenant in blocked_tenants:
                continue
            starving = now - records.seconds(job.create_time) > self.settings.starvation_seconds
            amounts = list(records.resources_of(job.spec).values())
            need = sum(amounts, Amount())
            wanted = records.total_of(job.spec)
            if capacity_blocked:
                continue
            if not need.fits_in(free):
                await self._note_waiting(job, "Unschedulable", self._capacity_message(need, free))
                capacity_blocked = starving
                continue
            dominated = next((message for b, message in busy[job.tenant] if _dominates(wanted, b)), None)
            if dominated is not None:
                # A no larger job of its tenant did not fit the quota just now.
                await self._note_waiting(job, "QuotaExceeded", dominated)
                continue
            outcome = await self._admit(job, amounts, wanted)
            if outcome == "admitted":
                free = free - need
            elif outcome == "quota":
                busy[job.tenant].append((wanted, self._last_quota_message))
                if starving:
                    blocked_tenants.add(job.tenant)
            elif outcome == "capacity":
                free = self.runtime.free()
                capacity_blocked = starving

    def _capacity_message(self, need: Amount, free: Amount) -> str:
        total = self.runtime.total()
        parts = []
        if need.cpu_millis > free.cpu_millis:
            parts.append(f"cpu: needs {need.cpu_millis}m, free {free.cpu_millis}m of {total.cpu_millis}m")
        if need.memory_bytes > free.memory_bytes:
            parts.append(f"memory: needs {records.format_memory(need.memory_bytes)}, free "
                         f"{records.format_memory(max(free.memory_bytes, 0))} of {records.format_memory(total.memory_bytes)}")
        if need.gpus > free.gpus:
            parts.append(f"gpus: needs {need.gpus}, free {free.gpus} of {total.gpus}")
        return f"waiting for capacity on the {self.runtime.name} runtime ({'; '.join(parts)})"

    async def _note_waiting(self, job: pb.TrainJob, reason: str, message: str) -> None:
        if job.reason == reason:
            return  # once per waiting episode

        def mutate(current: pb.TrainJob) -> None:
            if current.uid != job.uid or current.state != pb.JOB_STATE_QUEUED or current.reason == reason:
                raise Unchanged
            records.add_event(current, pb.JOB_STATE_QUEUED, reason, truncate(message), now=self.clock())

        await self.store.update(job.tenant, job.name, mutate)

    async def _admit(self, job: pb.TrainJob, amounts: list[Amount], wanted: resources_pb2.Resources) -> str:
        key = job_key(job.tenant, job.name)
        held = held_of(job)
        self._admitting.add(key)
        try:
            try:
                await self.quota.reserve(job.tenant, held.owner_id, wanted)
            except errors.QuotaBusy as err:
                self._last_quota_message = err.message
                await self._note_waiting(job, "QuotaExceeded", err.message)
                return "quota"
            except errors.ResourceExhausted as err:
                # The limits were lowered below the job after it was accepted.
                self._last_quota_message = f"{err.message} (waits until the limit is raised)"
                await self._note_waiting(job, "QuotaExceeded", self._last_quota_message)
                return "quota"
            except errors.NotFound:
                await self._cancel_queued(job, "TenantDeleted", f"tenant {job.tenant!r} no longer exists")
                return "skip"
            except errors.CloudMLError as err:
                log.info("cannot reserve quota for %s: %s", key, err.message)
                return "retry"
            try:
                await self.store.put_held(held)
                self.runtime.reserve(held.group, amounts)
            except (CapacityBusy, Unschedulable) as err:
                await self.release(held)
                await self._note_waiting(job, "Unschedulable", f"waiting for capacity: {err}")
                return "capacity"
            except BaseException:
                # etcd trouble after the quota was reserved: give it back now
                # (the release loop retries whatever this cannot).
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.release(held))
                raise
            now = self.clock()

            def mutate(current: pb.TrainJob) -> None:
                if current.uid != job.uid or current.state != pb.JOB_STATE_QUEUED:
                    raise Unchanged
                records.add_event(current, pb.JOB_STATE_PREPARING, "Admitted",
                                  f"quota and {self.runtime.name} capacity reserved for "
                                  f"{len(amounts)} replica(s)", now=now)
                if not current.HasField("start_time"):
                    current.start_time.CopyFrom(records.ts(now))

            admitted = await self.store.update(job.tenant, job.name, mutate)
            if admitted is None or admitted.uid != job.uid or admitted.state != pb.JOB_STATE_PREPARING:
                await self.release(held)  # cancelled (or deleted) meanwhile
                return "skip"
            self._queued.discard(key)
            self._spawn(admitted)
            return "admitted"
        finally:
            self._admitting.discard(key)

    async def _cancel_queued(self, job: pb.TrainJob, reason: str, message: str) -> None:
        def mutate(current: pb.TrainJob) -> None:
            if current.uid != job.uid or current.state != pb.JOB_STATE_QUEUED:
                raise Unchanged
            records.add_event(current, pb.JOB_STATE_CANCELLED, reason, message, now=self.clock())

        await self.store.update(job.tenant, job.name, mutate)

    # --- runners ---------------------------------------------------------------------------

    def _spawn(self, job: pb.TrainJob, recovered: str = "") -> None:
        key = job_key(job.tenant, job.name)
        runner = JobRunner(self, job, recovered)
        self.runners[key] = runner
        task = asyncio.create_task(runner.run(), name=f"job:{key}")
        self._tasks[key] = task

        def done(t: asyncio.Task) -> None:
            if self._tasks.get(key) is t:
                del self._tasks[key]
                self.runners.pop(key, None)
            self.metrics.active.set(len(self.runners))
            self._wake.set()

        task.add_done_callback(done)
