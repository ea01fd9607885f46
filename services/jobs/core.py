"""Jobs domain logic on the API side: validation, exactly-once submission,
cancel, delete, lists, logs, metrics and watches.

No gRPC here: methods take plain values and a `Principal`, return protobuf
messages and raise typed errors from `services.common.errors`. The state of
started jobs is driven by the scheduler (`services.jobs.scheduler`, leader
only); the core only creates records, asks for a cancel and deletes finished
records, all through compare-and-swap writes, so it is safe in every jobs
process at once.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import re
import secrets
import shlex
import stat
import time
from dataclasses import dataclass
from typing import AsyncIterator

from cloudml.jobs.v1 import jobs_service_pb2 as pb
from services.common import errors, validation
from services.common.confine import Confiner, Location, open_beneath
from services.common.uploads import Stored, Uploads
from services.common.runtime.base import Runtime, Unschedulable
from services.common.tokens import Principal
from services.jobs import policy, records
from services.jobs.logs import JobLog, JobPaths, LogStreamer
from services.jobs.metrics import TensorBoardReader, merge_series, metrics_line
from services.jobs.observability import JobsMetrics
from services.jobs.archiver import JobArchive
from services.jobs.store import JobIndex, JobStore, Unchanged, create_ns, summary_of
from services.jobs.tfconfig import ROLES, SINGLETONS, Replica

log = logging.getLogger(__name__)

MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
METRIC_RE = re.compile(r"[A-Za-z0-9_./-]{1,128}")
RESERVED_ENV = frozenset({"TF_CONFIG", "CUDA_VISIBLE_DEVICES"})
# The only CLOUDML_* variables a spec may set: the tuner names a trial's study
# and number (the replica also finds the number in TF_CONFIG's task.trial).
TRIAL_ENV = frozenset({"CLOUDML_STUDY_NAME", "CLOUDML_TRIAL_NUMBER"})
PACKAGE_SUFFIXES = (".tar.gz", ".whl", ".zip")
MAX_ARGS, MAX_ARG_CHARS = 1000, 8192
MAX_ENV, MAX_ENV_CHARS = 200, 32768
MAX_REPLICAS = 100
MAX_RETRIES = 100
MAX_PRIORITY = 1000
COUNT_FIELDS = ("train_jobs", "model_replicas", "studies", "dev_environments", "tensorboards")
LABELS = {"cpu_millis": "cpu", "memory_bytes": "memory", "gpus": "gpus", "train_jobs": "train jobs"}


@dataclass(frozen=True)
class Defaults:
    """Per-replica resources for amounts a spec leaves at zero."""

    cpu_millis: int = 500
    memory_bytes: int = 2 * 2**30
    gpus: int = 0


def confine_spec(confiner: Confiner, tenant: str, spec: pb.TrainJobSpec) -> tuple[Location, Location | None]:
    """Where the spec's trainer package and output are, checked for `tenant`
    (see services.common.confine); raises InvalidArgument / PermissionDenied
    naming the field. Used when a job is submitted and again by the scheduler
    right before the job runs (a stored job, or a symlink planted since)."""
    package = confiner.check(tenant, spec.trainer_uri.strip(), "spec.trainer_uri", keep_plain=False)
    output = confiner.check(tenant, spec.output_path, "spec.output_path") if spec.output_path else None
    return package, output


def check_package_file(where: Location) -> None:
    """A local trainer package must be a regular file reached without symlinks."""
    try:
        fd = open_beneath(where.root, where.relative, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise errors.InvalidArgument(f"spec.trainer_uri {where.uri!r}: no such file on the platform") from None
    except OSError as err:
        raise errors.PermissionDenied(
            f"spec.trainer_uri {where.uri!r} cannot be read without following a symlink ({err.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise errors.InvalidArgument(f"spec.trainer_uri {where.uri!r} is not a file")
    finally:
        os.close(fd)


def spec_hash(spec: pb.TrainJobSpec) -> str:
    return hashlib.sha256(spec.SerializeToString(deterministic=True)).hexdigest()


def _amount(field: str, value: int) -> str:
    if field == "cpu_millis":
        return f"{value}m"
    if field == "memory_bytes":
        return records.format_memory(value)
    return str(value)


def _page_token(job: pb.TrainJob | tuple[int, str]) -> str:
    """The position after `job` (or a position): its creation time (ns) and name."""
    created, name = job if isinstance(job, tuple) else (create_ns(job), job.name)
    return base64.urlsafe_b64encode(f"{created}/{name}".encode()).decode().rstrip("=")


def _page_after(token: str) -> tuple[int, str]:
    if not token:
        return (0, "")
    try:
        created, _, name = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode().partition("/")
        validation.check_name(name)
        position = (int(created), name)
    except (ValueError, UnicodeDecodeError, errors.InvalidArgument):
        raise errors.InvalidArgument("page_token is not one this service issued") from None
    if not 0 <= position[0] < 2**63:
        raise errors.InvalidArgument("page_token is not one this service issued")
    return position


class JobsCore:
    def __init__(self, store: JobStore, index: JobIndex, quota, runtime: Runtime, data_dir: str,
                 defaults: Defaults = Defaults(), clock=time.time, metrics: JobsMetrics | None = None,
                 confiner: Confiner | None = None, uploads: Uploads | None = None,
                 archive: JobArchive | None = None):
        self.store = store
        self.index = index
        self.archive = archive
        self.quota = quota
        self.runtime = runtime
        self.data_dir = data_dir
        self.defaults = defaults
        self.clock = clock
        self.tensorboard = TensorBoardReader()
        self.metrics = metrics or JobsMetrics()
        storage = os.path.join(data_dir, "storage")
        self.confiner = confiner or Confiner(storage)
        self.uploads = uploads or Uploads(storage)

    # --- helpers ----------------------------------------------------------------------

    def paths(self, tenant: str, name: str) -> JobPaths:
        return JobPaths.of(self.data_dir, tenant, name)

    @staticmethod
    def _tenant(caller: Principal, tenant: str, name: str = "") -> str:
        """The tenant a request is about; NOT_FOUND when the caller may not see it."""
        tenant = tenant or caller.tenant
        validation.check_name(tenant, "tenant")
        if not caller.may_access(tenant):
            if name:
                raise errors.NotFound(f"job {name!r} not found")
            raise errors.NotFound(f"tenant {tenant!r} not found")
        return tenant

    async def find(self, tenant: str, name: str) -> tuple[pb.TrainJob, int] | None:
        """A job by name, live (its record's mod_revision) or archived (0);
        no authorization: callers have checked the tenant."""
        found = await self.store.get(tenant, name)
        if found is not None:
            return found[0], found[1].mod_revision
        job = await self.archive.get(tenant, name) if self.archive else None
        return (job, 0) if job is not None else None

    async def _load(self, caller: Principal, tenant: str, name: str) -> tuple[str, pb.TrainJob, int]:
        """(tenant, job, mod_revision; 0 for an archived job). NOT_FOUND for a
        job the caller may not see, live or archived alike."""
        validation.check_name(name, "name")
        tenant = self._tenant(caller, tenant, name)
        found = await self.find(tenant, name)
        if found is None:
            raise errors.NotFound(f"job {name!r} not found in tenant {tenant!r}")
        return tenant, found[0], found[1]

    # --- validation ---------------------------------------------------------------------

    def normalize(self, tenant: str, name: str, spec: pb.TrainJobSpec) -> pb.TrainJobSpec:
        """Checks the spec and returns it with defaults filled in; raises
        InvalidArgument (PermissionDenied for a path outside the tenant's
        storage or a forbidden address) naming the field."""
        out = pb.TrainJobSpec()
        out.CopyFrom(spec)
        bad = errors.InvalidArgument

        uri = spec.trainer_uri.strip()
        if not uri:
            raise bad("spec.trainer_uri is required: a trainer package (.tar.gz or .whl) by URI")
        if not uri.split("?", 1)[0].endswith(PACKAGE_SUFFIXES):
            raise bad(f"spec.trainer_uri {uri!r} must name a Python sdist (.tar.gz) or wheel (.whl)")
        if not spec.output_path:
            out.output_path = os.path.join(self.data_dir, "storage", tenant, "jobs", name)
        package, output = confine_spec(self.confiner, tenant, out)
        if package.local:
            check_package_file(package)
        out.trainer_uri = package.uri
        if output is not None:
            out.output_path = output.uri

        if not MODULE_RE.fullmatch(spec.module_name):
            raise bad(f"spec.module_name {spec.module_name!r} must be a dotted Python module name, e.g. trainer.task")

        args = list(spec.job_args)
        if spec.job_args_line:
            try:
                args += shlex.split(spec.job_args_line)
            except ValueError as err:
                raise bad(f"spec.job_args_line cannot be split shell-style: {err}") from None
        if len(args) > MAX_ARGS:
            raise bad(f"spec.job_args has {len(args)} arguments; at most {MAX_ARGS}")
        for i, arg in enumerate(args):
            if len(arg) > MAX_ARG_CHARS or "\0" in arg:
                raise bad(f"spec.job_args[{i}] is longer than {MAX_ARG_CHARS} characters or holds a NUL")
        del out.job_args[:]
        out.job_args.extend(args)
        out.job_args_line = ""

        self._check_replicas(spec, out)

        if len(spec.env) > MAX_ENV or sum(len(k) + len(v) for k, v in spec.env.items()) > MAX_ENV_CHARS:
            raise bad(f"spec.env is too large (at most {MAX_ENV} variables, {MAX_ENV_CHARS} characters)")
        for key, value in spec.env.items():
            if not ENV_KEY_RE.fullmatch(key):
                raise bad(f"spec.env key {key!r} must match [A-Za-z_][A-Za-z0-9_]*")
            if key in RESERVED_ENV or (key.startswith("CLOUDML_") and key not in TRIAL_ENV):
                raise bad(f"spec.env key {key!r} is set by the platform (TF_CONFIG, CUDA_VISIBLE_DEVICES, CLOUDML_*)")
            if "\0" in value:
                raise bad(f"spec.env[{key!r}] holds a NUL character")

        if spec.restart_policy not in pb.RestartPolicy.values():
            raise bad(f"spec.restart_policy {spec.restart_policy} is not a RestartPolicy")
        if not 0 <= spec.max_retries <= MAX_RETRIES:
            raise bad(f"spec.max_retries must be within 0..{MAX_RETRIES} (got {spec.max_retries})")
        if spec.timeout.seconds < 0 or spec.timeout.nanos < 0:
            raise bad("spec.timeout must not be negative")
        if not -MAX_PRIORITY <= spec.priority <= MAX_PRIORITY:
            raise bad(f"spec.priority must be within -{MAX_PRIORITY}..{MAX_PRIORITY} (got {spec.priority})")
        return out

    def _check_replicas(self, spec: pb.TrainJobSpec, out: pb.TrainJobSpec) -> None:
        bad = errors.InvalidArgument
        specs = list(spec.replica_specs)
        if not specs:
            specs = [pb.ReplicaSpec(type=pb.REPLICA_TYPE_MASTER, replica_count=1)]
        seen: set[int] = set()
        total = 0
        for i, rs in enumerate(specs):
            where = f"spec.replica_specs[{i}]"
            if rs.type not in ROLES:
                raise bad(f"{where}.type must be MASTER, CHIEF, PS, WORKER or EVALUATOR")
            if rs.type in seen:
                raise bad(f"{where}.type {ROLES[rs.type].upper()} is listed twice; one entry per type")
            seen.add(rs.type)
            if rs.replica_count < 1:
                raise bad(f"{where}.replica_count must be at least 1 (got {rs.replica_count})")
            if rs.type in SINGLETONS and rs.replica_count > 1:
                raise bad(f"{where}.replica_count: at most one {ROLES[rs.type].upper()} (got {rs.replica_count})")
            total += rs.replica_count
            res = rs.resources
            for field in COUNT_FIELDS:
                if getattr(res, field):
                    raise bad(f"{where}.resources.{field} must be 0 (only cpu_millis, memory_bytes, gpus apply)")
            validation.check_resources(res, f"{where}.resources")
        if pb.REPLICA_TYPE_MASTER in seen and pb.REPLICA_TYPE_CHIEF in seen:
            raise bad("spec.replica_specs: a job has a MASTER or a CHIEF, not both")
        if not seen & {pb.REPLICA_TYPE_MASTER, pb.REPLICA_TYPE_CHIEF, pb.REPLICA_TYPE_WORKER}:
            raise bad("spec.replica_specs: at least one MASTER, CHIEF or WORKER is needed")
        if total > MAX_REPLICAS:
            raise bad(f"spec.replica_specs: {total} replicas; at most {MAX_REPLICAS}")
        del out.replica_specs[:]
        for rs in sorted(specs, key=lambda r: list(ROLES).index(r.type)):
            filled = pb.ReplicaSpec()
            filled.CopyFrom(rs)
            res = filled.resources
            res.cpu_millis = res.cpu_millis or self.defaults.cpu_millis
            res.memory_bytes = res.memory_bytes or self.defaults.memory_bytes
            res.gpus = res.gpus or self.defaults.gpus
            out.replica_specs.append(filled)

    async def _check_fits(self, tenant: str, spec: pb.TrainJobSpec) -> None:
        """RESOURCE_EXHAUSTED when the job can never run; NOT_FOUND for an unknown tenant."""
        if spec.docker_image and self.runtime.name == "local":
            raise errors.FailedPrecondition(
                f"spec.docker_image {spec.docker_image!r}: the platform's runtime `local` runs replicas as "
                "processes on this machine and cannot run container images; leave docker_image empty"
            )
        amounts = list(records.resources_of(spec).values())
        try:
            self.runtime.check_fits_ever(amounts, spec.docker_image)
        except Unschedulable as err:
            raise errors.ResourceExhausted(f"the job can never fit the runtime `{self.runtime.name}`: {err}") from None
        wanted = records.total_of(spec)
        limits = await self.quota.limits(tenant)
        for field in ("cpu_millis", "memory_bytes", "gpus", "train_jobs"):
            want, limit = getattr(wanted, field), getattr(limits, field)
            if want > limit:
                raise errors.ResourceExhausted(
                    f"quota exceeded: {LABELS[field]}: the job's replicas together need {_amount(field, want)}, "
                    f"more than tenant {tenant!r}'s limit of {_amount(field, limit)}; it can never fit"
                )

    # --- submit ------------------------------------------------------------------------

    async def submit(self, caller: Principal, tenant: str, name: str, spec: pb.TrainJobSpec,
                     validate_only: bool = False) -> tuple[pb.TrainJob, bool]:
        tenant = self._tenant(caller, tenant)
        validation.check_name(name, "name")
        normalized = await asyncio.to_thread(self.normalize, tenant, name, spec)
        digest = spec_hash(normalized)
        if not validate_only:
            found = await self.find(tenant, name)  # an archived job's name stays taken
            if found is not None:
                return self._same_or_conflict(found[0], digest), False
        await self._check_fits(tenant, normalized)
        now = self.clock()
        job = pb.TrainJob(name=name, tenant=tenant, spec=normalized, spec_hash=digest, state=pb.JOB_STATE_QUEUED,
                          create_time=records.ts(now), uid=secrets.token_hex(6),
                          replicas=records.pending_replicas(normalized))
        job.reason, job.message = "Submitted", f"submitted by {caller.tenant}"
        job.events.append(pb.JobEvent(time=job.create_time, state=pb.JOB_STATE_QUEUED, reason=job.reason,
                                      message=job.message, attempt=0))
        if validate_only:
            return job, False
        created, existing = await self.store.create(job)
        if not created:
            return self._same_or_conflict(existing, digest), False
        archived = await self.archive.get(tenant, name) if self.archive else None
        if archived is not None:
            # The archiver points at a job of this name before it deletes the
            # record, so a job archived since the check above is seen here.
            mine = await self.store.get(tenant, name)
            if mine is not None and mine[0].uid == job.uid:
                await self.store.remove_new(job, mine[1].mod_revision)
            return self._same_or_conflict(archived, digest), False
        self.metrics.submitted.inc()
        JobLog(self.paths(tenant, name), self.clock).write(0, f"submitted (uid {job.uid}, spec {digest[:12]})")
        return job, True

    @staticmethod
    def _same_or_conflict(existing: pb.TrainJob, digest: str) -> pb.TrainJob:
        if existing.spec_hash == digest:
            return existing
        raise errors.AlreadyExists(
            f"job {existing.name!r} already exists in tenant {existing.tenant!r} with a different spec "
            f"(spec_hash {existing.spec_hash[:12]}...); choose another name, or delete it first"
        )

    # --- reads -------------------------------------------------------------------------

    async def get(self, caller: Principal, tenant: str, name: str) -> pb.TrainJob:
        return (await self._load(caller, tenant, name))[1]

    async def list(self, caller: Principal, tenant: str, states: list[int], page_size: int,
                   page_token: str) -> tuple[list[pb.TrainJob], str]:
        """A page of the tenant's jobs, live and archived, oldest first by
        (create_time, name): the page token is that position, valid across
        jobs moving to the archive meanwhile."""
        tenant = self._tenant(caller, tenant)
        size = validation.check_page_size(page_size)
        for state in states:
            if state not in pb.JobState.values() or state == pb.JOB_STATE_UNSPECIFIED:
                raise errors.InvalidArgument(f"states: {state} is not a JobState")
        after, wanted = _page_after(page_token), frozenset(states)
        if not wanted:
            return await self._list_all(tenant, after, size)
        # etcd first, then the archive: a job moving meanwhile is written to
        # the archive before it leaves etcd, so it is in at least one of them.
        live, more = await self.store.page(tenant, wanted, after, size)
        archived, more_archived = await self.archive.page(tenant, wanted, after, size) if self.archive else ([], False)
        merged = {job.name: job for job in archived}
        merged.update((job.name, job) for job in live)
        jobs = sorted(merged.values(), key=lambda j: (create_ns(j), j.name))
        more = more or more_archived or len(jobs) > size
        jobs = jobs[:size]
        return jobs, (_page_token(jobs[-1]) if more and jobs else "")

    async def _list_all(self, tenant: str, after: tuple[int, str], size: int) -> tuple[list[pb.TrainJob], str]:
        """A page without a state filter: positions first (etcd's order/ keys
        alone, the archive's pages), then only the chosen live records."""
        live, more = await self.store.positions(tenant, after, size)
        archived, more_archived = await self.archive.page(tenant, frozenset(), after, size) if self.archive else ([], False)
        chosen = sorted({*live, *((create_ns(j), j.name) for j in archived)})
        more = more or more_archived or len(chosen) > size
        chosen = chosen[:size]
        in_archive = {j.name: j for j in archived}
        names = [name for _, name in chosen if name not in in_archive]
        found = await self.store.summaries(tenant, names)
        jobs = []
        for _, name in chosen:
            job = found.get(name) or in_archive.get(name)
            if job is None and self.archive:  # archived since the range (or deleted: then skipped)
                moved = await self.archive.get(tenant, name)
                job = summary_of(moved) if moved is not None else None
            if job is not None:
                jobs.append(job)
        return jobs, (_page_token(chosen[-1]) if more and chosen else "")

    async def watch(self, caller: Principal, tenant: str, name: str) -> AsyncIterator[pb.TrainJob]:
        tenant, job, revision = await self._load(caller, tenant, name)
        yield job
        if policy.is_final(job.state):
            return
        while True:
            changed = self.index.changed
            entry = self.index.get(tenant, name)
            if entry is None or entry.job.uid != job.uid:
                # Not live here: it ended (out of the index) or was deleted.
                found = await self.store.get(tenant, name)
                if found is None or found[0].uid != job.uid:
                    archived = await self.archive.get(tenant, name) if self.archive else None
                    if archived is None or archived.uid != job.uid:
                        raise errors.NotFound(f"job {name!r} was deleted")
                    yield archived
                    return
                if found[1].mod_revision > revision:
                    job, revision = found[0], found[1].mod_revision
                    yield job
                    if policy.is_final(job.state):
                        return
                    continue
            elif entry.mod_revision > revision:
                job, revision = entry.job, entry.mod_revision
                yield job
                if policy.is_final(job.state):
                    return
                continue
            try:
                await asyncio.wait_for(changed.wait(), 10)
            except asyncio.TimeoutError:
                pass

    # --- cancel and delete -------------------------------------------------------------

    async def cancel(self, caller: Principal, tenant: str, name: str) -> pb.TrainJob:
        tenant, _, _ = await self._load(caller, tenant, name)
        now = self.clock()

        def mutate(job: pb.TrainJob) -> None:
            if policy.is_final(job.state) or job.state == pb.JOB_STATE_CANCELLING:
                raise Unchanged
            if job.state == pb.JOB_STATE_QUEUED:
                records.add_event(job, pb.JOB_STATE_CANCELLED, "Cancelled",
                                  f"cancelled by {caller.tenant} while queued", now=now)
            else:
                records.add_event(job, pb.JOB_STATE_CANCELLING, "CancelRequested",
                                  f"cancel requested by {caller.tenant}; stopping the replicas", now=now)

        job = await self.store.update(tenant, name, mutate)
        if job is None:
            archived = await self.archive.get(tenant, name) if self.archive else None
            if archived is None:
                raise errors.NotFound(f"job {name!r} not found in tenant {tenant!r}")
            return archived  # finished long ago: nothing to cancel
        return job

    async def delete(self, caller: Principal, tenant: str, name: str, attempts: int = 8) -> None:
        """A job that just ended may still be written once by the scheduler (its
        quota given back): the delete reads it again rather than answering ABORTED."""
        for attempt in range(attempts):
            tenant, job, revision = await self._load(caller, tenant, name)
            if not policy.is_final(job.state):
                raise errors.FailedPrecondition(
                    f"job {name!r} is {policy.state_name(job.state)}; cancel it and wait until it ends before deleting"
                )
            if not revision or await self.store.delete(job, revision):
                break
            if attempt == attempts - 1:
                raise errors.Conflict(f"job {name!r} changed while being deleted; retry")
            await asyncio.sleep(0.05)
        if self.archive:  # archived, or (an archiver killed mid-way) both
            await self.archive.remove(tenant, name, job.uid)
        await asyncio.to_thread(self.paths(tenant, name).remove)

    # --- logs --------------------------------------------------------------------------

    async def stream_logs(self, caller: Principal, tenant: str, name: str, replicas: list[Replica], follow: bool,
                          tail_lines: int) -> AsyncIterator[list[pb.LogLine]]:
        if tail_lines < 0:
            raise errors.InvalidArgument("tail_lines must not be negative")
        tenant, job, _ = await self._load(caller, tenant, name)
        existing = set(records.replicas_of(job.spec))
        for replica in replicas:
            if replica not in existing:
                raise errors.InvalidArgument(f"replicas: job {name!r} has no replica {replica.name}")
        uid = job.uid

        async def load() -> pb.TrainJob | None:
            entry = self.index.get(tenant, name)
            if entry is not None and entry.job.uid == uid:
                return entry.job
            found = await self.find(tenant, name)
            return found[0] if found and found[0].uid == uid else None

        async def changed() -> None:
            await self.index.changed.wait()

        streamer = LogStreamer(self.paths(tenant, name), load, frozenset(replicas), follow, tail_lines,
                               policy.is_final, changed)
        async for batch in streamer.stream():
            yield batch

    # --- metrics -----------------------------------------------------------------------

    async def get_metrics(self, caller: Principal, tenant: str, name: str, metric_names: list[str],
                          start_step: int) -> list[pb.MetricSeries]:
        tenant, job, revision = await self._load(caller, tenant, name)
        names = set(metric_names)
        if revision:
            chunks = [series for _, series in await self.store.metric_chunks(tenant, name)]
        else:  # archived: the series went with it
            chunks = await self.archive.metric_chunks(job)
        reported = merge_series(chunks, names, start_step)
        if reported or any(c.source == pb.METRIC_SOURCE_REPORTED for c in chunks):
            return reported
        if not job.spec.output_path:
            return []
        where = await asyncio.to_thread(self.confiner.check, tenant, job.spec.output_path, "spec.output_path")
        return await asyncio.to_thread(self.tensorboard.series, where, names, start_step)

    # --- uploads -----------------------------------------------------------------------

    async def upload_package(self, caller: Principal, tenant: str, file_name: str, chunks) -> Stored:
        """Stores a trainer package streamed by the caller in the tenant's
        storage (services.common.uploads) and returns where."""
        tenant = self._tenant(caller, tenant)
        if (not file_name or "/" in file_name or "\\" in file_name or file_name.startswith(".")
                or len(file_name) > 255 or not file_name.endswith(PACKAGE_SUFFIXES)):
            raise errors.InvalidArgument(f"file_name {file_name[:80]!r} must be a plain .tar.gz or .whl file name")
        return await self.uploads.receive_file(tenant, ("packages",), file_name, chunks)

    async def report_metrics(self, caller: Principal, tenant: str, name: str, replica: Replica | None,
                             attempt: int, step: int, metrics: dict[str, float], wall_time: float) -> None:
        if not metrics:
            raise errors.InvalidArgument("metrics must hold at least one value")
        if step < 0:
            raise errors.InvalidArgument(f"step must not be negative (got {step})")
        for metric in metrics:
            if not METRIC_RE.fullmatch(metric):
                raise errors.InvalidArgument(f"metric name {metric!r} must be 1..128 characters of [A-Za-z0-9_./-]")
        tenant, job, _ = await self._load(caller, tenant, name)
        if replica is None:
            raise errors.InvalidArgument("replica is required (type and index)")
        if replica not in set(records.replicas_of(job.spec)):
            raise errors.InvalidArgument(f"replica: job {name!r} has no replica {replica.name}")
        if job.state != pb.JOB_STATE_RUNNING:
            raise errors.FailedPrecondition(f"job {name!r} is {policy.state_name(job.state)}, not RUNNING")
        attempt = attempt or job.attempts
        if not 1 <= attempt <= job.attempts:
            raise errors.InvalidArgument(f"attempt {attempt} is not one of the job's (1..{job.attempts})")
        clean = {k: float(v) for k, v in metrics.items()}
        line = metrics_line(replica, attempt, step, clean, wall_time or self.clock())
        path = self.paths(tenant, name).metrics_file(attempt, replica)

        def append() -> None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

        await asyncio.to_thread(append)

