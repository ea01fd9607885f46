"""Auth domain logic: tenants, access keys, tokens, quotas and reservations.

No gRPC here: methods take plain values and a `Principal`, return protobuf
messages, and raise typed errors from `services.common.errors`.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from typing import AsyncIterator

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.timestamp_pb2 import Timestamp

from cloudml.auth.v1 import auth_service_pb2 as pb
from cloudml.common.v1 import resources_pb2
from services.auth import kek as kek_module
from services.auth import store
from services.auth.store import AuthStore, KeyRecord
from services.auth.kek import KeyEncryptionError, KeyEncryptionKey
from services.common import errors, validation
from services.common.etcd import KV, Etcd, Mirror
from services.common.tokens import ADMIN_TENANT, AUDIENCE, ISSUER, ROLE_ADMIN, ROLE_MEMBER, Principal, TokenVerifier, \
    new_secret_key

log = logging.getLogger(__name__)

RESOURCE_FIELDS = tuple(validation.RESOURCE_BOUNDS)

DEFAULT_TTL = 3600
MAX_TTL = 12 * 3600
# Tokens live at most MAX_TTL, so a key revoked longer ago than that can have
# no valid token left and drops off the revocation list.
REVOCATION_MEMORY = MAX_TTL + 300
# Likewise a signing key superseded longer ago than that signed no token that
# is still valid, so a rotation retires it.
SIGNING_KEY_MEMORY = MAX_TTL + 300

DEFAULT_QUOTA = resources_pb2.Resources(
    cpu_millis=4_000, memory_bytes=8 * 2**30, gpus=0, train_jobs=10, model_replicas=10, studies=5,
    dev_environments=2, tensorboards=5,
)
ADMIN_QUOTA = resources_pb2.Resources(
    cpu_millis=64_000, memory_bytes=256 * 2**30, gpus=8, train_jobs=100, model_replicas=100, studies=20,
    dev_environments=20, tensorboards=20,
)

UNITS = {"cpu_millis": "m", "memory_bytes": " bytes"}
LABELS = {
    "cpu_millis": "cpu", "memory_bytes": "memory", "gpus": "gpus", "train_jobs": "train jobs",
    "model_replicas": "model replicas", "studies": "studies",
    "dev_environments": "dev environments", "tensorboards": "TensorBoards",
}


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _hash_secret(salt: str, secret: str) -> str:
    return hashlib.sha256(f"{salt}:{secret}".encode()).hexdigest()


def new_access_key_id() -> str:
    return "AK" + base64.b32encode(secrets.token_bytes(15)).decode()[:20]


def _amount(field: str, value: int) -> str:
    return f"{value}{UNITS.get(field, '')}"


def _private_der(private: Ed25519PrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class AuthCore:
    def __init__(self, etcd: Etcd, verifier: TokenVerifier, key_encryption_key_file: str, clock=time.time,
                 store: AuthStore | None = None):
        self.store = store or AuthStore(etcd)
        self.keys = self.store.keys
        self.verifier = verifier
        self.clock = clock
        #: where the key-encryption key lives (outside etcd); loaded by start()
        self.key_encryption_key_file = key_encryption_key_file
        self._kek: KeyEncryptionKey | None = None
        self._signing_cache: tuple[str, Ed25519PrivateKey] | None = None
        self._signing: Mirror = Mirror(etcd, self.keys.signing, decode=lambda kv: json.loads(kv.value))
        self._keys: Mirror = Mirror(etcd, self.keys.keys, decode=lambda kv: KeyRecord.decode(kv.value))
        self._signing.listeners.append(self._keys_changed)
        self._keys.listeners.append(self._keys_changed)
        self._snapshot = pb.VerificationKeys(issuer=ISSUER, audience=AUDIENCE)
        self._changed = asyncio.Event()
        self._tenant_locks: dict[str, asyncio.Lock] = {}
        self._ready = False
        self._mirrors_loaded = False

    # --- start-up -------------------------------------------------------------------

    async def start(self, bootstrap_keys: list[dict]) -> None:
        """Creates what the first start needs (idempotent, safe with two auth
        processes racing), then loads the key mirrors.

        Raises `KeyEncryptionError` (fatal: do not retry) when the
        key-encryption key file is unusable or does not open the signing keys
        already in etcd."""
        await self._prepare_signing_keys()
        changed = await self.store.add_missing_quota_counts(DEFAULT_QUOTA)
        if changed:
            log.info("quota: %d tenant(s) from before dev environments and TensorBoards were counted got the "
                     "default counts (%d, %d)", changed, DEFAULT_QUOTA.dev_environments, DEFAULT_QUOTA.tensorboards)
        await self._ensure_tenant(ADMIN_TENANT, "The platform's own tenant", ADMIN_QUOTA)
        for entry in bootstrap_keys:
            await self._ensure_key(entry)
        self._signing.start()
        self._keys.start()
        await self._signing.wait_synced(10)
        await self._keys.wait_synced(10)
        # Publish only now: with just the signing keys loaded, the verifier
        # would accept tokens of revoked keys.
        self._mirrors_loaded = True
        self._keys_changed()
        self._ready = True

    def ready(self) -> bool:
        return self._ready

    async def stop(self) -> None:
        await self._signing.stop()
        await self._keys.stop()

    async def _prepare_signing_keys(self) -> None:
        """Loads the key-encryption key, checks that it opens every signing key
        in etcd, seals any plaintext private key an older version stored, and
        creates the first signing key if there is none."""
        records = await self.store.signing_records()
        sealed_by = sorted({r["private_key"].get("kek_id", "?") for r in records.values()
                            if isinstance(r.get("private_key"), dict)})
        path = self.key_encryption_key_file
        if sealed_by:
            # Never create a new KEK while etcd holds keys sealed with another:
            # the lost file must be restored, not silently replaced.
            try:
                self._kek = kek_module.load(path)
            except FileNotFoundError:
                raise KeyEncryptionError(
                    f"the key-encryption key file {path} does not exist, but the signing keys in etcd are "
                    f"encrypted with key {', '.join(sealed_by)}; restore that file"
                ) from None
        else:
            self._kek, created = kek_module.load_or_create(path)
            if created:
                log.info("created key-encryption key file %s (key %s)", path, self._kek.key_id)
        for key, record in records.items():
            kid = key.rsplit("/", 1)[-1]
            if "private_key" in record:
                self._kek.open(kid, record["private_key"])  # raises on a wrong key file
            elif "private_pem" in record:
                await self._seal_plaintext_signing_key(key)
        await self._ensure_signing_key()
        log.info("token signing keys encrypted at rest with key-encryption key %s", self._kek.key_id)

    async def _seal_plaintext_signing_key(self, key: str) -> None:
        """Migration: replaces a plaintext private key (written by an older
        version) with its sealed form, compare-and-swap."""
        kid = key.rsplit("/", 1)[-1]

        def change(kv: KV | None) -> bytes | None:
            if kv is None:
                return None  # retired meanwhile: deleting an absent key is a no-op
            record = json.loads(kv.value)
            if "private_key" in record:  # another process sealed it first
                self._kek.open(kid, record["private_key"])
                return kv.value
            private = serialization.load_pem_private_key(record.pop("private_pem").encode(), password=None)
            record["private_key"] = self._kek.seal(kid, _private_der(private))
            return json.dumps(record).encode()

        await self.store.update_signing_key(key, change)
        log.warning("signing key %s was stored in plaintext; encrypted it at rest", kid)

    def _new_signing_key(self) -> tuple[str, dict]:
        """A fresh Ed25519 key id and its record, the private half sealed."""
        kid = secrets.token_hex(8)
        private = Ed25519PrivateKey.generate()
        record = {
            "public_pem": private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode(),
            "private_key": self._kek.seal(kid, _private_der(private)),
            "created": self.clock(),
        }
        return kid, record

    async def _ensure_signing_key(self) -> None:
        if await self.store.signing_records():
            return
        kid, record = self._new_signing_key()
        # Only one signing key may be created even when two processes race.
        if await self.store.create_first_signing_key(kid, record):
            log.info("created token signing key %s", kid)

    async def _ensure_tenant(self, name: str, description: str, quota) -> None:
        tenant = pb.Tenant(name=name, description=description, create_time=_ts(self.clock()))
        await self.store.create_tenant(tenant, quota)

    async def _ensure_key(self, entry: dict) -> None:
        tenant = entry.get("tenant", ADMIN_TENANT)
        salt = secrets.token_hex(8)
        record = store.KeyRecord(
            access_key_id=entry["access_key"], tenant=tenant, salt=salt,
            secret_hash=_hash_secret(salt, entry["secret_key"]),
            description=entry.get("description", ""), created=self.clock(),
        )
        await self.store.create_access_key(record)

    # --- verification keys ------------------------------------------------------------

    def _keys_changed(self) -> None:
        if not self._mirrors_loaded:
            return  # start() publishes once both mirrors are loaded
        now = self.clock()
        public = {kid: rec["public_pem"] for kid, rec in
                  ((k.rsplit("/", 1)[-1], v) for k, v in self._signing.items.items())}
        revoked = sorted(
            rec.access_key_id for rec in self._keys.items.values()
            if rec.revoked and now - rec.revoked < REVOCATION_MEMORY
        )
        self.verifier.update(public, set(revoked))
        self._snapshot = pb.VerificationKeys(
            public_keys=[pb.PublicKey(key_id=k, public_key_pem=v) for k, v in sorted(public.items())],
            revoked_access_key_ids=revoked, issuer=ISSUER, audience=AUDIENCE,
        )
        self._changed.set()
        self._changed = asyncio.Event()

    async def verification_snapshots(self) -> AsyncIterator[pb.VerificationKeys]:
        """The current snapshot, then one after every change (and a repeat
        every 30 s so that revocations age out)."""
        if not self._ready:
            raise errors.Unavailable("auth service is starting")
        while True:
            changed = self._changed
            yield self._snapshot
            try:
                await asyncio.wait_for(changed.wait(), 30)
            except asyncio.TimeoutError:
                self._keys_changed()

    # --- authorization helpers --------------------------------------------------------

    @staticmethod
    def _require_admin(caller: Principal) -> None:
        if not caller.is_admin:
            raise errors.PermissionDenied("only the admin tenant may do this")

    async def _visible_tenant(self, caller: Principal, name: str) -> tuple[pb.Tenant, KV]:
        """The tenant if it exists and the caller may see it; NOT_FOUND otherwise
        (a member cannot tell another tenant from a missing one)."""
        validation.check_name(name, "tenant")
        if not caller.may_access(name):
            raise errors.NotFound(f"tenant {name!r} not found")
        found = await self.store.get_tenant(name)
        if found is None:
            raise errors.NotFound(f"tenant {name!r} not found")
        return found

    # --- tenants --------------------------------------------------------------------

    async def create_tenant(self, caller: Principal, name: str, description: str) -> pb.Tenant:
        self._require_admin(caller)
        validation.check_name(name, "name")
        tenant = pb.Tenant(name=name, description=description, create_time=_ts(self.clock()))
        if not await self.store.create_tenant(tenant, DEFAULT_QUOTA):
            raise errors.AlreadyExists(f"tenant {name!r} already exists")
        return tenant

    async def get_tenant(self, caller: Principal, name: str) -> pb.Tenant:
        tenant, _ = await self._visible_tenant(caller, name)
        return tenant

    async def list_tenants(self, caller: Principal, page_size: int, page_token: str) -> tuple[list[pb.Tenant], str]:
        size = validation.check_page_size(page_size)
        if not caller.is_admin:
            tenant, _ = await self._visible_tenant(caller, caller.tenant)
            return ([tenant] if not page_token else []), ""
        after = ""
        if page_token:
            try:
                after = base64.b64decode(page_token.encode(), altchars=b"-_", validate=True).decode()
                validation.check_name(after)
            except (ValueError, UnicodeDecodeError, errors.InvalidArgument):
                raise errors.InvalidArgument("page_token is not one this service issued") from None
        tenants, more = await self.store.list_tenants(after, size)
        token = base64.urlsafe_b64encode(tenants[-1].name.encode()).decode() if more and tenants else ""
        return tenants, token

    async def delete_tenant(self, caller: Principal, name: str) -> None:
        self._require_admin(caller)
        validation.check_name(name, "name")
        if name == ADMIN_TENANT:
            raise errors.FailedPrecondition("the admin tenant cannot be deleted")
        found = await self.store.get_tenant(name)
        if found is None:
            raise errors.NotFound(f"tenant {name!r} not found")
        _, kv = found
        usage_revision = await self.store.usage_revision(name)
        held = await self.store.count_reservations(name)
        if held:
            raise errors.FailedPrecondition(
                f"tenant {name!r} still holds {held} reservation(s); stop its jobs, models and studies first"
            )
        # Revoke its keys first: once the tenant is gone nothing may act for it.
        now = self.clock()
        await self._revoke_tenant_keys(name, now)
        # A reservation made since the count would have changed usage.
        if not await self.store.delete_tenant(name, kv.mod_revision, usage_revision):
            raise errors.Conflict(f"tenant {name!r} changed while being deleted; retry")
        # A key created between the first pass and the delete (creation
        # compares the tenant's revision, so none can follow the delete).
        await self._revoke_tenant_keys(name, now)

    async def _revoke_tenant_keys(self, name: str, now: float) -> None:
        # Read from etcd, not the mirror: a key created a moment ago may not
        # have reached the mirror's watch yet.
        for record in await self.store.list_access_keys():
            if record.tenant == name and not record.revoked:
                await self._revoke(record.access_key_id, now)

    # --- access keys ------------------------------------------------------------------

    @staticmethod
    def _role_of(tenant: str) -> int:
        return ROLE_ADMIN if tenant == ADMIN_TENANT else ROLE_MEMBER

    def _key_message(self, record: store.KeyRecord) -> pb.AccessKey:
        message = pb.AccessKey(
            access_key_id=record.access_key_id, tenant=record.tenant, role=self._role_of(record.tenant),
            description=record.description, revoked=bool(record.revoked), create_time=_ts(record.created),
        )
        if record.revoked:
            message.revoke_time.CopyFrom(_ts(record.revoked))
        return message

    async def create_access_key(self, caller: Principal, tenant: str, description: str) -> tuple[pb.AccessKey, str]:
        _, tenant_kv = await self._visible_tenant(caller, tenant)
        secret = new_secret_key()
        salt = secrets.token_hex(8)
        record = store.KeyRecord(
            access_key_id=new_access_key_id(), tenant=tenant, salt=salt,
            secret_hash=_hash_secret(salt, secret), description=description[:200], created=self.clock(),
        )
        # Only while the tenant exists as read: a concurrent DeleteTenant must
        # not leave a live key behind.
        if not await self.store.create_access_key(record, tenant_kv.mod_revision):
            raise errors.Conflict(f"tenant {tenant!r} changed (or key id collision) while creating the key; retry")
        return self._key_message(record), secret

    async def list_access_keys(self, caller: Principal, tenant: str) -> list[pb.AccessKey]:
        await self._visible_tenant(caller, tenant)
        records = await self.store.list_access_keys()
        return [self._key_message(r) for r in sorted(records, key=lambda r: r.created) if r.tenant == tenant]

    async def revoke_access_key(self, caller: Principal, tenant: str, access_key_id: str) -> pb.AccessKey:
        await self._visible_tenant(caller, tenant)
        record = await self.store.get_access_key(access_key_id) if access_key_id else None
        if record is None or record.tenant != tenant:
            raise errors.NotFound(f"access key {access_key_id!r} not found in tenant {tenant!r}")
        return self._key_message(await self._revoke(access_key_id, self.clock()))

    async def _revoke(self, access_key_id: str, when: float) -> store.KeyRecord:
        result: list[store.KeyRecord] = []

        def change(kv: KV | None) -> bytes | None:
            if kv is None:
                raise errors.NotFound(f"access key {access_key_id!r} not found")
            record = store.KeyRecord.decode(kv.value)
            if not record.revoked:
                record.revoked = when
            result[:] = [record]
            return record.encode()

        await self.store.update_access_key(access_key_id, change)
        # Reflect it locally at once rather than waiting for the watch.
        self._keys.items[self.keys.access_key(access_key_id)] = result[0]
        self._keys_changed()
        return result[0]

    # --- tokens ---------------------------------------------------------------------

    async def issue_token(self, access_key_id: str, secret_key: str, ttl_seconds: int, audience: str) -> tuple[str, float]:
        if ttl_seconds < 0 or ttl_seconds > MAX_TTL:
            raise errors.InvalidArgument(f"ttl_seconds must be within 1..{MAX_TTL} (0 for the default {DEFAULT_TTL})")
        ttl = ttl_seconds or DEFAULT_TTL
        refused = errors.Unauthenticated("invalid access key or secret key")
        if not access_key_id or not secret_key:
            raise refused
        record = await self.store.get_access_key(access_key_id)
        if record is None:
            raise refused
        if record.revoked or not hmac.compare_digest(record.secret_hash, _hash_secret(record.salt, secret_key)):
            raise refused
        return self.sign_token(record, ttl, audience)

    def sign_token(self, record: KeyRecord, ttl: int, audience: str = "") -> tuple[str, float]:
        """A token for `record`'s tenant and key, valid `ttl` seconds (the caller checked the key)."""
        kid, signing = self._current_signing_key()
        now = self.clock()
        expires = now + ttl
        claims = {
            "iss": ISSUER, "aud": audience or AUDIENCE, "sub": record.tenant,
            "role": self._role_of(record.tenant), "akid": record.access_key_id,
            "iat": int(now), "exp": int(expires), "jti": secrets.token_hex(8),
        }
        token = jwt.encode(claims, signing, algorithm="EdDSA", headers={"kid": kid})
        return token, float(int(expires))

    def _current_signing_key(self):
        if not self._signing.items:
            raise errors.Unavailable("no token signing key loaded yet; retry")
        key, record = max(self._signing.items.items(), key=lambda item: item[1]["created"])
        kid = key.rsplit("/", 1)[-1]
        if self._signing_cache is None or self._signing_cache[0] != key:
            if "private_key" in record:
                private = serialization.load_der_private_key(self._kek.open(kid, record["private_key"]), password=None)
            else:  # plaintext from an older version, until start() seals it
                private = serialization.load_pem_private_key(record["private_pem"].encode(), password=None)
            self._signing_cache = (key, private)
        return kid, self._signing_cache[1]

    async def rotate_signing_key(self, caller: Principal) -> tuple[pb.PublicKey, list[str]]:
        """Adds a new signing key (used for every later token) and retires the
        keys superseded more than SIGNING_KEY_MEMORY ago."""
        self._require_admin(caller)
        kid, record = self._new_signing_key()
        if not await self.store.create_signing_key(kid, record):
            raise errors.Conflict("signing key id collision; retry")
        log.info("rotated the token signing key: new key %s", kid)
        # Read from etcd, not the mirror, which may lag behind another process.
        records = await self.store.signing_records()
        keys = sorted(((key, value["created"]) for key, value in records.items()), key=lambda item: item[1])
        now = self.clock()
        retired = []
        for (key, _), (_, superseded) in zip(keys, keys[1:]):
            if now - superseded > SIGNING_KEY_MEMORY and key != self.keys.signing_key(kid):
                await self.store.delete(key)
                retired.append(key.rsplit("/", 1)[-1])
                self._signing.items.pop(key, None)
        # Sign with the new key at once rather than after the watch delivers it.
        self._signing.items[self.keys.signing_key(kid)] = record
        self._keys_changed()
        return pb.PublicKey(key_id=kid, public_key_pem=record["public_pem"]), retired

    # --- quotas -----------------------------------------------------------------------

    async def get_quota(self, caller: Principal, tenant: str):
        await self._visible_tenant(caller, tenant)
        return await self.store.quota_and_usage(tenant)

    async def set_quota(self, caller: Principal, tenant: str, limits) -> tuple:
        self._require_admin(caller)
        validation.check_resources(limits, "limits")
        await self._visible_tenant(caller, tenant)
        await self.store.put_quota(tenant, limits)
        return await self.get_quota(caller, tenant)

    def _lock(self, tenant: str) -> asyncio.Lock:
        lock = self._tenant_locks.get(tenant)
        if lock is None:
            lock = self._tenant_locks[tenant] = asyncio.Lock()
        return lock

    async def reserve(self, caller: Principal, tenant: str, owner_id: str, resources) -> tuple[pb.Reservation, bool]:
        validation.check_owner_id(owner_id)
        validation.check_resources(resources)
        await self._visible_tenant(caller, tenant)
        # The lock only spares this process needless CAS retries; correctness
        # comes from the transaction's compares (other auth processes race too).
        async with self._lock(tenant):
            for _ in range(100):
                snap = await self.store.quota_snapshot(tenant, owner_id)
                if snap.limits is None:
                    raise errors.NotFound(f"tenant {tenant!r} not found")
                limits, usage = snap.limits, snap.usage
                if snap.reservation is not None:
                    existing = snap.reservation
                    if existing.resources == resources:
                        return self._shown(caller, existing), False
                    raise errors.AlreadyExists(
                        f"owner {owner_id!r} already holds a different reservation; release it first"
                    )
                self._check_fits(limits, usage, resources)
                new_usage = resources_pb2.Resources(
                    **{f: getattr(usage, f) + getattr(resources, f) for f in RESOURCE_FIELDS}
                )
                reservation = pb.Reservation(
                    tenant=tenant, owner_id=owner_id, resources=resources, create_time=_ts(self.clock()),
                    creator_access_key_id=caller.access_key_id,
                )
                if await self.store.commit_reservation(snap, reservation, new_usage):
                    return reservation, True
                await asyncio.sleep(0)
        raise errors.Conflict("too much contention on the quota; retry")

    @staticmethod
    def _check_fits(limits, usage, wanted) -> None:
        for field in RESOURCE_FIELDS:
            want, limit = getattr(wanted, field), getattr(limits, field)
            if want > limit:
                raise errors.ResourceExhausted(
                    f"quota exceeded: {LABELS[field]} requested {_amount(field, want)} is more than the "
                    f"tenant's limit of {_amount(field, limit)}; it can never fit"
                )
        for field in RESOURCE_FIELDS:
            want, limit, used = getattr(wanted, field), getattr(limits, field), getattr(usage, field)
            if want and used + want > limit:
                raise errors.QuotaBusy(
                    f"quota busy: {LABELS[field]} in use {_amount(field, used)} + requested "
                    f"{_amount(field, want)} > limit {_amount(field, limit)}; retry after a release"
                )

    async def release(self, caller: Principal, tenant: str, owner_id: str) -> bool:
        validation.check_owner_id(owner_id)
        await self._visible_tenant(caller, tenant)
        async with self._lock(tenant):
            for _ in range(100):
                snap = await self.store.quota_snapshot(tenant, owner_id, with_limits=False)
                if snap.reservation is None:
                    return False
                reservation = snap.reservation
                self._check_may_release(caller, reservation)
                held = reservation.resources
                usage = snap.usage
                values = {}
                for f in RESOURCE_FIELDS:
                    value = getattr(usage, f) - getattr(held, f)
                    if value < 0:
                        log.error("usage of %s for %s would go negative (%d); clamping", f, tenant, value)
                        value = 0
                    values[f] = value
                if await self.store.commit_release(tenant, owner_id, snap, resources_pb2.Resources(**values)):
                    return True
                await asyncio.sleep(0)
        raise errors.Conflict("too much contention on the quota; retry")

    @staticmethod
    def _check_may_release(caller: Principal, reservation: pb.Reservation) -> None:
        """Only the key that made a reservation, or an admin, may release it: a
        member must not free the quota a platform service holds for its work.
        A reservation stored before creators were recorded counts as an
        admin's."""
        if caller.is_admin:
            return
        creator = reservation.creator_access_key_id
        if creator and creator == caller.access_key_id:
            return
        raise errors.PermissionDenied(
            f"reservation of owner {reservation.owner_id!r} was made by another principal; "
            "only it or an admin may release it"
        )

    @staticmethod
    def _shown(caller: Principal, reservation: pb.Reservation) -> pb.Reservation:
        """The reservation as the caller may see it: a member sees the creator
        only when it is its own key (another key's id is not revealed)."""
        if caller.is_admin or reservation.creator_access_key_id in ("", caller.access_key_id):
            return reservation
        shown = pb.Reservation()
        shown.CopyFrom(reservation)
        shown.ClearField("creator_access_key_id")
        return shown

    async def list_reservations(self, caller: Principal, tenant: str) -> list[pb.Reservation]:
        await self._visible_tenant(caller, tenant)
        return [self._shown(caller, reservation) for reservation in await self.store.list_reservations(tenant)]
