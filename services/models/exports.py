"""The export driver: carries out ExportVersion's records (export_records.py)
on the elected leader, beside the reconciler.

Each export is converted by `python -m services.models.tflite_export` started
through the runtime exactly as a model-server replica is (lifecycle.py): as
the tenant's own user (a SavedModel is tenant code), in a working directory
of its own (`DIR/models/exports/<runtime id>/`, the tenant's), with a memory
limit, its CPU and memory reserved against the tenant's quota (owner
"models/exports/<model>/<version>/<export id>") and the runtime's capacity
(group "exports.<tenant>.<model>.<version>.<export id>") while it runs. Both
names are fixed per export, so reserving again after a crash is a no-op and
releasing always finds what was reserved.

One pass (on any change of an export record, and every `tick`) per record:

- PENDING: reserve quota and capacity (waiting, with the reason in
  `message`, while they are busy; FAILED when they can never fit), write
  RUNNING with the runtime id and `holds`, then start the process;
- RUNNING: while the process runs, a task waits for it (past `timeout` it
  is stopped and the export FAILED: a SavedModel may hang); once it ended, its
  result file decides: the artifact is copied (no symlink followed, hashed
  on the way) to `DIR/models/artifacts/<tenant>/<model>/<version>/<id>/`, the
  platform's own, and the export SUCCEEDED; the converter's refusal FAILED
  with its one-line reason; no result (a crash, OOMKilled, a lost process, a
  leader that found the runtime without it) PENDING again for another
  attempt, FAILED after `max_attempts`;
- a finished record that still `holds` has its process stopped, its quota,
  capacity and runtime record released, then `holds` cleared;
- a record whose version is gone or being deleted is released, its artifact
  removed, and the record deleted.

Records are changed only by compare-and-swap, and `holds` is cleared only
after releasing, so a leader killed at any point leaves records that the
next leader finishes: nothing stays RUNNING without a process, nothing
stays reserved without a record.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
import sys
import time
from dataclasses import dataclass

from cloudml.common.v1 import resources_pb2
from services.common import confine, errors
from services.common.etcd import Etcd, Mirror
from services.common.quota import QuotaClient
from services.common.runtime.base import (Amount, CapacityBusy, ReplicaPhase, ReplicaRequest, ReplicaStatus,
                                          Runtime, Unschedulable)
from services.models import store as model_store
from services.models.export_records import ARTIFACT_FILE, E, ExportRecord
from services.models.lifecycle import PROJECT_ROOT, watch_until_ended
from services.models.store import ModelStore
from services.common.aio import wait_event

log = logging.getLogger(__name__)

RUNTIME_PREFIX = "exports."
RESULT_FILE = "result.json"
LOG_FILE = "export.log"
MAX_ARTIFACT_BYTES = 4 << 30


@dataclass
class ExportSettings:
    data_dir: str
    #: what one export process reserves (quota and runtime capacity) and may use (its memory limit);
    #: the conversion is mostly one thread (~5 s of CPU for small models, TensorFlow's import included)
    cpu_millis: int = 500
    memory_bytes: int = 2 * 2**30
    #: processes started for one export before it is FAILED
    max_attempts: int = 3
    #: an attempt running longer is stopped and the export FAILED (a SavedModel is tenant code: it may hang)
    timeout: float = 900.0
    #: retry period while waiting for quota or capacity; a full pass at least this often
    retry_interval: float = 2.0
    tick: float = 2.0
    stop_grace: float = 5.0
    python: str = sys.executable

    @property
    def work_dir(self) -> str:
        return os.path.join(self.data_dir, "models", "exports")

    @property
    def artifacts_dir(self) -> str:
        return os.path.join(self.data_dir, "models", "artifacts")


class ExportDriver:
    def __init__(self, etcd: Etcd, runtime: Runtime, auth: QuotaClient, settings: ExportSettings, *,
                 confiner: confine.Confiner, store: ModelStore, clock=time.time):
        self.etcd = etcd
        self.runtime = runtime
        self.auth = auth
        self.settings = settings
        self.confiner = confiner
        self.store = store
        self.keys = store.keys
        self.clock = clock
        self._wake = asyncio.Event()
        self.exports: Mirror | None = None
        self.versions: Mirror | None = None
        self._statuses: dict[str, ReplicaStatus] = {}
        self._waiters: dict[str, asyncio.Task] = {}
        self._retry_at: dict[str, float] = {}

    def wake(self) -> None:
        self._wake.set()

    # --- the loop --------------------------------------------------------------------

    async def run(self) -> None:
        """The leader's loop; cancelled when leadership is lost (processes keep
        running and are adopted by the next leader)."""
        self._statuses, self._waiters, self._retry_at = {}, {}, {}
        self.exports = Mirror(self.etcd, self.keys.exports, lambda kv: ExportRecord.decode(kv.value))
        self.versions = Mirror(self.etcd, self.keys.versions, model_store.decode_kv_version)
        mirrors = (self.exports, self.versions)
        try:
            for mirror in mirrors:
                mirror.listeners.append(self.wake)
                mirror.start()
                await mirror.wait_synced(30)
            await self._adopt()
            while True:
                self._wake.clear()
                try:
                    await self._pass()
                except (errors.Unavailable, errors.Conflict) as err:
                    log.info("export pass interrupted: %s", err.message)
                    await asyncio.sleep(0.5)
                await wait_event(self._wake, self.settings.tick)
                await asyncio.sleep(0.02)
        finally:
            for task in self._waiters.values():
                task.cancel()
            await asyncio.gather(*self._waiters.values(), return_exceptions=True)
            for mirror in mirrors:
                await mirror.stop()

    async def _adopt(self) -> None:
        known = {r.runtime_id for r in self.exports.items.values() if r.holds and r.runtime_id}
        for status in await self.runtime.adopt():
            if not status.replica_id.startswith(RUNTIME_PREFIX):
                continue
            self._statuses[status.replica_id] = status
            if status.replica_id not in known:
                log.warning("stopping orphan export process %s", status.replica_id)
                with contextlib.suppress(Exception):
                    if not status.ended:
                        await self.runtime.stop(status.replica_id, self.settings.stop_grace)
                    await self.runtime.forget(status.replica_id)

    async def _pass(self) -> None:
        for key, record in sorted(self.exports.items.items()):
            try:
                await self._step(key, record)
            except (errors.Unavailable, errors.Conflict):
                raise
            except errors.CloudMLError as err:
                log.warning("export %s: %s", key, err.message)

    async def _step(self, key: str, record: ExportRecord) -> None:
        version = self.versions.items.get(self.keys.version(record.tenant, record.model, record.version))
        if version is None and await self.etcd.get(key) is None:
            # Gone with its version in one transaction: archived (archiver.py),
            # the artifact with it. Never remove what the archive still reads.
            self.exports.items.pop(key, None)
            return
        if version is None or version.HasField("delete_time"):
            # A PENDING record may hold quota and capacity while it waits for the other: give both back.
            await self._release(record, force=True)
            if record.artifact_path:
                await asyncio.to_thread(shutil.rmtree, os.path.dirname(record.artifact_path), True)
            await self.etcd.delete(key)
            log.info("export %s removed with its version", key)
            return
        if record.state == E.EXPORT_STATE_PENDING:
            await self._start(key, record)
        elif record.state == E.EXPORT_STATE_RUNNING:
            status = self._statuses.get(record.runtime_id) or await self.runtime.status(record.runtime_id)
            self._statuses[record.runtime_id] = status
            if status.ended:
                await self._collect(key, record, status)
            elif record.started and self.clock() - record.started > self.settings.timeout:
                await self._fail(key, f"the conversion ran longer than {self.settings.timeout:g} s "
                                      f"(attempt {record.attempts}); stopped")
                await self._release(record)
                await self._update(key, lambda r: setattr(r, "holds", False), touch=False)
            else:
                self._watch(record.runtime_id)
        elif record.holds:
            await self._release(record)
            await self._update(key, lambda r: setattr(r, "holds", False), touch=False)

    # --- records ---------------------------------------------------------------------

    async def _update(self, key: str, change, touch: bool = True) -> ExportRecord | None:
        """Applies `change(record)` by compare-and-swap; the record as written.
        `touch=False` for bookkeeping callers never see (what the record
        holds): its update_time stays that of its last visible change."""
        written: list[ExportRecord] = []

        def apply(kv):
            if kv is None:
                return None
            record = ExportRecord.decode(kv.value)
            change(record)
            if touch:
                record.updated = self.clock()
            written[:] = [record]
            return record.encode()

        await self.store.update_export(key, apply)
        if written:
            self.exports.items[key] = written[0]
        return written[0] if written else None

    def _group(self, record: ExportRecord) -> str:
        return f"{RUNTIME_PREFIX}{record.tenant}.{record.model}.{record.version}.{record.id}"

    def _owner(self, record: ExportRecord) -> str:
        return f"models/exports/{record.model}/{record.version}/{record.id}"

    async def _wait_message(self, key: str, record: ExportRecord, message: str, retry: float) -> None:
        self._retry_at[key] = self.clock() + retry
        if record.message != message:
            await self._update(key, lambda r: setattr(r, "message", message))

    async def _fail(self, key: str, message: str) -> None:
        def change(r: ExportRecord) -> None:
            r.state, r.message, r.finished = E.EXPORT_STATE_FAILED, message, self.clock()

        await self._update(key, change)
        log.info("export %s FAILED: %s", key, message)
        self.wake()

    # --- starting ----------------------------------------------------------------------

    async def _start(self, key: str, record: ExportRecord) -> None:
        if self._retry_at.get(key, 0) > self.clock():
            return
        if self.runtime.name != "local":
            # The process reads the tenant's storage and writes its working directory on this
            # machine; a Pod would need both mounted and the platform's image (not built yet).
            await self._fail(key, f"exports run on the local runtime only (this platform runs "
                                  f"{self.runtime.name})")
            return
        try:
            where = self.confiner.check(record.tenant, record.source, "model_version.model_uri")
        except errors.CloudMLError as err:
            await self._fail(key, f"the version's SavedModel cannot be read: {err.message}")
            return
        if not where.local:
            await self._fail(key, f"{record.source} is not in the platform's storage")
            return
        s = self.settings
        resources = resources_pb2.Resources(cpu_millis=s.cpu_millis, memory_bytes=s.memory_bytes)
        try:
            await self.auth.reserve(record.tenant, self._owner(record), resources)
        except errors.QuotaBusy as err:
            await self._wait_message(key, record, f"waiting for quota: {err.message}", s.retry_interval)
            return
        except errors.ResourceExhausted as err:
            await self._fail(key, f"the export cannot fit the tenant's quota: {err.message}")
            return
        except errors.NotFound as err:
            await self._fail(key, err.message)
            return
        except (errors.Unavailable, errors.DeadlineExceeded) as err:
            await self._wait_message(key, record, f"waiting for the auth service: {err.message}", s.retry_interval)
            return
        amount = Amount(cpu_millis=s.cpu_millis, memory_bytes=s.memory_bytes)
        try:
            self.runtime.reserve(self._group(record), [amount])
        except CapacityBusy as err:
            await self._wait_message(key, record, f"waiting for capacity: {err}", s.retry_interval)
            return
        except Unschedulable as err:
            await self.auth.release(record.tenant, self._owner(record))
            await self._fail(key, f"the export cannot fit the runtime: {err}")
            return
        attempt = record.attempts + 1
        runtime_id = f"{self._group(record)}.{attempt}.{secrets.token_hex(2)}"
        workdir = os.path.join(s.work_dir, runtime_id)

        def running(r: ExportRecord) -> None:
            r.state, r.message, r.attempts = E.EXPORT_STATE_RUNNING, "", attempt
            r.runtime_id, r.owner_id, r.workdir, r.holds = runtime_id, self._owner(record), workdir, True
            r.started = self.clock()

        record = await self._update(key, running)
        if record is None:
            return
        self._retry_at.pop(key, None)
        os.makedirs(s.work_dir, exist_ok=True)
        source = where.real_path
        request = ReplicaRequest(
            replica_id=runtime_id, group=self._group(record),
            argv=[s.python, "-m", "services.models.tflite_export", "--saved-model", source,
                  "--output", os.path.join(workdir, ARTIFACT_FILE), "--result", os.path.join(workdir, RESULT_FILE),
                  "--optimization", record.optimization, *(["--signature", record.signature]
                                                           if record.signature else [])],
            env={"PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "HOME": workdir, "TMPDIR": workdir,
                 "PYTHONPATH": PROJECT_ROOT},
            workdir=workdir, log_path=os.path.join(workdir, LOG_FILE), resources=amount, tenant=record.tenant,
        )
        try:
            status = await self.runtime.start(request)
        except Exception as err:  # noqa: BLE001 - counted as an attempt that gave no answer
            log.exception("starting export process %s failed", runtime_id)
            status = ReplicaStatus(runtime_id, request.group, ReplicaPhase.FAILED, reason=f"StartFailed: {err}")
        self._statuses[runtime_id] = status
        log.info("export %s: attempt %d started (%s)", key, attempt, runtime_id)
        if status.ended:
            self.wake()
        else:
            self._watch(runtime_id)

    def _watch(self, runtime_id: str) -> None:
        task = self._waiters.get(runtime_id)
        if task is not None and not task.done():
            return

        def ended(status: ReplicaStatus) -> None:
            self._statuses[runtime_id] = status
            self.wake()

        self._waiters[runtime_id] = watch_until_ended(self.runtime, runtime_id, ended)

    # --- finishing ---------------------------------------------------------------------

    async def _collect(self, key: str, record: ExportRecord, status: ReplicaStatus) -> None:
        result = await asyncio.to_thread(_read_result, record.workdir)
        if result.get("ok"):
            try:
                size, sha, path = await asyncio.to_thread(self._keep_artifact, record)
            except errors.CloudMLError as err:
                await self._fail(key, err.message)
            else:
                def done(r: ExportRecord) -> None:
                    r.state, r.message, r.finished = E.EXPORT_STATE_SUCCEEDED, "", self.clock()
                    r.artifact_path, r.size_bytes, r.sha256 = path, size, sha

                await self._update(key, done)
                log.info("export %s SUCCEEDED: %d bytes, sha256 %s", key, size, sha[:12])
        elif result.get("error"):
            await self._fail(key, str(result["error"])[:1000])
        else:
            why = status.reason or "no status"
            if status.message:
                why += f": {status.message}"
            if record.attempts >= self.settings.max_attempts:
                await self._fail(key, f"the export process ended without an answer {record.attempts} times "
                                      f"(last: {why})")
            else:
                def again(r: ExportRecord) -> None:
                    r.state = E.EXPORT_STATE_PENDING
                    r.message = f"attempt {r.attempts} ended without an answer ({why}); retrying"

                await self._update(key, again)
                log.info("export %s: attempt %d ended without an answer (%s); retrying", key, record.attempts, why)
        await self._release(record)
        await self._update(key, lambda r: setattr(r, "holds", False) if r.runtime_id == record.runtime_id
                           else None, touch=False)
        self.wake()

    def _keep_artifact(self, record: ExportRecord) -> tuple[int, str, str]:
        """Copies the process's output (in a directory its tenant owns: never
        through a symlink, only a regular file of bounded size) to the
        platform's own artifacts directory; (size, sha256, path)."""
        try:
            fd = confine.open_beneath(record.workdir, ARTIFACT_FILE, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as err:
            raise errors.FailedPrecondition(f"the export process left no readable {ARTIFACT_FILE} "
                                            f"({errno.errorcode.get(err.errno, err.errno)})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_ARTIFACT_BYTES:
                raise errors.FailedPrecondition(f"the export process's {ARTIFACT_FILE} is not a regular file "
                                                f"of at most {MAX_ARTIFACT_BYTES} bytes")
            target_dir = os.path.join(self.settings.artifacts_dir, record.tenant, record.model, str(record.version),
                                      record.id)
            os.makedirs(os.path.dirname(target_dir), mode=0o700, exist_ok=True)
            staging = f"{target_dir}.part-{secrets.token_hex(4)}"
            os.mkdir(staging, 0o700)
            try:
                digest, size = hashlib.sha256(), 0
                with open(os.path.join(staging, ARTIFACT_FILE), "xb") as out:
                    while size <= MAX_ARTIFACT_BYTES:
                        data = os.pread(fd, 1 << 20, size)
                        if not data:
                            break
                        digest.update(data)
                        out.write(data)
                        size += len(data)
                if size > MAX_ARTIFACT_BYTES:
                    raise errors.FailedPrecondition(f"the artifact is larger than {MAX_ARTIFACT_BYTES} bytes")
                shutil.rmtree(target_dir, ignore_errors=True)
                os.rename(staging, target_dir)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            return size, digest.hexdigest(), os.path.join(target_dir, ARTIFACT_FILE)
        finally:
            os.close(fd)

    async def _release(self, record: ExportRecord, force: bool = False) -> None:
        """Stops the record's process if it still runs and gives back its
        quota, capacity and runtime record (each step idempotent); only for
        a record that `holds` them, unless `force`."""
        if not record.holds and not force:
            return
        rid = record.runtime_id
        if rid:
            status = await self.runtime.status(rid)
            if not status.ended:
                await self.runtime.stop(rid, self.settings.stop_grace)
            waiter = self._waiters.pop(rid, None)
            if waiter is not None:
                waiter.cancel()
        self.runtime.release(self._group(record))
        await self.auth.release(record.tenant, self._owner(record))
        if rid:
            with contextlib.suppress(RuntimeError):
                await self.runtime.forget(rid)
            self._statuses.pop(rid, None)
        if record.workdir:
            await asyncio.to_thread(shutil.rmtree, record.workdir, True)


def _read_result(workdir: str) -> dict:
    """The process's result file ({} when missing or not what it should be)."""
    if not workdir:
        return {}
    try:
        data = json.loads(confine.read_beneath(workdir, RESULT_FILE, 64 << 10))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
