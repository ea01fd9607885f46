"""The `local` runtime: replicas are processes on this machine.

Processes
---------
Every replica runs under its own supervisor, `services.common.runtime.shim`
(see its docstring), started in a new session (so it outlives the service and
its process group) with `python -I -S` (no site-packages, no PYTHON*
variables) importing only the shim: start() takes ~12 ms. The shim spawns the replica in its own
process group, appends its stdout+stderr to the log file, enforces the memory
limit, and writes the replica's record to `<state_dir>/<replica_id>.json`
(RUNNING with pid and start tokens, then the final exit code and reason),
always atomically (temporary file + rename). The shim is the only writer of
that file while it lives; the runtime writes it only to record a replica as
Lost (its shim died without a final status) or, failing the shim, Killed.

Memory limits are enforced by the shim polling the RSS of the replica's whole
subtree (every 100 ms, 25 ms near the limit) and SIGKILLing the tree above
`resources.memory_bytes` (reason OOMKilled, exit code 137). No cgroups: this
host has cgroup v1 and a read-only /sys/fs/cgroup.

stop() writes `<state_dir>/<replica_id>.stop` (the grace period) and sends
SIGTERM to the shim, which SIGTERMs the replica's process group and subtree,
SIGKILLs them after the grace, reaps everything and records reason Killed. If
the shim is gone, the runtime kills the replica's process group itself.

Adoption
--------
A restarted service makes a new LocalRuntime on the same state_dir. Its
reservations are already there (`<state_dir>/.capacity.json`, read on every
operation under an flock of `.capacity.lock`, so services sharing a state_dir
also share the machine's capacity safely). `adopt()` reads every replica
record: RUNNING if the shim recorded in it is alive (same boot id, pid and
process start time, so a reused pid is never taken for it), else the final
status the shim wrote, else UNKNOWN / "Lost" (the replica's remaining
process group, if any, is killed: nothing would enforce its memory limit).
wait() polls the replica's record every 50 ms (a read of a few hundred
bytes), whoever started it.

Capacity
--------
total() defaults to os.cpu_count() * 1000 millicores, physical memory minus
1 GiB, and the GPUs listed in CLOUDML_GPUS ("0,1"; none by default). A group's
GPUs are chosen at reserve() time (groups never share one) and handed out
whole to its replicas at start() (CUDA_VISIBLE_DEVICES, "" without GPUs). CPU
and memory are accounted, not pinned; the memory limit is per replica.

Cluster ports
-------------
A job's replicas listen on free loopback ports (`addresses`). With tenant
isolation on, those ports are its tenant's alone (`port_guard.py`: no other
user may connect to them or listen on them, nothing outside the machine
reaches them), recorded with the group's reservation and guarded until
`release`; the rules are rebuilt from the reservations whenever they change
and when a runtime starts.

File I/O here is on small local files (a few hundred bytes) and done inline.
Shims are started with subprocess.Popen in a small thread pool (start() waits
for the shim's first record without blocking the event loop), not with
asyncio's subprocess support, whose transport kills its child when it is
closed or garbage-collected: a shim must outlive the runtime object.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import logging
import marshal
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Iterator, Mapping

from services.common import tenancy as _tenancy
from services.common.runtime import shim as _shim
from services.common.runtime.port_guard import TABLE_PREFIX, IsolationUnavailable, PortGuard
from services.common.runtime.base import (
    Amount,
    CapacityBusy,
    ReplicaPhase,
    ReplicaRequest,
    ReplicaStatus,
    Runtime,
    Unschedulable,
)

GiB = 1 << 30
MEMORY_RESERVE_BYTES = 1 * GiB
SHIM_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shim.py")
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(SHIM_PATH))))
# `python -m services.common.runtime.shim` without site (-S, ~15 ms saved) and
# without the environment's PYTHON* variables (-I); imported rather than run as
# a script so that its compiled .pyc is used.
SHIM_COMMAND = ("-I", "-S", "-c", f"import sys; sys.path.insert(0, {_ROOT!r}); "
                "from services.common.runtime.shim import main; sys.exit(main())")
CAPACITY_FILE = ".capacity.json"
LOCK_FILE = ".capacity.lock"
POLL_SECONDS = 0.05
SHIM_START_TIMEOUT = 30.0
PORT_QUARANTINE_SECONDS = 60.0
#: Variables of the service's environment that replicas inherit (under request.env).
BASE_ENV_KEYS = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE",
                 "TZ", "TMPDIR", "SYSTEMROOT")
log = logging.getLogger(__name__)

#: "1": with tenant isolation on, give jobs cluster ports without guarding
#: them (where nftables cannot run, e.g. a container without CAP_NET_ADMIN,
#: and every tenant trusts the others); the default is to refuse such jobs.
UNGUARDED_PORTS_ENV = "CLOUDML_UNGUARDED_CLUSTER_PORTS"

_REPLICA_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,199}$")


def _gpus_from_env() -> list[int]:
    raw = os.environ.get("CLOUDML_GPUS", "").strip()
    if not raw:
        return []
    try:
        return [int(x) for x in raw.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise ValueError(f"CLOUDML_GPUS must be GPU indices like '0,1', not {raw!r}") from None


def _machine_memory() -> int:
    try:
        import psutil  # noqa: PLC0415
        return int(psutil.virtual_memory().total)
    except ImportError:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _describe(resource: str, value: int) -> str:
    if resource == "cpu":
        return f"{value}m"
    if resource == "memory":
        return _fmt_bytes(value)
    return str(value)


def _resources(a: Amount) -> list[tuple[str, int]]:
    return [("cpu", a.cpu_millis), ("memory", a.memory_bytes), ("gpus", a.gpus)]


def _amount_json(a: Amount) -> dict:
    return {"cpu_millis": a.cpu_millis, "memory_bytes": a.memory_bytes, "gpus": a.gpus}


def _amount_from(d: Mapping) -> Amount:
    return Amount(int(d.get("cpu_millis", 0)), int(d.get("memory_bytes", 0)), int(d.get("gpus", 0)))


def _grants(groups: Mapping[str, dict]) -> dict[int, int]:
    """port -> the uid whose replicas may use it, of every reserved group."""
    return {int(p): int(g["uid"]) for g in groups.values() for p in g.get("ports", ())}


class LocalRuntime(Runtime):
    name = "local"

    def __init__(self, state_dir: str, *, total: Amount | None = None,
                 gpu_ids: list[int] | None = None, python: str = sys.executable,
                 base_env: Mapping[str, str] | None = None,
                 tenancy: _tenancy.Tenancy | None = None):
        self.state_dir = os.path.abspath(state_dir)
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        # Tenant isolation: on whenever the platform runs as root.
        self.tenancy = tenancy if tenancy is not None else _tenancy.Tenancy()
        # Tenant users run the platform's interpreter and import its code.
        for needed in (os.path.dirname(os.path.realpath(python)), _ROOT):
            self.tenancy.ensure_reachable(needed)
        ids = list(gpu_ids) if gpu_ids is not None else None
        if ids is None:
            ids = _gpus_from_env() if (total is None or total.gpus == 0) else list(range(total.gpus))
        if len(set(ids)) != len(ids) or any(i < 0 for i in ids):
            raise ValueError(f"gpu_ids must be distinct non-negative indices, not {ids}")
        if total is None:
            total = Amount((os.cpu_count() or 1) * 1000,
                           max(0, _machine_memory() - MEMORY_RESERVE_BYTES), len(ids))
        elif total.gpus == 0 and ids:
            total = Amount(total.cpu_millis, total.memory_bytes, len(ids))
        elif total.gpus != len(ids):
            raise ValueError(f"total.gpus is {total.gpus} but {len(ids)} GPU ids are configured ({ids})")
        self._total = total
        self._gpu_ids = ids
        self.python = python
        if base_env is None:
            base_env = {k: os.environ[k] for k in BASE_ENV_KEYS if k in os.environ}
        self._base_env = dict(base_env)
        # group -> {"amount": {...}, "replicas": n, "gpu_ids": [...], "assigned": {replica_id: [...]}}
        self._groups: dict[str, dict] = {}
        self._lock_fd = os.open(os.path.join(self.state_dir, LOCK_FILE),
                                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        # flock serializes processes, not this process's threads (they share
        # the descriptor): addresses() works on a thread beside the loop's.
        self._capacity_lock = threading.RLock()
        # Shims started by this instance, reaped by poll(); a Popen dropped
        # while its shim runs is reaped by the subprocess module later.
        self._procs: dict[str, subprocess.Popen] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._recent_ports: dict[int, float] = {}
        self._boot_id = _shim.boot_id()
        self._guard = PortGuard(TABLE_PREFIX + hashlib.sha256(self.state_dir.encode()).hexdigest()[:12]) \
            if self.tenancy.enabled else None
        if self._guard is not None and os.environ.get(UNGUARDED_PORTS_ENV) == "1":
            log.warning("%s=1: jobs' cluster ports are NOT kept to their tenants (any user of this machine can "
                        "run graphs on a job's TensorFlow servers)", UNGUARDED_PORTS_ENV)
            self._guard = None
        with self._capacity(write=False) as groups:
            if self._guard is not None:
                try:  # after a restart or a reboot: exactly the reservations' ports
                    self._guard.apply(_grants(groups))
                except IsolationUnavailable as err:
                    # Not fatal here: the models service shares this state and starts no job; jobs
                    # asking for ports now are refused (addresses), and rules already in the kernel stay.
                    log.error("%s (jobs with cluster ports will not start)", err)

    def __del__(self):
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    # ------------------------------------------------------------------ capacity
    @contextlib.contextmanager
    def _capacity(self, write: bool = True) -> Iterator[dict[str, dict]]:
        """The groups' reservations, fresh from disk, under an exclusive
        flock; saved atomically on exit when `write`."""
        with self._capacity_lock:
            yield from self._capacity_locked(write)

    def _capacity_locked(self, write: bool) -> Iterator[dict[str, dict]]:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            path = os.path.join(self.state_dir, CAPACITY_FILE)
            try:
                with open(path, "rb") as f:
                    self._groups = json.loads(f.read()).get("groups", {})
            except FileNotFoundError:
                self._groups = {}
            yield self._groups
            if write:
                _shim.atomic_write_json(path, {"version": 1, "groups": self._groups})
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _reserved(self) -> Amount:
        used = Amount()
        for g in self._groups.values():
            used = used + _amount_from(g["amount"])
        return used

    def total(self) -> Amount:
        return self._total

    def free(self) -> Amount:
        with self._capacity(write=False):
            return self._total - self._reserved()

    def check_fits_ever(self, replicas: list[Amount], image: str = "") -> None:
        if image:
            raise Unschedulable(
                f"the local runtime cannot run container images (docker_image {image!r}); "
                "submit a trainer package, or use the kubernetes runtime")
        need = Amount()
        for r in replicas:
            if min(r.cpu_millis, r.memory_bytes, r.gpus) < 0:
                raise ValueError(f"negative resources: {r}")
            need = need + r
        over = [f"{name}: requested {_describe(name, want)}, the local runtime has "
                f"{_describe(name, have)}"
                for (name, want), (_, have) in zip(_resources(need), _resources(self._total))
                if want > have]
        if over:
            raise Unschedulable("; ".join(over))

    def reserve(self, group: str, replicas: list[Amount]) -> None:
        self.check_fits_ever(replicas)
        need = Amount()
        for r in replicas:
            need = need + r
        with self._capacity() as groups:
            if group in groups:
                have = _amount_from(groups[group]["amount"])
                if have != need:
                    raise ValueError(f"group {group!r} is already reserved with {have}, not {need}")
                return
            free = self._total - self._reserved()
            if not need.fits_in(free):
                short = [f"{name}: requested {_describe(name, want)}, free "
                         f"{_describe(name, avail)} of {_describe(name, tot)}"
                         for (name, want), (_, avail), (_, tot)
                         in zip(_resources(need), _resources(free), _resources(self._total))
                         if want > avail]
                raise CapacityBusy("; ".join(short) + " on the local runtime")
            taken = {i for g in groups.values() for i in g.get("gpu_ids", ())}
            gpus = [i for i in self._gpu_ids if i not in taken][:need.gpus]
            if len(gpus) < need.gpus:  # only if gpu_ids changed under an existing state_dir
                raise CapacityBusy(f"gpus: requested {need.gpus}, free GPU ids {gpus}")
            groups[group] = {"amount": _amount_json(need), "replicas": len(replicas),
                             "gpu_ids": gpus, "assigned": {}}

    def release(self, group: str) -> None:
        with self._capacity() as groups:
            released = groups.pop(group, None)
            if released and released.get("ports") and self._guard is not None:
                try:
                    self._guard.apply(_grants(groups))
                except IsolationUnavailable as err:  # its ports stay its tenant's until the next change
                    log.warning("the ports of %s stay guarded: %s", group, err)

    def unguard(self) -> None:
        """Drops every group's cluster-port rules, its replicas all stopped
        (`cloudml-platform down`; a restarted job asks for ports again)."""
        with self._capacity() as groups:
            had = False
            for g in groups.values():
                had = bool(g.pop("ports", None)) or had
                g.pop("uid", None)
            if had and self._guard is not None:
                try:
                    self._guard.apply({})
                except IsolationUnavailable as err:  # the rules stay until the next change or a reboot
                    log.warning("the cluster ports stay guarded: %s", err)

    def _assign_gpus(self, request: ReplicaRequest) -> list[int]:
        with self._capacity() as groups:
            g = groups.get(request.group)
            if g is None:
                raise ValueError(f"group {request.group!r} has no reservation on the local "
                                 "runtime; reserve() it before start()")
            want = request.resources.gpus
            assigned: dict[str, list[int]] = g.setdefault("assigned", {})
            mine = assigned.get(request.replica_id)
            if mine is not None and len(mine) == want:
                return list(mine)
            others = {i for rid, ids in assigned.items() if rid != request.replica_id for i in ids}
            pool = [i for i in g.get("gpu_ids", ()) if i not in others]
            if len(pool) < want:
                raise ValueError(f"group {request.group!r} reserved {len(g.get('gpu_ids', ()))} GPU(s) "
                                 f"and {len(others)} are handed out; {request.replica_id} needs {want}")
            assigned[request.replica_id] = pool[:want]
            return pool[:want]

    def _unassign_gpus(self, replica_id: str, group: str) -> None:
        with self._capacity() as groups:
            g = groups.get(group)
            if g is not None:
                g.get("assigned", {}).pop(replica_id, None)

    # ------------------------------------------------------------------ ports
    async def addresses(self, group: str, replicas: list[tuple[str, int]],
                        tenant: str = "") -> dict[tuple[str, int], str]:
        if len(set(replicas)) != len(replicas):
            raise ValueError(f"replicas named twice in {replicas}")
        if self._guard is None:
            ports = self._free_ports(len(replicas))
        else:
            if not tenant:
                raise ValueError(f"group {group} names no tenant: with tenant isolation on, its cluster "
                                 "ports are kept to its tenant")
            loop = asyncio.get_running_loop()
            account = self.tenancy.cached(tenant) or await loop.run_in_executor(None, self.tenancy.account, tenant)
            ports = await loop.run_in_executor(None, self._guarded_ports, group, len(replicas), account.uid)
        return {key: f"127.0.0.1:{port}" for key, port in zip(replicas, ports)}

    def _guarded_ports(self, group: str, count: int, uid: int) -> list[int]:
        """`count` free ports for `group`, its tenant's (`uid`) alone before
        any replica of it starts (blocking: nft)."""
        with self._capacity() as groups:
            g = groups.get(group)
            if g is None:
                raise ValueError(f"group {group!r} has no reservation on the local runtime; reserve() it "
                                 "before addresses()")
            ports = self._free_ports(count, exclude=set(_grants(groups)) | self._guard.elsewhere())
            g["ports"], g["uid"] = ports, uid
            self._guard.apply(_grants(groups))  # refused: the reservation is left as it was
            return ports

    def _free_ports(self, count: int, exclude: set[int] = frozenset()) -> list[int]:
        now = time.monotonic()
        self._recent_ports = {p: t for p, t in self._recent_ports.items()
                              if now - t < PORT_QUARANTINE_SECONDS}
        socks: list[socket.socket] = []
        ports: list[int] = []
        try:
            for _ in range(count * 20 + 20):
                if len(ports) == count:
                    break
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)  # held open until the end: no duplicates within a call
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
                if port not in self._recent_ports and port not in exclude:
                    ports.append(port)
            else:
                raise RuntimeError(f"could not find {count} free loopback ports")
        finally:
            for s in socks:
                s.close()
        for p in ports:
            self._recent_ports[p] = now
        return ports

    # ------------------------------------------------------------------ records
    def _path(self, replica_id: str, suffix: str = ".json") -> str:
        if not _REPLICA_ID.match(replica_id or ""):
            raise ValueError(f"invalid replica id {replica_id!r}")
        return os.path.join(self.state_dir, replica_id + suffix)

    def _read(self, replica_id: str) -> dict | None:
        try:
            with open(self._path(replica_id), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except ValueError:  # never torn (atomic writes); a foreign file
            return None

    def _alive(self, rec: dict, pid_key: str, token_key: str) -> bool:
        pid = int(rec.get(pid_key) or 0)
        token = rec.get(token_key)
        return (bool(pid) and token is not None and rec.get("boot_id", "") == self._boot_id
                and _shim.start_token(pid) == token)

    @staticmethod
    def _to_status(rec: dict) -> ReplicaStatus:
        return ReplicaStatus(
            replica_id=rec.get("replica_id", ""), group=rec.get("group", ""),
            phase=ReplicaPhase(rec.get("phase", "UNKNOWN")),
            exit_code=rec.get("exit_code"), reason=rec.get("reason", ""),
            pid=int(rec.get("pid") or 0), gpu_ids=tuple(rec.get("gpu_ids", ())),
            started_at=float(rec.get("started_at") or 0.0),
            finished_at=float(rec.get("finished_at") or 0.0),
            message=rec.get("message", ""))

    def _kill_orphan_group(self, rec: dict) -> None:
        """The shim is gone: kill the replica's process group if its leader is
        still the process the shim started."""
        if self._alive(rec, "pid", "pid_start"):
            with contextlib.suppress(OSError):
                os.killpg(int(rec["pgid"] or rec["pid"]), signal.SIGKILL)

    def _status_sync(self, replica_id: str) -> ReplicaStatus:
        rec = self._read(replica_id)
        if rec is None:
            return ReplicaStatus(replica_id, "", ReplicaPhase.UNKNOWN, message="no record")
        if rec.get("phase") != "RUNNING" or self._alive(rec, "shim_pid", "shim_start"):
            return self._to_status(rec)
        rec = self._read(replica_id)  # it may have written its final record meanwhile
        if rec is None or rec.get("phase") != "RUNNING":
            return self._to_status(rec) if rec else self._status_sync(replica_id)
        self._kill_orphan_group(rec)
        rec.update(phase="UNKNOWN", reason="Lost", finished_at=time.time(),
                   message=f"the replica's supervisor (pid {rec.get('shim_pid')}) ended without "
                           "recording an exit status")
        _shim.atomic_write_json(self._path(replica_id), rec)
        return self._to_status(rec)

    # ------------------------------------------------------------------ replicas
    async def start(self, request: ReplicaRequest) -> ReplicaStatus:
        state_path = self._path(request.replica_id)
        if request.image:
            self.check_fits_ever([request.resources], request.image)
        current = self._status_sync(request.replica_id)
        if current.phase == ReplicaPhase.RUNNING:
            return current  # idempotent
        if self.tenancy.enabled and not request.tenant:
            raise ValueError(f"replica {request.replica_id} names no tenant: with tenant isolation on, "
                             "every replica runs as its tenant's user")
        run_as: list[str] = []
        workdir = os.path.abspath(request.workdir or self.state_dir)
        if self.tenancy.enabled:
            loop = asyncio.get_running_loop()
            # The first replica of a tenant may create its account (useradd, ~50 ms).
            account = self.tenancy.cached(request.tenant) or \
                await loop.run_in_executor(None, self.tenancy.account, request.tenant)
            if request.workdir:
                self.tenancy.own_dir(workdir, request.tenant)
            else:
                raise ValueError(f"replica {request.replica_id} has no working directory of its own")
            run_as = _tenancy.setpriv_prefix(account)
        gpus = self._assign_gpus(request)
        stop_path = self._path(request.replica_id, ".stop")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stop_path)
        env = dict(self._base_env)
        env.update(request.env)
        env.update(request.secret_env)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpus)
        if request.resources.memory_bytes:  # what the replica may use (a model server sizes its requests by it)
            env["CLOUDML_MEMORY_LIMIT_BYTES"] = str(int(request.resources.memory_bytes))
        spec = {
            "replica_id": request.replica_id, "group": request.group,
            "argv": list(request.argv), "run_as": run_as, "env": env,
            "workdir": workdir,
            "log_path": os.path.abspath(request.log_path),
            "memory_limit": int(request.resources.memory_bytes or 0),
            "state_path": state_path, "stop_path": stop_path, "gpu_ids": gpus,
        }
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max(4, os.cpu_count() or 1), thread_name_prefix="local-runtime-start")
        try:
            proc, rec = await asyncio.get_running_loop().run_in_executor(
                self._pool, self._spawn_shim, spec)
        except BaseException:
            self._unassign_gpus(request.replica_id, request.group)
            raise
        self._procs[request.replica_id] = proc
        return self._to_status(rec)

    def _spawn_shim(self, spec: dict) -> tuple[subprocess.Popen, dict]:
        """Starts the shim and waits for its first record (blocking; run in
        a thread). Not asyncio's subprocess: closing or collecting its
        transport kills the child, and the shim must outlive this object."""
        proc = subprocess.Popen([self.python, *SHIM_COMMAND], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, cwd=self.state_dir)
        try:
            proc.stdin.write(marshal.dumps(spec))
            proc.stdin.close()
            poller = select.poll()
            poller.register(proc.stdout.fileno(), select.POLLIN | select.POLLHUP)
            line = proc.stdout.readline() if poller.poll(SHIM_START_TIMEOUT * 1000) else b""
            if not line:
                if proc.poll() is None:
                    proc.kill()
                err = proc.stderr.read().decode(errors="replace").strip()[-2000:]
                proc.wait()
                raise RuntimeError(f"the supervisor of replica {spec['replica_id']} failed to start "
                                   f"(exit {proc.returncode}): {err or 'no output'}")
            return proc, json.loads(line)
        except BaseException:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise
        finally:
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                with contextlib.suppress(OSError):
                    pipe.close()

    def _reap(self, replica_id: str) -> None:
        proc = self._procs.get(replica_id)
        if proc is not None and proc.poll() is not None:
            del self._procs[replica_id]

    async def status(self, replica_id: str) -> ReplicaStatus:
        st = self._status_sync(replica_id)
        if st.ended:
            self._reap(replica_id)
        return st

    async def wait(self, replica_id: str, timeout: float | None = None) -> ReplicaStatus:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        shim: tuple[int, str] | None = None
        while True:
            # Cheap checks first: the shim writes the final record and then
            # exits, so while it lives (our child not yet exited, or its pid
            # still carrying its start time) the replica has not ended.
            proc = self._procs.get(replica_id)
            if proc is not None and proc.poll() is None:
                running = True
            elif shim is not None:
                running = _shim.start_token(shim[0]) == shim[1]
            else:
                running = False
            if not running:
                st = self._status_sync(replica_id)
                if st.ended:
                    self._reap(replica_id)
                    return st
                rec = self._read(replica_id) or {}
                if rec.get("shim_start") is not None:
                    shim = (int(rec.get("shim_pid") or 0), rec["shim_start"])
            if deadline is not None and loop.time() >= deadline:
                return self._status_sync(replica_id)
            delay = POLL_SECONDS if deadline is None else min(POLL_SECONDS, deadline - loop.time())
            await asyncio.sleep(max(0.0, delay))

    async def stop(self, replica_id: str, grace_seconds: float = 10.0) -> ReplicaStatus:
        st = self._status_sync(replica_id)
        if st.ended:
            return st
        rec = self._read(replica_id) or {}
        with open(self._path(replica_id, ".stop"), "w") as f:  # first line: the grace period
            f.write(f"{float(grace_seconds)!r}\nrequested at {time.time():.3f}\n")
        if self._alive(rec, "shim_pid", "shim_start"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(rec["shim_pid"]), signal.SIGTERM)
        # The shim SIGKILLs after the grace; allow it a moment to reap and record.
        st = await self.wait(replica_id, grace_seconds + 3.0)
        if st.ended:
            return st
        # The shim is unresponsive: do it ourselves.
        rec = self._read(replica_id) or {}
        self._kill_orphan_group(rec)
        if self._alive(rec, "shim_pid", "shim_start"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(rec["shim_pid"]), signal.SIGKILL)
        st = await self.wait(replica_id, 2.0)
        if st.ended and st.reason != "Lost":
            return st
        rec = self._read(replica_id) or rec
        rec.update(phase="FAILED", exit_code=137, reason="Killed", finished_at=time.time(),
                   message="stopped on request (its supervisor did not respond; killed)")
        _shim.atomic_write_json(self._path(replica_id), rec)
        return self._to_status(rec)

    async def adopt(self) -> list[ReplicaStatus]:
        with self._capacity(write=False):
            pass
        names = sorted(n[:-5] for n in os.listdir(self.state_dir)
                       if n.endswith(".json") and not n.startswith(".") and _REPLICA_ID.match(n[:-5]))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            None, lambda: [s for s in map(self._status_sync, names) if s.replica_id])

    async def forget(self, replica_id: str) -> None:
        st = self._status_sync(replica_id)
        if st.phase == ReplicaPhase.RUNNING:
            raise RuntimeError(f"replica {replica_id} is still running; stop() it first")
        for suffix in (".json", ".stop"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(replica_id, suffix))
        if st.group:
            self._unassign_gpus(replica_id, st.group)
        self._reap(replica_id)
