"""The auth service as a real process against a real etcd: the cross-tenant
denial matrix over every RPC (a member of one tenant never sees or touches
another; admin-only RPCs refused to members).

The tests share the session's auth process (`auth_service`) and the module's
two tenants (`victim`, `intruder`).
"""
from __future__ import annotations

import random

import jwt
import pytest

from cloudml.auth.v1 import auth_service_pb2 as pb
from cloudml.common.v1.resources_pb2 import Resources

from tests.integration.auth_helpers import (
    ADMIN_ONLY_RPCS, ALL_RPCS, Code, claims_of, expect_error, invoke, quota, reserve_request,
)


# --- cross-tenant denial matrix ---------------------------------------------------------

class Victim:
    """Tenant A and everything of it a member of tenant B must not see or touch."""

    def __init__(self, auth_service):
        self.description = "victim-description-" + random.randbytes(6).hex()
        self.client = auth_service.new_tenant("victim", description=self.description)
        self.tenant = self.client.tenant
        self.key_id = self.client.access_key_id
        self.owner = "victim-owner-" + random.randbytes(6).hex()
        self.cpu_limit = 987_654
        auth_service.admin.call("SetQuota", pb.SetQuotaRequest(
            tenant=self.tenant, limits=Resources(cpu_millis=self.cpu_limit, memory_bytes=2**30, train_jobs=5)))
        self.client.call("Reserve", reserve_request(self.tenant, self.owner, cpu_millis=1234, train_jobs=1))
        self.marks = [self.description, self.key_id, self.client.secret_key, self.owner, str(self.cpu_limit), "1234"]

    def assert_no_leak(self, *texts, sent: str = "") -> None:
        """No mark of tenant A in `texts`, except what the caller itself sent."""
        for text in texts:
            for mark in self.marks:
                if mark not in sent:
                    assert mark not in text, f"tenant A's data {mark!r} leaked: {text!r}"

    def assert_untouched(self, admin) -> None:
        tenant = admin.call("GetTenant", pb.GetTenantRequest(name=self.tenant)).tenant
        assert tenant.description == self.description
        keys = admin.call("ListAccessKeys", pb.ListAccessKeysRequest(tenant=self.tenant)).access_keys
        assert [(k.access_key_id, k.revoked) for k in keys] == [(self.key_id, False)]
        q = quota(admin, self.tenant)
        assert (q.limits.cpu_millis, q.usage.cpu_millis, q.usage.train_jobs) == (self.cpu_limit, 1234, 1)
        owners = [r.owner_id for r in admin.call(
            "ListReservations", pb.ListReservationsRequest(tenant=self.tenant)).reservations]
        assert owners == [self.owner]
        assert self.client.call("WhoAmI", pb.WhoAmIRequest()).tenant == self.tenant


@pytest.fixture(scope="module")
def victim(auth_service):
    return Victim(auth_service)


@pytest.fixture(scope="module")
def intruder(auth_service):
    return auth_service.new_tenant("intruder")


def _denied(*probes):
    """Matrix entry: each probe is (request builder taking (victim, intruder), expected code)."""
    def check(victim, intruder, auth_service):
        for build, code in probes:
            request = build(victim, intruder)
            err = expect_error(code, invoke, intruder.stub, check.rpc, request, intruder.md)
            victim.assert_no_leak(err.details() or "", repr(err.trailing_metadata()), sent=str(request))
    return check


def _check_list_tenants(victim, intruder, auth_service):
    for size in (0, 1, 1000):
        response = intruder.call("ListTenants", pb.ListTenantsRequest(page_size=size))
        assert [t.name for t in response.tenants] == [intruder.tenant] and not response.next_page_token
        victim.assert_no_leak(str(response))
    # The admin does see tenant A (so the member's view is a real filter).
    names, token = [], ""
    while True:
        page = auth_service.admin.call("ListTenants", pb.ListTenantsRequest(page_size=1000, page_token=token))
        names += [t.name for t in page.tenants]
        token = page.next_page_token
        if not token:
            break
    assert victim.tenant in names and intruder.tenant in names


def _check_issue_token(victim, intruder, auth_service):
    # Tenant A's key with B's secret: refused like any wrong secret.
    err = expect_error(Code.UNAUTHENTICATED, auth_service.stub.IssueToken, pb.IssueTokenRequest(
        access_key_id=victim.key_id, secret_key=intruder.secret_key))
    victim.assert_no_leak(err.details(), sent=victim.key_id)
    # B's own key gives a token for B only.
    token = auth_service.stub.IssueToken(pb.IssueTokenRequest(
        access_key_id=intruder.access_key_id, secret_key=intruder.secret_key)).token
    claims = claims_of(token)
    assert (claims["sub"], claims["role"], claims["akid"]) == (intruder.tenant, pb.ROLE_MEMBER, intruder.access_key_id)


def _check_whoami(victim, intruder, auth_service):
    who = intruder.call("WhoAmI", pb.WhoAmIRequest())
    assert (who.tenant, who.role, who.access_key_id) == (intruder.tenant, pb.ROLE_MEMBER, intruder.access_key_id)


def _check_watch_verification_keys(victim, intruder, auth_service):
    snapshot = invoke(intruder.stub, "WatchVerificationKeys", pb.WatchVerificationKeysRequest(), intruder.md)
    assert snapshot.issuer == "cloudml-auth" and snapshot.audience == "cloudml"
    assert snapshot.public_keys and all("PUBLIC KEY" in k.public_key_pem for k in snapshot.public_keys)
    assert "PRIVATE" not in str(snapshot)
    kid = jwt.get_unverified_header(intruder.token)["kid"]
    assert kid in {k.key_id for k in snapshot.public_keys}
    # Public keys and revoked key ids only: nothing of any tenant.
    victim.assert_no_leak(str(snapshot))
    assert intruder.tenant not in str(snapshot)


def _check_redeem_login_link(victim, intruder, auth_service):
    # A code is the credential: a made-up one is refused; B's own link logs in B only.
    expect_error(Code.UNAUTHENTICATED, auth_service.stub.RedeemLoginLink, pb.RedeemLoginLinkRequest(code="x" * 27))
    path = f"/tensorboard/{intruder.tenant}/board/"
    link = intruder.call("CreateLoginLink", pb.CreateLoginLinkRequest(path=path)).login_path
    redeemed = auth_service.stub.RedeemLoginLink(pb.RedeemLoginLinkRequest(code=link.split("code=", 1)[1]))
    assert claims_of(redeemed.token)["sub"] == intruder.tenant and redeemed.path == path
    victim.assert_no_leak(str(redeemed))


CROSS_TENANT = {
    "CreateTenant": _denied((lambda v, i: pb.CreateTenantRequest(name=v.tenant + "-x"), Code.PERMISSION_DENIED)),
    "GetTenant": _denied((lambda v, i: pb.GetTenantRequest(name=v.tenant), Code.NOT_FOUND)),
    "ListTenants": _check_list_tenants,
    "DeleteTenant": _denied((lambda v, i: pb.DeleteTenantRequest(name=v.tenant), Code.PERMISSION_DENIED)),
    "CreateAccessKey": _denied((lambda v, i: pb.CreateAccessKeyRequest(tenant=v.tenant), Code.NOT_FOUND)),
    "ListAccessKeys": _denied((lambda v, i: pb.ListAccessKeysRequest(tenant=v.tenant), Code.NOT_FOUND)),
    "RevokeAccessKey": _denied(
        (lambda v, i: pb.RevokeAccessKeyRequest(tenant=v.tenant, access_key_id=v.key_id), Code.NOT_FOUND),
        # A's key named under B's own tenant: still not found.
        (lambda v, i: pb.RevokeAccessKeyRequest(tenant=i.tenant, access_key_id=v.key_id), Code.NOT_FOUND),
    ),
    "IssueToken": _check_issue_token,
    "WhoAmI": _check_whoami,
    "WatchVerificationKeys": _check_watch_verification_keys,
    "RotateSigningKey": _denied((lambda v, i: pb.RotateSigningKeyRequest(), Code.PERMISSION_DENIED)),
    "GetQuota": _denied((lambda v, i: pb.GetQuotaRequest(tenant=v.tenant), Code.NOT_FOUND)),
    "SetQuota": _denied((lambda v, i: pb.SetQuotaRequest(tenant=v.tenant, limits=Resources(cpu_millis=1)),
                         Code.PERMISSION_DENIED)),
    "Reserve": _denied((lambda v, i: reserve_request(v.tenant, "intruder-job", cpu_millis=1), Code.NOT_FOUND),
                       (lambda v, i: reserve_request(v.tenant, v.owner, cpu_millis=1234, train_jobs=1),
                        Code.NOT_FOUND)),
    "Release": _denied((lambda v, i: pb.ReleaseRequest(tenant=v.tenant, owner_id=v.owner), Code.NOT_FOUND)),
    "ListReservations": _denied((lambda v, i: pb.ListReservationsRequest(tenant=v.tenant), Code.NOT_FOUND)),
    "CreateLoginLink": _denied(
        (lambda v, i: pb.CreateLoginLinkRequest(path=f"/tensorboard/{v.tenant}/board/"), Code.NOT_FOUND),
        (lambda v, i: pb.CreateLoginLinkRequest(path=f"/dev/{v.tenant}/nb/lab"), Code.NOT_FOUND)),
    "RedeemLoginLink": _check_redeem_login_link,
}
for _rpc, _check in CROSS_TENANT.items():
    _check.rpc = _rpc


def test_cross_tenant_matrix_covers_every_rpc():
    assert sorted(CROSS_TENANT) == ALL_RPCS


@pytest.mark.parametrize("rpc", ALL_RPCS)
def test_member_of_other_tenant_cannot_see_or_touch_it(auth_service, victim, intruder, rpc):
    check = CROSS_TENANT.get(rpc)
    if check is None:
        pytest.fail(f"AuthService.{rpc} has no entry in the cross-tenant denial matrix")
    check(victim, intruder, auth_service)
    victim.assert_untouched(auth_service.admin)


def test_release_of_other_tenants_owner_under_own_tenant_touches_nothing(auth_service, victim, intruder):
    released = intruder.call("Release", pb.ReleaseRequest(tenant=intruder.tenant, owner_id=victim.owner))
    assert not released.released
    victim.assert_untouched(auth_service.admin)


@pytest.mark.parametrize("rpc", ADMIN_ONLY_RPCS)
def test_admin_only_rpc_as_member_of_own_tenant_returns_permission_denied(auth_service, intruder, rpc):
    assert rpc in ALL_RPCS
    own = intruder.tenant
    request = {
        "CreateTenant": pb.CreateTenantRequest(name=own + "-child"),
        "DeleteTenant": pb.DeleteTenantRequest(name=own),
        "SetQuota": pb.SetQuotaRequest(tenant=own, limits=Resources(cpu_millis=10**6, gpus=100)),
        "RotateSigningKey": pb.RotateSigningKeyRequest(),
    }[rpc]
    before = quota(auth_service.admin, own)
    keys_before = invoke(intruder.stub, "WatchVerificationKeys", pb.WatchVerificationKeysRequest()).public_keys
    expect_error(Code.PERMISSION_DENIED, intruder.call, rpc, request)
    assert quota(auth_service.admin, own) == before
    assert invoke(intruder.stub, "WatchVerificationKeys", pb.WatchVerificationKeysRequest()).public_keys == keys_before
    assert intruder.call("GetTenant", pb.GetTenantRequest(name=own)).tenant.name == own
    expect_error(Code.NOT_FOUND, auth_service.admin.call, "GetTenant", pb.GetTenantRequest(name=own + "-child"))
