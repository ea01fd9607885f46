"""The auth service as a real process against a real etcd, called through sync
gRPC stubs: the token lifecycle (issue, expiry, tampering, audience,
revocation, deleted tenants, missing credentials, TTL bounds) and secrets at
rest.

The tests share the session's auth process (`auth_service`) and keep apart
with unique tenant names.
"""
from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloudml.auth.v1 import auth_service_pb2 as pb
from services.common.etcd import Etcd

from tests.integration.auth_helpers import (
    ALL_RPCS, PUBLIC_RPCS, Code, b64url, claims_of, expect_error, flip_char, invoke, request_class,
    unauthenticated_now, wait_until,
)


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
