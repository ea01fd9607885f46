"""Starting and stopping replicas, for the reconciler (a mixin of
`Reconciler`): quota, runtime capacity, `runtime.start` of the model server,
waiting for each process; and the idempotent stop (endpoint UNLOADING,
`runtime.stop`, releases, record deleted last) described in reconciler.py."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil

from cloudml.models.v1 import models_service_pb2 as pb
from services.common import errors
from services.common.runtime.base import CapacityBusy, ReplicaPhase, ReplicaRequest, ReplicaStatus, Unschedulable
from services.models import store
from services.models.rules import replica_amount, replica_resources
from services.models.observe import PORT_FILE

log = logging.getLogger(__name__)

S = pb.ModelVersionState
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOG_FILE = "replica.log"


def watch_until_ended(runtime, runtime_id: str, ended) -> asyncio.Task:
    """A task that waits for the runtime's replica `runtime_id` to end (the
    runtime's errors are logged and the wait retried) and then calls
    `ended(status)`."""
    async def wait() -> None:
        while True:
            try:
                status = await runtime.wait(runtime_id)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep watching
                log.exception("waiting for replica %s", runtime_id)
                await asyncio.sleep(1)
                continue
            if status.ended:
                ended(status)
                return

    return asyncio.create_task(wait(), name=f"wait:{runtime_id}")


class ReplicaLauncher:
    """Uses the `Reconciler`'s state (`settings`, `runtime`, `auth`,
    `replicas`, `statuses`, `_waiters`, `_stoppers`, `_waiting`,
    `_retry_at`, ...) and its observer's and artifacts' methods."""

    async def _place(self, record: store.ReplicaRecord, version: pb.ModelVersion, now: float) -> None:
        if self._retry_at.get(record.key, 0) > now:
            return
        retry = now + self.settings.retry_interval
        resources = replica_resources(version)
        record.resources = {"cpu_millis": resources.cpu_millis, "memory_bytes": resources.memory_bytes,
                            "gpus": resources.gpus}
        try:
            await self.auth.reserve(record.tenant, record.owner_id, resources)
        except errors.QuotaBusy as err:
            self._wait(record, f"waiting for quota: {err.message}", retry)
            return
        except errors.ResourceExhausted as err:
            self._wait(record, f"cannot fit the tenant's quota: {err.message}", now + 5 * self.settings.retry_interval)
            return
        except errors.AlreadyExists:
            # Reserved earlier with other resources (the spec cannot change, so
            # only by hand): give it back and reserve again.
            await self.auth.release(record.tenant, record.owner_id)
            self._wait(record, "re-reserving quota", now)
            return
        except (errors.Unavailable, errors.DeadlineExceeded) as err:
            self._wait(record, f"waiting for the auth service: {err.message}", retry)
            return
        try:
            self.runtime.reserve(record.runtime_id, [replica_amount(version)])
        except CapacityBusy as err:
            self._wait(record, f"waiting for capacity: {err}", retry)
            return
        except Unschedulable as err:
            self._wait(record, f"cannot fit the runtime: {err}", now + 5 * self.settings.retry_interval)
            return
        path = self._model_path(version)
        if path is None:
            download = self._downloads.get(self.keys.version(version.tenant, version.model, version.version))
            if download is not None and download.error:
                self._fail(record.version_key, 5, f"cannot fetch {version.model_uri}: {download.error}")
                return
            self._wait(record, f"fetching {version.model_uri}", now + 0.5)
            return
        os.makedirs(record.workdir, exist_ok=True)
        port_file = os.path.join(record.workdir, PORT_FILE)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(port_file)
        pods = self.runtime.reports_readiness  # kubernetes: a Pod, called at its IP once Ready
        record.started, record.started_at = True, now
        if pods:
            record.address = ""
        else:
            sockets = await asyncio.to_thread(self.socket_dir, record.tenant)
            record.address = f"unix:{os.path.join(sockets, record.replica_id)}.sock"
        try:
            await self._save(record)
        except BaseException:
            record.started, record.started_at, record.address = False, 0.0, ""
            raise
        self._waiting.pop(record.key, None)
        self._retry_at.pop(record.key, None)
        request = ReplicaRequest(
            replica_id=record.runtime_id, group=record.runtime_id, argv=self._argv(record, version, path, port_file),
            # HOME and TMPDIR in the replica's own working directory (TensorFlow and
            # Keras write caches there), never the platform's.
            env={"PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "HOME": record.workdir,
                 "TMPDIR": record.workdir, **({} if pods else {"PYTHONPATH": PROJECT_ROOT})},
            workdir=record.workdir, log_path=os.path.join(record.workdir, LOG_FILE),
            resources=replica_amount(version), tenant=record.tenant,
        )
        if pods:
            port = self.settings.replica_port
            request.serving_port = port
            request.readiness_command = [self.settings.pod_python, "-m", "services.common.health_probe",
                                         str(port)]
        try:
            status = await self.runtime.start(request)
        except Exception as err:  # noqa: BLE001 - counted as a failed start; the pass replaces it
            log.exception("starting replica %s failed", record.runtime_id)
            status = ReplicaStatus(record.runtime_id, record.runtime_id, ReplicaPhase.FAILED, exit_code=None,
                                   reason=f"StartFailed: {err}")
        self.statuses[record.runtime_id] = status
        if not status.ended:
            self._watch_process(record.runtime_id)
            self._monitor(record)
        log.info("replica %s started (pid %s) on %s", record.runtime_id, status.pid, record.address)

    def _argv(self, record: store.ReplicaRecord, version: pb.ModelVersion, path: str, port_file: str) -> list[str]:
        if self.runtime.reports_readiness:  # a Pod of the model-server image: its serving port on the Pod IP
            where = [self.settings.pod_python, "-m", "services.models.model_server",
                     "--listen", f"0.0.0.0:{self.settings.replica_port}"]
        else:
            where = [self.settings.python, "-m", "services.models.model_server", "--listen", record.address,
                     "--metrics-listen", f"unix:{self._socket_path(record, 'metrics')}"]
        argv = [
            *where, "--model-name", version.model, "--version", str(version.version), "--base-path", path,
            "--port-file", port_file, "--drain-delay", str(self.settings.drain_delay),
        ]
        b = version.batching
        if b.enabled:
            config = {"enabled": True}
            for name in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"):
                if getattr(b, name):
                    config[name] = getattr(b, name)
            argv += ["--batching-config", json.dumps(config)]
        return argv

    def _wait(self, record: store.ReplicaRecord, message: str, retry_at: float) -> None:
        if self._waiting.get(record.key) != message:
            log.info("replica %s: %s", record.runtime_id, message)
        self._waiting[record.key] = message
        self._retry_at[record.key] = retry_at

    def _watch_process(self, runtime_id: str) -> None:
        if runtime_id in self._waiters and not self._waiters[runtime_id].done():
            return

        def ended(status: ReplicaStatus) -> None:
            self.statuses[runtime_id] = status
            self.wake()

        self._waiters[runtime_id] = watch_until_ended(self.runtime, runtime_id, ended)

    async def _begin_stop(self, record: store.ReplicaRecord, reason: str) -> None:
        if not record.stopping:
            record.stopping, record.stop_reason = True, reason
            try:
                await self._save(record)
            except BaseException:
                record.stopping, record.stop_reason = False, ""
                raise
            log.info("stopping replica %s (%s)", record.runtime_id, reason)
        self._ensure_stopping(record)

    def _ensure_stopping(self, record: store.ReplicaRecord) -> None:
        task = self._stoppers.get(record.runtime_id)
        if task is None or task.done():
            self._stoppers[record.runtime_id] = asyncio.create_task(self._stop_and_release(record),
                                                                    name=f"stop:{record.runtime_id}")

    async def _stop_and_release(self, record: store.ReplicaRecord) -> None:
        delay = 0.2
        while True:
            try:
                await self._finish(record)
                return
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - retried until done
                log.warning("finishing replica %s: %s; retrying", record.runtime_id, getattr(err, "message", err))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _finish(self, record: store.ReplicaRecord) -> None:
        rid = record.runtime_id
        status = self.statuses.get(rid)
        if record.started:
            if status is None:
                status = await self.runtime.status(rid)
            self._stop_monitor(record)  # before SIGTERM: its open stream would hold the drain
            if not status.ended:
                # Gateways stop routing here before it is asked to stop.
                await self._set_endpoint(record, S.MODEL_VERSION_STATE_UNLOADING)
                status = await self.runtime.stop(rid, self.settings.stop_grace)
            self.statuses[rid] = status
        self._stop_monitor(record)
        await self._set_endpoint(record, None)
        self.runtime.release(rid)
        await self.auth.release(record.tenant, record.owner_id)
        if record.started and status is not None and status.phase != ReplicaPhase.UNKNOWN:
            await self.runtime.forget(rid)
        self._remove_sockets(record)
        await self.store.delete_replica(record)
        self.replicas.pop(record.key, None)
        self.statuses.pop(rid, None)
        self._ports.pop(record.key, None)
        self._waiting.pop(record.key, None)
        self._retry_at.pop(record.key, None)
        waiter = self._waiters.pop(rid, None)
        if waiter is not None:
            waiter.cancel()
        if record.stop_reason in ("scale-down", "deleted", "failed") and status is not None \
                and status.reason in ("Killed", "Completed", ""):
            shutil.rmtree(record.workdir, ignore_errors=True)
        log.info("replica %s finished (%s): quota and capacity released", rid, record.stop_reason)
        # What waited for quota or capacity may fit now: try again at once.
        self._retry_at.clear()
        self.wake()

    async def _stop_orphan(self, status: ReplicaStatus) -> None:
        rid = status.replica_id
        try:
            if not status.ended:
                await self.runtime.stop(rid, self.settings.stop_grace)
            self.runtime.release(rid)
            await self.runtime.forget(rid)
        except Exception:  # noqa: BLE001
            log.exception("stopping orphan replica %s", rid)
        self.statuses.pop(rid, None)
