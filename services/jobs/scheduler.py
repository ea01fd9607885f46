"""The scheduler: admits queued jobs and drives started ones (leader only).

Every jobs process runs `Scheduler.run()`, which campaigns in the election
under /cloudml/jobs/election/; only the leader schedules, the others stand by
(and serve the API). Losing the lease stops the leader's loops at once
without touching any replica process: the next leader adopts them.

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
One `JobDriver` task per started job: PREPARING (fetch the trainer package,
`EnvCache.ensure`, output into the job log), start an attempt (ports,
TF_CONFIG, one process per replica via the runtime), monitor (exits, cancel,
deadline, metrics ingestion every `ingest_seconds`), restart per policy,
stop, release. Every state write is a compare-and-swap, so a cancel made by
any process in between is never lost: the driver sees CANCELLING and stops.

Adoption (a new leader, after a crash or a failover)
----------------------------------------------------
`runtime.adopt()` restores the runtime's view; then every job the records
show as PREPARING, RUNNING, RESTARTING or CANCELLING gets a driver again:
RUNNING ones wait on their replicas anew (replicas that ended meanwhile are
judged by the policy at once; replicas the runtime lost count as failed with
ReplicaLost); PREPARING and RESTARTING ones stop whatever of their next
attempt had already started and start it again; CANCELLING ones finish the
cancel. Replicas of no active job are stopped, and quota and capacity held
for jobs that are no longer active (held markers, reservations) are
returned. Quota and capacity are always released after the final state is
written, and a held marker stays until both are released, so no crash can
leak them.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import defaultdict

import grpc
from dataclasses import dataclass

from cloudml.common.v1 import resources_pb2
from cloudml.jobs.v1 import jobs_service_pb2 as pb
from services.common import errors
from services.common.etcd import Election, Session, run_as_leader
from services.common.runtime.base import (
    Amount,
    CapacityBusy,
    ReplicaPhase,
    ReplicaRequest,
    ReplicaStatus,
    Runtime,
    Unschedulable,
)
from services.jobs import policy, records
from services.common.confine import Confiner
from services.jobs.core import confine_spec
from services.jobs.envs import EnvCache, FetchFailed, InstallFailed, fetch
from services.jobs.logs import JobLog, JobPaths
from services.jobs.metrics import Ingester
from services.jobs.observability import JobsMetrics
from services.jobs.store import ELECTION, Held, JobIndex, JobStore, Unchanged, job_key
from services.jobs.tfconfig import Replica, assign_addresses, cluster_spec, tf_config

log = logging.getLogger(__name__)

RESOURCE_FIELDS = ("cpu_millis", "memory_bytes", "gpus", "train_jobs")
MAX_MESSAGE = 4000


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


def _truncate(text: str, limit: int = MAX_MESSAGE) -> str:
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


def held_of(job: pb.TrainJob) -> Held:
    return Held(job.tenant, job.name, job.uid, records.owner_id(job), records.group_of(job))


def _dominates(need: resources_pb2.Resources, busy: resources_pb2.Resources) -> bool:
    """True when `need` is at least `busy` in every field: if busy did not fit
    the quota now, neither does need."""
    return all(getattr(need, f) >= getattr(busy, f) for f in RESOURCE_FIELDS)


class Scheduler:
    def __init__(self, session: Session, store: JobStore, index: JobIndex, quota, runtime: Runtime,
                 envs: EnvCache, settings: SchedulerSettings, clock=time.time, metrics: JobsMetrics | None = None):
        self.session = session
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
        self.drivers: dict[str, JobDriver] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._admitting: set[str] = set()
        self._queued: set[str] = set()
        self._wake = asyncio.Event()
        self._last_quota_message = ""
        index.listeners.append(self._on_change)

    # --- leadership ---------------------------------------------------------------------

    async def run(self) -> None:
        """Campaigns forever; schedules while leading."""
        while self.session.lease_id == 0:
            await asyncio.sleep(0.1)
        election = Election(self.session, ELECTION, self.settings.instance.encode())
        await run_as_leader(election, self._lead)

    def _on_change(self, key: str, job: pb.TrainJob | None) -> None:
        if not self.leading:
            return
        driver = self.drivers.get(key)
        if driver is not None:
            driver.poke(job)
        if job is None or policy.is_final(job.state):
            self._queued.discard(key)
            self._wake.set()
        elif job.state == pb.JOB_STATE_QUEUED and key not in self._queued:
            self._queued.add(key)
            self._wake.set()

    async def _lead(self) -> None:
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
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.pass_seconds)
        finally:
            self.leading = False
            if releaser:
                releaser.cancel()
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, *([releaser] if releaser else []), return_exceptions=True)
            self.drivers.clear()
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
            if key in self._admitting or (key in self.drivers and self.drivers[key].job.uid == held.uid):
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
        self.metrics.active.set(len(self.drivers))
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
            if key in self.drivers or key in self._admitting or job.tenant in blocked_tenants:
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
            records.add_event(current, pb.JOB_STATE_QUEUED, reason, _truncate(message), now=self.clock())

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

    # --- drivers ---------------------------------------------------------------------------

    def _spawn(self, job: pb.TrainJob, recovered: str = "") -> None:
        key = job_key(job.tenant, job.name)
        driver = JobDriver(self, job, recovered)
        self.drivers[key] = driver
        task = asyncio.create_task(driver.run(), name=f"job:{key}")
        self._tasks[key] = task

        def done(t: asyncio.Task) -> None:
            if self._tasks.get(key) is t:
                del self._tasks[key]
                self.drivers.pop(key, None)
            self.metrics.active.set(len(self.drivers))
            self._wake.set()

        task.add_done_callback(done)


class JobDriver:
    """Drives one started job to its final state, then releases what it holds."""

    def __init__(self, scheduler: Scheduler, job: pb.TrainJob, recovered: str = ""):
        self.s = scheduler
        self.job = job
        self.uid = job.uid
        self.tenant, self.name = job.tenant, job.name
        self.recovered = recovered
        self.paths = JobPaths.of(scheduler.settings.data_dir, job.tenant, job.name)
        self.joblog = JobLog(self.paths, scheduler.clock)
        self.replicas: list[Replica] = records.replicas_of(job.spec)
        self.resources = records.resources_of(job.spec)
        self.python: str | None = None
        self.latest_state = job.state
        self.poked = asyncio.Event()
        self.ingester = Ingester(scheduler.store, job.tenant, job.name, self.paths)
        timeout = job.spec.timeout.seconds + job.spec.timeout.nanos / 1e9
        self.timeout = timeout
        self.deadline = records.seconds(job.start_time) + timeout if timeout > 0 and job.HasField("start_time") else 0.0

    # --- plumbing --------------------------------------------------------------------------

    def poke(self, job: pb.TrainJob | None) -> None:
        if job is not None and job.uid == self.uid:
            self.latest_state = job.state
        self.poked.set()

    @property
    def cancel_requested(self) -> bool:
        return self.latest_state == pb.JOB_STATE_CANCELLING

    def rid(self, attempt: int, replica: Replica) -> str:
        return records.replica_id(self.job, attempt, replica)

    def _deadline_left(self) -> float | None:
        if not self.deadline:
            return None
        return self.deadline - self.s.clock()

    async def _write(self, mutate) -> pb.TrainJob:
        def guarded(job: pb.TrainJob) -> None:
            if job.uid != self.uid:
                raise errors.NotFound(f"job {self.name} was replaced")
            mutate(job)

        job = await self.s.store.update(self.tenant, self.name, guarded)
        if job is None:
            raise errors.NotFound(f"job {self.name} disappeared")
        self.job = job
        self.latest_state = job.state
        return job

    async def _transition(self, state: int, reason: str, message: str = "", extra=None) -> pb.TrainJob:
        """Moves the job to `state` with an event. A cancel that came in
        meanwhile wins: a final state becomes CANCELLED, any other keeps
        CANCELLING (with `extra`'s changes, e.g. the replicas just started)."""
        now = self.s.clock()
        message = _truncate(message)

        def mutate(job: pb.TrainJob) -> None:
            if policy.is_final(job.state):
                raise Unchanged
            if extra:
                extra(job)
            if job.state == pb.JOB_STATE_CANCELLING and state != pb.JOB_STATE_CANCELLED:
                if policy.is_final(state):
                    records.add_event(job, pb.JOB_STATE_CANCELLED, "Cancelled",
                                      f"cancelled (the job was ending: {reason} {message})".strip(), now=now)
                elif extra is None:
                    raise Unchanged
                return
            records.add_event(job, state, reason, message, now=now)

        before = self.job
        job = await self._write(mutate)
        self.joblog.write(job.attempts, f"[platform] {policy.state_name(job.state)}: {job.reason} {job.message}".rstrip())
        if policy.is_final(job.state) and not policy.is_final(before.state):
            self.s.metrics.finished.labels(policy.state_name(job.state), job.reason).inc()
        if job.reason == "Started" and job.attempts == 1 and before.attempts == 0:
            self.s.metrics.start_seconds.observe(max(0.0, self.s.clock() - records.seconds(job.create_time)))
        return job

    async def _wait_poke(self, timeout: float | None) -> None:
        self.poked.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.poked.wait(), timeout)

    async def _ingest(self) -> None:
        try:
            await self.ingester.ingest()
        except errors.CloudMLError as err:
            log.info("metrics of %s/%s not ingested now: %s", self.tenant, self.name, err.message)
        except Exception:  # noqa: BLE001 - metrics never fail a job
            log.exception("metrics ingestion of %s/%s failed", self.tenant, self.name)

    # --- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        delay = 0.5
        while True:
            try:
                await self._drive()
                return
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - retry from the stored state
                if isinstance(err, errors.NotFound):
                    log.warning("job %s/%s: %s; driver stops", self.tenant, self.name, err)
                    return
                log.exception("driver of %s/%s failed; resuming from the stored state", self.tenant, self.name)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                with contextlib.suppress(Exception):
                    found = await self.s.store.get(self.tenant, self.name)
                    if found is None or found[0].uid != self.uid:
                        return
                    self.job = found[0]
                    self.latest_state = self.job.state

    async def _drive(self) -> None:
        if self.recovered:
            message, self.recovered = self.recovered, ""

            def note(job: pb.TrainJob) -> None:
                if policy.is_final(job.state):
                    raise Unchanged
                records.add_event(job, job.state, "Recovered", message, now=self.s.clock())

            await self._write(note)
            self.joblog.write(self.job.attempts, f"[platform] {message}")
        while not policy.is_final(self.job.state):
            state = self.job.state
            if state == pb.JOB_STATE_PREPARING:
                await self._prepare()
            elif state == pb.JOB_STATE_RUNNING:
                await self._monitor()
            elif state == pb.JOB_STATE_RESTARTING:
                await self._restart()
            elif state == pb.JOB_STATE_CANCELLING:
                await self._cancel()
            else:
                raise RuntimeError(f"job {self.name} in state {policy.state_name(state)} has a driver")
        await self._finish()

    # --- preparing ---------------------------------------------------------------------------

    async def _ensure_env(self) -> bool:
        """Fetches and installs the trainer package; False when the job
        changed state instead (install failed, cancel, deadline)."""
        attempt = self.job.attempts
        started = self.s.clock()

        def line(text: str) -> None:
            self.joblog.write(attempt, text)

        async def install() -> str:
            line(f"[platform] fetching {self.job.spec.trainer_uri}")
            await asyncio.to_thread(self._gate_job_dirs)
            try:
                where = await asyncio.to_thread(self._confined)
            except errors.CloudMLError as err:
                raise FetchFailed(err.message) from None
            path = await fetch(self.job.spec.trainer_uri, self.paths.package_dir, where)
            env = await self.s.envs.ensure(path, line, tenant=self.tenant)
            line(f"[platform] environment {env.key[:12]} {'(cached)' if env.cached else 'built'}: {env.python}")
            return env.python

        task = asyncio.create_task(install())
        noted = False
        try:
            while not task.done():
                left = self._deadline_left()
                timeout = 0.5 if not noted else None
                if left is not None:
                    timeout = max(0.0, left) if timeout is None else min(timeout, max(0.0, left))
                self.poked.clear()
                poke = asyncio.create_task(self.poked.wait())
                await asyncio.wait({task, poke}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                poke.cancel()
                if task.done():
                    break
                if self.cancel_requested:
                    return False
                left = self._deadline_left()
                if left is not None and left <= 0:
                    await self._transition(pb.JOB_STATE_FAILED, "DeadlineExceeded",
                                           f"timeout {self.timeout:g}s passed while installing the trainer package")
                    return False
                if not noted and self.s.clock() - started >= 0.5:
                    noted = True
                    await self._transition(self.job.state, "Installing",
                                           f"installing {os.path.basename(self.job.spec.trainer_uri)} into a new "
                                           "environment (output in the job log)")
            self.python = task.result()
            return True
        except InstallFailed as err:
            await self._transition(pb.JOB_STATE_FAILED, "InstallFailed", err.message)
            return False
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def _confined(self):
        """The job's paths checked again for its tenant (a stored job from
        before the rules, or a symlink planted since it was submitted)."""
        confiner = Confiner(os.path.join(self.s.settings.data_dir, "storage"), self.s.settings.allowed_uri_schemes)
        return confine_spec(confiner, self.tenant, self.job.spec)[0]

    async def _prepare(self) -> None:
        try:
            await asyncio.to_thread(self._confined)
        except errors.CloudMLError as err:
            await self._transition(pb.JOB_STATE_FAILED, "PathRefused", err.message)
            await self._refresh()
            return
        if not await self._ensure_env():
            await self._refresh()
            return
        await self._start_attempt(self.job.attempts + 1)

    async def _refresh(self) -> None:
        found = await self.s.store.get(self.tenant, self.name)
        if found is None or found[0].uid != self.uid:
            raise errors.NotFound(f"job {self.name} disappeared")
        self.job = found[0]
        self.latest_state = self.job.state

    # --- starting an attempt ---------------------------------------------------------------

    def _gate_job_dirs(self) -> None:
        """The job's directory: only the platform and the job's tenant may
        enter it (services.common.tenancy); the package inside is readable
        by the tenant (its install runs as the tenant), the logs are the
        platform's alone (the tenant reads them through the API)."""
        tenancy = self.s.tenancy
        jobs_root = os.path.dirname(os.path.dirname(self.paths.root))
        os.makedirs(jobs_root, exist_ok=True)
        if tenancy.enabled:
            os.chmod(jobs_root, 0o711)
        tenancy.gate(os.path.dirname(self.paths.root), self.tenant, 0o710)
        tenancy.gate(self.paths.root, self.tenant, 0o710)
        tenancy.gate(self.paths.package_dir, self.tenant, 0o750)
        os.makedirs(self.paths.logs, exist_ok=True)
        os.chmod(self.paths.logs, 0o700)

    def _prepare_files(self, attempt: int) -> None:
        """What the attempt's replicas write, made theirs: the output
        directory (created as the tenant's when it is in the tenant's
        storage), one metrics file each in a directory they may not change
        (so the platform never reads through a link they planted). The work
        directory is made the tenant's by the runtime."""
        tenancy = self.s.tenancy
        self._gate_job_dirs()
        output = self.job.spec.output_path
        local = output[len("file://"):] if output.startswith("file://") else ("" if "://" in output else output)
        if local:
            storage = os.path.join(self.s.settings.data_dir, "storage")
            own = os.path.join(storage, self.tenant)
            os.makedirs(storage, exist_ok=True)
            if tenancy.enabled:
                os.chmod(storage, 0o711)
            tenancy.own_dir(own, self.tenant)
            if not (os.path.abspath(local) == own or os.path.abspath(local).startswith(own + os.sep)):
                raise ValueError(f"the output path {output} is outside the tenant's storage")
            tenancy.make_dirs(own, local, self.tenant)
        for replica in self.replicas:
            os.makedirs(os.path.dirname(self.paths.replica_log(attempt, replica)), mode=0o700, exist_ok=True)
            metrics = self.paths.metrics_file(attempt, replica)
            tenancy.gate(os.path.dirname(os.path.dirname(metrics)), self.tenant, 0o710)
            tenancy.gate(os.path.dirname(metrics), self.tenant, 0o710)
            tenancy.own_file(metrics, self.tenant)

    def _env(self, replica: Replica, attempt: int, cluster: dict[str, list[str]]) -> dict[str, str]:
        spec = self.job.spec
        # HOME and TMPDIR in the job's own work directory: tenant code writes
        # its caches and temporary files where no other tenant can look.
        env = {"PYTHONUNBUFFERED": "1", "HOME": self.paths.workdir, "TMPDIR": self.paths.workdir}
        env.update(spec.env)
        env.update({
            "TF_CONFIG": tf_config(cluster, replica, spec.env.get("CLOUDML_TRIAL_NUMBER", "")),
            "CLOUDML_JOB_NAME": self.name,
            "CLOUDML_TENANT": self.tenant,
            "CLOUDML_REPLICA_TYPE": replica.role,
            "CLOUDML_REPLICA_INDEX": str(replica.index),
            "CLOUDML_ATTEMPT": str(attempt),
            "CLOUDML_OUTPUT_PATH": spec.output_path,
            "CLOUDML_METRICS_FILE": self.paths.metrics_file(attempt, replica),
        })
        return env

    async def _clear_attempt(self, attempt: int) -> None:
        """Stops and forgets whatever of this attempt the runtime knows
        (after a crash mid-start, or before a restart)."""
        ids = [self.rid(attempt, r) for r in self.replicas]
        statuses = await asyncio.gather(*(self.s.runtime.status(i) for i in ids))
        running = [s for s in statuses if s.phase == ReplicaPhase.RUNNING]
        await asyncio.gather(*(self.s.runtime.stop(s.replica_id, self.s.settings.stop_grace) for s in running),
                             return_exceptions=True)
        for status in statuses:
            if status.phase != ReplicaPhase.UNKNOWN or status.reason == "Lost":
                with contextlib.suppress(Exception):
                    await self.s.runtime.forget(status.replica_id)

    async def _start_attempt(self, attempt: int) -> None:
        if self.cancel_requested:
            await self._refresh()
            return
        await self._clear_attempt(attempt)
        spec = self.job.spec
        in_cluster = [r for r in self.replicas if r.in_cluster]
        ports = await self.s.runtime.allocate_ports(len(in_cluster))
        addresses = assign_addresses(self.replicas, ports)
        cluster = cluster_spec(addresses)
        try:  # every attempt: a restart re-checks the paths too (a link planted since)
            await asyncio.to_thread(self._confined)
        except errors.CloudMLError as err:
            await self._transition(pb.JOB_STATE_FAILED, "PathRefused", err.message)
            return
        try:
            await asyncio.to_thread(self._prepare_files, attempt)
        except (OSError, ValueError) as err:
            await self._transition(pb.JOB_STATE_FAILED, "StartFailed", f"cannot prepare the job's files: {err}")
            return
        requests = []
        for replica in self.replicas:
            requests.append(ReplicaRequest(
                replica_id=self.rid(attempt, replica), group=records.group_of(self.job),
                argv=[self.python, "-m", spec.module_name, *spec.job_args],
                env=self._env(replica, attempt, cluster), workdir=self.paths.workdir,
                log_path=self.paths.replica_log(attempt, replica),
                resources=self.resources[replica], tenant=self.tenant,
            ))
        results = await asyncio.gather(*(self.s.runtime.start(r) for r in requests), return_exceptions=True)
        failed = [(req, res) for req, res in zip(requests, results) if isinstance(res, BaseException)]
        if failed:
            started = [res for res in results if not isinstance(res, BaseException)]
            await asyncio.gather(*(self.s.runtime.stop(s.replica_id, self.s.settings.stop_grace) for s in started),
                                 return_exceptions=True)
            request, error = failed[0]
            await self._transition(pb.JOB_STATE_FAILED, "StartFailed",
                                   f"cannot start {request.replica_id.rsplit('.', 1)[-1]}: {error}")
            return
        now = self.s.clock()

        def extra(job: pb.TrainJob) -> None:
            job.attempts = attempt
            del job.replicas[:]
            for replica, status in zip(self.replicas, results):
                item = pb.ReplicaStatus(replica=pb.ReplicaId(type=replica.type, index=replica.index),
                                        state=pb.REPLICA_STATE_RUNNING, address=addresses.get(replica, ""),
                                        pid=status.pid, start_time=records.ts(status.started_at or now),
                                        gpu_ids=list(status.gpu_ids))
                job.replicas.append(item)

        names = ", ".join(f"{r.name} pid {s.pid}" for r, s in zip(self.replicas, results))
        await self._transition(pb.JOB_STATE_RUNNING, "Started", f"attempt {attempt}: {names}", extra)

    # --- monitoring --------------------------------------------------------------------------

    def _exit_of(self, replica: Replica, status: ReplicaStatus) -> policy.Exit:
        if status.phase == ReplicaPhase.UNKNOWN:
            return policy.Exit(replica, status.exit_code, "Lost")
        return policy.Exit(replica, status.exit_code, status.reason or ("Completed" if status.exit_code == 0 else "Error"))

    @staticmethod
    def _record_exit(item: pb.ReplicaStatus, status: ReplicaStatus, stopped: bool = False) -> None:
        ok = status.phase == ReplicaPhase.SUCCEEDED
        if stopped and not ok and status.reason == "Killed":
            item.state = pb.REPLICA_STATE_STOPPED
        else:
            item.state = pb.REPLICA_STATE_SUCCEEDED if ok else pb.REPLICA_STATE_FAILED
        if status.exit_code is not None:
            item.exit_code = status.exit_code
        item.reason = "Lost" if status.phase == ReplicaPhase.UNKNOWN else (
            "" if ok else ("Stopped" if item.state == pb.REPLICA_STATE_STOPPED else status.reason))
        item.end_time.CopyFrom(records.ts(status.finished_at or time.time()))

    async def _record_statuses(self, ended: list[tuple[Replica, ReplicaStatus]], stopped: bool = False) -> None:
        if not ended:
            return

        def mutate(job: pb.TrainJob) -> None:
            for replica, status in ended:
                item = records.replica_status(job, replica)
                if item is not None:
                    self._record_exit(item, status, stopped)

        await self._write(mutate)

    async def _stop_attempt(self, attempt: int, already: set[Replica]) -> None:
        """Stops every replica of the attempt that has not ended, at once."""
        targets = [r for r in self.replicas if r not in already]
        results = await asyncio.gather(
            *(self.s.runtime.stop(self.rid(attempt, r), self.s.settings.stop_grace) for r in targets),
            return_exceptions=True)
        stopped = [(r, st) for r, st in zip(targets, results) if isinstance(st, ReplicaStatus)]
        for r, st in zip(targets, results):
            if isinstance(st, BaseException):
                log.error("stopping %s failed: %r", self.rid(attempt, r), st)
        await self._record_statuses(stopped, stopped=True)

    async def _monitor(self) -> None:
        attempt = self.job.attempts
        exits: list[tuple[float, policy.Exit]] = []
        ended_replicas: set[Replica] = set()
        waits: dict[asyncio.Task, Replica] = {}
        for replica in self.replicas:
            item = records.replica_status(self.job, replica)
            if item is not None and item.state in (pb.REPLICA_STATE_SUCCEEDED, pb.REPLICA_STATE_FAILED):
                code = item.exit_code if item.HasField("exit_code") else None
                reason = item.reason or ("Completed" if code == 0 else "Error")
                exits.append((records.seconds(item.end_time), policy.Exit(replica, code, reason)))
                ended_replicas.add(replica)
            else:
                waits[asyncio.create_task(self.s.runtime.wait(self.rid(attempt, replica)))] = replica
        exits.sort(key=lambda e: e[0])
        next_ingest = 0.0
        try:
            while True:
                verdict = policy.verdict(self.replicas, [e for _, e in exits])
                if verdict.outcome != "running":
                    break
                if self.cancel_requested:
                    await self._refresh()  # CANCELLING: the loop cancels
                    if self.job.state != pb.JOB_STATE_RUNNING:
                        return
                left = self._deadline_left()
                if left is not None and left <= 0:
                    await self._stop_attempt(attempt, ended_replicas)
                    await self._ingest()
                    await self._transition(pb.JOB_STATE_FAILED, "DeadlineExceeded",
                                           f"still running after its timeout of {self.timeout:g}s; replicas stopped")
                    return
                now = time.monotonic()
                if now >= next_ingest:
                    await self._ingest()
                    next_ingest = now + self.s.settings.ingest_seconds
                timeout = max(0.0, next_ingest - time.monotonic())
                if left is not None:
                    timeout = min(timeout, max(0.0, left))
                self.poked.clear()
                poke = asyncio.create_task(self.poked.wait())
                done, _ = await asyncio.wait({*waits, poke}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                poke.cancel()
                ended = []
                for task in done:
                    if task in waits:
                        replica = waits.pop(task)
                        ended.append((replica, task.result()))
                if ended:
                    ended.sort(key=lambda e: e[1].finished_at)
                    await self._record_statuses(ended)
                    for replica, status in ended:
                        exits.append((status.finished_at, self._exit_of(replica, status)))
                        ended_replicas.add(replica)
        finally:
            for task in waits:
                task.cancel()
            if waits:
                await asyncio.gather(*waits, return_exceptions=True)
        # The attempt is decided: stop the rest (parameter servers, other workers).
        await self._stop_attempt(attempt, ended_replicas)
        await self._ingest()
        if verdict.outcome == "succeeded":
            await self._transition(pb.JOB_STATE_SUCCEEDED, "Succeeded",
                                   f"{verdict.exit.replica.name} exited 0 (attempt {attempt})")
            return
        failure = verdict.exit
        memory = records.format_memory(self.resources[failure.replica].memory_bytes)
        message = policy.failure_message(failure, memory)
        spec = self.job.spec
        if policy.should_restart(spec.restart_policy, spec.max_retries, attempt, failure):
            await self._transition(pb.JOB_STATE_RESTARTING, policy.failure_reason(failure),
                                   f"{message}; restarting (attempt {attempt + 1} of at most {1 + spec.max_retries})")
        else:
            await self._transition(pb.JOB_STATE_FAILED, policy.failure_reason(failure), message)

    # --- restarting and cancelling -------------------------------------------------------------

    async def _restart(self) -> None:
        attempt = self.job.attempts
        await self._stop_attempt(attempt, set())
        await self._clear_attempt(attempt)
        delay = min(self.s.settings.restart_backoff * 2 ** max(0, attempt - 1), self.s.settings.restart_backoff_max)
        await self._wait_poke(delay)
        if self.cancel_requested:
            await self._refresh()
            return
        left = self._deadline_left()
        if left is not None and left <= 0:
            await self._transition(pb.JOB_STATE_FAILED, "DeadlineExceeded",
                                   f"timeout {self.timeout:g}s passed before attempt {attempt + 1} could start")
            return
        if self.python is None and not await self._ensure_env():
            await self._refresh()
            return
        await self._start_attempt(attempt + 1)

    async def _cancel(self) -> None:
        attempt = self.job.attempts
        # The current attempt, and the next one in case a start was under way.
        ids = {self.rid(a, r): r for a in (attempt, attempt + 1) if a > 0 for r in self.replicas}
        statuses = await asyncio.gather(*(self.s.runtime.status(i) for i in ids))
        running = [s for s in statuses if s.phase == ReplicaPhase.RUNNING]
        results = await asyncio.gather(
            *(self.s.runtime.stop(s.replica_id, self.s.settings.stop_grace) for s in running), return_exceptions=True)
        current = [(ids[s.replica_id], st) for s, st in zip(running, results)
                   if isinstance(st, ReplicaStatus) and s.replica_id.startswith(records.group_of(self.job) + f".a{attempt}.")]
        await self._record_statuses(current, stopped=True)
        await self._ingest()
        await self._transition(pb.JOB_STATE_CANCELLED, "Cancelled", f"{len(running)} replica process(es) stopped")

    # --- the end -----------------------------------------------------------------------------

    async def _finish(self) -> None:
        """After the final state: nothing of the job runs any more; forget its
        replicas; return its quota and capacity."""
        for attempt in range(1, self.job.attempts + 2):
            await self._clear_attempt(attempt)
        if not await self.s.release(held_of(self.job)):
            log.info("release of %s/%s deferred to the release loop", self.tenant, self.name)
