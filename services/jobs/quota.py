"""The jobs service's calls to the auth service's quota API.

Every call carries the service's own token (`ServiceIdentity`, an admin-tenant
key) and a deadline; failures come back as typed errors
(`errors.from_rpc_error`), so the scheduler branches on `errors.QuotaBusy`
(fits the limits, not the usage now: stay queued) versus
`errors.ResourceExhausted` (can never fit).
"""
from __future__ import annotations

import grpc

from cloudml.auth.v1 import auth_service_pb2 as auth_pb
from cloudml.auth.v1 import auth_service_pb2_grpc as auth_grpc
from cloudml.common.v1 import resources_pb2
from services.common import errors
from services.common.identity import ServiceIdentity
from services.common.registry import Directory

CALL_TIMEOUT = 5.0


class AuthQuota:
    def __init__(self, directory: Directory, identity: ServiceIdentity | None):
        self.directory = directory
        self.identity = identity

    async def _call(self, method: str, request):
        if self.identity is None:
            raise errors.Unavailable("the jobs service has no credentials for the auth service (--credentials-file)")
        stub = auth_grpc.AuthServiceStub(self.directory.channel("auth"))
        try:
            return await getattr(stub, method)(request, metadata=await self.identity.metadata(), timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as err:
            raise errors.from_rpc_error(err) from err

    async def limits(self, tenant: str) -> resources_pb2.Resources:
        """The tenant's quota limits. NotFound: no such tenant."""
        return (await self._call("GetQuota", auth_pb.GetQuotaRequest(tenant=tenant))).limits

    async def reserve(self, tenant: str, owner_id: str, resources: resources_pb2.Resources) -> None:
        """Raises QuotaBusy (not now), ResourceExhausted (never) or Unavailable."""
        await self._call("Reserve", auth_pb.ReserveRequest(tenant=tenant, owner_id=owner_id, resources=resources))

    async def release(self, tenant: str, owner_id: str) -> bool:
        try:
            resp = await self._call("Release", auth_pb.ReleaseRequest(tenant=tenant, owner_id=owner_id))
        except errors.NotFound:
            return False  # the tenant is gone, and its reservations with it
        return resp.released

    async def reservations(self, tenant: str) -> list[auth_pb.Reservation]:
        try:
            resp = await self._call("ListReservations", auth_pb.ListReservationsRequest(tenant=tenant))
        except errors.NotFound:
            return []
        return list(resp.reservations)
