"""Driving one started job (leader only): `JobRunner`.

The scheduler (`services.jobs.scheduler`) starts one `JobRunner` task per
job it admits or adopts: PREPARING (fetch the trainer package,
`EnvCache.ensure`, output into the job log), start an attempt (ports,
TF_CONFIG, one process per replica via the runtime), monitor (exits, cancel,
deadline, metrics ingestion every `ingest_seconds`), restart per policy,
stop, release. Every state write is a compare-and-swap, so a cancel made by
any process in between is never lost: the runner sees CANCELLING and stops.

A runner started after a take-over (`recovered`) resumes from the stored
state: RUNNING jobs wait on their replicas anew (replicas that ended meanwhile
are judged by the policy at once; replicas the runtime lost count as failed
with ReplicaLost); PREPARING and RESTARTING ones stop whatever of their next
attempt had already started and start it again; CANCELLING ones finish the
cancel. Quota and capacity are released (through the scheduler) after the
final state is written.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING

from cloudml.jobs.v1 import jobs_service_pb2 as pb
from services.common import errors
from services.common.confine import Confiner
from services.common.runtime.base import ReplicaPhase, ReplicaRequest, ReplicaStatus
from services.common.runtime.port_guard import IsolationUnavailable
from services.jobs import policy, records
from services.jobs.core import confine_spec
from services.jobs.envs import FetchFailed, InstallFailed, fetch
from services.jobs.logs import JobLog, JobPaths, last_line
from services.jobs.metrics import Ingester
from services.jobs.store import Held, Unchanged
from services.jobs.tfconfig import Replica, assign_addresses, cluster_spec, members, tf_config
from services.common.aio import wait_event

if TYPE_CHECKING:
    from services.jobs.scheduler import Scheduler

log = logging.getLogger(__name__)

MAX_MESSAGE = 4000


#: The interpreter of the platform's trainer image (on a runtime that installs packages itself).
POD_PYTHON = "python"


def truncate(text: str, limit: int = MAX_MESSAGE) -> str:
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


def held_of(job: pb.TrainJob) -> Held:
    """What a started job holds (quota reservation, runtime group), as its held marker names it."""
    return Held(job.tenant, job.name, job.uid, records.owner_id(job), records.group_of(job))


class JobRunner:
    """Drives one started job to its final state, then releases what it holds."""

    def __init__(self, scheduler: "Scheduler", job: pb.TrainJob, recovered: str = ""):
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
        message = truncate(message)

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
        await wait_event(self.poked, timeout)

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
                    log.warning("job %s/%s: %s; runner stops", self.tenant, self.name, err)
                    return
                log.exception("runner of %s/%s failed; resuming from the stored state", self.tenant, self.name)
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
                raise RuntimeError(f"job {self.name} in state {policy.state_name(state)} has a runner")
        await self._finish()

    # --- preparing ---------------------------------------------------------------------------

    async def _ensure_env(self) -> bool:
        """Fetches and installs the trainer package; False when the job
        changed state instead (install failed, cancel, deadline)."""
        attempt = self.job.attempts
        started = self.s.clock()

        def line(text: str) -> None:
            self.joblog.write(attempt, text)

        if self.s.runtime.installs_packages:  # the replica's entrypoint installs it, where it runs
            line(f"[platform] each replica installs {self.job.spec.trainer_uri} where it runs "
                 f"(services.jobs.pod_entrypoint on the {self.s.runtime.name} runtime)")
            self.python = POD_PYTHON
            return True

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
                                           f"{os.path.basename(self.job.spec.trainer_uri)} into a new environment "
                                           "(output in the job log)")
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
        env = {"PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "HOME": self.paths.workdir,
               "TMPDIR": self.paths.workdir}
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
        group = records.group_of(self.job)
        try:  # on `local` with tenant isolation, the ports are the tenant's alone from here on
            addresses = assign_addresses(self.replicas, await self.s.runtime.addresses(
                group, members(self.replicas), tenant=self.tenant))
        except IsolationUnavailable as err:
            await self._transition(pb.JOB_STATE_FAILED, "StartFailed", str(err))
            return
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
                replica_id=self.rid(attempt, replica), group=group, role=replica.role, index=replica.index,
                argv=self._argv(),
                env=self._env(replica, attempt, cluster), workdir=self.paths.workdir,
                log_path=self.paths.replica_log(attempt, replica),
                resources=self.resources[replica], tenant=self.tenant, image=spec.docker_image,
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

    def _argv(self) -> list[str]:
        spec = self.job.spec
        if self.s.runtime.installs_packages:
            return [POD_PYTHON, "-m", "services.jobs.pod_entrypoint", "--package", spec.trainer_uri,
                    "--module", spec.module_name, "--", *spec.job_args]
        return [self.python, "-m", spec.module_name, *spec.job_args]

    # --- monitoring --------------------------------------------------------------------------

    def _exit_of(self, replica: Replica, status: ReplicaStatus) -> policy.Exit:
        if status.phase == ReplicaPhase.UNKNOWN:
            return policy.Exit(replica, status.exit_code, "Lost")
        reason = status.reason or ("Completed" if status.exit_code == 0 else "Error")
        return policy.Exit(replica, status.exit_code, reason, status.message)

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
        if policy.failure_reason(failure) == "ReplicaFailed":
            said = await asyncio.to_thread(last_line, self.paths.replica_log(attempt, failure.replica))
            if said:
                message += f": {said}"
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
