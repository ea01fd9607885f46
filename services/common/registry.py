"""Service discovery: where each platform service listens.

Each service process writes `/cloudml/registry/<service>/<instance>` (JSON:
address, pid, start time) bound to its session lease, so an entry disappears
when its process dies. The registry prefix belongs to `services.common`, not
to any one service; it holds nothing but addresses.

`Directory` mirrors the registry and hands out one cached `grpc.aio` channel
per address. Callers pick an instance of a service per call.
"""
from __future__ import annotations

import json
import os
import random
import time

import grpc

from services.common import errors
from services.common.etcd import KV, Etcd, Mirror, Session

REGISTRY_PREFIX = "/cloudml/registry/"

# Channel options for internal hops: fail fast when a peer is gone, find new
# instances quickly.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)


def registry_key(service: str, instance: str) -> str:
    return f"{REGISTRY_PREFIX}{service}/{instance}"


async def register(session: Session, service: str, instance: str, address: str) -> None:
    record = {"address": address, "pid": os.getpid(), "started": time.time()}
    await session.keep(registry_key(service, instance), json.dumps(record).encode())


class Directory:
    def __init__(self, etcd: Etcd):
        self._mirror = Mirror(etcd, REGISTRY_PREFIX, decode=self._decode)
        self._channels: dict[str, grpc.aio.Channel] = {}

    @staticmethod
    def _decode(kv: KV) -> tuple[str, str]:
        service = kv.key[len(REGISTRY_PREFIX):].split("/", 1)[0]
        return service, json.loads(kv.value)["address"]

    def start(self) -> "Directory":
        self._mirror.start()
        return self

    async def wait_synced(self, timeout: float | None = None) -> None:
        await self._mirror.wait_synced(timeout)

    @property
    def listeners(self) -> list:
        """Called with no arguments after each change of the registry."""
        return self._mirror.listeners

    def addresses(self, service: str) -> list[str]:
        return sorted(addr for svc, addr in self._mirror.items.values() if svc == service)

    def channel(self, service: str) -> grpc.aio.Channel:
        """A channel to one live instance of `service` (random pick)."""
        addresses = self.addresses(service)
        if not addresses:
            raise errors.Unavailable(f"the {service} service is not running")
        return self.channel_for(random.choice(addresses))

    def channel_for(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels[address] = channel
        return channel

    async def close(self) -> None:
        await self._mirror.stop()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
