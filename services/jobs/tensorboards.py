"""TensorBoards: managed, quota-counted TensorBoard replicas of a tenant.

Why the jobs service owns them: a TensorBoard is a tenant's replica like a
trainer (placed through the same `Runtime`, as the tenant's own unprivileged
user, adopted after a restart by the same leader), it holds the tenant's
quota through the same reservations, and what it shows is what the jobs
write: a job's TensorBoard reads `<output_path>/tensorboard`, where trainers
write their event files and where `GetJobMetrics` reads them too.

Layout (under /cloudml/jobs/)

    tensorboards/<tenant>/<name>     JSON `Board` (below), compare-and-swap writes

Lifecycle
---------
`create` (any jobs process): checks the name, the logdir (confined to the
tenant's storage, `services.common.confine`), the per-tenant count
(--max-tensorboards), writes the record STARTING, then reserves the quota
(owner `jobs/tensorboard/<name>/<uid>`, cpu and memory); a refused
reservation deletes the record again, so a refused create leaves nothing.

The leader (`lead`, beside the scheduler) reconciles every record each
`pass_seconds`: STARTING -> reserve runtime capacity, start
`python -m services.jobs.tensorboard_replica` (as the tenant, listening on a
Unix socket in the tenant's 0700 socket directory) and, once the socket
answers, RUNNING with that address; a replica that ends -> FAILED;
DELETING (asked, or idle past --tensorboard-idle-seconds since the last page
request) -> stop the replica, release capacity and quota, delete the record.
A new leader adopts running replicas (`runtime.adopt`, ids `tensorboard.*`;
the scheduler judges only `jobs.*`), and stops any without a record.

The gateway finds a RUNNING board's address through `resolve`
(`cloudml.internal.v1.PageBackends`), called with the browser's token; each
call restarts the idle clock (written at most every ACCESS_WRITE_SECONDS).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
import re
from dataclasses import dataclass, field

from cloudml.common.v1 import resources_pb2
from cloudml.jobs.v1 import tensorboards_pb2 as pb
from services.common import errors, validation
from services.common.confine import Confiner
from services.common.etcd import Etcd, cmp_absent, op_put
from services.common.runtime.base import (
    Amount, CapacityBusy, ReplicaPhase, ReplicaRequest, Runtime, Unschedulable)
from services.common.sockets import pinned_address, socket_root, tenant_socket_dir
from services.common.tokens import Principal
from services.jobs.logs import timestamp
from services.jobs.page_records import PageRecord
from services.jobs.store import TENSORBOARDS

log = logging.getLogger(__name__)

PREFIX = TENSORBOARDS
RUNTIME_PREFIX = "tensorboard."
ACCESS_WRITE_SECONDS = 30.0
RESERVE_SECONDS = 60.0
MAX_RUNS = 100
_RUN_NAME = re.compile(r"^[A-Za-z0-9_.=+ -]{1,100}$")
#: the leader looks for replicas of no board every this many passes
ORPHAN_SWEEP_PASSES = 30
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOG_FILE = "tensorboard.log"

S = pb.TensorBoardState


@dataclass
class TensorBoardSettings:
    data_dir: str
    python: str = ""
    cpu_millis: int = 500
    memory_bytes: int = 1 << 30
    max_per_tenant: int = 5
    idle_seconds: float = 4 * 3600.0
    pass_seconds: float = 1.0
    start_timeout: float = 60.0
    stop_grace: float = 3.0


@dataclass
class Board(PageRecord):
    """A TensorBoard's record (JSON in etcd)."""

    RUNTIME_PREFIX = RUNTIME_PREFIX
    OWNER_KIND = "tensorboard"
    PAGE_KIND = "tensorboard"

    tenant: str
    name: str
    uid: str
    logdir: str
    job: str = ""
    state: int = S.TENSORBOARD_STATE_STARTING
    cpu_millis: int = 0
    memory_bytes: int = 0
    created: float = 0.0
    last_access: float = 0.0
    started: float = 0.0
    address: str = ""
    message: str = ""
    #: [[run name, logdir, job], ...] of a board over several directories (logdir is then "")
    runs: list = field(default_factory=list)
    #: False until create() holds its quota: the leader leaves it alone (and
    #: removes it after RESERVE_SECONDS: its creator died in between)
    reserved: bool = True



def socket_name(board: Board) -> str:
    """At most 37 characters, so that `<socket root>/<tenant dir>/<this>` fits
    the 107 bytes of a socket path (root 23, tenant dir at most 40)."""
    return f"tb-{board.name[:20]}-{board.uid}.sock"


class TensorBoards:
    def __init__(self, etcd: Etcd, quota, runtime: Runtime, confiner: Confiner, jobs, settings: TensorBoardSettings,
                 clock=time.time, prefix: str = PREFIX):
        self.etcd = etcd
        self.prefix = prefix
        self.quota = quota
        self.runtime = runtime
        self.confiner = confiner
        #: async (tenant, name) -> the job's TrainJob or None (live or archived)
        self.jobs = jobs
        self.settings = settings
        self.clock = clock
        self.tenancy = getattr(runtime, "tenancy", None)
        self._accessed: dict[str, float] = {}
        self._starting: dict[str, float] = {}

    def _key(self, tenant: str, name: str) -> str:
        return f"{self.prefix}{tenant}/{name}"

    # --- the API ----------------------------------------------------------------------------

    @staticmethod
    def _tenant(caller: Principal, tenant: str, name: str = "") -> str:
        tenant = tenant or caller.tenant
        validation.check_name(tenant, "tenant")
        if not caller.may_access(tenant):
            raise errors.NotFound(f"tensorboard {name!r} not found" if name else f"tenant {tenant!r} not found")
        return tenant

    async def _get(self, tenant: str, name: str) -> Board | None:
        kv = await self.etcd.get(self._key(tenant, name))
        return Board.decode(kv.value) if kv else None

    async def _load(self, caller: Principal, tenant: str, name: str) -> Board:
        validation.check_name(name, "name")
        tenant = self._tenant(caller, tenant, name)
        board = await self._get(tenant, name)
        if board is None:
            raise errors.NotFound(f"tensorboard {name!r} not found in tenant {tenant!r}")
        return board

    async def _all(self, tenant: str = "") -> list[Board]:
        kvs, _, _ = await self.etcd.get_prefix(self.prefix + (f"{tenant}/" if tenant else ""))
        return [Board.decode(kv.value) for kv in kvs]

    async def _lookup(self, tenant: str, job: str, runs) -> dict[str, object]:
        """The jobs a create request names, looked up before its checks run in a thread."""
        names = {n for n in (job, *(run.job for run in runs)) if n and validation.NAME_RE.fullmatch(n)}
        return {n: await self.jobs(tenant, n) for n in names}

    def _job_logdir(self, tenant: str, job: str, jobs: dict) -> str:
        validation.check_name(job, "job")
        found = jobs.get(job)
        if found is None:
            raise errors.NotFound(f"job {job!r} not found in tenant {tenant!r}")
        if not found.spec.output_path:
            raise errors.FailedPrecondition(f"job {job!r} has no output_path, so no TensorBoard logdir")
        return found.spec.output_path.rstrip("/") + "/tensorboard"

    def _confined(self, tenant: str, logdir: str, field_name: str) -> str:
        where = self.confiner.check(tenant, logdir.strip(), field_name, keep_plain=False)
        if not where.local:
            raise errors.InvalidArgument(f"{field_name} must be in the tenant's storage (TensorBoard reads local files)")
        if "," in where.uri:
            raise errors.InvalidArgument(f"{field_name} may not contain ','")
        return where.uri

    def _logdirs(self, tenant: str, logdir: str, job: str, runs, jobs: dict) -> tuple[str, str, list[list[str]]]:
        """(normalized logdir, job, [[run name, normalized logdir, job], ...]) of a create request."""
        if sum(map(bool, (logdir, job, runs))) != 1:
            raise errors.InvalidArgument("give exactly one of logdir, job and runs")
        if job:
            return self._confined(tenant, self._job_logdir(tenant, job, jobs), "the job's logdir"), job, []
        if logdir:
            return self._confined(tenant, logdir, "logdir"), "", []
        if len(runs) > MAX_RUNS:
            raise errors.InvalidArgument(f"at most {MAX_RUNS} runs")
        out, names = [], set()
        for i, run in enumerate(runs):
            field_name = f"runs[{i}]"
            if not _RUN_NAME.match(run.name) or run.name in names:
                raise errors.InvalidArgument(f"{field_name}.name must be 1..100 letters, digits, spaces or "
                                             "_.=+- and unique")
            names.add(run.name)
            if bool(run.logdir) == bool(run.job):
                raise errors.InvalidArgument(f"{field_name}: give exactly one of logdir and job")
            path = run.logdir or self._job_logdir(tenant, run.job, jobs)
            out.append([run.name, self._confined(tenant, path, f"{field_name}.logdir"), run.job])
        return "", "", out

    async def create(self, caller: Principal, tenant: str, name: str, logdir: str, job: str,
                     runs=()) -> pb.TensorBoard:
        validation.check_name(name, "name")
        tenant = self._tenant(caller, tenant)
        runs = list(runs)
        jobs = await self._lookup(tenant, job, runs)
        logdir, job, run_list = await asyncio.to_thread(self._logdirs, tenant, logdir, job, runs, jobs)
        existing = await self._all(tenant)
        if any(b.name == name for b in existing):
            raise errors.AlreadyExists(f"tensorboard {name!r} already exists in tenant {tenant!r}")
        # A cap, not a quota: two creates racing may pass it together (the
        # quota's cpu and memory still hold exactly).
        if len(existing) >= self.settings.max_per_tenant:
            raise errors.ResourceExhausted(
                f"tenant {tenant!r} has {len(existing)} TensorBoards, the most allowed "
                f"(--max-tensorboards {self.settings.max_per_tenant}): delete one first")
        now = self.clock()
        board = Board(tenant=tenant, name=name, uid=secrets.token_hex(4), logdir=logdir, job=job, runs=run_list,
                      cpu_millis=self.settings.cpu_millis, memory_bytes=self.settings.memory_bytes,
                      created=now, last_access=now, message="reserving quota", reserved=False)
        key = self._key(tenant, name)
        ok, _ = await self.etcd.txn([cmp_absent(key)], [op_put(key, board.encode())])
        if not ok:
            raise errors.AlreadyExists(f"tensorboard {name!r} already exists in tenant {tenant!r}")
        try:
            await self.quota.reserve(tenant, board.owner_id, resources_pb2.Resources(
                cpu_millis=board.cpu_millis, memory_bytes=board.memory_bytes, tensorboards=1))
        except BaseException as err:
            with contextlib.suppress(Exception):
                await self.etcd.delete(key)
            if isinstance(err, (errors.ResourceExhausted, errors.QuotaBusy)):
                raise errors.ResourceExhausted(
                    f"tenant {tenant!r} is over its quota for a TensorBoard "
                    f"({board.cpu_millis}m CPU, {board.memory_bytes >> 20} MiB): {err.message}") from None
            raise
        stored = await self._set(board, S.TENSORBOARD_STATE_STARTING, "starting", reserved=True)
        return self.message(stored or board)

    async def get(self, caller: Principal, tenant: str, name: str) -> pb.TensorBoard:
        return self.message(await self._load(caller, tenant, name))

    async def list(self, caller: Principal, tenant: str) -> list[pb.TensorBoard]:
        tenant = self._tenant(caller, tenant)
        return [self.message(b) for b in sorted(await self._all(tenant), key=lambda b: b.name)]

    async def delete(self, caller: Principal, tenant: str, name: str) -> None:
        board = await self._load(caller, tenant, name)
        await self._set(board, S.TENSORBOARD_STATE_DELETING, "deleting")

    async def resolve(self, caller: Principal, tenant: str, name: str) -> str:
        """The address of a RUNNING board (NOT_FOUND otherwise); marks it used."""
        board = await self._load(caller, tenant, name)
        if board.state != S.TENSORBOARD_STATE_RUNNING or not board.address:
            raise errors.NotFound(f"tensorboard {name!r} is not running")
        now = self.clock()
        key = self._key(board.tenant, board.name)
        if now - max(board.last_access, self._accessed.get(key, 0.0)) >= ACCESS_WRITE_SECONDS:
            self._accessed[key] = now

            def touch(kv):
                if kv is None:
                    return None
                current = Board.decode(kv.value)
                current.last_access = max(current.last_access, now)
                return current.encode()

            with contextlib.suppress(errors.CloudMLError):
                await self.etcd.update(key, touch)
        # The platform's own link to its socket, never the name in the tenant's directory (which
        # anything running as the tenant can rename: services.common.sockets.pin_socket).
        address = await pinned_address(board.address, socket_root(self.settings.data_dir), board.tenant, self.tenancy)
        if address is None:
            raise errors.Unavailable(f"tensorboard {name!r} cannot be reached: its socket is not its tenant's")
        return address

    def message(self, board: Board) -> pb.TensorBoard:
        out = pb.TensorBoard(
            tenant=board.tenant, name=board.name, uid=board.uid, logdir=board.logdir, job=board.job,
            runs=[pb.TensorBoardRun(name=n, logdir=d, job=j) for n, d, j in board.runs],
            state=board.state, path=board.path, message=board.message,
            resources=resources_pb2.Resources(cpu_millis=board.cpu_millis, memory_bytes=board.memory_bytes),
            create_time=timestamp(board.created), last_access_time=timestamp(board.last_access),
            idle_delete_time=timestamp(board.last_access + self.settings.idle_seconds))
        return out

    async def _set(self, board: Board, state: int, message: str, **changes) -> Board | None:
        """Compare-and-swap of one board's state (never out of DELETING, never
        onto another uid); the stored result, or None if it is gone."""
        result: list[Board | None] = [None]

        def change(kv):
            if kv is None:
                return None
            current = Board.decode(kv.value)
            if current.uid != board.uid:
                result[0] = current
                return kv.value
            if current.state == S.TENSORBOARD_STATE_DELETING and state != S.TENSORBOARD_STATE_DELETING:
                result[0] = current
                return kv.value
            current.state, current.message = state, message
            for name, value in changes.items():
                setattr(current, name, value)
            result[0] = current
            return current.encode()

        await self.etcd.update(self._key(board.tenant, board.name), change)
        return result[0]

    # --- the leader ----------------------------------------------------------------------------

    async def lead(self) -> None:
        """Reconciles until cancelled (this process stopped leading)."""
        adopted = [s for s in await self.runtime.adopt() if s.replica_id.startswith(RUNTIME_PREFIX)]
        log.info("tensorboards: leading; %d replica(s) adopted", len(adopted))
        rounds = 0
        while True:
            try:
                await self.reconcile(sweep=rounds % ORPHAN_SWEEP_PASSES == 0)
            except errors.CloudMLError as err:
                log.info("tensorboard pass interrupted: %s", err.message)
            except Exception:  # noqa: BLE001 - keep reconciling whatever happens
                log.exception("tensorboard pass failed")
            rounds += 1
            await asyncio.sleep(self.settings.pass_seconds)

    async def reconcile(self, sweep: bool = True) -> None:
        """One pass over every board; `sweep`: also stop replicas of no board."""
        boards = await self._all()
        known = {b.replica_id for b in boards}
        for status in await self.runtime.adopt() if sweep else ():
            if status.replica_id.startswith(RUNTIME_PREFIX) and status.replica_id not in known:
                log.warning("stopping TensorBoard replica %s of no record", status.replica_id)
                await self._stop_replica(status.replica_id)
        for board in boards:
            try:
                await self._reconcile_one(board)
            except errors.CloudMLError as err:
                log.info("tensorboard %s/%s: %s", board.tenant, board.name, err.message)

    async def _reconcile_one(self, board: Board) -> None:
        now = self.clock()
        if board.state == S.TENSORBOARD_STATE_DELETING:
            await self._stop_replica(board.replica_id)
            await self.quota.release(board.tenant, board.owner_id)
            await self.etcd.delete(self._key(board.tenant, board.name))
            self._starting.pop(board.replica_id, None)
            log.info("tensorboard %s/%s deleted", board.tenant, board.name)
            return
        if not board.reserved:
            if now - board.created > RESERVE_SECONDS:
                await self._set(board, S.TENSORBOARD_STATE_DELETING, "its creation did not finish")
            return
        if board.state != S.TENSORBOARD_STATE_FAILED and now - board.last_access >= self.settings.idle_seconds:
            await self._set(board, S.TENSORBOARD_STATE_DELETING,
                            f"idle for {self.settings.idle_seconds:g} s: deleting")
            return
        status = await self.runtime.status(board.replica_id)
        if board.state == S.TENSORBOARD_STATE_STARTING:
            if status.phase != ReplicaPhase.RUNNING:
                if board.replica_id in self._starting and status.ended:
                    await self._fail(board, status)
                    return
                await self._start(board)
                return
            if await self._answers(board.address):
                self._starting.pop(board.replica_id, None)
                await self._set(board, S.TENSORBOARD_STATE_RUNNING, "running")
            elif now - self._starting.setdefault(board.replica_id, now) > self.settings.start_timeout:
                await self._stop_replica(board.replica_id)
                await self._set(board, S.TENSORBOARD_STATE_FAILED,
                                f"its server did not answer within {self.settings.start_timeout:g} s")
        elif board.state == S.TENSORBOARD_STATE_RUNNING and status.phase != ReplicaPhase.RUNNING:
            await self._fail(board, status)

    async def _fail(self, board: Board, status) -> None:
        detail = status.message or status.reason or "ended"
        tail = await asyncio.to_thread(self._log_tail, board)
        await self._stop_replica(board.replica_id)
        self._starting.pop(board.replica_id, None)
        await self._set(board, S.TENSORBOARD_STATE_FAILED, f"its server {detail}" + (f": {tail}" if tail else ""))

    def _workdir(self, board: Board) -> str:
        return os.path.join(self.settings.data_dir, "tensorboards", board.tenant, f"{board.name}.{board.uid}")

    def _log_tail(self, board: Board) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self._workdir(board), LOG_FILE), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 300))
            lines = f.read().decode(errors="replace").strip().splitlines()
            return lines[-1][:300] if lines else ""
        return ""

    def _prepare(self, board: Board) -> tuple[str, str]:
        """(workdir, socket path), created for the tenant. Blocking."""
        base = os.path.join(self.settings.data_dir, "tensorboards")
        os.makedirs(base, mode=0o711, exist_ok=True)
        tenant_dir = os.path.join(base, board.tenant)
        if self.tenancy is not None and self.tenancy.enabled:
            self.tenancy.gate(tenant_dir, board.tenant, 0o710)
        else:
            os.makedirs(tenant_dir, mode=0o700, exist_ok=True)
        sockets = tenant_socket_dir(socket_root(self.settings.data_dir), board.tenant, self.tenancy)
        return self._workdir(board), os.path.join(sockets, socket_name(board))

    def _logdir_args(self, board: Board) -> list[str]:
        """The replica's --logdir or --logdir-spec (checked again: a symlink may have appeared)."""
        def real(uri: str) -> str:
            return self.confiner.check(board.tenant, uri, "logdir", keep_plain=False).real_path

        if not board.runs:
            return ["--logdir", real(board.logdir)]
        return ["--logdir-spec", ",".join(f"{name}:{real(uri)}" for name, uri, _ in board.runs)]

    async def _start(self, board: Board) -> None:
        amount = Amount(cpu_millis=board.cpu_millis, memory_bytes=board.memory_bytes)
        try:
            self.runtime.reserve(board.replica_id, [amount])
        except Unschedulable as err:
            await self._set(board, S.TENSORBOARD_STATE_FAILED, f"cannot fit the runtime: {err}")
            return
        except CapacityBusy as err:
            await self._set(board, S.TENSORBOARD_STATE_STARTING, f"waiting for capacity: {err}")
            return
        workdir, sock = await asyncio.to_thread(self._prepare, board)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        logdir_args = await asyncio.to_thread(self._logdir_args, board)
        stored = await self._set(board, S.TENSORBOARD_STATE_STARTING, "starting its server",
                                 address=f"unix:{sock}", started=self.clock())
        if stored is None or stored.uid != board.uid or stored.state != S.TENSORBOARD_STATE_STARTING:
            return
        argv = [self.settings.python or "python3", "-m", "services.jobs.tensorboard_replica",
                "--socket", sock, *logdir_args, "--path-prefix", board.path.rstrip("/")]
        request = ReplicaRequest(
            replica_id=board.replica_id, group=board.replica_id, argv=argv,
            env={"PYTHONPATH": PROJECT_ROOT, "PYTHONUNBUFFERED": "1", "HOME": workdir, "TMPDIR": workdir},
            workdir=workdir, log_path=os.path.join(workdir, LOG_FILE), resources=amount, tenant=board.tenant)
        self._starting[board.replica_id] = self.clock()
        status = await self.runtime.start(request)
        log.info("tensorboard %s/%s: replica %s started (pid %s) on %s", board.tenant, board.name,
                 board.replica_id, status.pid, sock)

    @staticmethod
    async def _answers(address: str) -> bool:
        """True once the replica's socket accepts a connection and answers HTTP."""
        if not address.startswith("unix:"):
            return False
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(address[5:]), 1.0)
        except (OSError, asyncio.TimeoutError):
            return False
        try:
            writer.write(b"HEAD / HTTP/1.0\r\nHost: tensorboard\r\n\r\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 2.0)
            return line.startswith(b"HTTP/")
        except (OSError, asyncio.TimeoutError):
            return False
        finally:
            writer.close()

    async def _stop_replica(self, replica_id: str) -> None:
        await stop_replica(self.runtime, replica_id, self.settings.stop_grace)


async def stop_replica(runtime: Runtime, replica_id: str, grace: float) -> None:
    """Stops a page server's replica (if it runs), forgets it and releases its capacity."""
    status = await runtime.status(replica_id)
    if status.phase == ReplicaPhase.RUNNING:
        await runtime.stop(replica_id, grace)
    if status.phase != ReplicaPhase.UNKNOWN or status.group:
        await runtime.forget(replica_id)
    runtime.release(replica_id)
