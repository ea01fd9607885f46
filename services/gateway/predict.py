"""The TF Serving front door of the gateway: `tensorflow.serving.PredictionService`
and `ModelService`, routed to model-server replicas.

The hot path reads only the request's `model_spec` (field 1 of every request,
or of the first task of a MultiInference request) straight from the wire
bytes, resolves it to a replica, and forwards the request bytes unparsed; the
replica's response bytes come back unparsed too.

Routing data comes from two registries in etcd, watched read-only (the one
exception to "a service never reads another service's prefix", for the hot
path): `/cloudml/models/routes/` (one `ModelRoute` per model, written by the
models service) and `/cloudml/models/endpoints/` (one `ReplicaEndpoint` per
loaded replica, written by the replica under its lease).

Naming and tenancy
------------------
Model names are per tenant. A caller with a token names its own tenant's
models plainly (`linear`). Any model may also be named `<tenant>.<model>`
(names are DNS labels, so the dot is unambiguous): that is how callers from
other tenants, and callers without a token, address a *public* model. A
model that is not the caller's and not public answers exactly as a missing
one (NOT_FOUND), so other tenants' models are never revealed. Admins reach
every model by its qualified name.

Version resolution (TF Serving's rules, plus the platform's traffic split):
an explicit `version` must be AVAILABLE; a `version_label` must exist
(INVALID_ARGUMENT otherwise, as TF Serving); with neither, the traffic split
picks among its AVAILABLE versions, else the default version, else the
highest AVAILABLE one.

Balancing: least outstanding requests between two random choices
(power of two choices) among the version's AVAILABLE replicas. A request that
fails with UNAVAILABLE (the replica died or its queue is full) is retried
once on another replica. The client's deadline travels with the request.

The native data plane (`services/common/native/dataplane/`, see `dataplane.py`) sits in
front of this code on the public port: a call it sends here (marked with its
secret) gets, on success, this module's `RouteDecision` for the caller and
model_spec in trailing metadata, which the data plane then applies itself to
later calls until the routing generation changes (`RoutingTable.generation`:
any change of routes, endpoints or token keys/revocations).

Request size: a model call larger than its version's limit is
RESOURCE_EXHAUSTED before it is sent. The limit is the smallest
`max_request_bytes` its AVAILABLE replicas published (each derives its own
from its memory: services/models/model_server/config.py), capped by the
gateway's `--max-request-bytes` (64 MiB by default), which also bounds every
model call before it is routed. The routing decision carries it to the data
plane, which checks it alike (and fills PredictBatch groups up to it).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import grpc
from prometheus_client import CollectorRegistry

from cloudml.internal.v1 import dataplane_pb2
from cloudml.models.v1 import models_service_pb2 as models_pb
from cloudml.tfs.tensorflow_serving.apis import get_model_status_pb2, model_pb2
from services.common import errors
from services.common.wire import varint as _varint
from services.common.etcd import Etcd, Mirror
from services.common.native.protocol import (
    AUTHORIZATION,
    FORWARDED_METHODS,
    PREDICTION_SERVICE,
    RESOLVED_VERSION_HEADER,
    ROUTE_DECISION_HEADER,
    SECRET_HEADER,
    is_hop_header,
    pick_two,
    pick_weighted,
)
from services.common.tokens import Principal, TokenVerifier, bearer_from_metadata
from services.gateway.model_metrics import ModelRequestMetrics
from services.models import store as models_store

log = logging.getLogger(__name__)

# What the models service publishes for the gateway (its key layout, not a copy).
ROUTES_PREFIX = models_store.ROUTES
ENDPOINTS_PREFIX = models_store.ENDPOINTS

MODEL_SERVICE = "tensorflow.serving.ModelService"
TFS_METHODS = frozenset(
    {f"/{PREDICTION_SERVICE}/{m}" for m in FORWARDED_METHODS}
    | {f"/{MODEL_SERVICE}/GetModelStatus", f"/{MODEL_SERVICE}/HandleReloadConfigRequest"}
)

AVAILABLE = models_pb.MODEL_VERSION_STATE_AVAILABLE

#: The gateway's default platform-wide cap on a model call's request size.
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024

# The headers between the gateway, its native data plane and replicas (the
# version the gateway resolved, which replicas trust from the gateway only;
# the data plane's secret; the routing decision handed back to it), what
# never crosses a hop, and the picking rules: services/common/native/protocol.py,
# shared with the data plane's C++.


# --- reading model_spec off the wire --------------------------------------------

def _field1(data: bytes) -> bytes | None:
    """The bytes of the first length-delimited field number 1, or None."""
    pos, end = 0, len(data)
    while pos < end:
        tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(data, pos)
            if number == 1:
                return data[pos:pos + length]
            pos += length
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if pos > end:
        raise ValueError("truncated message")
    return None


def model_spec_of(method: str, request: bytes) -> model_pb2.ModelSpec:
    """The request's ModelSpec (for MultiInference: its first task's)."""
    try:
        spec_bytes = _field1(request)
        if method == "MultiInference" and spec_bytes is not None:
            spec_bytes = _field1(spec_bytes)
        return model_pb2.ModelSpec.FromString(spec_bytes or b"")
    except Exception:  # noqa: BLE001 - any malformed input is the caller's
        raise errors.InvalidArgument("could not parse the request's model_spec") from None


# --- the routing table ------------------------------------------------------------

@dataclass(eq=False)
class Backend:
    key: str
    address: str
    version: int
    coalesce_max: int = 0
    max_request_bytes: int = 0  # 0: not published
    batch_timeout_micros: int = 0
    frame_address: str = ""  # the replica's framed socket (the data plane's HTTP/2 front uses it)
    outstanding: int = 0
    callables: dict = field(default_factory=dict)


class RoutingTable:
    """Mirrors of the two registries, indexed for the hot path."""

    def __init__(self, etcd: Etcd, channel_for):
        self._channel_for = channel_for
        self.routes_mirror = Mirror(etcd, ROUTES_PREFIX, decode=lambda kv: models_pb.ModelRoute.FromString(kv.value))
        self.endpoints_mirror = Mirror(etcd, ENDPOINTS_PREFIX,
                                       decode=lambda kv: models_pb.ReplicaEndpoint.FromString(kv.value))
        self.routes_mirror.listeners.append(self._rebuild_routes)
        self.endpoints_mirror.listeners.append(self._rebuild_endpoints)
        self.routes: dict[tuple[str, str], models_pb.ModelRoute] = {}
        self.backends: dict[tuple[str, str, int], list[Backend]] = {}
        self._by_key: dict[str, Backend] = {}
        # Bumped on every change of what a routing decision depends on.
        self.generation = 1
        self.listeners: list = []

    def changed(self) -> None:
        """Routing state changed (also called for token key/revocation updates)."""
        self.generation += 1
        for listener in self.listeners:
            listener(self.generation)

    def start(self) -> None:
        self.routes_mirror.start()
        self.endpoints_mirror.start()

    async def wait_synced(self, timeout: float) -> None:
        await self.routes_mirror.wait_synced(timeout)
        await self.endpoints_mirror.wait_synced(timeout)

    async def stop(self) -> None:
        await self.routes_mirror.stop()
        await self.endpoints_mirror.stop()

    def _rebuild_routes(self) -> None:
        self.routes = {(r.tenant, r.model): r for r in self.routes_mirror.items.values()}
        self.changed()

    def _rebuild_endpoints(self) -> None:
        backends: dict[tuple[str, str, int], list[Backend]] = {}
        by_key: dict[str, Backend] = {}
        for key, ep in self.endpoints_mirror.items.items():
            if ep.state != AVAILABLE or not ep.address:
                continue
            backend = self._by_key.get(key)
            if (backend is None or backend.address != ep.address or backend.coalesce_max != ep.coalesce_max
                    or backend.max_request_bytes != ep.max_request_bytes
                    or backend.batch_timeout_micros != ep.batch_timeout_micros
                    or backend.frame_address != ep.frame_address):
                backend = Backend(key, ep.address, ep.version, ep.coalesce_max, ep.max_request_bytes,
                                  ep.batch_timeout_micros, ep.frame_address)
            by_key[key] = backend
            backends.setdefault((ep.tenant, ep.model, ep.version), []).append(backend)
        self._by_key = by_key
        self.backends = backends
        self.changed()

    def available_versions(self, tenant: str, model: str) -> list[int]:
        return sorted(v for (t, m, v) in self.backends if t == tenant and m == model)

    def callable(self, backend: Backend, method: str):
        fn = backend.callables.get(method)
        if fn is None:
            channel = self._channel_for(backend.address)
            fn = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            backend.callables[method] = fn
        return fn


#: What the gateway appends to TF Serving's NOT_FOUND text, so people see where
#: the name was looked up and what to run; TF Serving's words come first, unchanged.
HINT_OPEN = " (cloudml: "


def _not_found(name: str, version: int | None, tenant: str = "", known_model: bool = False) -> errors.NotFound:
    """TF Serving's "Servable not found for request: Latest(name)" plus a hint
    naming the tenant the name was resolved in. The hint says the same for a
    model that does not exist and for one the caller may not call, so it
    reveals nothing about other tenants."""
    text = (f"Servable not found for request: Latest({name})" if version is None
            else f"Servable not found for request: Specific({name}, {version})")
    model = name.partition(".")[2] if "." in name else name
    if not tenant:
        return errors.NotFound(text)
    if known_model:
        what = (f"version {version} of model '{model}' in tenant '{tenant}' is not serving"
                if version is not None else f"model '{model}' in tenant '{tenant}' has no version serving")
        hint = f"{what}; see `cloudml models describe {model}`"
    else:
        hint = f"no model '{model}' in tenant '{tenant}' that you may call; see `cloudml models list`"
    return errors.NotFound(f"{text}{HINT_OPEN}{hint})")


def _outstanding(backend: Backend) -> int:
    return backend.outstanding


class RequestTooLarge(errors.ResourceExhausted):
    """A model call over its size limit (RESOURCE_EXHAUSTED; HTTP 413 on REST)."""


def too_large(api: str, size: int, limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"{api} request of {size} bytes is larger than this model's limit of {limit} bytes")


class PredictRouter:
    def __init__(self, table: RoutingTable, verifier: TokenVerifier, registry: CollectorRegistry,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        self.table = table
        self.verifier = verifier
        self.metrics = ModelRequestMetrics(registry)
        #: the platform-wide cap on a model call's request size (--max-request-bytes)
        self.max_request_bytes = max_request_bytes

    def request_limit(self, tenant: str, model: str, version: int) -> int:
        """The largest request this version's replicas take (see the module doc)."""
        published = [b.max_request_bytes for b in self.table.backends.get((tenant, model, version), ())
                     if b.max_request_bytes]
        return min([self.max_request_bytes, *published])

    # --- who and what ---------------------------------------------------------------

    def caller(self, metadata) -> Principal | None:
        token = bearer_from_metadata(metadata)
        if token is None:
            return None
        if not self.verifier.loaded:
            raise errors.Unavailable("token verification keys not loaded yet; retry")
        return self.verifier.verify(token)

    def route_for(self, caller: Principal | None, name: str, version_for_message: int | None):
        """(tenant, model, route) for a requested name, or NOT_FOUND."""
        if "." in name:
            tenant, _, model = name.partition(".")
        elif caller is not None:
            tenant, model = caller.tenant, name
        else:
            raise errors.Unauthenticated(
                "missing bearer token: send 'authorization: Bearer <token>', or name a public model "
                "as <tenant>.<model>"
            )
        route = self.table.routes.get((tenant, model))
        if route is None or not (route.public or (caller is not None and caller.may_access(tenant))):
            raise _not_found(name, version_for_message, tenant)
        return tenant, model, route

    def candidates(self, caller: Principal | None,
                   spec: model_pb2.ModelSpec) -> tuple[str, str, list[tuple[int, float]]]:
        """(tenant, model, [(version, weight)]): the versions that may answer
        this spec, weighted by the traffic split (one of weight 1 without)."""
        if not spec.name:
            raise errors.InvalidArgument("ModelSpec has no name specified.")
        explicit = spec.version.value if spec.HasField("version") else None
        tenant, model, route = self.route_for(caller, spec.name, explicit)
        available = self.table.available_versions(tenant, model)
        if explicit is not None:
            if explicit not in available:
                raise _not_found(spec.name, explicit, tenant, known_model=True)
            return tenant, model, [(explicit, 1.0)]
        if spec.version_label:
            version = route.labels.get(spec.version_label)
            if version is None:
                raise errors.InvalidArgument(f"Unrecognized servable version label: {spec.version_label}")
            if version not in available:
                raise _not_found(spec.name, version, tenant, known_model=True)
            return tenant, model, [(version, 1.0)]
        if not available:
            raise _not_found(spec.name, None, tenant, known_model=True)
        split = [(t.version, float(t.percent)) for t in route.traffic_split
                 if t.version in available and t.percent > 0]
        if split:
            return tenant, model, split
        if route.default_version and route.default_version in available:
            return tenant, model, [(route.default_version, 1.0)]
        return tenant, model, [(available[-1], 1.0)]

    def resolve(self, caller: Principal | None, spec: model_pb2.ModelSpec) -> tuple[str, str, int]:
        """(tenant, model, version) that should answer this spec."""
        tenant, model, choices = self.candidates(caller, spec)
        return tenant, model, pick_weighted(choices)

    def decision(self, caller: Principal | None, tenant: str, model: str,
                 choices: list[tuple[int, float]], generation: int) -> dataplane_pb2.RouteDecision:
        """What the data plane may apply to this caller's later calls with the same spec."""
        decision = dataplane_pb2.RouteDecision(generation=generation, model=model,
                                               expires_at=caller.expires_at if caller else 0.0)
        for version, weight in choices:
            backends = self.table.backends.get((tenant, model, version), ())
            decision.choices.add(version=version, weight=weight, addresses=[b.address for b in backends],
                                 frame_addresses=[b.frame_address for b in backends],
                                 coalesce_max=min((b.coalesce_max for b in backends), default=0),
                                 max_request_bytes=self.request_limit(tenant, model, version),
                                 batch_timeout_micros=min((b.batch_timeout_micros for b in backends), default=0))
        return decision

    def pick(self, tenant: str, model: str, version: int, exclude: Backend | None = None) -> Backend | None:
        """Least outstanding requests of two random replicas (protocol.pick_two), never `exclude`."""
        candidates = self.table.backends.get((tenant, model, version), ())
        if exclude is not None:
            candidates = [b for b in candidates if b is not exclude]
        return pick_two(candidates, _outstanding)

    # --- forwarding -----------------------------------------------------------------

    async def forward(self, api: str, request: bytes, metadata, timeout: float | None) -> bytes:
        """Routes one request and returns the replica's response bytes.
        Raises typed errors, or grpc.aio.AioRpcError relayed from the replica."""
        response, _ = await self.forward_routed(api, request, metadata, timeout, decide=False)
        return response

    async def forward_routed(self, api: str, request: bytes, metadata, timeout: float | None, decide: bool = True,
                             ) -> tuple[bytes, dataplane_pb2.RouteDecision | None]:
        """forward(), also returning the routing decision it applied (if `decide`)."""
        started = time.perf_counter()
        generation = self.table.generation
        if len(request) > self.max_request_bytes:
            raise too_large(api, len(request), self.max_request_bytes)
        spec = model_spec_of(api, request)
        label_model, label_version, code = spec.name or "-", "-", "OK"
        try:
            if api != "MultiInference" and not spec.name and _field1(request) is None:
                raise errors.InvalidArgument("Missing ModelSpec")
            caller = self.caller(metadata)
            tenant, model, choices = self.candidates(caller, spec)
            decision = self.decision(caller, tenant, model, choices, generation) if decide else None
            version = pick_weighted(choices)
            label_version = str(version)
            limit = self.request_limit(tenant, model, version)
            if len(request) > limit:
                raise too_large(api, len(request), limit)
            method = f"/{PREDICTION_SERVICE}/{api}"
            forwarded = tuple((k, v) for k, v in metadata if not is_hop_header(k) and k != AUTHORIZATION) + (
                (RESOLVED_VERSION_HEADER, label_version),)
            backend = self.pick(tenant, model, version)
            if backend is None:
                raise _not_found(spec.name, version, tenant, known_model=True)
            for attempt in (0, 1):
                current = backend
                current.outstanding += 1
                try:
                    response = await self.table.callable(current, method)(request, metadata=forwarded,
                                                                          timeout=timeout)
                    return response, decision
                except grpc.aio.AioRpcError as err:
                    retry = self.pick(tenant, model, version, exclude=current) if attempt == 0 else None
                    if err.code() != grpc.StatusCode.UNAVAILABLE or retry is None:
                        raise
                    log.info("replica %s unavailable (%s); retrying on %s", current.address,
                             err.details(), retry.address)
                    backend = retry
                finally:
                    current.outstanding -= 1
            raise AssertionError("unreachable")
        except errors.CloudMLError as err:
            code = err.code.name
            raise
        except grpc.aio.AioRpcError as err:
            code = err.code().name
            raise
        finally:
            self.metrics.observe(label_model, label_version, api, code, time.perf_counter() - started)

    # --- ModelService.GetModelStatus, answered from the registry ---------------------

    def model_status(self, caller: Principal | None, spec: model_pb2.ModelSpec) -> get_model_status_pb2.GetModelStatusResponse:
        if not spec.name:
            raise errors.NotFound("Could not find any versions of model ")
        explicit = spec.version.value if spec.HasField("version") else None
        try:
            _, _, route = self.route_for(caller, spec.name, explicit)
        except errors.NotFound:
            raise errors.NotFound(f"Could not find any versions of model {spec.name}") from None
        versions = sorted(route.versions, key=lambda v: v.version)
        if spec.version_label:
            labelled = route.labels.get(spec.version_label)
            if labelled is None:
                raise errors.InvalidArgument(f"Unrecognized servable version label: {spec.version_label}")
            explicit = labelled
        if explicit is not None:
            versions = [v for v in versions if v.version == explicit]
            if not versions:
                raise errors.NotFound(f"Could not find version {explicit} of model {spec.name}")
        if not versions:
            raise errors.NotFound(f"Could not find any versions of model {spec.name}")
        response = get_model_status_pb2.GetModelStatusResponse()
        for v in versions:
            status = response.model_version_status.add(version=v.version, state=int(v.state))
            status.status.error_code = v.status.code
            status.status.error_message = v.status.message
        return response


class TfServingHandler(grpc.GenericRpcHandler):
    """gRPC handlers for the TF Serving services on the gateway's port.

    `dataplane_secret`: calls carrying it came from the native data plane and
    get the routing decision back in trailing metadata."""

    def __init__(self, router: PredictRouter, dataplane_secret: str | None = None):
        self.router = router
        self.dataplane_secret = dataplane_secret
        self._handlers = {f"/{PREDICTION_SERVICE}/{api}": self._forwarder(api) for api in FORWARDED_METHODS}
        self._handlers[f"/{MODEL_SERVICE}/GetModelStatus"] = grpc.unary_unary_rpc_method_handler(
            self._get_model_status,
            request_deserializer=None,  # parsed in the handler: undecodable is INVALID_ARGUMENT, not UNKNOWN
            response_serializer=get_model_status_pb2.GetModelStatusResponse.SerializeToString,
        )
        self._handlers[f"/{MODEL_SERVICE}/HandleReloadConfigRequest"] = grpc.unary_unary_rpc_method_handler(
            self._reload_config, request_deserializer=None, response_serializer=None)

    def service(self, handler_call_details):
        return self._handlers.get(handler_call_details.method)

    def _forwarder(self, api: str) -> grpc.RpcMethodHandler:
        router = self.router
        secret = self.dataplane_secret

        async def handle(request: bytes, context) -> bytes:
            metadata = context.invocation_metadata()
            try:
                if secret is None or (SECRET_HEADER, secret) not in metadata:
                    return await router.forward(api, request, metadata, context.time_remaining())
                response, decision = await router.forward_routed(api, request, metadata, context.time_remaining())
                context.set_trailing_metadata(((ROUTE_DECISION_HEADER, decision.SerializeToString()),))
                return response
            except grpc.aio.AioRpcError as err:
                await context.abort(err.code(), err.details() or "",
                                    trailing_metadata=tuple(err.trailing_metadata() or ()))

        return grpc.unary_unary_rpc_method_handler(handle, request_deserializer=None, response_serializer=None)

    async def _get_model_status(self, raw: bytes, context):
        try:
            request = get_model_status_pb2.GetModelStatusRequest.FromString(raw)
        except Exception:  # noqa: BLE001 - DecodeError and the like: the caller's bytes
            raise errors.InvalidArgument("could not parse the GetModelStatusRequest") from None
        if not request.HasField("model_spec"):
            raise errors.InvalidArgument("Missing ModelSpec")
        caller = self.router.caller(context.invocation_metadata())
        return self.router.model_status(caller, request.model_spec)

    async def _reload_config(self, request, context):
        raise errors.Unimplemented(
            "HandleReloadConfigRequest is not supported: deploy models with the platform's models API "
            "(cloudml models create)"
        )
