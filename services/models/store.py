"""The models service's etcd layout (everything under /cloudml/models/).

    models/<tenant>/<model>                   cloudml.models.v1.Model
    versions/<tenant>/<model>/<version:019d>  cloudml.models.v1.ModelVersion: the spec (written by the
                                              API) and its state, desired_replicas and replicas (written
                                              by the reconciler); every write a CAS on mod_revision
    counters/<tenant>/<model>                 the highest version number the model ever had (decimal)
    replicas/<tenant>/<model>/<version:019d>/<replica id>
                                              ReplicaRecord (JSON): a replica the reconciler wants or
                                              still holds; written before its quota is reserved, deleted
                                              only after its process ended and its quota and capacity
                                              were released, so a restarted leader finds every
                                              reservation again
    routes/<tenant>/<model>                   cloudml.models.v1.ModelRoute, for the gateway
    endpoints/<tenant>/<model>/<version>/<replica id>
                                              cloudml.models.v1.ReplicaEndpoint (version in plain
                                              decimal), written only by the reconciler (never by a
                                              replica: replicas are tenant code and never reach etcd),
                                              with no lease: AVAILABLE once the replica reports itself
                                              serving, UNLOADING before it is stopped, deleted once its
                                              process is gone (see observe.py)
    exports/<tenant>/<model>/<version:019d>/<export id>
                                              ExportRecord (JSON, export_records.py): an export of a
                                              version (ExportVersion) and its process
    ended/<end ns:019d>/<tenant>/<model>/<version:019d>
                                              the version's create time in ns (decimal): a version that
                                              ended (END: it failed and nothing serves it), written in
                                              the transaction that moves it to END, so the archiver
                                              (archiver.py) finds what is due by end time without
                                              reading every version; a key whose version is gone, no
                                              longer END or another one (same number, created again)
                                              is dropped by the archiver
    election/<lease>                          the reconciler's leader election

The gateway reads routes/ and endpoints/ (read-only); nothing else outside
this service reads or writes here.

Routes are derived data: `publish_route` reads the model and its versions in
one snapshot and compare-and-swaps the route when it differs. Every writer of
a model or version record calls it after its write, and the reconciler
republishes whatever it finds stale, so the last publish always reflects the
latest records whatever process dies when.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, fields
from typing import Callable

from google.protobuf import timestamp_pb2

from cloudml.models.v1 import models_service_pb2 as pb
from services.common import errors
from services.common.etcd import (
    KV,
    Etcd,
    cmp_absent,
    cmp_mod_revision,
    op_delete,
    op_get,
    op_get_prefix,
    op_put,
)

log = logging.getLogger(__name__)

PREFIX = "/cloudml/models/"

S = pb.ModelVersionState
ROUTABLE_STATES = (S.MODEL_VERSION_STATE_AVAILABLE,)


class ModelKeys:
    """The key builders of the layout above, under `root` (default
    /cloudml/models/; tests give each their own root in one shared etcd).
    The gateway reads routes/ and endpoints/ through these too."""

    def __init__(self, root: str = PREFIX):
        self.root = root if root.endswith("/") else root + "/"
        self.models, self.versions, self.counters, self.replicas, self.routes, self.endpoints, self.election = (
            self.root + folder for folder in
            ("models/", "versions/", "counters/", "replicas/", "routes/", "endpoints/", "election/"))
        self.exports = self.root + "exports/"
        self.ended = self.root + "ended/"

    def model(self, tenant: str, model: str) -> str:
        return f"{self.models}{tenant}/{model}"

    def models_of(self, tenant: str) -> str:
        return f"{self.models}{tenant}/"

    def versions_of(self, tenant: str, model: str) -> str:
        return f"{self.versions}{tenant}/{model}/"

    def version(self, tenant: str, model: str, version: int) -> str:
        return f"{self.versions_of(tenant, model)}{version:019d}"

    def counter(self, tenant: str, model: str) -> str:
        return f"{self.counters}{tenant}/{model}"

    def replicas_of(self, tenant: str, model: str, version: int) -> str:
        return f"{self.replicas}{tenant}/{model}/{version:019d}/"

    def replica(self, tenant: str, model: str, version: int, replica_id: str) -> str:
        return self.replicas_of(tenant, model, version) + replica_id

    def route(self, tenant: str, model: str) -> str:
        return f"{self.routes}{tenant}/{model}"

    def endpoints_of(self, tenant: str, model: str, version: int) -> str:
        return f"{self.endpoints}{tenant}/{model}/{version}/"

    def endpoint(self, tenant: str, model: str, version: int, replica_id: str) -> str:
        return self.endpoints_of(tenant, model, version) + replica_id

    def exports_of(self, tenant: str, model: str, version: int) -> str:
        return f"{self.exports}{tenant}/{model}/{version:019d}/"

    def export(self, tenant: str, model: str, version: int, export_id: str) -> str:
        return self.exports_of(tenant, model, version) + export_id

    def ended_key(self, version: pb.ModelVersion, end_ns: int) -> str:
        return f"{self.ended}{end_ns:019d}/{version.tenant}/{version.model}/{version.version:019d}"

    def parse_ended(self, key: str) -> tuple[int, str, str, int]:
        """(end ns, tenant, model, version) of an ended/ key."""
        end, tenant, model, version = key[len(self.ended):].split("/")
        return int(end), tenant, model, int(version)

    def parse_version(self, key: str) -> tuple[str, str, int]:
        tenant, model, version = key[len(self.versions):].split("/")
        return tenant, model, int(version)

    def parse_model(self, key: str) -> tuple[str, str]:
        tenant, model = key[len(self.models):].split("/")
        return tenant, model

    def parse_route(self, key: str) -> tuple[str, str]:
        tenant, model = key[len(self.routes):].split("/")
        return tenant, model

    def parse_endpoint(self, key: str) -> tuple[str, str, int, str]:
        tenant, model, version, replica_id = key[len(self.endpoints):].split("/")
        return tenant, model, int(version), replica_id


# The default layout; the gateway reads these two prefixes.
DEFAULT_KEYS = ModelKeys()
ROUTES = DEFAULT_KEYS.routes
ENDPOINTS = DEFAULT_KEYS.endpoints


@dataclass
class ReplicaRecord:
    """The reconciler's bookkeeping for one replica (never shown as is).

    `runtime_id` names the replica and its capacity group in the runtime;
    `owner_id` its quota reservation in the auth service. `started` is set
    before the runtime is asked to start it, `stopping` before it is asked to
    stop it, so that after a crash the next leader knows whether a replica it
    cannot find in the runtime was lost (replace it) or never started.
    """

    tenant: str
    model: str
    version: int
    replica_id: str
    runtime_id: str
    owner_id: str
    workdir: str
    created: float
    started: bool = False
    started_at: float = 0.0
    # Set once it was seen serving (its endpoint AVAILABLE): a later death is
    # a crash to replace, not a failure to load.
    available: bool = False
    stopping: bool = False
    # Why it is being stopped: "scale-down", "deleted", "failed", "crashed", "orphan".
    stop_reason: str = ""
    # The resources reserved for it (cpu_millis, memory_bytes, gpus), as reserved.
    resources: dict = field(default_factory=dict)
    # The gRPC address it was told to listen on (`unix:<socket dir>/<replica id>.sock`),
    # chosen before it starts; kept so that a later leader finds its sockets again.
    address: str = ""
    # The layout its keys are in (not stored).
    keys: ModelKeys = field(default=DEFAULT_KEYS, repr=False, compare=False)

    @property
    def key(self) -> str:
        return self.keys.replica(self.tenant, self.model, self.version, self.replica_id)

    @property
    def version_key(self) -> str:
        return self.keys.version(self.tenant, self.model, self.version)

    def encode(self) -> bytes:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "keys"}
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes, keys: ModelKeys = DEFAULT_KEYS) -> "ReplicaRecord":
        data = json.loads(raw)
        known = {f for f in cls.__dataclass_fields__ if f != "keys"}
        return cls(**{k: v for k, v in data.items() if k in known}, keys=keys)


# --- snapshot reads ------------------------------------------------------------------

@dataclass
class ModelSnapshot:
    """A model record and its versions, read at one store revision."""

    model: pb.Model | None
    model_revision: int
    versions: list[pb.ModelVersion]
    version_revisions: dict[int, int]
    route: bytes | None
    route_revision: int


@dataclass
class VersionSnapshot:
    """A version with everything that refers to it, read at one store
    revision (what the archiver decides on): each KV or None."""

    version: KV | None
    model: KV | None
    counter: KV | None
    exports: list[KV]
    replicas: int
    endpoints: int


# --- routes ----------------------------------------------------------------------------

def build_route(model: pb.Model, versions: list[pb.ModelVersion]) -> pb.ModelRoute:
    """The gateway's routing record for a model that is not being deleted."""
    route = pb.ModelRoute(
        tenant=model.tenant, model=model.name, public=model.public, default_version=model.default_version,
        labels=dict(model.labels), traffic_split=list(model.traffic_split),
    )
    for version in sorted(versions, key=lambda v: v.version):
        entry = route.versions.add(version=version.version, state=version.state)
        if version.status.code:
            entry.status.CopyFrom(version.status)
    return route


def route_bytes(model: pb.Model | None, versions: list[pb.ModelVersion]) -> bytes | None:
    """What routes/<tenant>/<model> should hold (None: no route)."""
    if model is None or model.HasField("delete_time"):
        return None
    return build_route(model, versions).SerializeToString(deterministic=True)


def decode_kv_model(kv: KV) -> pb.Model:
    return pb.Model.FromString(kv.value)


def decode_kv_version(kv: KV) -> pb.ModelVersion:
    return pb.ModelVersion.FromString(kv.value)


def decode_kv_endpoint(kv: KV) -> pb.ReplicaEndpoint:
    return pb.ReplicaEndpoint.FromString(kv.value)


def make_endpoint(tenant: str, model: str, version: int, replica_id: str, address: str, state: int,
                  coalesce_max: int = 0, frame_address: str = "") -> pb.ReplicaEndpoint:
    """A replica's entry in endpoints/, stamped now."""
    now = time.time()
    return pb.ReplicaEndpoint(
        tenant=tenant, model=model, version=version, replica_id=replica_id, address=address, state=state,
        coalesce_max=coalesce_max, frame_address=frame_address,
        register_time=timestamp_pb2.Timestamp(seconds=int(now), nanos=int(now % 1 * 1e9)),
    )


async def put_endpoint(etcd: Etcd, endpoint: pb.ReplicaEndpoint) -> None:
    """Writes a replica's entry in endpoints/ under the default root."""
    await ModelStore(etcd).put_endpoint(endpoint)


# --- the store -------------------------------------------------------------------------

class ModelStore:
    """Reads and compare-and-swap writes of the models service's records
    (the layout above, under `root`)."""

    def __init__(self, etcd: Etcd, root: str = PREFIX, clock: Callable[[], float] = time.time):
        self.etcd = etcd
        self.keys = ModelKeys(root)
        #: stamps ended/ keys
        self.clock = clock

    # --- models and versions ----------------------------------------------------------

    async def get_model(self, tenant: str, model: str) -> tuple[pb.Model, int] | None:
        """The model record and its mod_revision."""
        kv = await self.etcd.get(self.keys.model(tenant, model))
        return (pb.Model.FromString(kv.value), kv.mod_revision) if kv else None

    async def snapshot(self, tenant: str, model: str) -> ModelSnapshot:
        """The model, its versions and its route, read in one transaction."""
        keys = self.keys
        _, resp = await self.etcd.txn([], [
            op_get(keys.model(tenant, model)),
            op_get_prefix(keys.versions_of(tenant, model)),
            op_get(keys.route(tenant, model)),
        ])
        model_r, versions_r, route_r = (r.response_range for r in resp.responses)
        record = pb.Model.FromString(model_r.kvs[0].value) if model_r.kvs else None
        versions, revisions = [], {}
        for kv in versions_r.kvs:
            version = pb.ModelVersion.FromString(kv.value)
            versions.append(version)
            revisions[version.version] = kv.mod_revision
        return ModelSnapshot(
            model=record, model_revision=model_r.kvs[0].mod_revision if model_r.kvs else 0,
            versions=versions, version_revisions=revisions,
            route=route_r.kvs[0].value if route_r.kvs else None,
            route_revision=route_r.kvs[0].mod_revision if route_r.kvs else 0,
        )

    async def create_model(self, model: pb.Model) -> bool:
        """Writes a new model record; False if the name is taken."""
        key = self.keys.model(model.tenant, model.name)
        ok, _ = await self.etcd.txn([cmp_absent(key)], [op_put(key, model.SerializeToString())])
        return ok

    async def list_models(self, tenant: str, after: str, limit: int) -> tuple[list[pb.Model], bool]:
        """Up to `limit` of the tenant's models named after `after`; and whether more follow."""
        start = self.keys.model(tenant, after) + "\0" if after else None
        kvs, _, more = await self.etcd.get_prefix(self.keys.models_of(tenant), start=start, limit=limit)
        return [pb.Model.FromString(kv.value) for kv in kvs], more

    async def put_model_if(self, model: pb.Model, model_revision: int, versions: dict[int, int]) -> bool:
        """Writes the model record only while it and the versions named in
        `versions` (number: mod_revision) are as read."""
        key = self.keys.model(model.tenant, model.name)
        compares = [cmp_mod_revision(key, model_revision)]
        compares += [cmp_mod_revision(self.keys.version(model.tenant, model.name, n), versions[n])
                     for n in sorted(versions)]
        ok, _ = await self.etcd.txn(compares, [op_put(key, model.SerializeToString())])
        return ok

    async def update_model(self, tenant: str, model: str, change: Callable[[KV | None], bytes | None]) -> None:
        """Compare-and-swap read-modify-write of the model record (`Etcd.update`)."""
        await self.etcd.update(self.keys.model(tenant, model), change)

    async def get_counter(self, tenant: str, model: str) -> tuple[int, int]:
        """The highest version number the model ever had, and the counter's mod_revision."""
        kv = await self.etcd.get(self.keys.counter(tenant, model))
        return (int(kv.value), kv.mod_revision) if kv else (0, 0)

    async def create_version(self, version: pb.ModelVersion, model_revision: int, highest: int,
                             counter_revision: int) -> bool:
        """Writes a new version and raises the counter to it, only while the
        model record and the counter are as read."""
        keys, tenant, model = self.keys, version.tenant, version.model
        vkey, ckey = keys.version(tenant, model, version.version), keys.counter(tenant, model)
        ok, _ = await self.etcd.txn(
            [cmp_mod_revision(keys.model(tenant, model), model_revision), cmp_absent(vkey),
             cmp_mod_revision(ckey, counter_revision)],
            [op_put(vkey, version.SerializeToString()), op_put(ckey, str(max(highest, version.version)).encode()),
             *self.ended_ops(None, version)],  # none for the API's (START); records seeded as ended have one
        )
        return ok

    async def get_version(self, tenant: str, model: str, number: int) -> pb.ModelVersion | None:
        kv = await self.etcd.get(self.keys.version(tenant, model, number))
        return pb.ModelVersion.FromString(kv.value) if kv else None

    async def list_versions(self, tenant: str, model: str, after: int, limit: int = 0
                            ) -> tuple[list[pb.ModelVersion], bool]:
        """The model's versions numbered after `after` (up to `limit`, 0: all); and whether more follow."""
        start = self.keys.version(tenant, model, after) + "\0" if after else None
        kvs, _, more = await self.etcd.get_prefix(self.keys.versions_of(tenant, model), start=start, limit=limit)
        return [pb.ModelVersion.FromString(kv.value) for kv in kvs], more

    async def put_version_if(self, version: pb.ModelVersion, model_revision: int, version_revision: int) -> bool:
        """Writes a version record only while it and its model are as read."""
        keys, tenant, model = self.keys, version.tenant, version.model
        vkey = keys.version(tenant, model, version.version)
        ok, _ = await self.etcd.txn(
            [cmp_mod_revision(keys.model(tenant, model), model_revision), cmp_mod_revision(vkey, version_revision)],
            [op_put(vkey, version.SerializeToString())],
        )
        return ok

    async def update_version(self, tenant: str, model: str, number: int,
                             change: Callable[[KV | None], bytes | None]) -> None:
        """Compare-and-swap read-modify-write of a version record (`Etcd.update`);
        a change that moves it to END writes its ended/ key in the same transaction."""
        await self.etcd.update(self.keys.version(tenant, model, number), change, also=self._ended_ops)

    def _ended_ops(self, current: KV | None, new: bytes | None) -> list:
        if current is None or new is None:
            return []
        return self.ended_ops(pb.ModelVersion.FromString(current.value), pb.ModelVersion.FromString(new))

    def ended_ops(self, before: pb.ModelVersion | None, after: pb.ModelVersion) -> list:
        """The ended/ key to write when a version record goes from `before`
        (None: none) to `after`: one if it moves to END now."""
        if after.state != S.MODEL_VERSION_STATE_END or (before is not None and before.state == after.state):
            return []
        end_ns = int(self.clock() * 1e9)
        return [op_put(self.keys.ended_key(after, end_ns), str(after.create_time.ToNanoseconds()).encode())]

    async def ended_before(self, cutoff_ns: int, after: str, limit: int) -> tuple[list[tuple[str, bytes]], bool]:
        """(ended/ key, value) of up to `limit` versions that ended before
        `cutoff_ns`, oldest first, from the key after `after` on (or the
        start); and whether more may follow."""
        kvs, _, more = await self.etcd.get_prefix(self.keys.ended, start=after + "\0" if after else None,
                                                  limit=limit)
        due = [(kv.key, kv.value) for kv in kvs if self.keys.parse_ended(kv.key)[0] < cutoff_ns]
        return due, more and len(due) == len(kvs)

    async def delete_version(self, tenant: str, model: str, number: int) -> None:
        """Deletes a version record and whatever is left of its endpoints."""
        await self.etcd.delete(self.keys.version(tenant, model, number))
        await self.etcd.delete_prefix(self.keys.endpoints_of(tenant, model, number))

    async def delete_model_if_empty(self, tenant: str, model: str) -> bool:
        """Deletes a model record (the caller saw it marked deleted) and its
        counter once it has no versions left; False while it has, or if the
        record changed meanwhile."""
        keys = self.keys
        if await self.etcd.count_prefix(keys.versions_of(tenant, model)):
            return False
        kv = await self.etcd.get(keys.model(tenant, model))
        if kv is None:
            return False
        ok, _ = await self.etcd.txn(
            [cmp_mod_revision(kv.key, kv.mod_revision)],
            [op_delete(kv.key), op_delete(keys.counter(tenant, model))],
        )
        return ok

    async def version_snapshot(self, tenant: str, model: str, number: int) -> VersionSnapshot:
        """The version, its model, counter, exports, replica records and endpoints, in one transaction."""
        keys = self.keys
        _, resp = await self.etcd.txn([], [
            op_get(keys.version(tenant, model, number)), op_get(keys.model(tenant, model)),
            op_get(keys.counter(tenant, model)), op_get_prefix(keys.exports_of(tenant, model, number)),
            op_get_prefix(keys.replicas_of(tenant, model, number)),
            op_get_prefix(keys.endpoints_of(tenant, model, number)),
        ])
        ranges = [[KV.from_pb(kv) for kv in r.response_range.kvs] for r in resp.responses]
        version, model_kv, counter, exports, replicas, endpoints = ranges
        return VersionSnapshot(version[0] if version else None, model_kv[0] if model_kv else None,
                               counter[0] if counter else None, exports, len(replicas), len(endpoints))

    async def remove_archived(self, snap: VersionSnapshot, ended_key: str) -> bool:
        """Deletes an archived version's keys (its record, exports and ended/
        key) only while it, its model, the model's counter and its exports
        are as in `snap`; raises the counter to at least the version's number
        in the same transaction (its revision moves, so a CreateVersion that
        read the counter before this retries and finds the version archived)."""
        version = pb.ModelVersion.FromString(snap.version.value)
        tenant, model, number = version.tenant, version.model, version.version
        keys = self.keys
        counter_key = keys.counter(tenant, model)
        highest = max(int(snap.counter.value) if snap.counter else 0, number)
        compares = [cmp_mod_revision(snap.version.key, snap.version.mod_revision),
                    cmp_mod_revision(snap.model.key, snap.model.mod_revision),
                    cmp_mod_revision(counter_key, snap.counter.mod_revision if snap.counter else 0),
                    *(cmp_mod_revision(kv.key, kv.mod_revision) for kv in snap.exports)]
        ops = [op_delete(snap.version.key), op_delete(ended_key), op_put(counter_key, str(highest).encode()),
               *(op_delete(kv.key) for kv in snap.exports)]
        ok, _ = await self.etcd.txn(compares, ops)
        return ok

    # --- exports ----------------------------------------------------------------------

    async def create_export(self, record) -> bool:
        """Writes a new export record (export_records.ExportRecord); False if it exists."""
        key = self.keys.export(record.tenant, record.model, record.version, record.id)
        ok, _ = await self.etcd.txn([cmp_absent(key)], [op_put(key, record.encode())])
        return ok

    async def get_export(self, tenant: str, model: str, version: int, export_id: str) -> bytes | None:
        kv = await self.etcd.get(self.keys.export(tenant, model, version, export_id))
        return kv.value if kv else None

    async def list_exports(self, tenant: str, model: str, version: int) -> list[bytes]:
        kvs, _, _ = await self.etcd.get_prefix(self.keys.exports_of(tenant, model, version))
        return [kv.value for kv in kvs]

    async def update_export(self, key: str, change: Callable[[KV | None], bytes | None]) -> None:
        """Compare-and-swap read-modify-write of an export record (`Etcd.update`)."""
        await self.etcd.update(key, change)

    # --- routes -----------------------------------------------------------------------

    async def publish_route(self, tenant: str, model: str, attempts: int = 20) -> None:
        """Makes routes/<tenant>/<model> match the model's records now."""
        for _ in range(attempts):
            snap = await self.snapshot(tenant, model)
            want = route_bytes(snap.model, snap.versions)
            if want == snap.route:
                return
            key = self.keys.route(tenant, model)
            op = op_delete(key) if want is None else op_put(key, want)
            # Only over the route as read, and only while the records are as read:
            # a later writer publishes after its own change.
            compares = [cmp_mod_revision(key, snap.route_revision),
                        cmp_mod_revision(self.keys.model(tenant, model), snap.model_revision)]
            ok, _ = await self.etcd.txn(compares, [op])
            if ok:
                return
        raise errors.Conflict(f"too much contention publishing the route of {tenant}/{model}; retry")

    async def routed_models(self) -> list[tuple[str, str]]:
        """(tenant, model) of every route published."""
        kvs, _, _ = await self.etcd.get_prefix(self.keys.routes, keys_only=True)
        return [self.keys.parse_route(kv.key) for kv in kvs]

    # --- replicas and endpoints -------------------------------------------------------

    async def list_replicas(self) -> list[ReplicaRecord]:
        """Every replica record; unreadable ones are logged and skipped."""
        kvs, _, _ = await self.etcd.get_prefix(self.keys.replicas)
        records = []
        for kv in kvs:
            try:
                records.append(ReplicaRecord.decode(kv.value, self.keys))
            except (ValueError, TypeError):
                log.exception("dropping unreadable replica record %s", kv.key)
        return records

    async def put_replica(self, record: ReplicaRecord) -> None:
        await self.etcd.put(record.key, record.encode())

    async def delete_replica(self, record: ReplicaRecord) -> None:
        await self.etcd.delete(record.key)

    async def put_endpoint(self, endpoint: pb.ReplicaEndpoint) -> None:
        """Writes a replica's entry in endpoints/ (no lease: it stays until deleted)."""
        await self.etcd.put(self.keys.endpoint(endpoint.tenant, endpoint.model, endpoint.version,
                                               endpoint.replica_id), endpoint.SerializeToString())

    async def delete_key(self, key: str) -> None:
        """Deletes one key of this layout (an endpoint found stale)."""
        await self.etcd.delete(key)
