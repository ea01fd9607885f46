"""Sessions and leader election on `services.common.etcd.Etcd`, as etcd's
own `clientv3/concurrency` offers them:

- `Session`: a lease kept alive in the background; when it is lost (etcd
  down longer than the TTL) a new one is granted and the keys registered with
  `Session.keep()` are written again.
- `Election`: leader election under a prefix (lowest create_revision wins),
  with `run_as_leader()` to run a loop only while leading.

Every key goes through `Etcd`, so a namespaced `Etcd` gives namespaced
sessions' keys and elections.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, Callable

import grpc

from services.common import errors
from services.common.etcd import Etcd

log = logging.getLogger(__name__)

class Session:
    """A lease kept alive in the background, like etcd's concurrency.Session.

    `keep(key, value)` writes a key bound to the lease and writes it again
    whenever the lease had to be replaced. `lost` is set while no valid lease
    is held (leaders must step down then).
    """

    def __init__(self, etcd: Etcd, ttl: int = 10):
        self.etcd = etcd
        self.ttl = ttl
        self.lease_id = 0
        self.lost = asyncio.Event()
        self.renewed = asyncio.Event()
        self._kept: dict[str, bytes] = {}
        self._task: asyncio.Task | None = None
        self._generation = 0

    @property
    def generation(self) -> int:
        """Bumped each time a new lease replaces a lost one."""
        return self._generation

    async def start(self) -> "Session":
        self.lease_id = await self.etcd.grant_lease(self.ttl)
        self._task = asyncio.create_task(self._keepalive(), name="etcd-session-keepalive")
        return self

    async def keep(self, key: str, value: bytes) -> None:
        self._kept[key] = value
        await self.etcd.put(key, value, lease=self.lease_id)

    async def forget(self, key: str) -> None:
        self._kept.pop(key, None)
        with contextlib.suppress(errors.Unavailable):
            await self.etcd.delete(key)

    async def _keepalive(self) -> None:
        loop = asyncio.get_running_loop()
        expires = loop.time() + self.ttl
        while True:
            await asyncio.sleep(max(self.ttl / 3, 0.2))
            try:
                remaining = await self.etcd.keepalive_once(self.lease_id)
            except errors.Unavailable:
                if loop.time() < expires:
                    continue
                remaining = 0
            except Exception:  # noqa: BLE001 - keep the session alive whatever happens
                log.exception("lease keep-alive failed")
                continue
            if remaining > 0:
                expires = loop.time() + remaining
                continue
            # The lease is gone: say so, then get a new one and re-register.
            self.lost.set()
            log.warning("etcd lease %x lost; granting a new one", self.lease_id)
            await self._renew()
            expires = loop.time() + self.ttl

    async def _renew(self) -> None:
        delay = 0.2
        while True:
            try:
                self.lease_id = await self.etcd.grant_lease(self.ttl)
                for key, value in list(self._kept.items()):
                    await self.etcd.put(key, value, lease=self.lease_id)
                self._generation += 1
                self.lost.clear()
                self.renewed.set()
                self.renewed = asyncio.Event()
                return
            except errors.Unavailable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.etcd.revoke_lease(self.lease_id)


class Election:
    """Leader election under `/cloudml/<owner>/election/<name>/`.

    Each candidate writes a key bound to its session's lease; the one with the
    lowest create_revision leads. A candidate waits for the deletion of the
    key just before its own (no thundering herd), as etcd's recipe does.
    """

    def __init__(self, session: Session, prefix: str, value: bytes = b""):
        self.session = session
        self.etcd = session.etcd
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.value = value
        self.key = ""

    async def campaign(self) -> None:
        """Returns once this candidate leads."""
        while True:
            try:
                self.key = f"{self.prefix}{self.session.lease_id:016x}"
                await self.etcd.create(self.key, self.value, lease=self.session.lease_id)
                mine = await self.etcd.get(self.key)
                if mine is None:  # lease lost between the two calls
                    await asyncio.sleep(0.2)
                    continue
                while True:
                    kvs, revision, _ = await self.etcd.get_prefix(self.prefix)
                    ahead = [kv for kv in kvs if kv.create_revision < mine.create_revision]
                    if all(kv.key != self.key for kv in kvs):
                        break  # our key vanished (lease lost): campaign again
                    if not ahead:
                        return
                    predecessor = max(ahead, key=lambda kv: kv.create_revision)
                    await self._wait_deleted(predecessor.key, revision + 1)
            except errors.Unavailable:
                await asyncio.sleep(0.5)

    async def _wait_deleted(self, key: str, start_revision: int) -> None:
        # The pending read is kept across the periodic re-checks: cancelling
        # it (as asyncio.wait_for would on timeout) cancels the whole watch
        # call, and a predecessor that outlives one TTL would then end the
        # campaign by accident.
        call = self.etcd.watch_stream(key, start_revision)
        reader: asyncio.Future | None = None
        try:
            while True:
                if await self.etcd.get(key) is None:
                    return
                if reader is None:
                    reader = asyncio.ensure_future(call.read())
                done, _ = await asyncio.wait({reader}, timeout=self.session.ttl)
                if not done:
                    continue
                resp, reader = reader.result(), None
                if resp is grpc.aio.EOF or resp.canceled:
                    return
                if any(ev.type == ev.DELETE for ev in resp.events):
                    return
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.5)
        finally:
            if reader is not None:
                reader.cancel()
            call.cancel()

    async def leader(self) -> str | None:
        """The current leader's value, or None when nobody leads."""
        kvs, _, _ = await self.etcd.get_prefix(self.prefix)
        if not kvs:
            return None
        return min(kvs, key=lambda kv: kv.create_revision).value.decode()

    async def resign(self) -> None:
        if self.key:
            with contextlib.suppress(errors.Unavailable):
                await self.etcd.delete(self.key)
            self.key = ""


async def run_as_leader(
    election: Election,
    work: Callable[[], Awaitable[None]],
    *,
    on_change: Callable[[bool], None] | None = None,
) -> None:
    """Runs `work()` only while `election` leads; restarts it after leadership
    is regained. Never returns until cancelled (then it resigns)."""
    session = election.session
    try:
        while True:
            await election.campaign()
            log.info("became leader for %s", election.prefix)
            if on_change:
                on_change(True)
            task = asyncio.create_task(work(), name=f"leader:{election.prefix}")
            lost = asyncio.create_task(session.lost.wait())
            done, _ = await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
            if on_change:
                on_change(False)
            if task in done:
                lost.cancel()
                exc = task.exception()
                if exc:
                    log.error("leader loop for %s failed: %r; campaigning again", election.prefix, exc)
                await election.resign()
                await asyncio.sleep(0.5)
                continue
            log.warning("lost leadership for %s (lease lost)", election.prefix)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            await session.renewed.wait() if session.lost.is_set() else None
    finally:
        await election.resign()
