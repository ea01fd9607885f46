"""The server interceptors every service installs, outermost first:

1. `ObservabilityInterceptor`: a request id per call (the caller's
   `x-request-id` or a new one), one access-log line, and the Prometheus
   metrics `grpc_server_handled_total` / `grpc_server_handling_seconds`.
2. `ErrorInterceptor`: the one place typed errors (`services.common.errors`)
   become status codes; anything else is INTERNAL with the request id, its
   traceback logged and never sent.
3. `AuthInterceptor`: verifies the bearer token locally and sets the caller's
   `Principal` for the handler; methods listed as public need no token.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import time
import uuid
from typing import Any, Callable

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from services.common import errors
from services.common.tokens import TokenVerifier, bearer_from_metadata, current_principal

log = logging.getLogger(__name__)
access_log = logging.getLogger("cloudml.access")

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

# Methods no service ever authenticates.
ALWAYS_PUBLIC_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.rpartition("/")
    return service.lstrip("/"), name


def wrap_handler(handler: grpc.RpcMethodHandler, around: Callable[[Any], Any]) -> grpc.RpcMethodHandler:
    """Returns `handler` with each call run inside `around(context)`, an async
    context manager; works for the four kinds of RPC."""
    if handler is None:
        return None

    if handler.response_streaming:
        behavior = handler.unary_stream or handler.stream_stream

        async def streaming(request_or_iterator, context):
            async with around(context):
                result = behavior(request_or_iterator, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:
                    await result

        factory = grpc.stream_stream_rpc_method_handler if handler.request_streaming else grpc.unary_stream_rpc_method_handler
        return factory(streaming, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)

    behavior = handler.unary_unary or handler.stream_unary

    async def unary(request_or_iterator, context):
        async with around(context):
            return await behavior(request_or_iterator, context)

    factory = grpc.stream_unary_rpc_method_handler if handler.request_streaming else grpc.unary_unary_rpc_method_handler
    return factory(unary, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


class ServerMetrics:
    """The standard gRPC server metrics, in the registry of one process."""

    def __init__(self, registry: CollectorRegistry):
        labels = ("grpc_service", "grpc_method", "grpc_code")
        self.handled = Counter(
            "grpc_server_handled_total", "RPCs completed on the server, by status code.",
            labels, registry=registry,
        )
        self.seconds = Histogram(
            "grpc_server_handling_seconds", "Time to handle an RPC, by status code.",
            labels, registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        service, name = _split(method)
        incoming = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "x-request-id":
                incoming = value
                break
        metrics = self.metrics
        quiet = method.startswith(ALWAYS_PUBLIC_PREFIXES)  # health probes flood the log

        @contextlib.asynccontextmanager
        async def around(context):
            rid = incoming or uuid.uuid4().hex[:16]
            token = request_id.set(rid)
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                yield
            except BaseException:
                code = _code_of(context, grpc.StatusCode.UNKNOWN)
                raise
            finally:
                if code is grpc.StatusCode.OK:
                    code = _code_of(context, grpc.StatusCode.OK)
                elapsed = time.perf_counter() - start
                metrics.handled.labels(service, name, code.name).inc()
                metrics.seconds.labels(service, name, code.name).observe(elapsed)
                if not quiet and access_log.isEnabledFor(logging.INFO):
                    caller = current_principal.get()
                    access_log.info(
                        "%s %s %.2fms tenant=%s rid=%s", method, code.name, elapsed * 1000,
                        caller.tenant if caller else "-", rid,
                    )
                request_id.reset(token)

        return wrap_handler(handler, around)


def _code_of(context, default: grpc.StatusCode) -> grpc.StatusCode:
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - older runtimes lack code()
        return default
    if code is None:
        return default
    if isinstance(code, int):
        return next((c for c in grpc.StatusCode if c.value[0] == code), default)
    return code


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method

        @contextlib.asynccontextmanager
        async def around(context):
            try:
                yield
            except errors.CloudMLError as err:
                await context.abort(err.code, err.message, trailing_metadata=tuple(err.trailers))
            except grpc.aio.AbortError:
                raise
            except Exception:  # noqa: BLE001 - the one place that catches everything
                rid = request_id.get()
                log.exception("unhandled error in %s (request id %s)", method, rid)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {rid})")

        return wrap_handler(handler, around)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, verifier: TokenVerifier, public_methods: frozenset[str] = frozenset()):
        self.verifier = verifier
        self.public_methods = public_methods

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if method in self.public_methods or method.startswith(ALWAYS_PUBLIC_PREFIXES):
            return handler
        token = bearer_from_metadata(handler_call_details.invocation_metadata)
        verifier = self.verifier

        @contextlib.asynccontextmanager
        async def around(context):
            if token is None:
                raise errors.Unauthenticated("missing bearer token: send metadata 'authorization: Bearer <token>'")
            if not verifier.loaded:
                raise errors.Unavailable("token verification keys not loaded yet; retry")
            # Each RPC runs in its own task, so the value ends with the call;
            # it is not reset so that the access log can name the tenant.
            current_principal.set(verifier.verify(token))
            yield

        return wrap_handler(handler, around)

