"""The deployment reconciler: drives every version's model-server replicas
toward its desired count. It runs only on the elected leader
(`/cloudml/models/election/`, `run_as_leader`), so two models-service
processes never both act.

What it knows
-------------
- desired state, by list-then-watch (`Mirror`): models/ and versions/;
- the endpoint registry the gateways route by: endpoints/, which only this
  reconciler writes (see observe.py);
- its own bookkeeping: replicas/ (`store.ReplicaRecord`), loaded once when it
  becomes leader and from then on written only by it;
- processes: the runtime (`adopt()` when it becomes leader, then one
  `runtime.wait()` task per running replica, so a crash is seen at once);
- load errors: a model server that cannot load its SavedModel writes
  {"error": "..."} to its port file and exits non-zero;
- whether a replica serves: its gRPC health (a `Health.Watch` stream per
  running replica, over its socket).

Replica endpoints: observe.py (sockets, health, the endpoints/ entries).
Model artifacts: artifacts.py. Starting and stopping replicas: lifecycle.py.
The in-flight scrape for autoscaling: autoscaler.py.

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
import logging
import os
import secrets
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from cloudml.models.v1 import models_service_pb2 as pb
from services.common import errors
from services.common.etcd import Etcd, Mirror
from services.common.quota import QuotaClient
from services.common.sockets import socket_root
from services.common.runtime.base import ReplicaStatus, Runtime
from services.models import store
from services.models.artifacts import ArtifactFetcher, _Download, _fetch  # noqa: F401 - importable here
from services.models.autoscaler import Autoscaler, InflightScraper
from services.models.rules import ts
from services.models.lifecycle import LOG_FILE, ReplicaLauncher
from services.models.observe import (  # noqa: F401 - importable here, as before the split
    PORT_FILE,
    ReplicaObserver,
    error_code,
    read_port_file,
)
from services.models.store import ModelStore
from services.common.aio import wait_event

log = logging.getLogger(__name__)

S = pb.ModelVersionState
RUNTIME_PREFIX = "models."


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
    #: kubernetes runtime: the model-server image's interpreter and the replicas' serving port
    pod_python: str = "python"
    replica_port: int = 8500

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
        return socket_root(self.data_dir)


@dataclass
class _Failures:
    count: int = 0
    retry_at: float = 0.0


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
        self.archived = Counter("cloudml_models_versions_archived_total",
                                "Ended versions moved from etcd to the archive (leader only).", registry=registry)
        self.ended = Counter("cloudml_models_replica_failures_total",
                             "Replicas that ended without being asked to, by kind.", ("kind",), registry=registry)
        self.scaled = Counter("cloudml_models_autoscale_changes_total", "Autoscaler changes, by direction.",
                              ("direction",), registry=registry)


class Reconciler(ReplicaObserver, ReplicaLauncher, ArtifactFetcher, InflightScraper):
    """The leader's loop and the state machine of every version (the module's docstring)."""

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
                await wait_event(self._wake, self.settings.tick)
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


    async def _delete_version(self, vkey: str, tenant: str, model: str, number: int) -> None:
        await self.store.delete_version(tenant, model, number)
        self.forget_version(tenant, model, number)
        log.info("version %s/%s v%d deleted", tenant, model, number)

    def archived(self, version: pb.ModelVersion) -> None:
        """The archiver (archiver.py, on this leader) moved `version` out of etcd."""
        self.metrics.archived.inc()
        self.forget_version(version.tenant, version.model, version.version)

    def forget_version(self, tenant: str, model: str, number: int) -> None:
        """Drops what the leader holds of a version that left etcd (deleted,
        or archived: `archived`), with its replicas' working directories
        and fetched SavedModels."""
        vkey = self.keys.version(tenant, model, number)
        if self.versions is not None:
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


class _Gone(Exception):
    """The record disappeared under an update."""
