"""Forwards platform RPCs to their owning service as raw bytes.

Requests and responses are never parsed: the gateway only authenticates
(done by the auth interceptor before a handler runs), picks an instance of
the owning service, and relays bytes, metadata, the deadline, the status
code, its message and trailing metadata. Unary and streaming RPCs alike.

The instance is resolved per call (`Directory.channel`), so a restarted
service is used from its registration on, and an instance that went down is
skipped from the next call on. Callables are cached per channel and dropped
whenever the directory changes (its channels to gone instances are closed).
"""
from __future__ import annotations

import logging

import grpc

from services.common.native.protocol import is_hop_header
from services.common.registry import Directory
from services.gateway.routes import Route

log = logging.getLogger(__name__)


def forwarded_metadata(context) -> tuple[tuple[str, str | bytes], ...]:
    """The call's metadata but the hop's own (protocol.is_hop_header, as the
    native data plane's relay); the caller's `authorization` goes on."""
    return tuple((k, v) for k, v in context.invocation_metadata() if not is_hop_header(k))


class Proxy(grpc.GenericRpcHandler):
    def __init__(self, routes: dict[str, Route], directory: Directory):
        self.routes = routes
        self.directory = directory
        self._handlers = {path: self._handler(route) for path, route in routes.items()}
        self._callables: dict[tuple[int, str], tuple[grpc.aio.Channel, object]] = {}
        directory.listeners.append(self._callables.clear)
        #: set with a native data plane: metadata -> trailing metadata vouching
        #: for the caller's token (see dataplane.py), or ()
        self.vouch = lambda metadata: ()

    def service(self, handler_call_details):
        return self._handlers.get(handler_call_details.method)

    def _callable(self, route: Route):
        channel = self.directory.channel(route.owner)  # raises Unavailable if none
        key = (id(channel), route.method)
        cached = self._callables.get(key)
        if cached is not None and cached[0] is channel:
            return cached[1]
        kind = {
            (False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream,
        }[(route.client_streaming, route.server_streaming)]
        fn = kind(route.method, request_serializer=None, response_deserializer=None)
        self._callables[key] = (channel, fn)
        return fn

    def _handler(self, route: Route) -> grpc.RpcMethodHandler:
        proxy = self

        async def unary_response(request, context):
            call = proxy._callable(route)(
                request, metadata=forwarded_metadata(context), timeout=context.time_remaining()
            )
            try:
                response = await call
            except grpc.aio.AioRpcError as err:
                await context.abort(err.code(), err.details() or "", trailing_metadata=tuple(err.trailing_metadata() or ()))
            trailers = tuple(await call.trailing_metadata() or ()) + proxy.vouch(context.invocation_metadata())
            if trailers:
                context.set_trailing_metadata(trailers)
            return response

        async def stream_response(request, context):
            call = proxy._callable(route)(
                request, metadata=forwarded_metadata(context), timeout=context.time_remaining()
            )
            try:
                async for message in call:
                    yield message
            except grpc.aio.AioRpcError as err:
                await context.abort(err.code(), err.details() or "", trailing_metadata=tuple(err.trailing_metadata() or ()))
            trailers = tuple(await call.trailing_metadata() or ()) + proxy.vouch(context.invocation_metadata())
            if trailers:
                context.set_trailing_metadata(trailers)

        if route.server_streaming:
            factory = (grpc.stream_stream_rpc_method_handler if route.client_streaming
                       else grpc.unary_stream_rpc_method_handler)
            return factory(stream_response)
        factory = (grpc.stream_unary_rpc_method_handler if route.client_streaming
                   else grpc.unary_unary_rpc_method_handler)
        return factory(unary_response)
