"""The auth service as a real process against a real etcd, called through sync
gRPC stubs: token lifecycle, secrets at rest, the cross-tenant denial matrix
over every RPC, bad input, concurrent and idempotent reservations, kill -9
recovery, and etcd going away and coming back.

Most tests share the session's auth process (`auth_service`) and keep apart
with unique tenant names; the kill/restart tests start their own auth
(`auth_launcher`) on a key namespace of their own on the session etcd
(`etcd_space`), or on an etcd of their own when they stop etcd (`own_etcd`).
"""
from __future__ import annotations

import base64
import json
import random
import threading
import time

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloudml.auth.v1 import auth_service_pb2 as pb
from cloudml.common.v1.resources_pb2 import Resources
from deploy.local.etcd import EtcdProcess, free_port
from deploy.local.service_process import health_status, read_port_file
from services.common.etcd import Etcd

Code = grpc.StatusCode
SERVING, NOT_SERVING = 1, 2
SERVICE = pb.DESCRIPTOR.services_by_name["AuthService"]
ALL_RPCS = sorted(m.name for m in SERVICE.methods)
PUBLIC_RPCS = {"IssueToken", "WatchVerificationKeys", "RedeemLoginLink"}
ADMIN_ONLY_RPCS = ("CreateTenant", "DeleteTenant", "SetQuota", "RotateSigningKey")
FIELDS = ("cpu_millis", "memory_bytes", "gpus", "train_jobs", "model_replicas", "studies", "dev_environments",
          "tensorboards")
BOUNDS = {"cpu_millis": 10**9, "memory_bytes": 2**60, "gpus": 10**5,
          "train_jobs": 10**6, "model_replicas": 10**6, "studies": 10**6, "dev_environments": 10**6,
          "tensorboards": 10**6}


# --- helpers ------------------------------------------------------------------------

def expect_error(code: grpc.StatusCode, fn, *args, **kwargs) -> grpc.RpcError:
    """Calls fn and asserts it fails with `code`; returns the error."""
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert err.code() == code, f"expected {code.name}, got {err.code().name}: {err.details()}"
    return err


def invoke(stub, rpc: str, request, metadata=(), timeout: float = 10.0):
    """Calls any AuthService RPC; for a server-streaming one, returns its first message."""
    method = SERVICE.methods_by_name[rpc]
    if method.server_streaming:
        call = getattr(stub, rpc)(request, metadata=metadata, timeout=timeout)
        try:
            return next(call)
        finally:
            call.cancel()
    return getattr(stub, rpc)(request, metadata=metadata, timeout=timeout)


def request_class(rpc: str):
    return getattr(pb, SERVICE.methods_by_name[rpc].input_type.name)


def trailers(err: grpc.RpcError) -> dict:
    return dict(err.trailing_metadata() or ())


def claims_of(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def flip_char(segment: str) -> str:
    """The segment with one base64url character in its middle changed (the
    last character may carry unused bits, so it is never the one flipped)."""
    i = len(segment) // 2
    return segment[:i] + ("A" if segment[i] != "A" else "B") + segment[i + 1:]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(interval)


def unauthenticated_now(client, rpc="WhoAmI", request=None) -> bool:
    try:
        client.call(rpc, request or pb.WhoAmIRequest(), timeout=5)
    except grpc.RpcError as err:
        assert err.code() == Code.UNAUTHENTICATED, f"{err.code().name}: {err.details()}"
        return True
    return False


def quota(admin, tenant: str) -> pb.GetQuotaResponse:
    return admin.call("GetQuota", pb.GetQuotaRequest(tenant=tenant))


def reserve_request(tenant: str, owner: str, **amounts) -> pb.ReserveRequest:
    return pb.ReserveRequest(tenant=tenant, owner_id=owner, resources=Resources(**amounts))


@pytest.fixture
def own_etcd(tmp_path):
    """An etcd of this test's own, to stop and start again."""
    server = EtcdProcess(str(tmp_path / "etcd")).start()
    yield server
    server.stop()


# --- token lifecycle ------------------------------------------------------------------

def test_issue_token_and_whoami_describe_the_caller(auth_service):
    member = auth_service.new_tenant("life")
    before = time.time()
    response = auth_service.stub.IssueToken(
        pb.IssueTokenRequest(access_key_id=member.access_key_id, secret_key=member.secret_key, ttl_seconds=600),
        timeout=10,
    )
    header = jwt.get_unverified_header(response.token)
    assert header["alg"] == "EdDSA" and header["kid"]
    claims = claims_of(response.token)
    assert claims["sub"] == member.tenant and claims["aud"] == "cloudml" and claims["akid"] == member.access_key_id
    assert before + 598 <= response.expire_time.seconds <= time.time() + 601

    member.token = response.token
    who = member.call("WhoAmI", pb.WhoAmIRequest())
    assert (who.tenant, who.role, who.access_key_id) == (member.tenant, pb.ROLE_MEMBER, member.access_key_id)
    assert who.expire_time.seconds == response.expire_time.seconds

    admin = auth_service.admin.call("WhoAmI", pb.WhoAmIRequest())
    assert (admin.tenant, admin.role) == ("admin", pb.ROLE_ADMIN)


def test_issue_token_wrong_secret_returns_unauthenticated(auth_service):
    member = auth_service.new_tenant("secret")
    wrong = expect_error(Code.UNAUTHENTICATED, auth_service.stub.IssueToken,
                         pb.IssueTokenRequest(access_key_id=member.access_key_id, secret_key=member.secret_key + "x"))
    unknown = expect_error(Code.UNAUTHENTICATED, auth_service.stub.IssueToken,
                           pb.IssueTokenRequest(access_key_id="AKNOSUCHKEY000000000", secret_key=member.secret_key))
    empty = expect_error(Code.UNAUTHENTICATED, auth_service.stub.IssueToken,
                         pb.IssueTokenRequest(access_key_id=member.access_key_id))
    # One message for every refusal: it does not tell which part was wrong.
    assert wrong.details() == unknown.details() == empty.details()


def test_expired_token_returns_unauthenticated(auth_service):
    member = auth_service.new_tenant("expiry").login(ttl_seconds=1)
    expires = claims_of(member.token)["exp"]
    time.sleep(max(0.0, expires - time.time()) + 0.3)
    err = expect_error(Code.UNAUTHENTICATED, member.call, "WhoAmI", pb.WhoAmIRequest())
    assert "expired" in err.details()
    expect_error(Code.UNAUTHENTICATED, member.call, "GetTenant", pb.GetTenantRequest(name=member.tenant))


@pytest.mark.parametrize("part", ["payload", "signature", "forged_claims", "foreign_key", "alg_none"])
def test_tampered_token_returns_unauthenticated(auth_service, part):
    member = auth_service.new_tenant("tamper")
    assert member.call("WhoAmI", pb.WhoAmIRequest()).tenant == member.tenant
    header, payload, signature = member.token.split(".")
    if part == "payload":
        forged = ".".join((header, flip_char(payload), signature))
    elif part == "signature":
        forged = ".".join((header, payload, flip_char(signature)))
    elif part == "forged_claims":
        # A privilege escalation attempt: the same signature over admin claims.
        claims = claims_of(member.token)
        claims.update(sub="admin", role=pb.ROLE_ADMIN)
        forged = ".".join((header, b64url(json.dumps(claims).encode()), signature))
    elif part == "foreign_key":
        # Well-formed, right kid, but signed by a key the platform never had.
        forged = jwt.encode(claims_of(member.token), Ed25519PrivateKey.generate(), algorithm="EdDSA",
                            headers={"kid": jwt.get_unverified_header(member.token)["kid"]})
    else:
        forged = ".".join((b64url(b'{"alg":"none","typ":"JWT"}'), payload, ""))
    assert forged != member.token
    member.token = forged
    expect_error(Code.UNAUTHENTICATED, member.call, "WhoAmI", pb.WhoAmIRequest())
    expect_error(Code.UNAUTHENTICATED, member.call, "GetQuota", pb.GetQuotaRequest(tenant="admin"))


def test_wrong_audience_token_returns_unauthenticated(auth_service):
    member = auth_service.new_tenant("aud").login(audience="other")
    assert claims_of(member.token)["aud"] == "other"
    err = expect_error(Code.UNAUTHENTICATED, member.call, "WhoAmI", pb.WhoAmIRequest())
    assert "audience" in err.details()


def test_revoked_key_token_returns_unauthenticated_and_cannot_issue(auth_service):
    member = auth_service.new_tenant("revoke")
    other = auth_service.member_of(member.tenant)  # a second key of the same tenant
    assert member.call("WhoAmI", pb.WhoAmIRequest()).tenant == member.tenant

    revoked = auth_service.admin.call(
        "RevokeAccessKey", pb.RevokeAccessKeyRequest(tenant=member.tenant, access_key_id=member.access_key_id)
    ).access_key
    assert revoked.revoked and revoked.revoke_time.seconds > 0

    wait_until(lambda: unauthenticated_now(member), 2.0, what="revoked key's token refused")
    expect_error(Code.UNAUTHENTICATED, auth_service.stub.IssueToken,
                 pb.IssueTokenRequest(access_key_id=member.access_key_id, secret_key=member.secret_key))
    # Only that key is affected; revoking again is a no-op.
    assert other.call("WhoAmI", pb.WhoAmIRequest()).access_key_id == other.access_key_id
    again = other.call("RevokeAccessKey", pb.RevokeAccessKeyRequest(tenant=member.tenant,
                                                                     access_key_id=member.access_key_id))
    assert again.access_key.revoke_time == revoked.revoke_time
    keys = {k.access_key_id: k for k in other.call(
        "ListAccessKeys", pb.ListAccessKeysRequest(tenant=member.tenant)).access_keys}
    assert keys[member.access_key_id].revoked and not keys[other.access_key_id].revoked
    # The revocation is published to every verifier.
    call = auth_service.stub.WatchVerificationKeys(pb.WatchVerificationKeysRequest(), timeout=5)
    snapshot = next(call)
    call.cancel()
    assert member.access_key_id in snapshot.revoked_access_key_ids


def test_deleted_tenant_key_token_returns_unauthenticated(auth_service):
    member = auth_service.new_tenant("doomed")
    assert member.call("WhoAmI", pb.WhoAmIRequest()).tenant == member.tenant
    # A key created just before the delete is revoked too.
    late = auth_service.member_of(member.tenant)
    auth_service.admin.call("DeleteTenant", pb.DeleteTenantRequest(name=member.tenant))
    for client in (member, late):
        wait_until(lambda: unauthenticated_now(client), 2.0, what="deleted tenant's token refused")
        expect_error(Code.UNAUTHENTICATED, auth_service.stub.IssueToken,
                     pb.IssueTokenRequest(access_key_id=client.access_key_id, secret_key=client.secret_key))
    expect_error(Code.NOT_FOUND, auth_service.admin.call, "GetTenant", pb.GetTenantRequest(name=member.tenant))
    expect_error(Code.NOT_FOUND, auth_service.admin.call, "DeleteTenant", pb.DeleteTenantRequest(name=member.tenant))


@pytest.mark.parametrize("metadata", [
    (),
    (("authorization", "Bearer"),),
    (("authorization", "Bearer "),),
    (("authorization", "Basic dXNlcjpwYXNz"),),
    (("authorization", "Bearer not-a-jwt"),),
    (("authorization", "Bearer a.b.c"),),
    (("x-token", "Bearer whatever"),),
], ids=["missing", "bearer-only", "bearer-space", "basic", "garbage", "three-garbage-parts", "wrong-header"])
def test_missing_or_malformed_authorization_returns_unauthenticated(auth_service, metadata):
    expect_error(Code.UNAUTHENTICATED, auth_service.stub.WhoAmI, pb.WhoAmIRequest(), metadata=metadata, timeout=5)
    expect_error(Code.UNAUTHENTICATED, auth_service.stub.GetTenant, pb.GetTenantRequest(name="admin"),
                 metadata=metadata, timeout=5)


@pytest.mark.parametrize("rpc", sorted(set(ALL_RPCS) - PUBLIC_RPCS))
def test_every_non_public_rpc_without_token_returns_unauthenticated(auth_service, rpc):
    expect_error(Code.UNAUTHENTICATED, invoke, auth_service.stub, rpc, request_class(rpc)())


@pytest.mark.parametrize("ttl", [-1, 12 * 3600 + 1, 10**9])
def test_issue_token_ttl_out_of_range_returns_invalid_argument(auth_service, ttl):
    admin = auth_service.admin
    err = expect_error(Code.INVALID_ARGUMENT, auth_service.stub.IssueToken, pb.IssueTokenRequest(
        access_key_id=admin.access_key_id, secret_key=admin.secret_key, ttl_seconds=ttl))
    assert "ttl_seconds" in err.details()


def test_issue_token_ttl_at_maximum_is_accepted(auth_service):
    admin = auth_service.admin
    response = auth_service.stub.IssueToken(pb.IssueTokenRequest(
        access_key_id=admin.access_key_id, secret_key=admin.secret_key, ttl_seconds=12 * 3600))
    claims = claims_of(response.token)
    assert claims["exp"] - claims["iat"] == 12 * 3600


# --- secrets at rest --------------------------------------------------------------------

async def test_secret_keys_are_never_stored_in_plaintext(auth_service, etcd_server):
    member = auth_service.new_tenant("plain")
    more = [auth_service.member_of(member.tenant) for _ in range(2)]
    secrets_ = [auth_service.admin_secret, member.secret_key, *(c.secret_key for c in more)]
    key_ids = [member.access_key_id, *(c.access_key_id for c in more)]

    etcd = await Etcd.connect(etcd_server.endpoint)
    try:
        kvs, _, _ = await etcd.get_prefix("/cloudml/")
    finally:
        await etcd.close()
    assert kvs
    stored = [(kv.key.encode(), kv.value) for kv in kvs]
    for secret in secrets_:
        forms = {secret.encode(), base64.b64encode(secret.encode()), b64url(secret.encode()).encode(),
                 secret.encode().hex().encode()}
        for key, value in stored:
            for form in forms:
                assert form not in key and form not in value, f"a secret key is stored in plaintext under {key!r}"
    # The key records are there, with a salted hash instead.
    records = {kv.key.rsplit("/", 1)[-1]: json.loads(kv.value) for kv in kvs if kv.key.startswith("/cloudml/auth/keys/")}
    for key_id in key_ids:
        assert records[key_id]["secret_hash"] and records[key_id]["salt"]


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


# --- bad input ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Team-a", "TEAM", "-team", "team-", "a" * 64, "", "te_am", "te.am", "tëam", "a b"],
                         ids=["upper", "all-upper", "leading-dash", "trailing-dash", "64-chars", "empty",
                              "underscore", "dot", "non-ascii", "space"])
def test_create_tenant_invalid_name_returns_invalid_argument(auth_service, name):
    err = expect_error(Code.INVALID_ARGUMENT, auth_service.admin.call, "CreateTenant", pb.CreateTenantRequest(name=name))
    assert "name" in err.details()


def test_create_tenant_63_char_name_is_accepted_and_duplicate_returns_already_exists(auth_service):
    name = ("n" + random.randbytes(16).hex() + "x" * 63)[:63]
    created = auth_service.admin.call("CreateTenant", pb.CreateTenantRequest(name=name)).tenant
    assert created.name == name and created.create_time.seconds > 0
    expect_error(Code.ALREADY_EXISTS, auth_service.admin.call, "CreateTenant", pb.CreateTenantRequest(name=name))
    auth_service.admin.call("DeleteTenant", pb.DeleteTenantRequest(name=name))


@pytest.mark.parametrize("rpc,request_", [
    ("GetTenant", pb.GetTenantRequest(name="Bad")),
    ("DeleteTenant", pb.DeleteTenantRequest(name="-bad")),
    ("CreateAccessKey", pb.CreateAccessKeyRequest(tenant="BAD")),
    ("GetQuota", pb.GetQuotaRequest(tenant="")),
    ("ListReservations", pb.ListReservationsRequest(tenant="x" * 64)),
], ids=["get", "delete", "create-key", "get-quota", "list-reservations"])
def test_invalid_tenant_name_in_any_rpc_returns_invalid_argument(auth_service, rpc, request_):
    expect_error(Code.INVALID_ARGUMENT, auth_service.admin.call, rpc, request_)


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("kind", ["negative", "absurd"])
def test_set_quota_negative_or_absurd_returns_invalid_argument_naming_field(auth_service, field, kind):
    tenant = auth_service.new_tenant("badquota").tenant
    before = quota(auth_service.admin, tenant)
    value = -1 if kind == "negative" else BOUNDS[field] + 1
    limits = Resources(cpu_millis=1000, memory_bytes=2**30, train_jobs=1)
    setattr(limits, field, value)
    err = expect_error(Code.INVALID_ARGUMENT, auth_service.admin.call, "SetQuota",
                       pb.SetQuotaRequest(tenant=tenant, limits=limits))
    assert f"limits.{field}" in err.details()
    assert quota(auth_service.admin, tenant) == before


def test_set_quota_at_bounds_is_accepted(auth_service):
    tenant = auth_service.new_tenant("maxquota").tenant
    limits = Resources(**BOUNDS)
    response = auth_service.admin.call("SetQuota", pb.SetQuotaRequest(tenant=tenant, limits=limits))
    assert response.limits == limits and quota(auth_service.admin, tenant).limits == limits


@pytest.mark.parametrize("amounts,field", [
    ({"cpu_millis": -100}, "resources.cpu_millis"),
    ({"memory_bytes": 2**61}, "resources.memory_bytes"),
    ({"gpus": -1}, "resources.gpus"),
])
def test_reserve_negative_or_absurd_amount_returns_invalid_argument_naming_field(auth_service, amounts, field):
    member = auth_service.new_tenant("badres")
    err = expect_error(Code.INVALID_ARGUMENT, member.call, "Reserve", reserve_request(member.tenant, "job", **amounts))
    assert field in err.details()
    assert quota(auth_service.admin, member.tenant).usage == Resources()


@pytest.mark.parametrize("owner", ["", "has space", "x" * 254, "tab\tid", "ünï"], ids=["empty", "space", "254", "tab", "non-ascii"])
def test_reserve_invalid_owner_id_returns_invalid_argument(auth_service, owner):
    member = auth_service.new_tenant("badowner")
    err = expect_error(Code.INVALID_ARGUMENT, member.call, "Reserve", reserve_request(member.tenant, owner, cpu_millis=1))
    assert "owner_id" in err.details()


@pytest.mark.parametrize("request_", [
    pb.ListTenantsRequest(page_size=-1),
    pb.ListTenantsRequest(page_token="!!"),
    pb.ListTenantsRequest(page_token="QUJD"),  # base64 of "ABC", not a tenant name
    pb.ListTenantsRequest(page_token="not base64 at all"),
], ids=["negative-page-size", "garbage-page-token", "non-name-page-token", "spaces-page-token"])
def test_list_tenants_bad_paging_returns_invalid_argument(auth_service, request_):
    err = expect_error(Code.INVALID_ARGUMENT, auth_service.admin.call, "ListTenants", request_)
    assert "page_" in err.details()


def test_list_tenants_pages_through_every_tenant_once(auth_service):
    created = {auth_service.new_tenant("page").tenant for _ in range(5)}
    everything = auth_service.admin.call("ListTenants", pb.ListTenantsRequest(page_size=1000))
    assert not everything.next_page_token
    names, token, pages = [], "", 0
    while True:
        page = auth_service.admin.call("ListTenants", pb.ListTenantsRequest(page_size=3, page_token=token))
        assert len(page.tenants) <= 3
        names += [t.name for t in page.tenants]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert names == [t.name for t in everything.tenants] == sorted(names)
    assert created <= set(names) and "admin" in names and pages > 1


# --- reservations ---------------------------------------------------------------------

def _tenant_with_room_for_ten(auth_service):
    member = auth_service.new_tenant("room")
    auth_service.admin.call("SetQuota", pb.SetQuotaRequest(tenant=member.tenant, limits=Resources(
        cpu_millis=10 * 100, memory_bytes=2**30, gpus=0, train_jobs=100, model_replicas=100, studies=100)))
    return member


def test_fifty_parallel_reserves_against_room_for_ten_exactly_ten_succeed(auth_service):
    member = _tenant_with_room_for_ten(auth_service)
    one = dict(cpu_millis=100, memory_bytes=2**20, train_jobs=1)
    futures = {
        f"jobs/train/j{i:02d}": member.stub.Reserve.future(
            reserve_request(member.tenant, f"jobs/train/j{i:02d}", **one), metadata=member.md, timeout=30)
        for i in range(50)
    }
    won, busy = [], []
    for owner, future in futures.items():
        err = future.exception()
        if err is None:
            response = future.result()
            assert response.created and response.reservation.owner_id == owner
            won.append(owner)
        else:
            assert err.code() == Code.FAILED_PRECONDITION, f"{err.code().name}: {err.details()}"
            assert trailers(err).get("cloudml-retry") == "quota"
            assert "cpu" in err.details()
            busy.append(owner)
    assert len(won) == 10 and len(busy) == 40

    q = quota(auth_service.admin, member.tenant)
    assert q.usage == Resources(cpu_millis=1000, memory_bytes=10 * 2**20, train_jobs=10)
    reservations = member.call("ListReservations", pb.ListReservationsRequest(tenant=member.tenant)).reservations
    assert sorted(r.owner_id for r in reservations) == sorted(won)
    for field in FIELDS:
        assert getattr(q.usage, field) == sum(getattr(r.resources, field) for r in reservations)

    # Full now: one more is a "queue and retry" answer, not an error.
    err = expect_error(Code.FAILED_PRECONDITION, member.call, "Reserve", reserve_request(member.tenant, "late", **one))
    assert trailers(err).get("cloudml-retry") == "quota"

    releases = [member.stub.Release.future(pb.ReleaseRequest(tenant=member.tenant, owner_id=o),
                                           metadata=member.md, timeout=30) for o in won]
    assert all(f.result().released for f in releases)
    assert quota(auth_service.admin, member.tenant).usage == Resources()
    assert not member.call("ListReservations", pb.ListReservationsRequest(tenant=member.tenant)).reservations
    # After a release the queued request fits.
    assert member.call("Reserve", reserve_request(member.tenant, "late", **one)).created


def test_fifty_parallel_reserves_across_two_auth_processes_exactly_ten_succeed(etcd_space, auth_launcher):
    """Two auth processes on one etcd: only the etcd transaction (not a
    process-local lock) keeps them from overbooking."""
    first = auth_launcher.connect(auth_launcher.start(etcd_space))
    second = auth_launcher.connect(auth_launcher.start(etcd_space))
    member = _tenant_with_room_for_ten(first)
    stubs = [first.stub, second.stub]
    for stub in stubs:  # warm both connections so that the burst really races
        assert stub.WhoAmI(pb.WhoAmIRequest(), metadata=member.md, timeout=10).tenant == member.tenant
    futures = [
        stubs[i % 2].Reserve.future(reserve_request(member.tenant, f"o{i}", cpu_millis=100), metadata=member.md, timeout=30)
        for i in range(50)
    ]
    outcomes = []
    for future in futures:
        err = future.exception()
        outcomes.append(Code.OK if err is None else err.code())
        if err is not None:
            assert err.code() == Code.FAILED_PRECONDITION and trailers(err).get("cloudml-retry") == "quota", \
                f"{err.code().name}: {err.details()}"
    assert outcomes.count(Code.OK) == 10
    won = {f"o{i}" for i, code in enumerate(outcomes) if code == Code.OK}
    for service in (first, second):
        q = quota(service.admin, member.tenant)
        assert q.usage.cpu_millis == 1000
        listed = service.admin.call("ListReservations", pb.ListReservationsRequest(tenant=member.tenant))
        assert {r.owner_id for r in listed.reservations} == won


@pytest.mark.parametrize("amounts,label", [
    ({"cpu_millis": 1001}, "cpu"),
    ({"memory_bytes": 2**30 + 1}, "memory"),
    ({"gpus": 1}, "gpus"),
    ({"cpu_millis": 100, "train_jobs": 101}, "train jobs"),
])
def test_reserve_larger_than_limit_returns_resource_exhausted_naming_resource(auth_service, amounts, label):
    member = _tenant_with_room_for_ten(auth_service)
    err = expect_error(Code.RESOURCE_EXHAUSTED, member.call, "Reserve", reserve_request(member.tenant, "huge", **amounts))
    assert label in err.details()
    assert "cloudml-retry" not in trailers(err)
    assert quota(auth_service.admin, member.tenant).usage == Resources()
    assert not member.call("ListReservations", pb.ListReservationsRequest(tenant=member.tenant)).reservations


def test_reserve_same_owner_twice_is_idempotent(auth_service):
    member = _tenant_with_room_for_ten(auth_service)
    request = reserve_request(member.tenant, "models/m/1/replica-0", cpu_millis=300, model_replicas=1)
    first = member.call("Reserve", request)
    second = member.call("Reserve", request)
    assert first.created and not second.created
    assert second.reservation == first.reservation
    assert quota(auth_service.admin, member.tenant).usage == Resources(cpu_millis=300, model_replicas=1)
    # Idempotent even when the quota is full now.
    member.call("Reserve", reserve_request(member.tenant, "filler", cpu_millis=700))
    assert not member.call("Reserve", request).created
    assert quota(auth_service.admin, member.tenant).usage == Resources(cpu_millis=1000, model_replicas=1)


def test_reserve_same_owner_different_amounts_returns_already_exists(auth_service):
    member = _tenant_with_room_for_ten(auth_service)
    member.call("Reserve", reserve_request(member.tenant, "job", cpu_millis=100))
    err = expect_error(Code.ALREADY_EXISTS, member.call, "Reserve", reserve_request(member.tenant, "job", cpu_millis=200))
    assert "job" in err.details()
    assert quota(auth_service.admin, member.tenant).usage == Resources(cpu_millis=100)


def test_release_unknown_owner_reports_not_released(auth_service):
    member = _tenant_with_room_for_ten(auth_service)
    assert not member.call("Release", pb.ReleaseRequest(tenant=member.tenant, owner_id="never-reserved")).released
    member.call("Reserve", reserve_request(member.tenant, "job", cpu_millis=100))
    assert member.call("Release", pb.ReleaseRequest(tenant=member.tenant, owner_id="job")).released
    assert not member.call("Release", pb.ReleaseRequest(tenant=member.tenant, owner_id="job")).released
    assert quota(auth_service.admin, member.tenant).usage == Resources()


# --- who may release a reservation ------------------------------------------------------

def service_key(auth_service):
    """A logged-in client of a new admin-tenant key, like the platform services' key."""
    return auth_service.member_of("admin", description="platform services (test)")


def test_member_cannot_release_reservation_made_by_service_key(auth_service):
    member = auth_service.new_tenant("heldby")
    service = service_key(auth_service)
    auth_service.admin.call("SetQuota", pb.SetQuotaRequest(
        tenant=member.tenant, limits=Resources(cpu_millis=200, memory_bytes=2**30, train_jobs=5)))
    made = service.call("Reserve", reserve_request(member.tenant, "jobs/train/a", cpu_millis=200, train_jobs=1))
    assert made.created and made.reservation.creator_access_key_id == service.access_key_id
    before = quota(auth_service.admin, member.tenant).usage

    err = expect_error(Code.PERMISSION_DENIED, member.call, "Release",
                       pb.ReleaseRequest(tenant=member.tenant, owner_id="jobs/train/a"))
    assert "\n" not in err.details() and "only it or an admin may release it" in err.details()
    assert service.access_key_id not in err.details()
    assert quota(auth_service.admin, member.tenant).usage == before
    # The freed room was not handed out: a second 200m job still does not fit.
    expect_error(Code.FAILED_PRECONDITION, member.call, "Reserve",
                 reserve_request(member.tenant, "mine", cpu_millis=200))
    # Still there, and the member is not told which key made it.
    listed = member.call("ListReservations", pb.ListReservationsRequest(tenant=member.tenant)).reservations
    assert [(r.owner_id, r.creator_access_key_id) for r in listed] == [("jobs/train/a", "")]
    again = member.call("Reserve", reserve_request(member.tenant, "jobs/train/a", cpu_millis=200, train_jobs=1))
    assert not again.created and again.reservation.creator_access_key_id == ""
    admin_view = auth_service.admin.call("ListReservations", pb.ListReservationsRequest(tenant=member.tenant))
    assert [r.creator_access_key_id for r in admin_view.reservations] == [service.access_key_id]

    # The key that made it releases it.
    assert service.call("Release", pb.ReleaseRequest(tenant=member.tenant, owner_id="jobs/train/a")).released
    assert quota(auth_service.admin, member.tenant).usage == Resources()


def test_admin_may_release_reservation_made_by_another_key(auth_service):
    member = auth_service.new_tenant("adminrel")
    service = service_key(auth_service)
    service.call("Reserve", reserve_request(member.tenant, "models/m/1/replica-0", cpu_millis=100, model_replicas=1))
    mine = member.call("Reserve", reserve_request(member.tenant, "mine", cpu_millis=50))
    assert mine.reservation.creator_access_key_id == member.access_key_id
    for owner in ("models/m/1/replica-0", "mine"):
        assert auth_service.admin.call("Release", pb.ReleaseRequest(tenant=member.tenant, owner_id=owner)).released
    assert quota(auth_service.admin, member.tenant).usage == Resources()


def test_member_may_release_its_own_reservation_but_not_another_keys(auth_service):
    member = auth_service.new_tenant("ownrel")
    other_key = auth_service.member_of(member.tenant)
    member.call("Reserve", reserve_request(member.tenant, "mine", cpu_millis=300, studies=1))
    expect_error(Code.PERMISSION_DENIED, other_key.call, "Release",
                 pb.ReleaseRequest(tenant=member.tenant, owner_id="mine"))
    assert quota(auth_service.admin, member.tenant).usage == Resources(cpu_millis=300, studies=1)
    assert member.call("Release", pb.ReleaseRequest(tenant=member.tenant, owner_id="mine")).released
    assert quota(auth_service.admin, member.tenant).usage == Resources()
    # Idempotent as before: nothing left to release.
    assert not member.call("Release", pb.ReleaseRequest(tenant=member.tenant, owner_id="mine")).released


async def test_reservation_stored_without_creator_only_admin_may_release(auth_service, etcd_server):
    member = auth_service.new_tenant("legacy")
    held = Resources(cpu_millis=250, train_jobs=1)
    # As an older version stored it: no creator recorded.
    old = pb.Reservation(tenant=member.tenant, owner_id="jobs/train/old", resources=held)
    etcd = await Etcd.connect(etcd_server.endpoint)
    try:
        await etcd.put(f"/cloudml/auth/reservations/{member.tenant}/jobs/train/old", old.SerializeToString())
        await etcd.put(f"/cloudml/auth/usage/{member.tenant}", held.SerializeToString())
    finally:
        await etcd.close()
    expect_error(Code.PERMISSION_DENIED, member.call, "Release",
                 pb.ReleaseRequest(tenant=member.tenant, owner_id="jobs/train/old"))
    assert quota(auth_service.admin, member.tenant).usage == held
    assert auth_service.admin.call(
        "Release", pb.ReleaseRequest(tenant=member.tenant, owner_id="jobs/train/old")).released
    assert quota(auth_service.admin, member.tenant).usage == Resources()


def test_delete_tenant_holding_reservations_returns_failed_precondition(auth_service):
    member = _tenant_with_room_for_ten(auth_service)
    member.call("Reserve", reserve_request(member.tenant, "job", cpu_millis=100))
    expect_error(Code.FAILED_PRECONDITION, auth_service.admin.call, "DeleteTenant",
                 pb.DeleteTenantRequest(name=member.tenant))
    expect_error(Code.FAILED_PRECONDITION, auth_service.admin.call, "DeleteTenant", pb.DeleteTenantRequest(name="admin"))
    member.call("Release", pb.ReleaseRequest(tenant=member.tenant, owner_id="job"))
    auth_service.admin.call("DeleteTenant", pb.DeleteTenantRequest(name=member.tenant))


def test_lowering_limit_below_usage_keeps_reservations_and_refuses_new_ones(auth_service):
    member = _tenant_with_room_for_ten(auth_service)
    member.call("Reserve", reserve_request(member.tenant, "job", cpu_millis=500))
    auth_service.admin.call("SetQuota", pb.SetQuotaRequest(tenant=member.tenant, limits=Resources(cpu_millis=600)))
    q = quota(auth_service.admin, member.tenant)
    assert q.usage.cpu_millis == 500 and q.limits.cpu_millis == 600
    err = expect_error(Code.FAILED_PRECONDITION, member.call, "Reserve", reserve_request(member.tenant, "j2", cpu_millis=200))
    assert trailers(err).get("cloudml-retry") == "quota"
    assert member.call("Release", pb.ReleaseRequest(tenant=member.tenant, owner_id="job")).released


# --- failures: kill -9, etcd restarts ---------------------------------------------------

def test_kill_9_during_reservation_burst_loses_nothing_acknowledged(etcd_space, auth_launcher):
    service = auth_launcher.connect(auth_launcher.start(etcd_space))
    # Several tenants, so that several quota transactions are in flight at
    # the kill (each process serializes one tenant's reservations).
    members = [service.new_tenant("burst") for _ in range(3)]
    for member in members:
        service.admin.call("SetQuota", pb.SetQuotaRequest(tenant=member.tenant, limits=Resources(
            cpu_millis=10**8, memory_bytes=2**50, train_jobs=10**6, model_replicas=10**6, studies=10**6)))

    # (tenant, owner) -> (state, amounts); state is "reserved" (acknowledged,
    # no release tried), "released" (release acknowledged) or "unknown" (a
    # call on it got no answer).
    ledger: dict[tuple[str, str], tuple[str, Resources]] = {}
    acked = [0]
    errors_seen: list[grpc.RpcError] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        member = members[n % len(members)]
        rng = random.Random(n)
        for i in range(10**6):
            owner = f"jobs/w{n}/o{i}"
            amounts = Resources(cpu_millis=rng.randint(1, 500), memory_bytes=rng.randint(1, 2**30),
                                train_jobs=1, studies=rng.randint(0, 2))
            entry = (member.tenant, owner)
            try:
                ledger[entry] = ("unknown", amounts)
                response = member.call("Reserve", pb.ReserveRequest(
                    tenant=member.tenant, owner_id=owner, resources=amounts), timeout=10)
                assert response.created
                ledger[entry] = ("reserved", amounts)
                if rng.random() < 0.5:
                    ledger[entry] = ("unknown", amounts)
                    assert member.call("Release", pb.ReleaseRequest(tenant=member.tenant, owner_id=owner),
                                       timeout=10).released
                    ledger[entry] = ("released", amounts)
            except grpc.RpcError as err:
                with lock:
                    errors_seen.append(err)
                return
            with lock:
                acked[0] += 1

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(9)]
    for t in threads:
        t.start()
    wait_until(lambda: acked[0] >= 200, 20, what="a burst of acknowledged reservations")
    first = service.process
    first.kill()  # SIGKILL, mid-burst
    for t in threads:
        t.join(20)
        assert not t.is_alive()
    assert len(errors_seen) == len(threads)  # every worker was still calling when it died
    assert {e.code() for e in errors_seen} <= {Code.UNAVAILABLE}, [(e.code(), e.details()) for e in errors_seen]

    restarted = auth_launcher.connect(auth_launcher.start(etcd_space))
    assert restarted.process.process.pid != first.process.pid
    # The signing key lives in etcd: a token issued before the crash still works.
    members[0].stub = restarted.stub
    assert members[0].call("WhoAmI", pb.WhoAmIRequest()).tenant == members[0].tenant

    states = {state for state, _ in ledger.values()}
    assert {"reserved", "released"} <= states
    for member in members:
        tenant = member.tenant
        q = quota(restarted.admin, tenant)
        listed = restarted.admin.call("ListReservations", pb.ListReservationsRequest(tenant=tenant)).reservations
        present = {r.owner_id: r.resources for r in listed}
        for field in FIELDS:
            used = getattr(q.usage, field)
            assert used >= 0, f"usage of {field} is negative"
            assert used == sum(getattr(r, field) for r in present.values()), \
                f"{tenant}: usage of {field} {used} != sum of its reservations"
        for (owner_tenant, owner), (state, amounts) in ledger.items():
            if owner_tenant != tenant:
                continue
            if state == "reserved":
                assert present.get(owner) == amounts, f"acknowledged reservation {owner} lost"
            elif state == "released":
                assert owner not in present, f"acknowledged release of {owner} undone"
            elif owner in present:
                assert present[owner] == amounts
        assert {(tenant, o) for o in present} <= set(ledger), "a reservation nobody asked for"

        # Nothing leaked: releasing everything brings usage back to zero.
        for owner in present:
            assert restarted.admin.call("Release", pb.ReleaseRequest(tenant=tenant, owner_id=owner)).released
        assert quota(restarted.admin, tenant).usage == Resources()


def test_etcd_restart_under_load_goes_not_serving_and_recovers_without_restart(own_etcd, auth_launcher):
    service = auth_launcher.connect(auth_launcher.start(own_etcd.endpoint))
    member = service.new_tenant("etcdgone")
    pid = service.process.process.pid
    endpoint = own_etcd.endpoint

    results: list[tuple[str, grpc.StatusCode]] = []  # (phase, code) of each GetQuota
    phase = ["up"]
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            current = phase[0]
            try:
                member.call("GetQuota", pb.GetQuotaRequest(tenant=member.tenant), timeout=4)
                code = Code.OK
            except grpc.RpcError as err:
                code = err.code()
            results.append((current, code))
            time.sleep(0.01)

    def seen(wanted_phase, wanted_code) -> bool:
        return any(p == wanted_phase and c == wanted_code for p, c in list(results))

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        wait_until(lambda: seen("up", Code.OK), 5, what="GetQuota OK before the outage")

        own_etcd.stop()
        phase[0] = "down"
        wait_until(lambda: health_status(service.address) == NOT_SERVING, 5, what="health NOT_SERVING")
        wait_until(lambda: seen("down", Code.UNAVAILABLE), 5, what="GetQuota UNAVAILABLE while etcd is down")
        assert health_status(service.address, service="cloudml.auth.v1.AuthService") == NOT_SERVING

        own_etcd.start()
        assert own_etcd.endpoint == endpoint  # same ports, same data dir
        phase[0] = "back"
        wait_until(lambda: health_status(service.address) == SERVING, 15, interval=0.1, what="health SERVING again")
        wait_until(lambda: seen("back", Code.OK), 5, what="GetQuota OK after etcd came back")
    finally:
        stop.set()
        loader.join(10)

    assert service.process.alive() and service.process.process.pid == pid  # recovered without a restart
    unexpected = [(p, c.name) for p, c in results if c not in (Code.OK, Code.UNAVAILABLE)]
    assert not unexpected, unexpected
    # Writes work again, on state that survived the restart.
    assert member.call("Reserve", reserve_request(member.tenant, "after", cpu_millis=100)).created
    assert quota(service.admin, member.tenant).usage.cpu_millis == 100


def test_health_not_serving_until_etcd_reachable(tmp_path, auth_launcher):
    client_port = free_port()
    peer_port = free_port()
    while peer_port == client_port:
        peer_port = free_port()
    endpoint = f"127.0.0.1:{client_port}"
    process = auth_launcher.start(endpoint, wait=False)  # nothing listens there yet

    def address():
        ports = read_port_file(process.port_file)
        return ports["address"] if ports and ports.get("pid") == process.process.pid else ""

    addr = process.address = wait_until(address, 15, what="auth's port file")
    for _ in range(5):
        assert health_status(addr) == NOT_SERVING
        assert health_status(addr, service="cloudml.auth.v1.AuthService") == NOT_SERVING
        time.sleep(0.1)
    expect_error(Code.UNAVAILABLE, auth_launcher.connect, process)  # IssueToken needs etcd

    etcd = EtcdProcess(str(tmp_path / "etcd"), client_port=client_port, peer_port=peer_port)
    try:
        etcd.start()
        assert etcd.endpoint == endpoint
        process.wait_serving(20)
        assert process.address == addr and health_status(addr) == SERVING
        service = auth_launcher.connect(process)
        assert service.admin.call("WhoAmI", pb.WhoAmIRequest()).role == pb.ROLE_ADMIN
    finally:
        etcd.stop()


async def test_auth_store_under_its_own_root_reserves_and_releases_atomically(etcd_endpoint, etcd_prefix):
    from services.auth.store import AuthStore

    etcd = await Etcd.connect(etcd_endpoint)
    try:
        store = AuthStore(etcd, etcd_prefix + "auth")
        tenant = pb.Tenant(name="team-a")
        assert await store.create_tenant(tenant, Resources(cpu_millis=1000))
        assert not await store.create_tenant(tenant, Resources(cpu_millis=1))
        snap = await store.quota_snapshot("team-a", "job-1")
        assert snap.limits.cpu_millis == 1000 and snap.reservation is None
        reservation = pb.Reservation(tenant="team-a", owner_id="job-1", resources=Resources(cpu_millis=300))
        assert await store.commit_reservation(snap, reservation, Resources(cpu_millis=300))
        assert not await store.commit_reservation(snap, reservation, Resources(cpu_millis=300))  # stale snapshot
        limits, usage = await store.quota_and_usage("team-a")
        assert (limits.cpu_millis, usage.cpu_millis) == (1000, 300)
        assert await store.count_reservations("team-a") == 1
        snap = await store.quota_snapshot("team-a", "job-1", with_limits=False)
        assert snap.limits is None and snap.reservation == reservation
        assert await store.commit_release("team-a", "job-1", snap, Resources())
        assert await store.list_reservations("team-a") == []
        kvs, _, _ = await etcd.get_prefix(etcd_prefix)
        assert kvs and all(kv.key.startswith(etcd_prefix + "auth/") for kv in kvs)
    finally:
        await etcd.close()
