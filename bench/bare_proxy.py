#!/usr/bin/env python3
"""The floor for any Python gateway hop: a grpc.aio server that forwards every
unary call's bytes to one backend, with no auth, routing or metrics.

    python bench/bare_proxy.py BACKEND_ADDRESS   (prints its port, serves until killed)
"""
import asyncio
import sys

import grpc


async def main(backend: str) -> None:
    channel = grpc.aio.insecure_channel(backend)
    calls = {}

    class Forward(grpc.GenericRpcHandler):
        def service(self, details):
            method = details.method
            call = calls.get(method)
            if call is None:
                call = calls[method] = channel.unary_unary(method, request_serializer=None,
                                                           response_deserializer=None)

            async def handle(request, context):
                return await call(request, timeout=context.time_remaining())

            return grpc.unary_unary_rpc_method_handler(handle)

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((Forward(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
