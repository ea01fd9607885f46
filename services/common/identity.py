"""How services authenticate to each other and learn the token keys.

- `ServiceIdentity`: a service's own access key (the launcher writes it to a
  0600 file in the data dir and registers it with the auth service as an
  admin-tenant key). It exchanges the key for a token through the auth
  service and renews the token before it expires, so long-running loops
  (schedulers, reconcilers) can call other services at any time.
- `follow_verification_keys`: keeps a `TokenVerifier` current from the auth
  service's `WatchVerificationKeys` stream, reconnecting as needed (with a
  backoff, cut short when a new auth instance registers). While the auth
  service is down the last snapshot stays in force.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

import grpc

from cloudml.auth.v1 import auth_service_pb2 as auth_pb2
from cloudml.auth.v1 import auth_service_pb2_grpc as auth_grpc
from services.common import errors
from services.common.registry import Directory
from services.common.tokens import TokenVerifier

log = logging.getLogger(__name__)

CALL_TIMEOUT = 5.0


class ServiceIdentity:
    def __init__(self, access_key: str, secret_key: str, directory: Directory):
        self.access_key = access_key
        self._secret_key = secret_key
        self.directory = directory
        self._token = ""
        self._expires = 0.0
        self._lock = asyncio.Lock()

    @classmethod
    def from_file(cls, path: str, directory: Directory) -> "ServiceIdentity":
        with open(path) as f:
            data = json.load(f)
        return cls(data["access_key"], data["secret_key"], directory)

    async def token(self) -> str:
        if time.time() < self._expires - 60:
            return self._token
        async with self._lock:
            if time.time() < self._expires - 60:
                return self._token
            stub = auth_grpc.AuthServiceStub(self.directory.channel("auth"))
            try:
                resp = await stub.IssueToken(
                    auth_pb2.IssueTokenRequest(access_key_id=self.access_key, secret_key=self._secret_key),
                    timeout=CALL_TIMEOUT,
                )
            except grpc.aio.AioRpcError as err:
                raise errors.from_rpc_error(err) from err
            self._token = resp.token
            self._expires = resp.expire_time.seconds
            return self._token

    async def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {await self.token()}"),)


async def follow_verification_keys(directory: Directory, verifier: TokenVerifier) -> None:
    delay = 0.1
    while True:
        try:
            stub = auth_grpc.AuthServiceStub(directory.channel("auth"))
            call = stub.WatchVerificationKeys(auth_pb2.WatchVerificationKeysRequest())
            async for snapshot in call:
                verifier.update(
                    {k.key_id: k.public_key_pem for k in snapshot.public_keys},
                    set(snapshot.revoked_access_key_ids),
                )
                delay = 0.1
        except asyncio.CancelledError:
            raise
        except (errors.Unavailable, grpc.aio.AioRpcError) as err:
            log.debug("verification key stream interrupted: %s", err)
        except Exception:  # noqa: BLE001 - never stop following
            log.exception("verification key stream failed")
        # A restarted auth service is followed as soon as it registers.
        await directory.changed(delay)
        delay = min(delay * 2, 2.0)
