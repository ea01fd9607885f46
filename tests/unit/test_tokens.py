"""TokenVerifier: signature, expiry, audience, issuer, revocation, key rotation."""
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.common import errors
from services.common.tokens import ROLE_ADMIN, TokenVerifier, bearer_from_metadata


def _pem(key):
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.fixture
def key():
    return Ed25519PrivateKey.generate()


@pytest.fixture
def verifier(key):
    v = TokenVerifier()
    v.update({"k1": _pem(key)}, set())
    return v


def _token(key, kid="k1", **claims):
    now = int(time.time())
    body = {"iss": "cloudml-auth", "aud": "cloudml", "sub": "team-a", "role": 1, "akid": "AK1",
            "iat": now, "exp": now + 60}
    body.update(claims)
    return jwt.encode(body, key, algorithm="EdDSA", headers={"kid": kid})


def test_valid_token_gives_principal(verifier, key):
    p = verifier.verify(_token(key, role=ROLE_ADMIN, sub="admin"))
    assert p.tenant == "admin" and p.is_admin and p.access_key_id == "AK1"
    assert p.may_access("anyone")


def test_member_may_access_only_own_tenant(verifier, key):
    p = verifier.verify(_token(key))
    assert p.may_access("team-a") and not p.may_access("team-b")


@pytest.mark.parametrize("claims, message", [
    ({"exp": int(time.time()) - 5}, "expired"),
    ({"aud": "other"}, "audience"),
    ({"iss": "someone-else"}, "invalid token"),
])
def test_bad_claims_are_unauthenticated(verifier, key, claims, message):
    with pytest.raises(errors.Unauthenticated, match=message):
        verifier.verify(_token(key, **claims))


def test_tampered_payload_is_unauthenticated(verifier, key):
    header, payload, sig = _token(key).split(".")
    other = _token(key, sub="team-b").split(".")[1]
    with pytest.raises(errors.Unauthenticated):
        verifier.verify(".".join([header, other, sig]))


def test_token_from_another_key_is_unauthenticated(verifier):
    with pytest.raises(errors.Unauthenticated, match="invalid token"):
        verifier.verify(_token(Ed25519PrivateKey.generate()))
    with pytest.raises(errors.Unauthenticated, match="unknown key"):
        verifier.verify(_token(Ed25519PrivateKey.generate(), kid="k9"))


def test_revocation_applies_to_cached_tokens(verifier, key):
    token = _token(key)
    verifier.verify(token)  # cached now
    verifier.update({"k1": _pem(key)}, {"AK1"})
    with pytest.raises(errors.Unauthenticated, match="revoked"):
        verifier.verify(token)


def test_cached_token_expires(verifier, key):
    token = _token(key, exp=int(time.time()) + 1)
    verifier.verify(token)
    time.sleep(1.2)
    with pytest.raises(errors.Unauthenticated, match="expired"):
        verifier.verify(token)


def test_retired_signing_key_stops_cached_tokens(verifier, key):
    token = _token(key)
    verifier.verify(token)
    verifier.update({"k2": _pem(Ed25519PrivateKey.generate())}, set())
    with pytest.raises(errors.Unauthenticated):
        verifier.verify(token)


@pytest.mark.parametrize("metadata, expected", [
    ((("authorization", "Bearer abc"),), "abc"),
    ((("authorization", "bearer abc"),), "abc"),
    ((("authorization", "Basic abc"),), None),
    ((("x", "y"),), None),
    ((), None),
])
def test_bearer_from_metadata(metadata, expected):
    assert bearer_from_metadata(metadata) == expected
