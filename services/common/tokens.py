"""Bearer tokens: EdDSA-signed JWTs issued by the auth service and verified
locally by every service (no call to the auth service per request).

A verifier holds the public keys and the revoked access-key ids that the auth
service streams (`WatchVerificationKeys`). Verified tokens are cached until
they expire, so a repeated token costs a dict lookup plus the revocation check
rather than an Ed25519 verification.
"""
from __future__ import annotations

import contextvars
import secrets
import time
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from services.common import errors

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
        keys = {kid: load_pem_public_key(pem.encode()) for kid, pem in public_keys.items()}
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
            return jwt.get_unverified_header(token).get("kid", "")
        except jwt.PyJWTError:
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
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise errors.Unauthenticated("malformed bearer token") from None
        key = self._keys.get(header.get("kid", ""))
        if key is None:
            raise errors.Unauthenticated("token signed by an unknown key")
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=["EdDSA"],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "iat", "sub", "aud", "iss"]},
            )
        except jwt.ExpiredSignatureError:
            raise errors.Unauthenticated("token expired; get a new one") from None
        except jwt.InvalidAudienceError:
            raise errors.Unauthenticated("token is not meant for this platform (audience)") from None
        except jwt.PyJWTError as err:
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
