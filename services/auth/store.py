"""The auth service's etcd layout (everything under /cloudml/auth/).

    tenants/<tenant>                 cloudml.auth.v1.Tenant
    keys/<access key id>             services.auth.store.KeyRecord (JSON)
    signing/<kid>                    JSON {public_pem, created, private_key: {alg, kek_id, nonce, ciphertext}}
                                     (the private key sealed under the key-encryption key, which
                                     lives in a file outside etcd: services/auth/kek.py; an older
                                     version's plaintext `private_pem` is sealed on the next start)
    signing-initialized              the first signing key's id (only one first key, however many race)
    quotas/<tenant>                  cloudml.common.v1.Resources (limits)
    usage/<tenant>                   cloudml.common.v1.Resources (sum of reservations)
    reservations/<tenant>/<owner>    cloudml.auth.v1.Reservation

A reservation records the access key that made it (`creator_access_key_id`);
only that key or an admin may release it.

Usage and reservations change together in one transaction, so usage always
equals the sum of the live reservations, whatever process dies when.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

PREFIX = "/cloudml/auth/"
TENANTS = PREFIX + "tenants/"
KEYS = PREFIX + "keys/"
SIGNING = PREFIX + "signing/"
QUOTAS = PREFIX + "quotas/"
USAGE = PREFIX + "usage/"
RESERVATIONS = PREFIX + "reservations/"
ELECTION = PREFIX + "election/"


def tenant_key(tenant: str) -> str:
    return TENANTS + tenant


def access_key_key(access_key_id: str) -> str:
    return KEYS + access_key_id


def signing_key(kid: str) -> str:
    return SIGNING + kid


def quota_key(tenant: str) -> str:
    return QUOTAS + tenant


def usage_key(tenant: str) -> str:
    return USAGE + tenant


def reservations_prefix(tenant: str) -> str:
    return f"{RESERVATIONS}{tenant}/"


def reservation_key(tenant: str, owner_id: str) -> str:
    return reservations_prefix(tenant) + owner_id


@dataclass
class KeyRecord:
    """An access key as stored: the secret only as a salted SHA-256 hash.

    Secrets are 240-bit random strings, so a fast hash is enough: there is
    nothing to brute-force, and IssueToken stays cheap.
    """

    access_key_id: str
    tenant: str
    salt: str
    secret_hash: str
    description: str = ""
    created: float = 0.0
    revoked: float = 0.0  # revocation time, 0 while valid

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "KeyRecord":
        return cls(**json.loads(raw))
