"""The replica's entry in the model-endpoint registry the gateway watches.

Key: `/cloudml/models/endpoints/<tenant>/<model>/<version>/<replica-id>`,
value: a serialized `cloudml.models.v1.ReplicaEndpoint`, bound to the
replica's own etcd lease (`services.common.etcd.Session`), so the entry
disappears within the lease TTL when the process dies. Written only once the
model is loaded and warmed up (state AVAILABLE), rewritten with state
UNLOADING when the replica starts to drain, and removed (lease revoked) when
it exits.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from google.protobuf import timestamp_pb2

from cloudml.models.v1 import models_service_pb2 as models_pb
from services.common import errors
from services.common.etcd import Etcd, Session
from services.models.store import endpoint_key  # the models service owns /cloudml/models/

log = logging.getLogger(__name__)


class Registration:
    def __init__(self, etcd_endpoint: str, *, tenant: str, model: str, version: int, replica_id: str,
                 address: str, ttl: int = 10, coalesce_max: int = 0):
        self.etcd_endpoint = etcd_endpoint
        self.key = endpoint_key(tenant, model, version, replica_id)
        self.ttl = ttl
        self.endpoint = models_pb.ReplicaEndpoint(
            tenant=tenant, model=model, version=version, replica_id=replica_id, address=address,
            coalesce_max=coalesce_max,
        )
        self._etcd: Etcd | None = None
        self._session: Session | None = None
        self.registered = asyncio.Event()

    def _value(self, state: int) -> bytes:
        self.endpoint.state = state
        now = time.time()
        self.endpoint.register_time.CopyFrom(timestamp_pb2.Timestamp(seconds=int(now), nanos=int(now % 1 * 1e9)))
        return self.endpoint.SerializeToString()

    async def register(self, stop: asyncio.Event) -> bool:
        """Writes the entry as AVAILABLE, retrying while etcd is unreachable."""
        delay = 0.1
        while not stop.is_set():
            try:
                if self._etcd is None:
                    self._etcd = await Etcd.connect(self.etcd_endpoint)
                if self._session is None:
                    self._session = await Session(self._etcd, ttl=self.ttl).start()
                await self._session.keep(self.key, self._value(models_pb.MODEL_VERSION_STATE_AVAILABLE))
                self.registered.set()
                log.info("registered %s (lease %x, ttl %ds)", self.key, self._session.lease_id, self.ttl)
                return True
            except (errors.Unavailable, OSError) as err:
                log.info("etcd registration waiting: %s", getattr(err, "message", err))
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - keep trying; the log says why
                log.warning("etcd registration failed (%s: %s); retrying", type(err).__name__, err)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 2.0)
        return False

    async def unloading(self) -> None:
        """Rewrites the entry with state UNLOADING (the gateway stops routing here)."""
        if self._session is None or not self.registered.is_set():
            return
        try:
            await asyncio.wait_for(
                self._session.keep(self.key, self._value(models_pb.MODEL_VERSION_STATE_UNLOADING)), 3.0
            )
        except Exception as err:  # noqa: BLE001 - the lease ends it anyway
            log.warning("could not mark %s UNLOADING: %s", self.key, err)

    async def close(self) -> None:
        """Revokes the lease (the entry goes with it)."""
        if self._session is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._session.close(), 3.0)
        if self._etcd is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._etcd.close(), 3.0)
