"""The auth service's etcd layout (everything under /cloudml/auth/).

    tenants/<tenant>                 cloudml.auth.v1.Tenant
    keys/<access key id>             services.auth.store.KeyRecord (JSON)
    signing/<kid>                    JSON {public_pem, created, private_key: {alg, kek_id, nonce, ciphertext}}
                                     (the private key sealed under the key-encryption key, which
                                     lives in a file outside etcd: services/auth/kek.py; an older
                                     version's plaintext `private_pem` is sealed on the next start)
    signing-initialized              the first signing key's id (only one first key, however many race)
    quota-counts-v2                  set once the quotas written before the dev-environment and
                                     TensorBoard counts existed were given the default counts
    quotas/<tenant>                  cloudml.common.v1.Resources (limits)
    usage/<tenant>                   cloudml.common.v1.Resources (sum of reservations)
    reservations/<tenant>/<owner>    cloudml.auth.v1.Reservation
    login/<sha256 of a code>         JSON {tenant, access_key_id, path, expires} of a one-time
                                     browser login link, under a lease of about a minute
                                     (services/auth/login.py)

A reservation records the access key that made it (`creator_access_key_id`);
only that key or an admin may release it.

Usage and reservations change together in one transaction, so usage always
equals the sum of the live reservations, whatever process dies when.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Callable

from cloudml.auth.v1 import auth_service_pb2 as pb
from cloudml.common.v1 import resources_pb2
from services.common.etcd import KV, Etcd, cmp_absent, cmp_mod_revision, op_delete, op_get, op_put

PREFIX = "/cloudml/auth/"


class AuthKeys:
    """The key builders of the layout above, under `root` (default
    /cloudml/auth/; tests give each their own root in one shared etcd)."""

    def __init__(self, root: str = PREFIX):
        self.root = root if root.endswith("/") else root + "/"
        self.tenants, self.keys, self.signing, self.quotas, self.usage, self.reservations, self.election = (
            self.root + folder for folder in
            ("tenants/", "keys/", "signing/", "quotas/", "usage/", "reservations/", "election/"))
        self.signing_initialized = self.root + "signing-initialized"
        self.quota_counts_migrated = self.root + "quota-counts-v2"
        self.login = self.root + "login/"

    def tenant(self, tenant: str) -> str:
        return self.tenants + tenant

    def access_key(self, access_key_id: str) -> str:
        return self.keys + access_key_id

    def signing_key(self, kid: str) -> str:
        return self.signing + kid

    def quota(self, tenant: str) -> str:
        return self.quotas + tenant

    def usage_of(self, tenant: str) -> str:
        return self.usage + tenant

    def reservations_of(self, tenant: str) -> str:
        return f"{self.reservations}{tenant}/"

    def reservation(self, tenant: str, owner_id: str) -> str:
        return self.reservations_of(tenant) + owner_id


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


def _resources(range_response) -> resources_pb2.Resources:
    kvs = range_response.response_range.kvs
    return resources_pb2.Resources.FromString(kvs[0].value) if kvs else resources_pb2.Resources()


def _revision(range_response) -> int:
    kvs = range_response.response_range.kvs
    return kvs[0].mod_revision if kvs else 0


@dataclass
class QuotaSnapshot:
    """A tenant's quota, usage and one owner's reservation, read in one transaction."""

    limits: resources_pb2.Resources | None  # None: no quota record (no such tenant)
    quota_revision: int
    usage: resources_pb2.Resources
    usage_revision: int
    reservation: pb.Reservation | None
    reservation_revision: int


class AuthStore:
    """Reads and compare-and-swap writes of the auth service's records
    (the layout above, under `root`)."""

    def __init__(self, etcd: Etcd, root: str = PREFIX):
        self.etcd = etcd
        self.keys = AuthKeys(root)

    async def delete(self, key: str) -> None:
        await self.etcd.delete(key)

    # --- signing keys -------------------------------------------------------------------

    async def signing_records(self) -> dict[str, dict]:
        """Every signing key record by key, decoded."""
        kvs, _, _ = await self.etcd.get_prefix(self.keys.signing)
        return {kv.key: json.loads(kv.value) for kv in kvs}

    async def create_first_signing_key(self, kid: str, record: dict) -> bool:
        """Writes the first signing key; only one call ever succeeds, however
        many processes race (the first to create the marker wins)."""
        marker = self.keys.signing_initialized
        ok, _ = await self.etcd.txn(
            [cmp_absent(marker)],
            [op_put(marker, kid.encode()), op_put(self.keys.signing_key(kid), json.dumps(record).encode())],
        )
        return ok

    async def create_signing_key(self, kid: str, record: dict) -> bool:
        return await self.etcd.create(self.keys.signing_key(kid), json.dumps(record).encode())

    async def update_signing_key(self, key: str, change: Callable[[KV | None], bytes | None]) -> None:
        """Compare-and-swap read-modify-write of one signing key record (`Etcd.update`)."""
        await self.etcd.update(key, change)

    # --- tenants ------------------------------------------------------------------------

    async def create_tenant(self, tenant: pb.Tenant, quota: resources_pb2.Resources) -> bool:
        """Writes a new tenant with its quota and zero usage; False if it exists."""
        keys, name = self.keys, tenant.name
        ok, _ = await self.etcd.txn(
            [cmp_absent(keys.tenant(name))],
            [op_put(keys.tenant(name), tenant.SerializeToString()),
             op_put(keys.quota(name), quota.SerializeToString()),
             op_put(keys.usage_of(name), resources_pb2.Resources().SerializeToString())],
        )
        return ok

    async def get_tenant(self, name: str) -> tuple[pb.Tenant, KV] | None:
        kv = await self.etcd.get(self.keys.tenant(name))
        return (pb.Tenant.FromString(kv.value), kv) if kv else None

    async def list_tenants(self, after: str, limit: int) -> tuple[list[pb.Tenant], bool]:
        """Up to `limit` tenants named after `after`; and whether more follow."""
        start = self.keys.tenant(after) + "\0" if after else None
        kvs, _, more = await self.etcd.get_prefix(self.keys.tenants, start=start, limit=limit)
        return [pb.Tenant.FromString(kv.value) for kv in kvs], more

    async def usage_revision(self, tenant: str) -> int:
        """The mod_revision of the tenant's usage record (0: none)."""
        kv = await self.etcd.get(self.keys.usage_of(tenant))
        return kv.mod_revision if kv else 0

    async def count_reservations(self, tenant: str) -> int:
        return await self.etcd.count_prefix(self.keys.reservations_of(tenant))

    async def delete_tenant(self, name: str, tenant_revision: int, usage_revision: int) -> bool:
        """Deletes the tenant, its quota and usage, only while the tenant and
        its usage are as read."""
        keys = self.keys
        ok, _ = await self.etcd.txn(
            [cmp_mod_revision(keys.tenant(name), tenant_revision),
             cmp_mod_revision(keys.usage_of(name), usage_revision)],
            [op_delete(keys.tenant(name)), op_delete(keys.quota(name)), op_delete(keys.usage_of(name))],
        )
        return ok

    # --- access keys --------------------------------------------------------------------

    async def create_access_key(self, record: KeyRecord, tenant_revision: int | None = None) -> bool:
        """Writes a new access key; with `tenant_revision`, only while its
        tenant is as read (a concurrent DeleteTenant must not leave a live key)."""
        key = self.keys.access_key(record.access_key_id)
        if tenant_revision is None:
            return await self.etcd.create(key, record.encode())
        ok, _ = await self.etcd.txn(
            [cmp_absent(key), cmp_mod_revision(self.keys.tenant(record.tenant), tenant_revision)],
            [op_put(key, record.encode())],
        )
        return ok

    async def get_access_key(self, access_key_id: str) -> KeyRecord | None:
        kv = await self.etcd.get(self.keys.access_key(access_key_id))
        return KeyRecord.decode(kv.value) if kv else None

    async def list_access_keys(self) -> list[KeyRecord]:
        kvs, _, _ = await self.etcd.get_prefix(self.keys.keys)
        return [KeyRecord.decode(kv.value) for kv in kvs]

    async def update_access_key(self, access_key_id: str, change: Callable[[KV | None], bytes | None]) -> None:
        """Compare-and-swap read-modify-write of one access key (`Etcd.update`)."""
        await self.etcd.update(self.keys.access_key(access_key_id), change)

    # --- quotas and reservations --------------------------------------------------------

    async def quota_and_usage(self, tenant: str) -> tuple[resources_pb2.Resources, resources_pb2.Resources]:
        """The tenant's limits and usage, read together (zero when absent)."""
        _, resp = await self.etcd.txn([], [op_get(self.keys.quota(tenant)), op_get(self.keys.usage_of(tenant))])
        limits, usage = (_resources(r) for r in resp.responses)
        return limits, usage

    async def add_missing_quota_counts(self, counts: resources_pb2.Resources) -> int:
        """Once per etcd: gives every quota written before the dev-environment
        and TensorBoard counts existed (both 0: proto3 cannot tell "unset"
        from 0, and no one could set them then) `counts`' values, so an
        upgrade takes nothing away from existing tenants. Returns how many
        quotas changed; later calls change nothing (the marker key)."""
        marker = self.keys.quota_counts_migrated
        if await self.etcd.get(marker) is not None:
            return 0
        kvs, _, _ = await self.etcd.get_prefix(self.keys.quotas)
        changed = 0
        for kv in kvs:
            limits = resources_pb2.Resources.FromString(kv.value)
            if limits.dev_environments or limits.tensorboards:
                continue
            limits.dev_environments, limits.tensorboards = counts.dev_environments, counts.tensorboards
            # Compare-and-swap: a quota set meanwhile (by an admin, with the counts) is left alone.
            ok, _ = await self.etcd.txn([cmp_mod_revision(kv.key, kv.mod_revision)],
                                        [op_put(kv.key, limits.SerializeToString())])
            changed += ok
        await self.etcd.put(marker, b"1")
        return changed

    async def put_quota(self, tenant: str, limits: resources_pb2.Resources) -> None:
        await self.etcd.put(self.keys.quota(tenant), limits.SerializeToString())

    async def quota_snapshot(self, tenant: str, owner_id: str, *, with_limits: bool = True) -> QuotaSnapshot:
        """The quota (unless not `with_limits`), usage and `owner_id`'s reservation, in one transaction."""
        keys = self.keys
        ops = [op_get(keys.usage_of(tenant)), op_get(keys.reservation(tenant, owner_id))]
        if with_limits:
            ops.insert(0, op_get(keys.quota(tenant)))
        _, resp = await self.etcd.txn([], ops)
        responses = list(resp.responses)
        quota_r = responses.pop(0) if with_limits else None
        usage_r, res_r = responses
        res_kvs = res_r.response_range.kvs
        return QuotaSnapshot(
            limits=_resources(quota_r) if quota_r is not None and quota_r.response_range.kvs else None,
            quota_revision=_revision(quota_r) if quota_r is not None else 0,
            usage=_resources(usage_r), usage_revision=_revision(usage_r),
            reservation=pb.Reservation.FromString(res_kvs[0].value) if res_kvs else None,
            reservation_revision=res_kvs[0].mod_revision if res_kvs else 0,
        )

    async def commit_reservation(self, snap: QuotaSnapshot, reservation: pb.Reservation,
                                 usage: resources_pb2.Resources) -> bool:
        """Writes the reservation and the new usage together, only while the
        usage and quota are as in `snap` and the reservation is absent."""
        keys, tenant = self.keys, reservation.tenant
        rkey, ukey = keys.reservation(tenant, reservation.owner_id), keys.usage_of(tenant)
        ok, _ = await self.etcd.txn(
            [cmp_mod_revision(ukey, snap.usage_revision), cmp_absent(rkey),
             cmp_mod_revision(keys.quota(tenant), snap.quota_revision)],
            [op_put(ukey, usage.SerializeToString()), op_put(rkey, reservation.SerializeToString())],
        )
        return ok

    async def commit_release(self, tenant: str, owner_id: str, snap: QuotaSnapshot,
                             usage: resources_pb2.Resources) -> bool:
        """Deletes `owner_id`'s reservation and writes the new usage together,
        only while both are as in `snap`."""
        rkey, ukey = self.keys.reservation(tenant, owner_id), self.keys.usage_of(tenant)
        ok, _ = await self.etcd.txn(
            [cmp_mod_revision(ukey, snap.usage_revision), cmp_mod_revision(rkey, snap.reservation_revision)],
            [op_put(ukey, usage.SerializeToString()), op_delete(rkey)],
        )
        return ok

    async def list_reservations(self, tenant: str) -> list[pb.Reservation]:
        kvs, _, _ = await self.etcd.get_prefix(self.keys.reservations_of(tenant))
        return [pb.Reservation.FromString(kv.value) for kv in kvs]
