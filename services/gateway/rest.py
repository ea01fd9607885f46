"""The gateway's HTTP listener (TF Serving's REST port, 8501 by default).

TF Serving's REST API, routed exactly as the gRPC side (`predict.PredictRouter`):

    POST /v1/models/{name}[/versions/{n}|/labels/{l}]:predict|:classify|:regress
    GET  /v1/models/{name}[/versions/{n}|/labels/{l}]            (status)
    GET  /v1/models/{name}[/versions/{n}|/labels/{l}]/metadata

JSON bodies are converted without TensorFlow (`tfs_json`); the input dtypes
come from the version's signatures, fetched once per version from a replica
(GetModelMetadata) and cached (a version's SavedModel never changes). Errors
are `{"error": "..."}` with TF Serving's HTTP codes. Authentication:
`Authorization: Bearer <token>`; a public model needs none when named
`<tenant>.<model>`.

Hostile bodies: a body is read for at most BODY_READ_TIMEOUT seconds (a
Content-Length larger than what is sent gets 408 and the connection is
closed); a model call's body, as sent (Content-Length) and as decoded
(Content-Encoding: gzip/deflate), may not exceed the model's request limit
(predict.PredictRouter.request_limit: its replicas' published limit capped
by the gateway's --max-request-bytes), nor may the request converted from
it: 413 with TF Serving's `{"error": ...}` body, before any conversion. A
body that cannot be decoded is 400.

Beyond TF Serving: `GET /v1/models` lists the caller's models, `/healthz`
(alive) and `/readyz` (routing data and the auth keys loaded), and Prometheus
metrics at `/metrics` and TF Serving's `/monitoring/prometheus/metrics`.
Browser pages (`/login`, `/tensorboard/...`): `services.gateway.pages`; the
web console (`/`, `/ui/`): `services.gateway.console`.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import os
import re
import zlib
from typing import Callable

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from cloudml.tfs.tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    model_pb2,
    predict_pb2,
    regression_pb2,
)
from cloudml.internal.v1 import dataplane_pb2
from services.common import errors
from services.common.native.protocol import REST_DECISION_HEADER, REST_RESOLVE_HEADER, SECRET_HEADER
from services.gateway import tfs_json
from services.gateway.pages import BrowserPages
from services.gateway.predict import PredictRouter, RequestTooLarge, too_large

log = logging.getLogger(__name__)

# TF Serving matches its REST paths case-insensitively.
_MODEL_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
    r"(?::(?P<verb>predict|classify|regress)|(?P<metadata>/metadata))?/?$",
    re.IGNORECASE,
)
DEFAULT_TIMEOUT = 60.0
#: Seconds a request body may take to arrive (a slow or lying client holds no connection longer).
BODY_READ_TIMEOUT = 5.0
#: TF Serving's REST API takes versions as int64.
_INT64_MAX = (1 << 63) - 1
_METADATA_CACHE_LIMIT = 4096


def json_response(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json")


def json_error(status: int, message: str) -> web.Response:
    return json_response(status, tfs_json.error_json(message))


class _Decoder:
    """Inflates a request body as it arrives (Content-Encoding identity, gzip, deflate)."""

    def __init__(self, wbits: int | None):
        self._zlib = zlib.decompressobj(wbits) if wbits is not None else None
        self._raw_fallback = wbits == zlib.MAX_WBITS  # "deflate" is zlib-wrapped, some clients send it raw
        self._started = False

    @classmethod
    def of(cls, encoding: str) -> "_Decoder":
        encoding = encoding.strip().lower()
        if encoding in ("", "identity"):
            return cls(None)
        if encoding in ("gzip", "x-gzip"):
            return cls(16 + zlib.MAX_WBITS)
        if encoding == "deflate":
            return cls(zlib.MAX_WBITS)
        raise _Respond(json_error(415, f"Unsupported Content-Encoding {encoding!r}: use gzip, deflate or identity"))

    def feed(self, data: bytes, max_length: int) -> bytes:
        if self._zlib is None:
            return data
        if not self._started and self._raw_fallback and data and (data[0] & 0x0F) != 8:
            self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
        self._started = True
        try:
            out = self._zlib.decompress(data, max_length)
        except zlib.error as err:
            raise tfs_json.JsonError(f"Could not decode the request body ({err})") from None
        return out

    def flush(self) -> bytes:
        if self._zlib is None:
            return b""
        if not self._zlib.eof and self._started:
            raise tfs_json.JsonError("Could not decode the request body: the compressed stream is truncated")
        return self._zlib.flush()


class RestServer:
    def __init__(self, listen: str, registry: CollectorRegistry, ready: Callable[[], bool],
                 router: PredictRouter | None = None, pages: BrowserPages | None = None, console=None,
                 dataplane_secret: str | None = None):
        """`listen`: HOST:PORT, or unix:PATH when the native data plane owns the
        public port and relays here (`dataplane_secret`: the secret its
        requests carry; they get a RestDecision back, see _predict)."""
        self.listen = listen
        self.dataplane_secret = dataplane_secret
        self.registry = registry
        self.ready = ready
        self.router = router
        self._metadata: dict[tuple[str, str, int], get_model_metadata_pb2.GetModelMetadataResponse] = {}
        self.max_body_bytes = router.max_request_bytes if router is not None else 64 * 1024 * 1024
        self.app = web.Application(middlewares=[self._errors], client_max_size=self.max_body_bytes)
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/monitoring/prometheus/metrics", self._metrics)
        self.app.router.add_get("/v1/models", self._list_models)
        self.app.router.add_route("*", "/v1/models/{tail:.*}", self._model)
        self.pages = pages
        if pages is not None:
            pages.add_routes(self.app)
        self.console = console
        if console is not None:  # services.gateway.console.Console
            console.rest = self
            console.add_routes(self.app)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @web.middleware
    async def _errors(self, request, handler):
        try:
            return await handler(request)
        except _Respond as respond:
            return respond.response
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if exc.status == 404:
                return json_error(404, f"Malformed request: {request.method} {request.path}")
            return json_error(exc.status, exc.reason or "error")
        except tfs_json.JsonError as err:
            return json_response(err.http_status, err.to_json())
        except RequestTooLarge as err:
            return json_error(413, err.message)
        except errors.CloudMLError as err:
            return json_error(tfs_json.http_status_for_grpc(err.code), err.message)
        except grpc.aio.AioRpcError as err:
            return json_error(tfs_json.http_status_for_grpc(err.code()), err.details() or err.code().name)
        except Exception:  # noqa: BLE001 - the client gets a 500, the log the traceback
            log.exception("REST %s %s failed", request.method, request.path)
            return json_error(500, "internal error")

    # --- probes and metrics -----------------------------------------------------------

    async def _healthz(self, request):
        return web.json_response({"status": "ok"})

    async def _readyz(self, request):
        if self.ready():
            return web.json_response({"status": "ready"})
        return json_error(503, "not ready: etcd or the platform services are unreachable")

    async def _metrics(self, request):
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # --- TF Serving's API -----------------------------------------------------------------

    @staticmethod
    def _metadata_of(request: web.Request) -> tuple[tuple[str, str], ...]:
        header = request.headers.get("Authorization")
        out = [("authorization", header)] if header else []
        rid = request.headers.get("X-Request-Id")
        if rid:
            out.append(("x-request-id", rid))
        return tuple(out)

    async def _list_models(self, request):
        caller = self._router().caller(self._metadata_of(request))
        if caller is None:
            raise errors.Unauthenticated("missing bearer token: send 'Authorization: Bearer <token>'")
        table = self._router().table
        models = []
        for (tenant, model), route in sorted(table.routes.items()):
            if tenant != caller.tenant:
                continue
            models.append({
                "name": model,
                "public": route.public,
                "qualified_name": f"{tenant}.{model}",
                "default_version": str(route.default_version) if route.default_version else "",
                "labels": {k: str(v) for k, v in sorted(route.labels.items())},
                "versions": [{"version": str(v.version),
                              "state": tfs_json_state(v.state),
                              "ready_replicas": len(table.backends.get((tenant, model, v.version), ()))}
                             for v in sorted(route.versions, key=lambda v: v.version)],
            })
        return web.json_response({"models": models})

    def _router(self) -> PredictRouter:
        if self.router is None:
            raise errors.Unavailable("model routing is not enabled on this gateway")
        return self.router

    async def _model(self, request: web.Request):
        match = _MODEL_PATH.match(request.path)
        if not match:
            raise web.HTTPNotFound()
        name, verb = match["name"], (match["verb"] or "").lower()
        version = None
        if match["version"] is not None:
            try:
                version = int(match["version"])
            except ValueError:
                version = None
            if version is None or not 0 <= version <= _INT64_MAX:
                raise tfs_json.JsonError(f"Failed to convert version: {match['version']} to numeric.") from None
        label = match["label"]
        metadata = self._metadata_of(request)
        if request.method == "GET" and not verb:
            if match["metadata"]:
                return await self._get_metadata(name, version, label, metadata)
            return self._get_status(name, version, label, metadata)
        if request.method != "POST" or not verb:
            raise web.HTTPNotFound()
        if request.headers.get(REST_RESOLVE_HEADER) == "1" and self._from_dataplane(request):
            return await self._resolve_for_dataplane(verb, name, version, label, metadata)
        body = await self._read_body(request, verb, self._body_limit(name, version, label, metadata))
        if verb == "predict":
            return await self._predict(name, version, label, body, metadata, self._from_dataplane(request))
        return await self._classify_or_regress(verb, name, version, label, body, metadata,
                                               self._from_dataplane(request))

    def _body_limit(self, name, version, label, metadata) -> int:
        """The request limit of the versions that may answer (the gateway's cap
        if none resolves: the call then fails later, in TF Serving's order)."""
        router = self._router()
        try:
            tenant, model, choices = router.candidates(router.caller(metadata), self._spec(name, version, label))
        except errors.CloudMLError:
            return router.max_request_bytes
        return min(router.request_limit(tenant, model, v) for v, _ in choices)

    async def _read_body(self, request: web.Request, verb: str, limit: int) -> bytes:
        """The (decoded) body, at most `limit` bytes and BODY_READ_TIMEOUT seconds.

        The body is decoded here, not by aiohttp (the runner turns its
        auto_decompress off): aiohttp answers a body it cannot inflate with a
        plain-text 400 before any handler runs, and TF Serving's clients expect
        `{"error": ...}`. Inflating is bounded: never more than `limit` + 1
        bytes are produced, so a compression bomb costs nothing.
        """
        api = verb.capitalize()
        if request.content_length is not None and request.content_length > limit:
            raise too_large(api, request.content_length, limit)
        decoder = _Decoder.of(request.headers.get("Content-Encoding", ""))
        chunks, size = [], 0

        def add(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > limit:  # decoded bytes
                raise too_large(api, size, limit)
            chunks.append(data)

        async def read() -> None:
            while True:
                chunk = await request.content.readany()
                if not chunk:
                    add(decoder.flush())
                    return
                add(decoder.feed(chunk, limit - size + 1))

        try:
            await asyncio.wait_for(read(), BODY_READ_TIMEOUT)
        except asyncio.TimeoutError:
            response = json_error(408, f"the request body did not arrive within {BODY_READ_TIMEOUT:g} seconds")
            response.force_close()
            raise _Respond(response) from None
        except (RequestTooLarge, tfs_json.JsonError, asyncio.CancelledError):
            raise
        except Exception as err:  # noqa: BLE001 - a body that cannot be decoded (bad gzip, bad chunking)
            raise tfs_json.JsonError(f"Could not read the request body: {getattr(err, 'message', None) or err}") \
                from None
        return b"".join(chunks)

    def _spec(self, name: str, version: int | None, label: str | None, signature: str = "") -> model_pb2.ModelSpec:
        spec = model_pb2.ModelSpec(name=name, signature_name=signature)
        if version is not None:
            spec.version.value = version
        if label:
            spec.version_label = label
        return spec

    def _get_status(self, name, version, label, metadata):
        router = self._router()
        response = router.model_status(router.caller(metadata), self._spec(name, version, label))
        return json_response(200, tfs_json.model_status_to_json(response))

    async def _fetch_metadata(self, name, version, label, metadata):
        """The signatures of the version that would answer (cached per version)."""
        router = self._router()
        tenant, model, resolved = router.resolve(router.caller(metadata), self._spec(name, version, label))
        key = (tenant, model, resolved)
        cached = self._metadata.get(key)
        if cached is not None:
            return cached, resolved
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.CopyFrom(self._spec(name, resolved, None))
        raw = await router.forward("GetModelMetadata", request.SerializeToString(), metadata, DEFAULT_TIMEOUT)
        response = get_model_metadata_pb2.GetModelMetadataResponse.FromString(raw)
        if len(self._metadata) >= _METADATA_CACHE_LIMIT:
            self._metadata.clear()
        self._metadata[key] = response
        return response, resolved

    async def _get_metadata(self, name, version, label, metadata):
        response, _ = await self._fetch_metadata(name, version, label, metadata)
        return json_response(200, tfs_json.model_metadata_to_json(response))

    async def read_predict_body(self, request: web.Request, name: str, version: int | None, metadata) -> bytes:
        """A Predict body read as `POST /v1/models/...:predict` reads it (the console's "try Predict")."""
        return await self._read_body(request, "predict", self._body_limit(name, version, None, metadata))

    async def predict_json(self, name: str, version: int | None, body: bytes, metadata) -> web.Response:
        """REST Predict for `metadata`'s caller, TF Serving's JSON in and out."""
        try:
            return await self._predict(name, version, None, body, metadata)
        except _Respond as respond:
            return respond.response
        except tfs_json.JsonError as err:
            return json_response(err.http_status, err.to_json())
        except RequestTooLarge as err:
            return json_error(413, err.message)

    async def _predict(self, name, version, label, body, metadata, dataplane: bool = False):
        generation = self._router().table.generation  # before any routing: a change since voids the decision
        doc, signature_name = tfs_json.load_request_json(body)
        signatures, resolved = await self._fetch_metadata(name, version, label, metadata)
        parsed = tfs_json.parse_predict_request(doc, signatures, model_name=name, version=resolved)
        parsed.request.model_spec.signature_name = signature_name
        raw = await self._router().forward("Predict", parsed.request.SerializeToString(), metadata, DEFAULT_TIMEOUT)
        response = json_response(200, tfs_json.predict_response_to_json(
            predict_pb2.PredictResponse.FromString(raw), parsed.row_format))
        if dataplane:
            self._add_decision(response, name, version, label, metadata, generation)
        return response

    def _add_decision(self, response: web.Response, name, version, label, metadata, generation) -> None:
        """The RestDecision for a call the data plane relayed and that succeeded, in its header."""
        try:
            decision = self._rest_decision(name, version, label, metadata, generation)
        except Exception:  # noqa: BLE001 - the answer stands; the data plane asks again next time
            log.exception("no routing decision for the data plane (REST %s)", name)
            decision = None
        if decision is not None:
            response.headers[REST_DECISION_HEADER] = base64.b64encode(decision.SerializeToString()).decode()

    async def _resolve_for_dataplane(self, verb, name, version, label, metadata) -> web.Response:
        """The data plane's question before a token's first REST model call:
        may it convert and route this call itself? 204, with the RestDecision
        (the signatures of every version that may answer, fetched if need be)
        when it may; 204 without one for anything else (not authorized, no
        such model, a replica that does not answer): the data plane then
        relays the call here, which answers it, errors included, as before.
        So this process converts JSON only for calls the data plane's codec
        declines (and needs numpy only then), and a first call costs what a
        repeat call does plus this round trip."""
        router = self._router()
        generation = router.table.generation  # before any routing: a change since voids the decision
        response = web.Response(status=204)
        try:
            caller = router.caller(metadata)
            _, _, choices = router.candidates(caller, self._spec(name, version, label))
            if verb == "predict":  # its tensors' dtypes come from each version's signatures
                for v, _ in choices:
                    await self._fetch_metadata(name, v, None, metadata)
        except (errors.CloudMLError, grpc.aio.AioRpcError) as err:
            log.debug("no REST decision for %s (%s)", name, err)
            return response
        self._add_decision(response, name, version, label, metadata, generation)
        return response

    def _from_dataplane(self, request: web.Request) -> bool:
        """True for a request the native data plane relayed (it carries its secret)."""
        got = request.headers.get(SECRET_HEADER)
        return bool(self.dataplane_secret and got and hmac.compare_digest(got, self.dataplane_secret))

    def _rest_decision(self, name, version, label, metadata, generation) -> dataplane_pb2.RestDecision | None:
        """What the data plane may repeat for this caller's later model calls
        to this path: the route, as for gRPC, and the input dtypes of the
        versions whose signatures are known here (predict needs them: a
        version without them comes here again, which fetches them)."""
        router = self._router()
        try:
            caller = router.caller(metadata)
            tenant, model, choices = router.candidates(caller, self._spec(name, version, label))
        except errors.CloudMLError:
            return None
        decision = dataplane_pb2.RestDecision(route=router.decision(caller, tenant, model, choices, generation))
        for v, _ in choices:
            cached = self._metadata.get((tenant, model, v))
            if cached is None:
                continue
            try:
                signatures = tfs_json.signature_map_from_metadata(cached)
            except tfs_json.JsonError:
                continue
            entry = decision.versions.add(version=v)
            for signame, sig in signatures.items():
                entry.signatures[signame].dtypes.update({k: t.dtype for k, t in sig.inputs.items()})
        return decision

    async def _classify_or_regress(self, verb, name, version, label, body, metadata, dataplane: bool = False):
        router = self._router()
        generation = router.table.generation
        convert = (tfs_json.classification_request_from_json if verb == "classify"
                   else tfs_json.regression_request_from_json)
        request = convert(body, model_name=name, version=version, version_label=label)  # the body's errors first
        # The version answers as for predict: a label or the traffic split
        # resolved here (replicas know no labels), the replica told which.
        _, _, resolved = router.resolve(router.caller(metadata), self._spec(name, version, label))
        request.model_spec.ClearField("version_label")
        request.model_spec.version.value = resolved
        api = verb.capitalize()
        raw = await router.forward(api, request.SerializeToString(), metadata, DEFAULT_TIMEOUT)
        if verb == "classify":
            response = json_response(200, tfs_json.classification_response_to_json(
                classification_pb2.ClassificationResponse.FromString(raw)))
        else:
            response = json_response(200, tfs_json.regression_response_to_json(
                regression_pb2.RegressionResponse.FromString(raw)))
        if dataplane:
            self._add_decision(response, name, version, label, metadata, generation)
        return response

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        # lingering_time: after an early answer (413, 408), unread body bytes are
        # drained for at most a second before the connection closes.
        self._runner = web.AppRunner(self.app, access_log=None, lingering_time=1.0, auto_decompress=False)
        await self._runner.setup()
        if self.listen.startswith("unix:"):
            path = self.listen[5:]
            site = web.UnixSite(self._runner, path)
            await site.start()
            os.chmod(path, 0o600)  # its directory is the gateway's own (0700) as well
            self.port = 1
            log.info("REST listening on %s (behind the native data plane)", self.listen)
            return
        host, _, port = self.listen.rpartition(":")
        site = web.TCPSite(self._runner, host or "127.0.0.1", int(port), reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        log.info("REST listening on %s:%d", host, self.port)

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()
        if self.pages is not None:
            await self.pages.close()


class _Respond(Exception):
    """Answers the request with `response` (from a helper deep in a handler)."""

    def __init__(self, response: web.Response):
        super().__init__()
        self.response = response


_STATES = {10: "START", 20: "LOADING", 30: "AVAILABLE", 40: "UNLOADING", 50: "END"}


def tfs_json_state(state: int) -> str:
    return _STATES.get(int(state), "UNKNOWN")
