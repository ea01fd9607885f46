"""`cloudml-platform up` keeps the auth service's signing keys encrypted at
rest: the key-encryption key in DIR/secrets/kek (0600, in a 0700 directory),
nothing private in etcd, and tokens valid across `down` and `up`."""
from __future__ import annotations

import json
import os
import stat

import grpc
import pytest

from cloudml.auth.v1 import auth_service_pb2 as pb
from cloudml.auth.v1 import auth_service_pb2_grpc as pb_grpc
from services.common.etcd import Etcd
from tests.e2e.test_launcher import Platform, admin_stub, eventually

# Reads the platform's etcd and secrets directory.
pytestmark = [pytest.mark.slow, pytest.mark.needs_local_platform]

#: only etcd, auth and the gateway: the others play no part here
LIGHT = {"CLOUDML_PLATFORM_DISABLE": "jobs,tuner,models"}


async def etcd_values(platform: Platform) -> list[tuple[str, bytes]]:
    etcd = await Etcd.connect(platform.component("etcd")["address"])
    try:
        kvs, _, _ = await etcd.get_prefix("/")
    finally:
        await etcd.close()
    return [(kv.key, kv.value) for kv in kvs]


async def test_up_keeps_signing_keys_encrypted_with_dir_secrets_kek(tmp_path):
    platform = Platform(str(tmp_path / "data"))
    try:
        platform.up(env=LIGHT)
        secrets_dir = os.path.join(platform.data_dir, "secrets")
        kek_file = os.path.join(secrets_dir, "kek")
        assert stat.S_IMODE(os.stat(secrets_dir).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(kek_file).st_mode) == 0o600 and os.path.getsize(kek_file) == 32
        kek = open(kek_file, "rb").read()

        stub, md, channel = eventually(lambda: admin_stub(platform))
        with channel:
            assert stub.WhoAmI(pb.WhoAmIRequest(), metadata=md, timeout=5).tenant == "admin"
        values = await etcd_values(platform)
        signing = [v for k, v in values if k.startswith("/cloudml/auth/signing/")]
        assert signing and all("private_key" in json.loads(v) for v in signing)
        for key, value in values:
            assert b"PRIVATE KEY" not in value and kek not in value, key

        assert platform.down().returncode == 0
        platform.up(env=LIGHT)
        assert open(kek_file, "rb").read() == kek
        # The token issued before the restart still verifies after it.
        def whoami():
            with grpc.insecure_channel(platform.credentials["endpoint"]) as ch:
                return pb_grpc.AuthServiceStub(ch).WhoAmI(pb.WhoAmIRequest(), metadata=md, timeout=5)
        assert eventually(whoami).tenant == "admin"
    finally:
        assert platform.down().returncode == 0
