"""cloudml.auth.v1.AuthService over `AuthCore`: check shape, call, respond."""
from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from cloudml.auth.v1 import auth_service_pb2 as pb
from cloudml.auth.v1 import auth_service_pb2_grpc as pb_grpc
from cloudml.common.v1 import resources_pb2
from services.auth.core import AuthCore
from services.auth.login import LoginLinks
from services.common.tokens import principal


def _ts(seconds: float) -> Timestamp:
    return Timestamp(seconds=int(seconds))


class AuthServicer(pb_grpc.AuthServiceServicer):
    def __init__(self, core: AuthCore, login: LoginLinks | None = None):
        self.core = core
        self.login = login

    async def CreateTenant(self, request, context):
        tenant = await self.core.create_tenant(principal(), request.name, request.description)
        return pb.CreateTenantResponse(tenant=tenant)

    async def GetTenant(self, request, context):
        return pb.GetTenantResponse(tenant=await self.core.get_tenant(principal(), request.name))

    async def ListTenants(self, request, context):
        tenants, token = await self.core.list_tenants(principal(), request.page_size, request.page_token)
        return pb.ListTenantsResponse(tenants=tenants, next_page_token=token)

    async def DeleteTenant(self, request, context):
        await self.core.delete_tenant(principal(), request.name)
        return pb.DeleteTenantResponse()

    async def CreateAccessKey(self, request, context):
        key, secret = await self.core.create_access_key(principal(), request.tenant, request.description)
        return pb.CreateAccessKeyResponse(access_key=key, secret_key=secret)

    async def ListAccessKeys(self, request, context):
        return pb.ListAccessKeysResponse(access_keys=await self.core.list_access_keys(principal(), request.tenant))

    async def RevokeAccessKey(self, request, context):
        key = await self.core.revoke_access_key(principal(), request.tenant, request.access_key_id)
        return pb.RevokeAccessKeyResponse(access_key=key)

    async def IssueToken(self, request, context):
        token, expires = await self.core.issue_token(
            request.access_key_id, request.secret_key, request.ttl_seconds, request.audience
        )
        return pb.IssueTokenResponse(token=token, expire_time=_ts(expires))

    async def WhoAmI(self, request, context):
        caller = principal()
        return pb.WhoAmIResponse(
            tenant=caller.tenant, role=caller.role, access_key_id=caller.access_key_id,
            expire_time=_ts(caller.expires_at),
        )

    async def WatchVerificationKeys(self, request, context):
        async for snapshot in self.core.verification_snapshots():
            yield snapshot

    async def RotateSigningKey(self, request, context):
        public_key, retired = await self.core.rotate_signing_key(principal())
        return pb.RotateSigningKeyResponse(public_key=public_key, retired_key_ids=retired)

    async def GetQuota(self, request, context):
        limits, usage = await self.core.get_quota(principal(), request.tenant)
        return pb.GetQuotaResponse(tenant=request.tenant, limits=limits, usage=usage)

    async def SetQuota(self, request, context):
        limits, usage = await self.core.set_quota(principal(), request.tenant, request.limits)
        return pb.SetQuotaResponse(tenant=request.tenant, limits=limits, usage=usage)

    async def Reserve(self, request, context):
        reservation, created = await self.core.reserve(
            principal(), request.tenant, request.owner_id, request.resources or resources_pb2.Resources()
        )
        return pb.ReserveResponse(reservation=reservation, created=created)

    async def Release(self, request, context):
        released = await self.core.release(principal(), request.tenant, request.owner_id)
        return pb.ReleaseResponse(released=released)

    async def ListReservations(self, request, context):
        reservations = await self.core.list_reservations(principal(), request.tenant)
        return pb.ListReservationsResponse(reservations=reservations)

    async def CreateLoginLink(self, request, context):
        login_path, expires = await self.login.create(principal(), request.path)
        return pb.CreateLoginLinkResponse(login_path=login_path, expire_time=_ts(expires))

    async def RedeemLoginLink(self, request, context):
        token, expires, path, cookie_path = await self.login.redeem(request.code)
        return pb.RedeemLoginLinkResponse(token=token, expire_time=_ts(expires), path=path, cookie_path=cookie_path)
