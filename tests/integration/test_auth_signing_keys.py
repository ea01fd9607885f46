"""The token signing keys at rest: private keys only sealed under the
key-encryption key file (never plaintext in etcd), tokens surviving restarts,
rotation, migration of an older version's plaintext key, and a wrong or lost
key file stopping the service instead of minting new keys.

Each test runs its own auth processes (`auth_launcher`) on a keyspace of its own
(`etcd_space`: a key namespace on the session etcd).
"""
from __future__ import annotations

import base64
import json
import os
import stat
import time

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloudml.auth.v1 import auth_service_pb2 as pb
from deploy.local.stack import EtcdTarget
from services.auth import kek
from services.auth.server import EXIT_KEY_ENCRYPTION
from tests.integration.conftest import ADMIN_ACCESS_KEY, Client, connect, start_auth

SIGNING = "/cloudml/auth/signing/"


async def all_values(etcd_target: EtcdTarget) -> list[tuple[str, bytes]]:
    etcd = await etcd_target.connect()
    try:
        kvs, _, _ = await etcd.get_prefix("/")
    finally:
        await etcd.close()
    return [(kv.key, kv.value) for kv in kvs]


async def signing_records(etcd_target: EtcdTarget) -> dict[str, dict]:
    return {k[len(SIGNING):]: json.loads(v) for k, v in await all_values(etcd_target) if k.startswith(SIGNING)}


def private_forms(private: Ed25519PrivateKey) -> list[bytes]:
    """Every plaintext encoding of a private key a careless store might hold."""
    raw = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
    der = private.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    body = b"".join(pem.splitlines()[1:-1])
    return [raw, der, pem, body, base64.b64encode(raw), base64.b64encode(der), raw.hex().encode(), der.hex().encode()]


def assert_no_private_key_in(values: list[tuple[str, bytes]], privates: list[Ed25519PrivateKey], key: bytes) -> None:
    assert values
    for name, value in values:
        assert b"PRIVATE KEY" not in value and b"private_pem" not in value, f"plaintext key material under {name}"
        for private in privates:
            for form in private_forms(private):
                assert form not in value, f"a signing private key is stored in plaintext under {name}"
        for form in (key, base64.b64encode(key), key.hex().encode()):
            assert form not in value, f"the key-encryption key is stored in etcd under {name}"


def unseal(records: dict[str, dict], kek_file: str) -> dict[str, Ed25519PrivateKey]:
    """The private keys, opened the way the service does (and checked against their public keys)."""
    key = kek.load(kek_file)
    privates = {}
    for kid, record in records.items():
        private = serialization.load_der_private_key(key.open(kid, record["private_key"]), password=None)
        public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        assert public == record["public_pem"]
        privates[kid] = private
    return privates


def published_kids(stub) -> set[str]:
    call = stub.WatchVerificationKeys(pb.WatchVerificationKeysRequest(), timeout=10)
    try:
        return {k.key_id for k in next(call).public_keys}
    finally:
        call.cancel()


def kid_of(token: str) -> str:
    return jwt.get_unverified_header(token)["kid"]


def expect_start_failure(process, text: str, timeout: float = 30) -> str:
    """Waits for a process that must refuse to start; returns its log."""
    assert process.process.wait(timeout) == EXIT_KEY_ENCRYPTION
    with open(process.log_path) as f:
        log = f.read()
    assert text in log, log[-3000:]
    return log


# --- at rest ------------------------------------------------------------------------

async def test_after_start_etcd_holds_no_private_key_in_plaintext(etcd_space, auth_launcher):
    service = auth_launcher.connect(auth_launcher.start(etcd_space))
    service.admin.call("RotateSigningKey", pb.RotateSigningKeyRequest())
    kek_file = os.path.join(auth_launcher.workdir, "kek")
    assert stat.S_IMODE(os.stat(kek_file).st_mode) == 0o600 and os.path.getsize(kek_file) == 32

    records = await signing_records(etcd_space)
    assert len(records) == 2
    for record in records.values():
        assert set(record) == {"public_pem", "created", "private_key"}
        assert record["private_key"]["alg"] == "AES-256-GCM"
    privates = unseal(records, kek_file)
    assert_no_private_key_in(await all_values(etcd_space), list(privates.values()),
                             open(kek_file, "rb").read())
    # The sealed keys are the ones tokens are signed with.
    token = service.admin.token
    public = privates[kid_of(token)].public_key()
    assert jwt.decode(token, public, algorithms=["EdDSA"], audience="cloudml")["akid"] == ADMIN_ACCESS_KEY


async def test_token_issued_before_a_restart_verifies_after_it(etcd_space, auth_launcher):
    first = auth_launcher.connect(auth_launcher.start(etcd_space))
    member = first.new_tenant("restart")
    before = await signing_records(etcd_space)
    first.process.stop()

    second = auth_launcher.connect(auth_launcher.start(etcd_space))
    member.stub = second.stub
    assert member.call("WhoAmI", pb.WhoAmIRequest()).tenant == member.tenant
    # Same keys, still sealed the same way; new tokens are signed with the same key.
    assert await signing_records(etcd_space) == before
    assert kid_of(Client(second.stub, member.access_key_id, member.secret_key).login().token) == kid_of(member.token)


async def test_rotation_signs_with_a_new_key_and_keeps_old_tokens_valid(etcd_space, auth_launcher):
    service = auth_launcher.connect(auth_launcher.start(etcd_space))
    member = service.new_tenant("rotate")
    old_kid = kid_of(member.token)

    rotated = service.admin.call("RotateSigningKey", pb.RotateSigningKeyRequest())
    new_kid = rotated.public_key.key_id
    assert new_kid != old_kid and "PUBLIC KEY" in rotated.public_key.public_key_pem
    assert not rotated.retired_key_ids
    assert published_kids(service.stub) == {old_kid, new_kid}
    fresh = Client(service.stub, member.access_key_id, member.secret_key).login()
    assert kid_of(fresh.token) == new_kid
    for client in (member, fresh):
        assert client.call("WhoAmI", pb.WhoAmIRequest()).tenant == member.tenant

    records = await signing_records(etcd_space)
    assert set(records) == {old_kid, new_kid}
    unseal(records, os.path.join(auth_launcher.workdir, "kek"))

    # A restart keeps signing with the newest key, and both tokens verify.
    service.process.stop()
    restarted = auth_launcher.connect(auth_launcher.start(etcd_space))
    for client in (member, fresh):
        client.stub = restarted.stub
        assert client.call("WhoAmI", pb.WhoAmIRequest()).tenant == member.tenant
    assert kid_of(Client(restarted.stub, member.access_key_id, member.secret_key).login().token) == new_kid


async def test_rotation_retires_keys_superseded_longer_than_the_longest_token_ago(etcd_space, auth_launcher):
    service = auth_launcher.connect(auth_launcher.start(etcd_space))
    current = kid_of(service.admin.token)
    key = kek.load(os.path.join(auth_launcher.workdir, "kek"))
    etcd = await etcd_space.connect()
    try:
        # Two older keys: "ancient" was superseded by "old" a day ago (retire),
        # "old" only by the current key, a moment ago (keep).
        for kid, age in (("ancient", 2 * 86400), ("old", 86400)):
            private = Ed25519PrivateKey.generate()
            record = {
                "public_pem": private.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
                "private_key": key.seal(kid, private.private_bytes(
                    serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())),
                "created": time.time() - age,
            }
            await etcd.put(SIGNING + kid, json.dumps(record).encode())
    finally:
        await etcd.close()

    rotated = service.admin.call("RotateSigningKey", pb.RotateSigningKeyRequest())
    assert list(rotated.retired_key_ids) == ["ancient"]
    assert set(await signing_records(etcd_space)) == {"old", current, rotated.public_key.key_id}
    assert service.admin.call("WhoAmI", pb.WhoAmIRequest()).access_key_id == ADMIN_ACCESS_KEY


# --- migration ----------------------------------------------------------------------

async def test_plaintext_key_of_an_older_version_is_encrypted_on_the_next_start(etcd_space, auth_launcher):
    # What an older version left in etcd: the private key as PEM.
    private = Ed25519PrivateKey.generate()
    kid = "0ldversion0000ab"
    legacy = {
        "private_pem": private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()).decode(),
        "public_pem": private.public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
        "created": time.time() - 60,
    }
    etcd = await etcd_space.connect()
    try:
        await etcd.put(SIGNING + kid, json.dumps(legacy).encode())
        await etcd.put("/cloudml/auth/signing-initialized", kid.encode())
    finally:
        await etcd.close()
    # A token that version issued (to the admin key the launcher bootstraps).
    now = int(time.time())
    old_token = jwt.encode({"iss": "cloudml-auth", "aud": "cloudml", "sub": "admin", "role": 2,
                            "akid": ADMIN_ACCESS_KEY, "iat": now, "exp": now + 600, "jti": "x"},
                           private, algorithm="EdDSA", headers={"kid": kid})

    service = auth_launcher.connect(auth_launcher.start(etcd_space))
    records = await signing_records(etcd_space)
    assert set(records) == {kid} and set(records[kid]) == {"public_pem", "created", "private_key"}
    assert records[kid]["public_pem"] == legacy["public_pem"]
    kek_file = os.path.join(auth_launcher.workdir, "kek")
    unseal(records, kek_file)
    assert_no_private_key_in(await all_values(etcd_space), [private], open(kek_file, "rb").read())
    # The old token still verifies, and new tokens are signed by the same key.
    old = Client(service.stub, token=old_token)
    assert old.call("WhoAmI", pb.WhoAmIRequest()).access_key_id == ADMIN_ACCESS_KEY
    assert kid_of(service.admin.token) == kid


# --- a wrong or lost key file --------------------------------------------------------

async def test_wrong_key_file_stops_the_service_instead_of_making_new_keys(etcd_space, auth_launcher, tmp_path):
    service = auth_launcher.connect(auth_launcher.start(etcd_space))
    token = service.admin.token
    service.process.stop()
    before = await all_values(etcd_space)

    wrong = str(tmp_path / "wrong-kek")
    with open(wrong, "wb") as f:
        f.write(os.urandom(32))
    os.chmod(wrong, 0o600)
    process = start_auth(etcd_space, str(tmp_path / "wrong"), admin_secret=auth_launcher.secret,
                         wait=False, kek_file=wrong)
    auth_launcher.processes.append(process)
    expect_start_failure(process, "wrong or replaced key file")
    after = await all_values(etcd_space)
    assert [(k, v) for k, v in after if k.startswith(SIGNING)] == [(k, v) for k, v in before if k.startswith(SIGNING)]

    # With the right file again, the old token still verifies.
    again = auth_launcher.connect(auth_launcher.start(etcd_space))
    assert Client(again.stub, token=token).call("WhoAmI", pb.WhoAmIRequest()).tenant == "admin"


async def test_missing_key_file_with_encrypted_keys_in_etcd_refuses_to_start(etcd_space, auth_launcher, tmp_path):
    auth_launcher.start(etcd_space).stop()
    lost = tmp_path / "lost" / "kek"
    process = start_auth(etcd_space, str(tmp_path / "lost-run"), admin_secret=auth_launcher.secret,
                         wait=False, kek_file=str(lost))
    auth_launcher.processes.append(process)
    expect_start_failure(process, "does not exist, but the signing keys in etcd are encrypted")
    assert not lost.exists()  # not replaced by a new key


def test_key_file_other_users_may_read_refuses_to_start(etcd_space, auth_launcher, tmp_path):
    loose = tmp_path / "loose-kek"
    loose.write_bytes(os.urandom(32))
    loose.chmod(0o644)
    process = start_auth(etcd_space, str(tmp_path / "loose"), admin_secret=auth_launcher.secret,
                         wait=False, kek_file=str(loose))
    auth_launcher.processes.append(process)
    expect_start_failure(process, "chmod 600")


def test_auth_without_a_key_file_flag_refuses_to_start(etcd_space, tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "CLOUDML_KEY_ENCRYPTION_KEY_FILE"}
    done = subprocess.run([sys.executable, "-m", "services.auth", "--etcd", etcd_space.endpoint],
                          capture_output=True, text=True, timeout=60, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert done.returncode != 0
    assert "--key-encryption-key-file" in done.stderr and "required" in done.stderr


# --- several processes at once --------------------------------------------------------

async def test_two_auth_processes_starting_at_once_share_one_new_key_file(etcd_space, auth_launcher):
    kek_file = os.path.join(auth_launcher.workdir, "kek")
    assert not os.path.exists(kek_file)
    processes = [auth_launcher.start(etcd_space, wait=False) for _ in range(2)]
    for process in processes:
        process.wait_serving(30)
    a, b = (auth_launcher.connect(p) for p in processes)
    # A token from either verifies on the other: one signing key, one KEK.
    assert Client(b.stub, token=a.admin.token).call("WhoAmI", pb.WhoAmIRequest()).tenant == "admin"
    assert Client(a.stub, token=b.admin.token).call("WhoAmI", pb.WhoAmIRequest()).tenant == "admin"
    records = await signing_records(etcd_space)
    assert len(records) == 1
    unseal(records, kek_file)
    assert sorted(os.listdir(auth_launcher.workdir)) == ["0", "1", "kek"]
