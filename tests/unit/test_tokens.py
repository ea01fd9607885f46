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


# --- the decoder itself (services/common/tokens.py `decode`), as a forger would try it -----------

def _b64(data: bytes) -> str:
    import base64
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed(key, header: bytes, payload: bytes) -> str:
    """A compact JWS of exactly these header and payload bytes, signed by `key`."""
    signed = f"{_b64(header)}.{_b64(payload)}"
    return f"{signed}.{_b64(key.sign(signed.encode()))}"


def _claims(**changes):
    now = int(time.time())
    body = {"iss": "cloudml-auth", "aud": "cloudml", "sub": "team-a", "role": 1, "akid": "AK1",
            "iat": now, "exp": now + 60}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def _json(value) -> bytes:
    import json
    return json.dumps(value).encode()


def test_agrees_with_pyjwt_on_a_valid_token(verifier, key):
    token = _token(key, jti="abc", nbf=int(time.time()) - 1)
    pem = _pem(key)
    expected = jwt.decode(token, key=serialization.load_pem_public_key(pem.encode()), algorithms=["EdDSA"],
                          audience="cloudml", issuer="cloudml-auth")
    from services.common.ed25519 import PublicKey
    from services.common.tokens import decode
    assert decode(token, PublicKey.from_pem(pem), audience="cloudml", issuer="cloudml-auth") == expected


@pytest.mark.parametrize("header", [
    {"alg": "none", "kid": "k1"},
    {"alg": "HS256", "kid": "k1"},
    {"alg": "ES256", "kid": "k1"},
    {"kid": "k1"},
    {"alg": "EdDSA", "kid": "k1", "crit": ["exp"]},
])
def test_only_plain_eddsa_headers_are_accepted(verifier, key, header):
    with pytest.raises(errors.Unauthenticated, match="invalid token"):
        verifier.verify(_signed(key, _json(header), _json(_claims())))


def test_unsigned_and_hmac_forgeries_are_refused(verifier, key):
    import hashlib
    import hmac
    header, payload = _json({"alg": "none", "kid": "k1"}), _json(_claims(role=ROLE_ADMIN, sub="admin"))
    body = f"{_b64(header)}.{_b64(payload)}"
    with pytest.raises(errors.Unauthenticated):
        verifier.verify(body + ".")
    # HS256 keyed with the public key's PEM: the classic algorithm confusion
    header = _json({"alg": "HS256", "kid": "k1"})
    body = f"{_b64(header)}.{_b64(payload)}"
    mac = hmac.new(_pem(key).encode(), body.encode(), hashlib.sha256).digest()
    with pytest.raises(errors.Unauthenticated):
        verifier.verify(f"{body}.{_b64(mac)}")


@pytest.mark.parametrize("token", [
    "", "a", "a.b", "a.b.c.d", "..", "!!!.e30.AAAA", "e30.e30.e30", "e30.e30.A",
    "eyJhbGciOiJFZERTQSIsImtpZCI6ImsxIn0.e30." + "A" * 86 + "==",
])
def test_malformed_tokens_are_unauthenticated(verifier, token):
    with pytest.raises(errors.Unauthenticated):
        verifier.verify(token)


def test_oversize_token_is_refused_before_parsing(verifier, key):
    with pytest.raises(errors.Unauthenticated):
        verifier.verify(_signed(key, _json({"alg": "EdDSA", "kid": "k1"}), _json(_claims(pad="x" * 20_000))))


# Payloads are built in the test (their times change): ids stay the same in every worker.
_UNACCEPTABLE = [
    ("array", lambda: b"[1, 2]", "invalid token"),
    ("not-json", lambda: b"not json", "invalid token"),
    ("not-utf8", lambda: b"\xff\xfe", "invalid token"),
    *[(f"no-{name}", lambda name=name: _json(_claims(**{name: None})), f'missing the "{name}"')
      for name in ("exp", "iat", "sub", "aud", "iss")],
    ("iat-future", lambda: _json(_claims(iat=int(time.time()) + 3600)), "not yet valid"),
    ("nbf-future", lambda: _json(_claims(nbf=int(time.time()) + 3600)), "not yet valid"),
    ("exp-bool", lambda: _json(_claims(exp=True)), "invalid token"),
    ("exp-string", lambda: _json(_claims(exp="9999999999")), "invalid token"),
    ("iat-string", lambda: _json(_claims(iat="0")), "invalid token"),
    ("aud-others", lambda: _json(_claims(aud=["other", "else"])), "audience"),
    ("aud-number", lambda: _json(_claims(aud=[1])), "invalid token"),
    ("aud-object", lambda: _json(_claims(aud={"cloudml": 1})), "invalid token"),
    ("sub-number", lambda: _json(_claims(sub=7)), "invalid token"),
    ("jti-number", lambda: _json(_claims(jti=7)), "invalid token"),
    ("iss-list", lambda: _json(_claims(iss=["cloudml-auth"])), "invalid token"),
]


@pytest.mark.parametrize("make, message", [pytest.param(make, message, id=name) for name, make, message in _UNACCEPTABLE])
def test_signed_but_unacceptable_claims(verifier, key, make, message):
    with pytest.raises(errors.Unauthenticated, match=message):
        verifier.verify(_signed(key, _json({"alg": "EdDSA", "kid": "k1"}), make()))


def test_audience_list_naming_the_platform_is_accepted(verifier, key):
    token = _signed(key, _json({"alg": "EdDSA", "kid": "k1"}), _json(_claims(aud=["other", "cloudml"])))
    assert verifier.verify(token).tenant == "team-a"


def test_token_issued_by_the_auth_service_signer_verifies(verifier, key):
    """The auth service signs with PyJWT (services/auth/core.py): what it writes, the decoder reads."""
    token = jwt.encode(_claims(jti="0123456789abcdef"), key, algorithm="EdDSA", headers={"kid": "k1"})
    assert verifier.verify(token).access_key_id == "AK1"


def test_services_do_not_load_cryptography_pyjwt_or_numpy():
    """What every service but auth imports at start: token checks by libcrypto,
    TF Serving's JSON codec without numpy until a conversion needs it."""
    import subprocess
    import sys
    code = ("import sys\n"
            "import services.jobs.server, services.models.server, services.tuner.server, services.gateway.server\n"
            "from services.gateway import tfs_json\n"
            "tfs_json.model_status_to_json, tfs_json.model_metadata_to_json, tfs_json.signature_map_from_metadata\n"
            "print(sorted(m for m in ('cryptography', 'jwt', 'numpy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
