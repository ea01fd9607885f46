"""Service discovery: where each platform service listens.

Each service process writes `/cloudml/registry/<service>/<instance>` (JSON:
address, host, pid, start time) bound to its session lease, once it is
SERVING. A clean exit deletes the entry before draining (and then revokes
the lease); an entry of a killed process stays until its lease expires (the
TTL, 10 s by default), so callers cannot wait for that to move on:

- `Directory` mirrors the registry (list-then-watch), so a new registration
  is known as soon as etcd has it.
- A registration replaces, at once, every older registration of the same
  service from the same host (the process a supervisor restarted, on a new
  port). Instances on different hosts are all used (spread at random).
- Each instance of a service this process uses has a channel whose
  connectivity is watched: an instance whose channel fails to connect (its
  process is gone) is skipped while any other instance is up, and used again
  once its channel reconnects. Callers resolve an instance per call, so the
  call after a failed one goes elsewhere.

`listeners` are called after each change of which instances are in use (a
registration, a deregistration, an instance going down or coming back); the
gateway pushes `addresses()` to its native data plane from there.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

import grpc

from services.common import errors
from services.common.etcd import KV, Etcd, Mirror
from services.common.etcd_concurrency import Session

log = logging.getLogger(__name__)

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

# Calls still running on the channel of an instance whose entry is gone get
# this long before the channel is closed.
CLOSE_GRACE = 5.0

_DOWN = grpc.ChannelConnectivity.TRANSIENT_FAILURE
_UP = grpc.ChannelConnectivity.READY


def registry_key(service: str, instance: str) -> str:
    return f"{REGISTRY_PREFIX}{service}/{instance}"


async def register(session: Session, service: str, instance: str, address: str) -> None:
    record = {"address": address, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    await session.keep(registry_key(service, instance), json.dumps(record).encode())


async def deregister(session: Session, service: str, instance: str) -> None:
    """Removes the entry (a clean exit: callers move on before the lease ends)."""
    await session.forget(registry_key(service, instance))


@dataclass(frozen=True, slots=True)
class Instance:
    service: str
    address: str
    host: str
    #: etcd create_revision of the entry: registration order
    revision: int


class Directory:
    def __init__(self, etcd: Etcd):
        self._mirror = Mirror(etcd, REGISTRY_PREFIX, decode=self._decode)
        self._mirror.listeners.append(self._registry_changed)
        self._channels: dict[str, grpc.aio.Channel] = {}  # channel_for(): any address
        self._instance_channels: dict[str, grpc.aio.Channel] = {}  # registered instances in use
        self._monitors: dict[str, asyncio.Task] = {}
        self._closing: set[asyncio.Task] = set()
        self._down: set[str] = set()
        self._wanted: set[str] = set()  # services this process has asked for
        self._in_use: dict[str, list[str]] = {}  # service -> addresses() as last announced
        self._changed = asyncio.Event()
        self.listeners: list[Callable[[], Any]] = []
        """Called with no arguments after each change of the instances in use."""

    @staticmethod
    def _decode(kv: KV) -> Instance:
        service = kv.key[len(REGISTRY_PREFIX):].split("/", 1)[0]
        record = json.loads(kv.value)
        return Instance(service, record["address"], record.get("host", ""), kv.create_revision)

    def start(self) -> "Directory":
        self._mirror.start()
        return self

    async def wait_synced(self, timeout: float | None = None) -> None:
        await self._mirror.wait_synced(timeout)

    # --- which instances ----------------------------------------------------------

    def instances(self, service: str) -> list[Instance]:
        """Every registered instance of `service`, newest first."""
        found = [i for i in self._mirror.items.values() if i.service == service]
        return sorted(found, key=lambda i: i.revision, reverse=True)

    def _current(self, service: str) -> list[Instance]:
        """The newest registration per host (and per address), newest first."""
        hosts, addresses, current = set(), set(), []
        for inst in self.instances(service):
            if inst.address in addresses or (inst.host and inst.host in hosts):
                continue
            hosts.add(inst.host)
            addresses.add(inst.address)
            current.append(inst)
        return current

    def addresses(self, service: str) -> list[str]:
        """The addresses of `service` to call, newest registration first:
        the instances that are up, or all current ones when none is."""
        self._want(service)
        current = [i.address for i in self._current(service)]
        up = [a for a in current if a not in self._down]
        return up or current

    def channel(self, service: str) -> grpc.aio.Channel:
        """A channel to one instance of `service` (a random one of `addresses()`).
        Raises `errors.Unavailable` when none is registered."""
        addresses = self.addresses(service)
        if not addresses:
            raise errors.Unavailable(f"the {service} service is not running")
        address = random.choice(addresses)
        channel = self._instance_channels.get(address)
        return channel if channel is not None else self._watch(address)

    def instance_channel(self, address: str) -> grpc.aio.Channel | None:
        """The channel `channel()` hands out for a registered instance, if any."""
        return self._instance_channels.get(address)

    def channel_for(self, address: str) -> grpc.aio.Channel:
        """A cached channel to any address (model-server replicas)."""
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels[address] = channel
        return channel

    async def changed(self, timeout: float | None = None) -> bool:
        """Waits for the next change of the instances in use; False on timeout."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    # --- keeping it current -------------------------------------------------------

    def _want(self, service: str) -> None:
        if service not in self._wanted:
            self._wanted.add(service)
            self._in_use[service] = self._announced(service)
            self._sync_channels()

    def _announced(self, service: str) -> list[str]:
        current = [i.address for i in self._current(service)]
        return [a for a in current if a not in self._down] or current

    def _registry_changed(self) -> None:
        self._sync_channels()
        self._notify(force=True)

    def _sync_channels(self) -> None:
        """Watches the channel of every current instance of a wanted service;
        closes (after a grace) those of instances no longer registered."""
        current = {i.address for s in self._wanted for i in self._current(s)}
        registered = {i.address for i in self._mirror.items.values()}
        for address in current - self._instance_channels.keys():
            self._watch(address)
        for address in list(self._instance_channels):
            if address not in registered:
                self._drop(address)

    def _watch(self, address: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._instance_channels[address] = channel
        self._monitors[address] = asyncio.get_running_loop().create_task(
            self._monitor(address, channel), name=f"registry-channel:{address}")
        return channel

    def _drop(self, address: str) -> None:
        channel = self._instance_channels.pop(address)
        self._monitors.pop(address).cancel()
        self._down.discard(address)
        task = asyncio.get_running_loop().create_task(channel.close(CLOSE_GRACE))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _monitor(self, address: str, channel: grpc.aio.Channel) -> None:
        """Marks `address` down while its channel cannot connect; keeps it connecting."""
        state = channel.get_state(try_to_connect=True)
        while True:
            if state == _DOWN and address not in self._down:
                log.info("instance at %s is down", address)
                self._down.add(address)
                self._notify()
            elif state == _UP and address in self._down:
                log.info("instance at %s is up again", address)
                self._down.discard(address)
                self._notify()
            await channel.wait_for_state_change(state)
            state = channel.get_state(try_to_connect=True)

    def _notify(self, force: bool = False) -> None:
        changed = force
        for service in self._wanted:
            now = self._announced(service)
            if now != self._in_use.get(service):
                self._in_use[service] = now
                changed = True
        if not changed:
            return
        self._changed.set()
        self._changed = asyncio.Event()
        for listener in list(self.listeners):
            try:
                result = listener()
                if asyncio.iscoroutine(result):
                    asyncio.get_running_loop().create_task(result)
            except Exception:  # noqa: BLE001 - one listener must not stop the others
                log.exception("registry listener failed")

    async def close(self) -> None:
        await self._mirror.stop()
        for task in self._monitors.values():
            task.cancel()
        await asyncio.gather(*self._monitors.values(), return_exceptions=True)
        self._monitors.clear()
        for channel in (*self._channels.values(), *self._instance_channels.values()):
            with contextlib.suppress(Exception):
                await channel.close()
        self._channels.clear()
        self._instance_channels.clear()
        for task in list(self._closing):
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)
