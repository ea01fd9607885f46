"""The deployment reconciler: drives every version's model-server replicas
toward its desired count. It runs only on the elected leader
(`/cloudml/models/election/`, `run_as_leader`), so two models-service
processes never both act.

What it knows
-------------
- desired state, by list-then-watch (`Mirror`): models/ and versions/;
- the endpoint registry the gateways route by: endpoints/, which only this
  reconciler writes (see "Replica endpoints" below);
- its own bookkeeping: replicas/ (`store.ReplicaRecord`), loaded once when it
  becomes leader and from then on written only by it;
- processes: the runtime (`adopt()` when it becomes leader, then one
  `runtime.wait()` task per running replica, so a crash is seen at once);
- load errors: a model server that cannot load its SavedModel writes
  {"error": "..."} to its port file and exits non-zero;
- whether a replica serves: its gRPC health (a `Health.Watch` stream per
  running replica, over its socket).

Replica endpoints
-----------------
A replica is tenant code (a SavedModel's ops read and write files), so it
never reaches etcd, and only the platform reaches it: the reconciler starts
it listening on a Unix socket, `unix:<socket_dir(tenant)>/<replica id>.sock`
(its metrics on `<replica id>.metrics.sock`; with the native front, its
Python server on `<replica id>.server.sock`), in a directory of mode 0700
per tenant under a per-platform directory (`/run/cloudml-<hash of the data
dir>`, else under the temp dir), short enough for the 107-byte limit of
socket paths. No TCP port is opened.

The reconciler publishes `endpoints/<tenant>/<model>/<version>/<replica id>`
(`ReplicaEndpoint`) for the gateways itself:
- AVAILABLE as soon as the replica's health turns SERVING (it does once the
  model is loaded and warmed up; the port file then holds `coalesce_max` and
  `max_request_bytes`, copied into the record). The address is the one the
  reconciler chose (the `.server.sock` one when the port file says the front
  took the public one), never an address the replica names;
- UNLOADING before the reconciler sends SIGTERM (gateways stop routing to it
  while it drains; the replica's `--drain-delay` covers their reaction), or
  when the replica's health turns NOT_SERVING on its own;
- deleted once its process is gone: a dead replica (kill -9, crash) is seen
  by its `runtime.wait()` task within ~50 ms, and its entry is the first
  thing removed.

Entries carry no lease, so a models service killed (even for good) leaves
them as they are: gateways keep routing to live replicas, and nothing goes
stale while no process leads, except the entry of a replica that dies in
that gap (gateways retry such calls once, on another replica). Every pass
deletes entries that no replica record accounts for; a new leader adopts the
running replicas (their records hold their addresses), watches their health
again and rewrites their entries only where they differ. Writes of one
replica's entry are serialized, and AVAILABLE is never written once the
replica is marked `stopping`.

One pass (after any change, debounced, and every `tick` seconds) goes over
every version:

1. replicas whose process ended unexpectedly are finished off (below) and
   classified: a load error fails the version at once (END, the error in
   `status`, replicas stopped, quota released: delete the version); a
   replica that dies before it ever loaded counts toward
   `max_start_failures` consecutive failures (then END likewise), with a
   doubling back-off between attempts; a replica that dies after it served
   (crash, OOMKilled, kill -9) is simply replaced by a new one (new id);
2. a version being deleted (or of a model being deleted), and a failed one,
   has every replica stopped; a deleted version's record is removed once its
   last replica is gone, and a deleted model's once its last version is;
3. otherwise `desired_replicas` comes from the autoscaler (autoscaler.py)
   within [min_replicas, max_replicas]; missing replicas are added and extra
   ones stopped (those not yet serving first, then the newest);
4. replicas not started yet are placed: a ReplicaRecord is written first,
   then quota reserved through the auth service (owner
   "models/<model>/<version>/<replica id>", the version's resources plus
   model_replicas=1; QuotaBusy keeps it in START and retries every
   `retry_interval`), then runtime capacity (`runtime.reserve`, one group
   per replica), then `runtime.start` of `python -m services.models.model_server`;
5. the version's state, desired count and replicas are written back (only
   when they changed), and the model's route republished.

Stopping a replica (scale-down, delete, failure, or the remains of a crash)
runs in the background: record marked `stopping`, its endpoint rewritten
UNLOADING, `runtime.stop` (SIGTERM: the model server goes NOT_SERVING, waits
its drain delay, finishes what it holds and exits; SIGKILL after
`stop_grace`), its endpoint deleted, then runtime capacity and the quota
reservation are released, the runtime forgets it, its sockets are removed,
and last the record is deleted. Every
step is idempotent, and the record is deleted last, so a leader killed at
any point leaves work that the next one finishes: records marked `stopping`
are stopped again, records `started` that the runtime does not know are
lost replicas (replaced), records never started are placed, and runtime
replicas named "models.*" without a record (none, unless etcd lost data)
are stopped.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families

from cloudml.models.v1 import models_service_pb2 as pb
from services.common import errors
from services.common.etcd import Etcd, Mirror
from services.common.runtime.base import (
    CapacityBusy,
    ReplicaPhase,
    ReplicaRequest,
    ReplicaStatus,
    Runtime,
    Unschedulable,
)
from services.models import store
from services.models.store import ModelStore
from services.models.autoscaler import Autoscaler
from services.models.core import replica_amount, replica_resources, split_uri, ts
from services.common.quota import QuotaClient

log = logging.getLogger(__name__)

S = pb.ModelVersionState
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNTIME_PREFIX = "models."
# The model server's gauge of calls it is handling (queued for a batch or running).
INFLIGHT_METRICS = ("cloudml_model_server_inflight_requests", "cloudml_model_inflight_requests")
PORT_FILE = "port.json"
LOG_FILE = "replica.log"
# A port file is a few hundred bytes; a replica (tenant code) may write anything there.
PORT_FILE_MAX = 64 * 1024
# Bounds on what a replica reports for its endpoint record.
COALESCE_MAX_LIMIT = 1 << 16
METRICS_MAX = 1 << 20
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass
class ReconcilerSettings:
    data_dir: str
    #: SIGTERM -> SIGKILL when stopping a replica (its drain time)
    stop_grace: float = 30.0
    #: a stopping replica's health NOT_SERVING -> refusing calls (its endpoint is UNLOADING before SIGTERM)
    drain_delay: float = 0.5
    #: autoscaling: in-flight requests per replica, scale-down delay, scrape period
    target_inflight: float = 4.0
    scale_down_delay: float = 60.0
    scrape_interval: float = 1.0
    #: retry period of replicas waiting for quota or capacity
    retry_interval: float = 2.0
    #: consecutive replica failures before loading (without a load error) that fail a version
    max_start_failures: int = 3
    #: a full pass at least this often
    tick: float = 2.0
    python: str = sys.executable

    @property
    def replicas_dir(self) -> str:
        return os.path.join(self.data_dir, "models", "replicas")

    @property
    def cache_dir(self) -> str:
        return os.path.join(self.data_dir, "models", "cache")

    @property
    def socket_root(self) -> str:
        """The platform's directory of replica sockets: short (socket paths
        are limited to 107 bytes, and data dirs can be long), one per data
        dir (two platforms side by side never share it)."""
        digest = hashlib.sha256(os.path.realpath(self.data_dir).encode()).hexdigest()[:10]
        base = "/run" if os.access("/run", os.W_OK | os.X_OK) else tempfile.gettempdir()
        return os.path.join(base, f"cloudml-{digest}")


@dataclass
class _Failures:
    count: int = 0
    retry_at: float = 0.0


@dataclass
class _Download:
    task: asyncio.Task
    error: str = ""


@dataclass
class _Observed:
    """What a pass derived for one replica."""

    state: int
    address: str = ""
    message: str = ""
    code: int = 0


def error_code(port: dict) -> int:
    """The status code of a load error: the port file's "code" when the model
    server wrote one, else a leading "CODE_NAME: " of the message, else UNKNOWN."""
    code = port.get("code")
    if isinstance(code, int) and 0 < code < 17:
        return code
    if isinstance(code, str) and code.upper() in _CODES:
        return _CODES[code.upper()]
    head = str(port.get("error", "")).split(":", 1)[0].strip().upper()
    return _CODES.get(head, 2)


_CODES = {name: number for number, name in enumerate((
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"))}


def read_port_file(path: str) -> dict:
    """The replica's port file (written by tenant code in its own working
    directory): never through a link it planted, at most PORT_FILE_MAX bytes."""
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            data = json.loads(f.read(PORT_FILE_MAX))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _count(value, limit: int) -> int:
    """A non-negative int a replica reported, within `limit` (0 if it is not one)."""
    return min(value, limit) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _private_dir(path: str, mode: int) -> None:
    """Creates `path` (one level) as this process's own directory with `mode`;
    refuses one that someone else made (the temp dir is shared)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, mode)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise PermissionError(f"{path} is not a directory of this platform's user")
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)


class ReconcilerMetrics:
    """The domain metrics `cloudml_models_*` (on the service's --metrics-listen)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        registry = registry or CollectorRegistry()
        self.leader = Gauge("cloudml_models_leader", "1 while this process runs the reconciler.",
                            registry=registry)
        self.versions = Gauge("cloudml_models_versions", "Versions by state (leader only).", ("state",),
                              registry=registry)
        self.replicas = Gauge("cloudml_models_replicas", "Replicas by state (leader only).", ("state",),
                              registry=registry)
        self.passes = Counter("cloudml_models_reconcile_passes_total", "Reconciler passes.", registry=registry)
        self.ended = Counter("cloudml_models_replica_failures_total",
                             "Replicas that ended without being asked to, by kind.", ("kind",), registry=registry)
        self.scaled = Counter("cloudml_models_autoscale_changes_total", "Autoscaler changes, by direction.",
                              ("direction",), registry=registry)


class Reconciler:
    def __init__(self, etcd: Etcd, runtime: Runtime, auth: QuotaClient, settings: ReconcilerSettings,
                 clock=time.time, metrics: ReconcilerMetrics | None = None, confiner=None,
                 store: ModelStore | None = None):
        self.metrics = metrics or ReconcilerMetrics()
        # Local model paths are checked again before each start (a version
        # stored before the rules, or a link planted in the tenant's tree since).
        self.confiner = confiner
        self.etcd = etcd
        self.store = store or ModelStore(etcd)
        self.keys = self.store.keys
        self.runtime = runtime
        self.auth = auth
        self.settings = settings
        self.clock = clock
        self.autoscaler = Autoscaler(settings.target_inflight, settings.scale_down_delay, settings.scrape_interval)
        self._reset()

    def _reset(self) -> None:
        self.models: Mirror | None = None
        self.versions: Mirror | None = None
        self.endpoints: Mirror | None = None
        self.replicas: dict[str, store.ReplicaRecord] = {}
        self.statuses: dict[str, ReplicaStatus] = {}
        self._waiters: dict[str, asyncio.Task] = {}
        self._stoppers: dict[str, asyncio.Task] = {}
        self._tasks: list[asyncio.Task] = []
        self._failures: dict[str, _Failures] = {}
        self._failed: dict[str, pb.ErrorStatus] = {}
        self._retry_at: dict[str, float] = {}
        self._waiting: dict[str, str] = {}
        self._ports: dict[str, dict] = {}
        self._downloads: dict[str, _Download] = {}
        self._route_dirty: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()
        # Per replica record key: its health watch, and the lock its endpoint writes take.
        self._monitors: dict[str, asyncio.Task] = {}
        self._endpoint_locks: dict[str, asyncio.Lock] = {}

    def wake(self) -> None:
        self._wake.set()

    # --- leadership ----------------------------------------------------------------

    async def run(self) -> None:
        """The leader's loop; cancelled when leadership is lost."""
        self._reset()
        self.models = Mirror(self.etcd, self.keys.models, store.decode_kv_model)
        self.versions = Mirror(self.etcd, self.keys.versions, store.decode_kv_version)
        self.endpoints = Mirror(self.etcd, self.keys.endpoints, store.decode_kv_endpoint)
        mirrors = (self.models, self.versions, self.endpoints)
        try:
            for mirror in mirrors:
                mirror.listeners.append(self.wake)
            self.models.watcher.on_event = self._on_model_event(self.models.watcher.on_event)
            self.versions.watcher.on_event = self._on_model_event(self.versions.watcher.on_event)
            for mirror in mirrors:
                mirror.start()
                await mirror.wait_synced(30)
            await self._load()
            self._tasks.append(asyncio.create_task(self._scrape_loop(), name="models-autoscale-scrape"))
            while True:
                self._wake.clear()
                try:
                    await self._pass()
                except (errors.Unavailable, errors.Conflict) as err:
                    log.info("reconcile pass interrupted: %s", err.message)
                    await asyncio.sleep(0.5)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.tick)
                await asyncio.sleep(0.02)  # debounce bursts of events
        finally:
            tasks = [*self._tasks, *self._waiters.values(), *self._stoppers.values(), *self._monitors.values(),
                     *(d.task for d in self._downloads.values())]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for mirror in mirrors:
                await mirror.stop()
            self.metrics.versions.clear()
            self.metrics.replicas.clear()

    def _on_model_event(self, inner):
        """Marks the route of the model an event under models/ or versions/ touches."""

        async def handle(event):
            key = event.kv.key
            try:
                if key.startswith(self.keys.models):
                    self._route_dirty.add(self.keys.parse_model(key))
                else:
                    tenant, model, _ = self.keys.parse_version(key)
                    self._route_dirty.add((tenant, model))
            except ValueError:
                pass
            return await inner(event)

        return handle

    async def _load(self) -> None:
        for record in await self.store.list_replicas():
            self.replicas[record.key] = record
        adopted = await self.runtime.adopt()
        known = {r.runtime_id for r in self.replicas.values()}
        for status in adopted:
            if not status.replica_id.startswith(RUNTIME_PREFIX):
                continue
            self.statuses[status.replica_id] = status
            if status.replica_id not in known:
                # A replica without a record: nothing accounts for it. Stop it.
                log.warning("stopping orphan replica %s", status.replica_id)
                self._stoppers[status.replica_id] = asyncio.create_task(self._stop_orphan(status))
            elif not status.ended:
                self._watch_process(status.replica_id)
        for record in self.replicas.values():
            status = self.statuses.get(record.runtime_id)
            if record.started and not record.stopping and status is not None and not status.ended:
                self._monitor(record)
        running = sum(1 for s in adopted if s.replica_id in known and not s.ended)
        log.info("reconciler leading: %d replica records, %d running replicas adopted", len(self.replicas), running)
        # Republish every route once: a process may have died between a
        # change and its publish.
        self._route_dirty.update(await self.store.routed_models())
        for key in self.models.items:
            self._route_dirty.add(self.keys.parse_model(key))

    # --- the pass ---------------------------------------------------------------------

    async def _pass(self) -> None:
        self.metrics.passes.inc()
        by_version: dict[str, list[store.ReplicaRecord]] = defaultdict(list)
        for record in self.replicas.values():
            by_version[record.version_key].append(record)
        for vkey in sorted(set(self.versions.items) | set(by_version)):
            try:
                await self._reconcile_version(vkey, by_version.get(vkey, []))
            except (errors.Unavailable, errors.Conflict):
                raise
            except errors.CloudMLError as err:
                log.warning("reconciling %s: %s", vkey, err.message)
        await self._finish_deleted_models()
        await self._sweep_endpoints()
        await self._publish_routes()
        self._export_counts()

    async def _sweep_endpoints(self) -> None:
        """Deletes endpoints/ entries that no replica record accounts for
        (left by a leader killed mid-way, or by replicas of older releases)."""
        for key in list(self.endpoints.items):
            try:
                tenant, model, number, replica_id = self.keys.parse_endpoint(key)
            except ValueError:
                continue
            if self.keys.replica(tenant, model, number, replica_id) not in self.replicas:
                log.info("deleting endpoint %s: no replica record", key)
                await self.store.delete_key(key)
                self.endpoints.items.pop(key, None)

    def _export_counts(self) -> None:
        versions: dict[str, int] = defaultdict(int)
        for version in self.versions.items.values():
            versions[S.Name(version.state)[len("MODEL_VERSION_STATE_"):]] += 1
        replicas: dict[str, int] = defaultdict(int)
        for record in self.replicas.values():
            replicas[S.Name(self._observe(record).state)[len("MODEL_VERSION_STATE_"):]] += 1
        for name in ("START", "LOADING", "AVAILABLE", "UNLOADING", "END"):
            self.metrics.versions.labels(name).set(versions.get(name, 0))
            self.metrics.replicas.labels(name).set(replicas.get(name, 0))

    async def _publish_routes(self) -> None:
        dirty, self._route_dirty = sorted(self._route_dirty), set()
        for i, (tenant, model) in enumerate(dirty):
            try:
                await self.store.publish_route(tenant, model)
            except errors.CloudMLError:
                self._route_dirty.update(dirty[i:])
                raise

    async def _finish_deleted_models(self) -> None:
        for key, model in list(self.models.items.items()):
            if not model.HasField("delete_time"):
                continue
            tenant, name = self.keys.parse_model(key)
            prefix = self.keys.versions_of(tenant, name)
            if any(k.startswith(prefix) for k in self.versions.items):
                continue
            if any(r.tenant == tenant and r.model == name for r in self.replicas.values()):
                continue
            # False too while etcd still has versions the mirror saw deleted.
            if await self.store.delete_model_if_empty(tenant, name):
                log.info("model %s/%s deleted", tenant, name)
                self._route_dirty.add((tenant, name))

    def _model_of(self, tenant: str, model: str) -> pb.Model | None:
        return self.models.items.get(self.keys.model(tenant, model))

    async def _reconcile_version(self, vkey: str, records: list[store.ReplicaRecord]) -> None:
        tenant, model_name, number = self.keys.parse_version(vkey)
        version = self.versions.items.get(vkey)
        model = self._model_of(tenant, model_name)
        deleting = (version is None or version.HasField("delete_time") or model is None
                    or model.HasField("delete_time"))
        now = self.clock()

        # 1. replicas whose process ended (not on our request)
        live: list[store.ReplicaRecord] = []
        for record in records:
            if record.stopping:
                self._ensure_stopping(record)
                continue
            if record.started:
                status = self.statuses.get(record.runtime_id)
                if status is None or status.ended:
                    self._replica_ended(vkey, record, status, now)
                    await self._begin_stop(record, "crashed")
                    continue
                if not record.available and self._endpoint_state(record) == S.MODEL_VERSION_STATE_AVAILABLE:
                    record.available = True
                    self._failures.pop(vkey, None)
                    try:
                        await self._save(record)
                    except BaseException:
                        record.available = False
                        raise
            live.append(record)

        failure = self._failed.get(vkey)
        if failure is None and version is not None and version.state == S.MODEL_VERSION_STATE_END \
                and version.status.code:
            failure = version.status

        if version is None:
            for record in live:
                await self._begin_stop(record, "deleted")
            return
        if deleting or failure is not None:
            for record in live:
                await self._begin_stop(record, "deleted" if deleting else "failed")
            if deleting and not records:
                await self._delete_version(vkey, tenant, model_name, number)
                return
            live = []
            desired = version.desired_replicas
        else:
            desired = self._desired(vkey, version, now)
            live = await self._scale(vkey, version, live, desired, now)
            for record in live:
                if not record.started:
                    await self._place(record, version, now)

        await self._write_status(vkey, version, deleting, failure, desired)

    def _desired(self, vkey: str, version: pb.ModelVersion, now: float) -> int:
        current = min(max(version.desired_replicas or version.min_replicas, version.min_replicas),
                      version.max_replicas)
        desired = self.autoscaler.desired(vkey, current, version.min_replicas, version.max_replicas, now)
        if desired != current:
            self.metrics.scaled.labels("up" if desired > current else "down").inc()
            log.info("autoscaling %s/%s v%d: %d -> %d replicas", version.tenant, version.model, version.version,
                     current, desired)
        return desired

    async def _scale(self, vkey: str, version: pb.ModelVersion, live: list[store.ReplicaRecord], desired: int,
                     now: float) -> list[store.ReplicaRecord]:
        if len(live) > desired:
            # Not yet serving first, then the newest.
            def order(r: store.ReplicaRecord):
                return (self._endpoint_state(r) == S.MODEL_VERSION_STATE_AVAILABLE, -r.created)

            victims = sorted(live, key=order)[: len(live) - desired]
            for record in victims:
                await self._begin_stop(record, "scale-down")
            live = [r for r in live if r not in victims]
        elif len(live) < desired:
            failures = self._failures.get(vkey)
            if failures is None or failures.retry_at <= now:
                for _ in range(desired - len(live)):
                    live.append(await self._new_replica(version, now))
        return live

    async def _new_replica(self, version: pb.ModelVersion, now: float) -> store.ReplicaRecord:
        taken = {r.replica_id for r in self.replicas.values() if r.tenant == version.tenant}
        replica_id = secrets.token_hex(4)
        while replica_id in taken:  # it names the replica's sockets in the tenant's directory
            replica_id = secrets.token_hex(4)
        runtime_id = f"{RUNTIME_PREFIX}{version.tenant}.{version.model}.{version.version}.{replica_id}"
        record = store.ReplicaRecord(
            tenant=version.tenant, model=version.model, version=version.version, replica_id=replica_id,
            runtime_id=runtime_id, owner_id=f"models/{version.model}/{version.version}/{replica_id}",
            workdir=os.path.join(self.settings.replicas_dir, runtime_id), created=now, keys=self.keys,
        )
        await self._save(record)
        log.info("replica %s of %s/%s v%d added", replica_id, version.tenant, version.model, version.version)
        return record

    async def _save(self, record: store.ReplicaRecord) -> None:
        await self.store.put_replica(record)
        self.replicas[record.key] = record

    # --- placing a replica ------------------------------------------------------------

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
        sockets = await asyncio.to_thread(self.socket_dir, record.tenant)
        record.started, record.started_at = True, now
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
            env={"PYTHONPATH": PROJECT_ROOT, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
                 "HOME": record.workdir, "TMPDIR": record.workdir},
            workdir=record.workdir, log_path=os.path.join(record.workdir, LOG_FILE),
            resources=replica_amount(version), tenant=record.tenant,
        )
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
        argv = [
            self.settings.python, "-m", "services.models.model_server",
            "--model-name", version.model, "--version", str(version.version), "--base-path", path,
            "--listen", record.address, "--port-file", port_file,
            "--metrics-listen", f"unix:{self._socket_path(record, 'metrics')}",
            "--drain-delay", str(self.settings.drain_delay),
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

    def _model_path(self, version: pb.ModelVersion) -> str | None:
        """The SavedModel's local directory, or None while it is being fetched."""
        scheme, rest = split_uri(version.model_uri)
        if scheme == "file":
            if self.confiner is not None:
                try:
                    where = self.confiner.check(version.tenant, version.model_uri, "model_version.model_uri")
                    return os.path.join(where.root, where.relative) if where.relative else where.root
                except errors.CloudMLError as err:
                    self._fail(self.keys.version(version.tenant, version.model, version.version), 7, err.message)
                    return None
            return os.path.realpath(rest)
        vkey = self.keys.version(version.tenant, version.model, version.version)
        digest = hashlib.sha256(version.model_uri.encode()).hexdigest()[:12]
        target = os.path.join(self.settings.cache_dir, version.tenant, version.model,
                              f"{version.version}-{digest}")
        if os.path.isdir(target):
            return target
        download = self._downloads.get(vkey)
        if download is None or (download.task.done() and not download.error):
            task = asyncio.create_task(asyncio.to_thread(_fetch, version.model_uri, target))
            download = self._downloads[vkey] = _Download(task)

            def done(t: asyncio.Task, d=download) -> None:
                if not t.cancelled() and t.exception() is not None:
                    d.error = str(t.exception()) or type(t.exception()).__name__
                self.wake()

            task.add_done_callback(done)
        return None

    def _watch_process(self, runtime_id: str) -> None:
        if runtime_id in self._waiters and not self._waiters[runtime_id].done():
            return

        async def wait() -> None:
            while True:
                try:
                    status = await self.runtime.wait(runtime_id)
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - keep watching
                    log.exception("waiting for replica %s", runtime_id)
                    await asyncio.sleep(1)
                    continue
                if status.ended:
                    self.statuses[runtime_id] = status
                    self.wake()
                    return

        self._waiters[runtime_id] = asyncio.create_task(wait(), name=f"wait:{runtime_id}")

    # --- replica sockets -------------------------------------------------------------------

    def socket_dir(self, tenant: str) -> str:
        """The directory of `tenant`'s replica sockets, created if missing:
        `<socket_root>/<tenant>` (a long name is cut and hashed), mode 0700,
        under a root of mode 0711 that only the platform's user owns. With
        tenant isolation on, the tenant's user owns it (its replicas create
        their sockets there; no other tenant can reach them). Blocking (it may
        create the tenant's account): run it on a thread."""
        root = self.settings.socket_root
        _private_dir(root, 0o711)
        name = tenant if len(tenant) <= 40 else f"{tenant[:31]}-{hashlib.sha256(tenant.encode()).hexdigest()[:8]}"
        path = os.path.join(root, name)
        tenancy = getattr(self.runtime, "tenancy", None)
        if tenancy is not None and tenancy.enabled:
            if os.path.islink(path):
                raise PermissionError(f"{path} is a symbolic link")
            tenancy.own_dir(path, tenant, 0o700)
        else:
            _private_dir(path, 0o700)
        return path

    @staticmethod
    def _socket_path(record: store.ReplicaRecord, role: str = "") -> str:
        """`<dir>/<replica id>.sock` (the public address), `.server.sock` (the
        Python server behind a native front; the model server's own naming
        rule, server_address()), `.metrics.sock`."""
        base = record.address[len("unix:"):-len(".sock")]
        return f"{base}.{role}.sock" if role else f"{base}.sock"

    def _serving_address(self, record: store.ReplicaRecord, port: dict) -> str:
        """The address gateways call: the replica's Python server itself (behind
        a native front, its `.server.sock`: gateways coalesce already), else
        its public one. Only ever one of the two addresses chosen for it."""
        server = f"unix:{self._socket_path(record, 'server')}"
        return server if port.get("replica_address") == server else record.address

    def _remove_sockets(self, record: store.ReplicaRecord) -> None:
        if not record.address.startswith("unix:"):
            return
        for role in ("", "server", "metrics"):
            path = self._socket_path(record, role)
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)

    # --- replica health and endpoints ----------------------------------------------------------

    def _monitor(self, record: store.ReplicaRecord) -> None:
        """Follows a started replica's health until it ends or is stopped."""
        if not record.address.startswith("unix:"):
            return  # started by an older release: it registers itself
        task = self._monitors.get(record.key)
        if task is None or task.done():
            self._monitors[record.key] = asyncio.create_task(self._watch_health(record),
                                                             name=f"health:{record.runtime_id}")

    def _stop_monitor(self, record: store.ReplicaRecord) -> None:
        task = self._monitors.pop(record.key, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _live(self, record: store.ReplicaRecord) -> bool:
        status = self.statuses.get(record.runtime_id)
        return (self.replicas.get(record.key) is record and not record.stopping
                and (status is None or not status.ended))

    async def _watch_health(self, record: store.ReplicaRecord) -> None:
        """Until the replica drains (SERVING, then NOT_SERVING: a model server
        never serves again after that) or ends. The stream is closed then: an
        open call would hold the replica's shutdown for its whole grace."""
        port_path = os.path.join(record.workdir, PORT_FILE)
        while self._live(record):
            port = read_port_file(port_path)
            if port.get("error"):
                return  # it exits; the pass reads the error
            if not port.get("address"):
                await asyncio.sleep(0.05)  # still importing TensorFlow
                continue
            address = self._serving_address(record, port)
            try:
                if await self._follow_health(record, address, port_path):
                    return
            except grpc.aio.AioRpcError as err:
                log.debug("health of %s: %s", record.runtime_id, err.code().name)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep watching
                log.exception("watching the health of replica %s", record.runtime_id)
            await asyncio.sleep(0.2)

    async def _follow_health(self, record: store.ReplicaRecord, address: str, port_path: str) -> bool:
        """One Health.Watch stream (the replica pushes every change at once);
        True once the replica drains."""
        async with grpc.aio.insecure_channel(address) as channel:
            call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            async for reply in call:
                if reply.status == SERVING:
                    port = read_port_file(port_path)
                    await self._set_endpoint(record, S.MODEL_VERSION_STATE_AVAILABLE, address,
                                             _count(port.get("coalesce_max"), COALESCE_MAX_LIMIT),
                                             _count(port.get("max_request_bytes"), 1 << 62),
                                             _count(port.get("batch_timeout_micros"), (1 << 32) - 1))
                elif record.available or self._endpoint_state(record) == S.MODEL_VERSION_STATE_AVAILABLE:
                    await self._set_endpoint(record, S.MODEL_VERSION_STATE_UNLOADING)
                    call.cancel()
                    return True
        return False

    async def _set_endpoint(self, record: store.ReplicaRecord, state: int | None, address: str = "",
                            coalesce_max: int = 0, max_request_bytes: int = 0,
                            batch_timeout_micros: int = 0) -> None:
        """Writes the replica's endpoints/ entry: AVAILABLE (only while the
        replica is live), UNLOADING (only over an entry there is), or None:
        deleted. One replica's writes never interleave."""
        key = self.keys.endpoint(record.tenant, record.model, record.version, record.replica_id)
        lock = self._endpoint_locks.setdefault(record.key, asyncio.Lock())
        async with lock:
            current = self.endpoints.items.get(key)
            if state is None:
                await self.store.delete_key(key)
                self.endpoints.items.pop(key, None)
                self._endpoint_locks.pop(record.key, None)
                return
            if state == S.MODEL_VERSION_STATE_AVAILABLE:
                if not self._live(record):
                    return
                endpoint = store.make_endpoint(record.tenant, record.model, record.version, record.replica_id,
                                               address, state, coalesce_max)
                if max_request_bytes and "max_request_bytes" in pb.ReplicaEndpoint.DESCRIPTOR.fields_by_name:
                    endpoint.max_request_bytes = max_request_bytes
                endpoint.batch_timeout_micros = batch_timeout_micros
                if current is not None and _same_endpoint(current, endpoint):
                    return
            else:
                if current is None or current.state == state:
                    return
                endpoint = pb.ReplicaEndpoint()
                endpoint.CopyFrom(current)
                endpoint.state = state
            await self.store.put_endpoint(endpoint)
            self.endpoints.items[key] = endpoint
            log.info("endpoint of replica %s: %s %s", record.runtime_id,
                     S.Name(state)[len("MODEL_VERSION_STATE_"):], endpoint.address)
        self.wake()

    # --- observing replicas --------------------------------------------------------------

    def _endpoint(self, record: store.ReplicaRecord) -> pb.ReplicaEndpoint | None:
        return self.endpoints.items.get(self.keys.endpoint(record.tenant, record.model, record.version,
                                                           record.replica_id))

    def _endpoint_state(self, record: store.ReplicaRecord) -> int:
        endpoint = self._endpoint(record)
        return endpoint.state if endpoint is not None else S.MODEL_VERSION_STATE_UNSPECIFIED

    def _port_info(self, record: store.ReplicaRecord) -> dict:
        info = self._ports.get(record.key)
        if info is None or not (info.get("address") or info.get("error")):
            info = read_port_file(os.path.join(record.workdir, PORT_FILE))
            self._ports[record.key] = info
        return info

    def _observe(self, record: store.ReplicaRecord) -> _Observed:
        endpoint = self._endpoint(record)
        status = self.statuses.get(record.runtime_id)
        waiting = self._waiting.get(record.key, "")
        if not record.started:
            return _Observed(S.MODEL_VERSION_STATE_START, message=waiting)
        port = self._port_info(record)
        address = endpoint.address if endpoint is not None else record.address
        if status is None or status.ended:
            message = port.get("error") or self._exit_message(status)
            return _Observed(S.MODEL_VERSION_STATE_END, address, message,
                             0 if record.stopping else (error_code(port) if port.get("error") else 2))
        if record.stopping:
            return _Observed(S.MODEL_VERSION_STATE_UNLOADING, address)
        if endpoint is not None:
            return _Observed(endpoint.state, address)
        return _Observed(S.MODEL_VERSION_STATE_LOADING, address)

    @staticmethod
    def _exit_message(status: ReplicaStatus | None) -> str:
        if status is None or status.phase == ReplicaPhase.UNKNOWN:
            return "the runtime lost the replica's process"
        return f"replica exited with code {status.exit_code} ({status.reason or 'Error'})"

    def _replica_ended(self, vkey: str, record: store.ReplicaRecord, status: ReplicaStatus | None,
                       now: float) -> None:
        """Classifies a replica that ended without being asked to."""
        port = read_port_file(os.path.join(record.workdir, PORT_FILE))
        self._ports[record.key] = port
        log_path = os.path.join(record.workdir, LOG_FILE)
        if port.get("error"):
            self.metrics.ended.labels("load_error").inc()
            log.warning("replica %s failed to load: %s", record.runtime_id, port["error"])
            self._fail(vkey, error_code(port), str(port["error"]))
            return
        message = self._exit_message(status)
        if record.available:
            self.metrics.ended.labels("crash").inc()
            log.warning("replica %s crashed (%s); replacing it", record.runtime_id, message)
            self._failures.pop(vkey, None)
            return
        self.metrics.ended.labels("before_load").inc()
        failures = self._failures.setdefault(vkey, _Failures())
        failures.count += 1
        failures.retry_at = now + min(2 ** (failures.count - 1), 30)
        log.warning("replica %s ended before it loaded (%s), failure %d of %d", record.runtime_id, message,
                    failures.count, self.settings.max_start_failures)
        if failures.count >= self.settings.max_start_failures:
            self._fail(vkey, 2, f"{message} before it loaded the model, {failures.count} times in a row "
                                f"(last log: {log_path})")

    def _fail(self, vkey: str, code: int, message: str) -> None:
        if vkey not in self._failed:
            self._failed[vkey] = pb.ErrorStatus(code=code or 2, message=message)
            self.wake()

    # --- stopping ------------------------------------------------------------------------

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

    async def _delete_version(self, vkey: str, tenant: str, model: str, number: int) -> None:
        await self.store.delete_version(tenant, model, number)
        self.versions.items.pop(vkey, None)
        self._failed.pop(vkey, None)
        self._failures.pop(vkey, None)
        self._downloads.pop(vkey, None)
        self.autoscaler.forget(vkey)
        self._route_dirty.add((tenant, model))
        # Working directories kept for post-mortems (crashed replicas' logs)
        # and fetched copies of the SavedModel go with the version.
        replicas_dir = self.settings.replicas_dir
        if os.path.isdir(replicas_dir):
            mine = f"{RUNTIME_PREFIX}{tenant}.{model}.{number}."
            for name in os.listdir(replicas_dir):
                if name.startswith(mine):
                    shutil.rmtree(os.path.join(replicas_dir, name), ignore_errors=True)
        cache = os.path.join(self.settings.cache_dir, tenant, model)
        if os.path.isdir(cache):
            for name in os.listdir(cache):
                if name.split("-", 1)[0] == str(number):
                    shutil.rmtree(os.path.join(cache, name), ignore_errors=True)
        log.info("version %s/%s v%d deleted", tenant, model, number)

    # --- writing back -----------------------------------------------------------------------

    async def _write_status(self, vkey: str, version: pb.ModelVersion, deleting: bool,
                            failure: pb.ErrorStatus | None, desired: int) -> None:
        records = sorted((r for r in self.replicas.values() if r.version_key == vkey), key=lambda r: r.replica_id)
        replicas = []
        observed = []
        for record in records:
            seen = self._observe(record)
            observed.append(seen)
            replica = pb.ModelReplica(id=record.replica_id, state=seen.state, address=seen.address)
            if seen.message:
                replica.status.CopyFrom(pb.ErrorStatus(code=seen.code, message=seen.message))
            if record.started_at:
                replica.start_time.CopyFrom(ts(record.started_at))
            replicas.append(replica)
        live_states = [o.state for o, r in zip(observed, records) if not r.stopping]
        if deleting:
            state = S.MODEL_VERSION_STATE_UNLOADING
        elif failure is not None:
            state = S.MODEL_VERSION_STATE_END
        elif S.MODEL_VERSION_STATE_AVAILABLE in live_states:
            state = S.MODEL_VERSION_STATE_AVAILABLE
        elif S.MODEL_VERSION_STATE_LOADING in live_states or S.MODEL_VERSION_STATE_UNLOADING in live_states:
            state = S.MODEL_VERSION_STATE_LOADING
        else:
            state = S.MODEL_VERSION_STATE_START

        def apply(target: pb.ModelVersion) -> None:
            target.state = S.MODEL_VERSION_STATE_UNLOADING if target.HasField("delete_time") else state
            if failure is not None:
                target.status.CopyFrom(failure)
            else:
                target.ClearField("status")
            target.desired_replicas = min(max(desired, target.min_replicas), target.max_replicas)
            del target.replicas[:]
            target.replicas.extend(replicas)

        wanted = pb.ModelVersion()
        wanted.CopyFrom(version)
        apply(wanted)
        if wanted.SerializeToString(deterministic=True) == version.SerializeToString(deterministic=True):
            return

        written: list[pb.ModelVersion] = []

        def change(kv):
            if kv is None:
                raise _Gone()
            current = pb.ModelVersion.FromString(kv.value)
            apply(current)
            written[:] = [current]
            return current.SerializeToString()

        try:
            await self.store.update_version(version.tenant, version.model, version.version, change)
        except _Gone:
            return
        self.versions.items[vkey] = written[0]
        if written[0].state != version.state or written[0].status != version.status:
            log.info("version %s/%s v%d: %s%s", version.tenant, version.model, version.version,
                     S.Name(written[0].state)[len("MODEL_VERSION_STATE_"):],
                     f" ({written[0].status.message})" if written[0].status.code else "")
            self._route_dirty.add((version.tenant, version.model))

    # --- autoscaling ----------------------------------------------------------------------

    async def _scrape_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.scrape_interval)
            try:
                await self._scrape()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a scrape must never stop the loop
                log.exception("autoscaling scrape failed")

    async def _scrape(self) -> None:
        """Reads each autoscaled AVAILABLE replica's in-flight gauge from its
        metrics socket (`<replica id>.metrics.sock`, HTTP)."""
        targets: dict[str, list[str]] = defaultdict(list)
        for record in list(self.replicas.values()):
            version = self.versions.items.get(record.version_key)
            if version is None or version.min_replicas == version.max_replicas or record.stopping:
                continue
            if self._endpoint_state(record) != S.MODEL_VERSION_STATE_AVAILABLE:
                continue
            if record.address.startswith("unix:"):
                targets[record.version_key].append(self._socket_path(record, "metrics"))
        now = self.clock()
        for vkey, paths in targets.items():
            values = await asyncio.gather(*(self._inflight(path) for path in paths))
            total = sum(v for v in values if v is not None)
            self.autoscaler.observe(vkey, total, now)
            version = self.versions.items.get(vkey)
            if version is not None:
                current = version.desired_replicas or version.min_replicas
                if self.autoscaler.desired(vkey, current, version.min_replicas, version.max_replicas,
                                           now) != current:
                    self.wake()

    async def _inflight(self, path: str) -> float | None:
        timeout = aiohttp.ClientTimeout(total=max(self.settings.scrape_interval * 0.8, 0.2))
        try:
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path), timeout=timeout) as http:
                async with http.get("http://replica/metrics") as resp:
                    text = (await resp.content.read(METRICS_MAX)).decode(errors="replace")
            families = list(text_string_to_metric_families(text))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            return None
        for family in families:
            if family.name in INFLIGHT_METRICS:
                return sum(sample.value for sample in family.samples)
        return None


class _Gone(Exception):
    """The record disappeared under an update."""


def _same_endpoint(a: pb.ReplicaEndpoint, b: pb.ReplicaEndpoint) -> bool:
    """Equal but for register_time."""
    a2, b2 = pb.ReplicaEndpoint(), pb.ReplicaEndpoint()
    a2.CopyFrom(a)
    b2.CopyFrom(b)
    a2.ClearField("register_time")
    b2.ClearField("register_time")
    return a2 == b2


def _fetch(uri: str, target: str) -> None:
    """Copies a SavedModel directory from an fsspec URI to `target` (atomically),
    after checking the URI again (services.common.confine)."""
    import fsspec  # noqa: PLC0415

    from services.common.confine import recheck_remote_model  # noqa: PLC0415

    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{target}.part-{secrets.token_hex(4)}"
    try:
        recheck_remote_model(uri)  # typed error: the version fails to load with its message
        fs, path = fsspec.core.url_to_fs(uri)
        if not any(fs.exists(f"{path.rstrip('/')}/{name}") for name in ("saved_model.pb", "saved_model.pbtxt")):
            raise FileNotFoundError(f"no saved_model.pb under {uri}")
        fs.get(path.rstrip("/") + "/", tmp + "/", recursive=True)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
