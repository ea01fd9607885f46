"""A service's calls to another platform service, and the one client every
service uses for the auth service's tenants and quota.

Every call carries the calling service's own token (`ServiceIdentity`, an
admin-tenant key, so it may act in any tenant) and a deadline; failures come
back as typed errors (`errors.from_rpc_error`), so callers branch on
`errors.QuotaBusy` (fits the limits, not the usage now: wait and retry) versus
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


class ServiceCaller:
    """Calls `service`'s RPCs as the calling service."""

    def __init__(self, directory: Directory, identity: ServiceIdentity | None, service: str,
                 timeout: float = CALL_TIMEOUT):
        self.directory = directory
        self.identity = identity
        self.service = service
        self.timeout = timeout

    async def metadata(self):
        if self.identity is None:
            raise errors.Unavailable(
                f"this service has no credentials (--credentials-file) to call the {self.service} service"
            )
        return await self.identity.metadata()

    async def call(self, stub_class, method: str, request, timeout: float | None = None):
        stub = stub_class(self.directory.channel(self.service))
        try:
            return await getattr(stub, method)(request, metadata=await self.metadata(),
                                               timeout=timeout or self.timeout)
        except grpc.aio.AioRpcError as err:
            raise errors.from_rpc_error(err) from err


class QuotaClient(ServiceCaller):
    def __init__(self, directory: Directory, identity: ServiceIdentity | None):
        super().__init__(directory, identity, "auth")

    async def _auth(self, method: str, request):
        return await self.call(auth_grpc.AuthServiceStub, method, request)

    async def tenant_exists(self, tenant: str) -> bool:
        try:
            await self._auth("GetTenant", auth_pb.GetTenantRequest(name=tenant))
        except errors.NotFound:
            return False
        return True

    async def limits(self, tenant: str) -> resources_pb2.Resources:
        """The tenant's quota limits. NotFound: no such tenant."""
        return (await self._auth("GetQuota", auth_pb.GetQuotaRequest(tenant=tenant))).limits

    async def reserve(self, tenant: str, owner_id: str, resources: resources_pb2.Resources) -> bool:
        """Idempotent per owner; True when this call made the reservation.
        Raises QuotaBusy (not now), ResourceExhausted (never), NotFound (tenant)."""
        resp = await self._auth("Reserve", auth_pb.ReserveRequest(tenant=tenant, owner_id=owner_id,
                                                                   resources=resources))
        return resp.created

    async def release(self, tenant: str, owner_id: str) -> bool:
        """Idempotent; False when the owner held nothing (or the tenant is gone,
        and its reservations with it)."""
        try:
            resp = await self._auth("Release", auth_pb.ReleaseRequest(tenant=tenant, owner_id=owner_id))
        except errors.NotFound:
            return False
        return resp.released

    async def create_access_key(self, tenant: str, description: str) -> tuple[str, str]:
        """(access key id, secret) of a new key of `tenant` (a MEMBER key: e.g. a
        dev environment's kernels act as the tenant, never as this service)."""
        resp = await self._auth("CreateAccessKey", auth_pb.CreateAccessKeyRequest(tenant=tenant,
                                                                                 description=description))
        return resp.access_key.access_key_id, resp.secret_key

    async def revoke_access_key(self, tenant: str, access_key_id: str) -> None:
        await self._auth("RevokeAccessKey", auth_pb.RevokeAccessKeyRequest(tenant=tenant,
                                                                          access_key_id=access_key_id))

    async def reservations(self, tenant: str) -> list[auth_pb.Reservation]:
        try:
            resp = await self._auth("ListReservations", auth_pb.ListReservationsRequest(tenant=tenant))
        except errors.NotFound:
            return []
        return list(resp.reservations)
