"""Bearer tokens: EdDSA-signed JWTs issued by the auth service and verified
locally by every service (no call to the auth service per request).

A verifier holds the public keys and the revoked access-key ids that the auth
service streams (`WatchVerificationKeys`). Verified tokens are cached until
they expire, so a repeated token costs a dict lookup plus the revocation check
rather than an Ed25519 verification.

Tokens are decoded here (`decode`) rather than by PyJWT, which imports
`cryptography` (~8 MB per process; see `ed25519.py`). The checks are PyJWT's
for the options the verifier used: compact JWS with three base64url parts,
`alg` EdDSA only (no `none`, no HMAC, no `crit` extensions), the signature
first, then the required claims, `iat` and `nbf` not in the future, `exp` in
the future, issuer, audience, and `sub` and `jti` strings. The auth service
still signs with PyJWT; a test checks the two agree.
"""
from __future__ import annotations

import base64
import binascii
import contextvars
import json
import re
import secrets
import time
from dataclasses import dataclass

from services.common import errors
from services.common.ed25519 import PublicKey

ISSUER = "cloudml-auth"
AUDIENCE = "cloudml"
ADMIN_TENANT = "admin"

# Role values match cloudml.auth.v1.Role.
ROLE_MEMBER = 1
ROLE_ADMIN = 2


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as proven by a verified token."""

    tenant: str
    role: int
    access_key_id: str
    expires_at: float

    @property
    def is_admin(self) -> bool:
        return self.role == ROLE_ADMIN

    def may_access(self, tenant: str) -> bool:
        return self.is_admin or tenant == self.tenant


# The principal of the RPC being handled; set by the auth interceptor.
current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "current_principal", default=None
)


def principal() -> Principal:
    """The caller of the current RPC (the auth interceptor guarantees one)."""
    found = current_principal.get()
    if found is None:
        raise errors.Unauthenticated("missing bearer token")
    return found


class TokenVerifier:
    _CACHE_LIMIT = 50_000

    def __init__(self, issuer: str = ISSUER, audience: str = AUDIENCE):
        self.issuer = issuer
        self.audience = audience
        self._keys: dict[str, object] = {}
        self._revoked: frozenset[str] = frozenset()
        self._cache: dict[str, Principal] = {}
        self.loaded = False
        #: called after every update (the gateway's data plane drops its cached decisions)
        self.listeners: list = []

    def update(self, public_keys: dict[str, str], revoked_access_key_ids: set[str] | frozenset[str]) -> None:
        """Replaces the key set (kid -> PEM) and the revocation list."""
        keys = {kid: PublicKey.from_pem(pem) for kid, pem in public_keys.items()}
        self._keys = keys
        self._revoked = frozenset(revoked_access_key_ids)
        # Tokens signed by a retired key must verify again (and fail).
        self._cache = {t: p for t, p in self._cache.items() if self._kid_of(t) in keys}
        self.loaded = True
        for listener in self.listeners:
            listener()

    @staticmethod
    def _kid_of(token: str) -> str:
        try:
            return _parts(token)[0].get("kid", "")
        except InvalidToken:
            return ""

    def verify(self, token: str) -> Principal:
        now = time.time()
        cached = self._cache.get(token)
        if cached is None:
            cached = self._verify_signature(token)
            if len(self._cache) >= self._CACHE_LIMIT:
                self._cache.clear()
            self._cache[token] = cached
        if cached.expires_at <= now:
            self._cache.pop(token, None)
            raise errors.Unauthenticated("token expired; get a new one")
        if cached.access_key_id in self._revoked:
            raise errors.Unauthenticated("token's access key was revoked")
        return cached

    def _verify_signature(self, token: str) -> Principal:
        try:
            header = _parts(token)[0]
        except InvalidToken:
            raise errors.Unauthenticated("malformed bearer token") from None
        key = self._keys.get(header.get("kid", ""))
        if key is None:
            raise errors.Unauthenticated("token signed by an unknown key")
        try:
            claims = decode(token, key, audience=self.audience, issuer=self.issuer)
        except ExpiredToken:
            raise errors.Unauthenticated("token expired; get a new one") from None
        except WrongAudience:
            raise errors.Unauthenticated("token is not meant for this platform (audience)") from None
        except InvalidToken as err:
            raise errors.Unauthenticated(f"invalid token: {err}") from None
        try:
            return Principal(
                tenant=str(claims["sub"]),
                role=int(claims.get("role", ROLE_MEMBER)),
                access_key_id=str(claims.get("akid", "")),
                expires_at=float(claims["exp"]),
            )
        except (KeyError, TypeError, ValueError):
            raise errors.Unauthenticated("invalid token claims") from None


# --- the JWT itself ---------------------------------------------------------------------------

MAX_TOKEN_CHARS = 16 * 1024
REQUIRED_CLAIMS = ("exp", "iat", "sub", "aud", "iss")
_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")


class InvalidToken(Exception):
    """The token is not one this platform accepts (the message says why)."""


class ExpiredToken(InvalidToken):
    pass


class WrongAudience(InvalidToken):
    pass


def _segment(text: str) -> bytes:
    if not _SEGMENT.fullmatch(text) or len(text) % 4 == 1:
        raise InvalidToken("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidToken("not base64url") from None


def _json_object(raw: bytes, what: str) -> dict:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidToken(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise InvalidToken(f"{what} is not a JSON object")
    return value


def _parts(token: str) -> tuple[dict, str, bytes]:
    """The header, the signed text and the signature of a compact JWS,
    nothing verified yet."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        raise InvalidToken("not a token")
    pieces = token.split(".")
    if len(pieces) != 3:
        raise InvalidToken("not three parts")
    header = _json_object(_segment(pieces[0]), "header")
    return header, f"{pieces[0]}.{pieces[1]}", _segment(pieces[2])


def _number(claims: dict, name: str) -> int:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidToken(f"{name} is not a number")
    try:
        return int(value)
    except (ValueError, OverflowError):
        raise InvalidToken(f"{name} is not a number") from None


def decode(token: str, key: PublicKey, audience: str, issuer: str, now: float | None = None) -> dict:
    """The claims of an EdDSA JWT signed by `key`, checked; InvalidToken
    (ExpiredToken, WrongAudience) otherwise."""
    header, signed, signature = _parts(token)
    if header.get("alg") != "EdDSA":
        raise InvalidToken("the algorithm is not EdDSA")
    if "crit" in header:
        raise InvalidToken("unsupported critical header parameters")
    if not key.verify(signature, signed.encode("ascii")):
        raise InvalidToken("Signature verification failed")
    claims = _json_object(_segment(signed.partition(".")[2]), "payload")
    for name in REQUIRED_CLAIMS:
        if claims.get(name) is None:
            raise InvalidToken(f'Token is missing the "{name}" claim')
    now = time.time() if now is None else now
    if _number(claims, "iat") > now:
        raise InvalidToken("The token is not yet valid (iat)")
    if "nbf" in claims and _number(claims, "nbf") > now:
        raise InvalidToken("The token is not yet valid (nbf)")
    if _number(claims, "exp") <= now:
        raise ExpiredToken("Signature has expired")
    if claims["iss"] != issuer:
        raise InvalidToken("Invalid issuer")
    aud = claims["aud"]
    if isinstance(aud, str):
        aud = [aud]
    if not isinstance(aud, list) or not all(isinstance(a, str) for a in aud):
        raise InvalidToken("Invalid claim format in token")
    if audience not in aud:
        raise WrongAudience("Audience doesn't match")
    if not isinstance(claims["sub"], str):
        raise InvalidToken("Subject must be a string")
    if "jti" in claims and not isinstance(claims["jti"], str):
        raise InvalidToken("JWT ID must be a string")
    return claims


def bearer_from_metadata(metadata) -> str | None:
    """The token of an `authorization: Bearer <token>` metadata entry."""
    for key, value in metadata or ():
        if key == "authorization":
            if isinstance(value, bytes):
                value = value.decode()
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token:
                return token.strip()
            return None
    return None


def new_secret_key() -> str:
    """A new access key's secret: 40 URL-safe characters that never begin with
    '-', so `cloudml configure --secret-key SECRET` is never read as an option."""
    while True:
        secret = secrets.token_urlsafe(30)
        if not secret.startswith("-"):
            return secret
