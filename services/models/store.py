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
                                              process is gone (see reconciler.py)
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
import time
from dataclasses import asdict, dataclass, field

from aetcd import rpc
from google.protobuf import timestamp_pb2

from cloudml.models.v1 import models_service_pb2 as pb
from services.common import errors
from services.common.etcd import KV, Etcd, cmp_mod_revision, op_delete, op_get, op_put, prefix_end

PREFIX = "/cloudml/models/"
MODELS = PREFIX + "models/"
VERSIONS = PREFIX + "versions/"
COUNTERS = PREFIX + "counters/"
REPLICAS = PREFIX + "replicas/"
ROUTES = PREFIX + "routes/"
ENDPOINTS = PREFIX + "endpoints/"
ELECTION = PREFIX + "election/"

S = pb.ModelVersionState
ROUTABLE_STATES = (S.MODEL_VERSION_STATE_AVAILABLE,)


def model_key(tenant: str, model: str) -> str:
    return f"{MODELS}{tenant}/{model}"


def models_prefix(tenant: str) -> str:
    return f"{MODELS}{tenant}/"


def versions_prefix(tenant: str, model: str) -> str:
    return f"{VERSIONS}{tenant}/{model}/"


def version_key(tenant: str, model: str, version: int) -> str:
    return f"{versions_prefix(tenant, model)}{version:019d}"


def counter_key(tenant: str, model: str) -> str:
    return f"{COUNTERS}{tenant}/{model}"


def replicas_prefix(tenant: str, model: str, version: int) -> str:
    return f"{REPLICAS}{tenant}/{model}/{version:019d}/"


def replica_key(tenant: str, model: str, version: int, replica_id: str) -> str:
    return replicas_prefix(tenant, model, version) + replica_id


def route_key(tenant: str, model: str) -> str:
    return f"{ROUTES}{tenant}/{model}"


def endpoint_key(tenant: str, model: str, version: int, replica_id: str) -> str:
    return f"{ENDPOINTS}{tenant}/{model}/{version}/{replica_id}"


def parse_version_key(key: str) -> tuple[str, str, int]:
    tenant, model, version = key[len(VERSIONS):].split("/")
    return tenant, model, int(version)


def parse_model_key(key: str) -> tuple[str, str]:
    tenant, model = key[len(MODELS):].split("/")
    return tenant, model


def parse_endpoint_key(key: str) -> tuple[str, str, int, str]:
    tenant, model, version, replica_id = key[len(ENDPOINTS):].split("/")
    return tenant, model, int(version), replica_id


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

    @property
    def key(self) -> str:
        return replica_key(self.tenant, self.model, self.version, self.replica_id)

    @property
    def version_key(self) -> str:
        return version_key(self.tenant, self.model, self.version)

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "ReplicaRecord":
        data = json.loads(raw)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


# --- snapshot reads ------------------------------------------------------------------

def op_get_prefix(prefix: str):
    """A transaction op that ranges every key under `prefix`, in key order."""
    key = prefix.encode()
    return rpc.RequestOp(request_range=rpc.RangeRequest(
        key=key, range_end=prefix_end(key),
        sort_order=rpc.RangeRequest.ASCEND, sort_target=rpc.RangeRequest.KEY,
    ))


@dataclass
class ModelSnapshot:
    """A model record and its versions, read at one store revision."""

    model: pb.Model | None
    model_revision: int
    versions: list[pb.ModelVersion]
    version_revisions: dict[int, int]
    route: bytes | None
    route_revision: int


async def read_model_snapshot(etcd: Etcd, tenant: str, model: str) -> ModelSnapshot:
    _, resp = await etcd.txn([], [
        op_get(model_key(tenant, model)),
        op_get_prefix(versions_prefix(tenant, model)),
        op_get(route_key(tenant, model)),
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


async def publish_route(etcd: Etcd, tenant: str, model: str, attempts: int = 20) -> None:
    """Makes routes/<tenant>/<model> match the model's records now."""
    for _ in range(attempts):
        snap = await read_model_snapshot(etcd, tenant, model)
        want = route_bytes(snap.model, snap.versions)
        if want == snap.route:
            return
        key = route_key(tenant, model)
        op = op_delete(key) if want is None else op_put(key, want)
        # Only over the route as read, and only while the records are as read:
        # a later writer publishes after its own change.
        compares = [cmp_mod_revision(key, snap.route_revision),
                    cmp_mod_revision(model_key(tenant, model), snap.model_revision)]
        ok, _ = await etcd.txn(compares, [op])
        if ok:
            return
    raise errors.Conflict(f"too much contention publishing the route of {tenant}/{model}; retry")


def decode_kv_model(kv: KV) -> pb.Model:
    return pb.Model.FromString(kv.value)


def decode_kv_version(kv: KV) -> pb.ModelVersion:
    return pb.ModelVersion.FromString(kv.value)


def make_endpoint(tenant: str, model: str, version: int, replica_id: str, address: str, state: int,
                  coalesce_max: int = 0) -> pb.ReplicaEndpoint:
    """A replica's entry in endpoints/, stamped now."""
    now = time.time()
    return pb.ReplicaEndpoint(
        tenant=tenant, model=model, version=version, replica_id=replica_id, address=address, state=state,
        coalesce_max=coalesce_max,
        register_time=timestamp_pb2.Timestamp(seconds=int(now), nanos=int(now % 1 * 1e9)),
    )


async def put_endpoint(etcd: Etcd, endpoint: pb.ReplicaEndpoint) -> None:
    """Writes a replica's entry in endpoints/ (no lease: it stays until deleted)."""
    await etcd.put(endpoint_key(endpoint.tenant, endpoint.model, endpoint.version, endpoint.replica_id),
                   endpoint.SerializeToString())


def decode_kv_endpoint(kv: KV) -> pb.ReplicaEndpoint:
    return pb.ReplicaEndpoint.FromString(kv.value)
