"""The models service's calls to the auth service (tenants, quota limits,
reservations), made with the service's own identity (an admin-tenant key),
each with a deadline. Failures come back as typed errors
(`services.common.errors`), `QuotaBusy` included."""
from __future__ import annotations

import grpc

from cloudml.auth.v1 import auth_service_pb2 as auth_pb
from cloudml.auth.v1 import auth_service_pb2_grpc as auth_grpc
from cloudml.common.v1 import resources_pb2
from services.common import errors
from services.common.identity import ServiceIdentity
from services.common.registry import Directory

CALL_TIMEOUT = 5.0


class AuthClient:
    def __init__(self, directory: Directory, identity: ServiceIdentity | None):
        self.directory = directory
        self.identity = identity

    async def _call(self, method: str, request):
        if self.identity is None:
            raise errors.FailedPrecondition(
                "the models service has no credentials (--credentials-file) to call the auth service"
            )
        stub = auth_grpc.AuthServiceStub(self.directory.channel("auth"))
        try:
            return await getattr(stub, method)(request, metadata=await self.identity.metadata(),
                                               timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as err:
            raise errors.from_rpc_error(err) from err

    async def tenant_exists(self, tenant: str) -> bool:
        try:
            await self._call("GetTenant", auth_pb.GetTenantRequest(name=tenant))
        except errors.NotFound:
            return False
        return True

    async def limits(self, tenant: str) -> resources_pb2.Resources:
        return (await self._call("GetQuota", auth_pb.GetQuotaRequest(tenant=tenant))).limits

    async def reserve(self, tenant: str, owner_id: str, resources: resources_pb2.Resources) -> bool:
        """Idempotent per owner; raises QuotaBusy (not now) or ResourceExhausted (never)."""
        resp = await self._call("Reserve", auth_pb.ReserveRequest(tenant=tenant, owner_id=owner_id,
                                                                   resources=resources))
        return resp.created

    async def release(self, tenant: str, owner_id: str) -> bool:
        """Idempotent; False when the owner held nothing (or the tenant is gone)."""
        try:
            resp = await self._call("Release", auth_pb.ReleaseRequest(tenant=tenant, owner_id=owner_id))
        except errors.NotFound:
            return False
        return resp.released
