"""The `cloudml` CLI and the `cloudml.Client` SDK against a real auth service
on a real etcd, run as a user would: the CLI as a subprocess with
CLOUDML_ENDPOINT / CLOUDML_ACCESS_KEY / CLOUDML_SECRET_KEY (or the config file
`cloudml configure` writes) pointing straight at the auth service, which
serves the same API the gateway proxies.

Uses the session's shared auth process (`auth_service`, tests/integration/
conftest.py); tenants get unique names so tests never collide.
"""
from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import pytest

import cloudml
from cloudml import errors

from tests.integration.cli_result import Result

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Key:
    access_key: str
    secret_key: str


class Cli:
    """Runs `python -m cloudml.cli.main` with a clean environment."""

    def __init__(self, endpoint: str, config_path: str):
        self.endpoint = endpoint
        self.config_path = config_path

    def env(self, key: Key | None) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDML_")}
        env["CLOUDML_CONFIG"] = self.config_path
        if key is not None:
            env.update(CLOUDML_ENDPOINT=self.endpoint, CLOUDML_ACCESS_KEY=key.access_key,
                       CLOUDML_SECRET_KEY=key.secret_key)
        return env

    def __call__(self, *argv: str, key: Key | None) -> Result:
        proc = subprocess.run([sys.executable, "-m", "cloudml.cli.main", *argv], env=self.env(key), cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def admin(auth_service) -> Key:
    return Key(auth_service.admin.access_key_id, auth_service.admin.secret_key)


@pytest.fixture
def cli(auth_service, tmp_path) -> Cli:
    return Cli(auth_service.address, str(tmp_path / "cloudml" / "config.json"))


def unique(prefix: str = "cli") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def new_member(cli: Cli, admin: Key) -> tuple[str, Key]:
    """A new tenant and a key of it (MEMBER)."""
    name = unique()
    assert cli("tenants", "create", name, key=admin).code == 0
    created = cli("keys", "create", "--tenant", name, "-o", "json", key=admin).json()
    return name, Key(created["access_key"]["access_key_id"], created["secret_key"])


def table(out: str) -> list[list[str]]:
    """A CLI table's rows (header first), cells split on runs of 2+ spaces."""
    import re

    return [re.split(r"\s{2,}", line.strip()) for line in out.strip().splitlines()]


# --- configure + credentials ----------------------------------------------------------


def test_configure_then_commands_use_the_config_file(cli, admin, tmp_path):
    r = cli("configure", "--endpoint", cli.endpoint, "--access-key", admin.access_key,
            "--secret-key", admin.secret_key, key=None)
    assert r.code == 0, r.err
    assert admin.secret_key not in r.out
    mode = stat.S_IMODE(os.stat(cli.config_path).st_mode)
    assert mode == 0o600
    with open(cli.config_path) as f:
        assert json.load(f) == {"endpoint": cli.endpoint, "access_key": admin.access_key,
                                "secret_key": admin.secret_key}
    # No CLOUDML_* credentials in the environment: the file is used.
    me = cli("auth", "whoami", "-o", "json", key=None).json()
    assert me["tenant"] == "admin" and me["role"] == "ROLE_ADMIN" and me["access_key_id"] == admin.access_key


def test_configure_from_the_platforms_credentials_json(cli, admin, tmp_path):
    creds = tmp_path / "credentials.json"
    creds.write_text(json.dumps({"endpoint": cli.endpoint, "rest_endpoint": "http://127.0.0.1:8501",
                                 "access_key": admin.access_key, "secret_key": admin.secret_key}))
    assert cli("configure", "--from-file", str(creds), key=None).code == 0
    rows = table(cli("auth", "whoami", key=None).out)
    assert ["Tenant:", "admin"] in rows


def test_environment_wins_over_the_config_file(cli, admin):
    assert cli("configure", "--endpoint", cli.endpoint, "--access-key", "AKWRONG0000000000000",
               "--secret-key", "wrong", "--no-verify", key=None).code == 0
    assert cli("auth", "whoami", key=None).error_line() == "error: UNAUTHENTICATED: invalid access key or secret key"
    assert cli("auth", "whoami", "-o", "json", key=admin).json()["tenant"] == "admin"


def test_configure_profile_verifies_the_key_and_every_command_acts_as_it(cli, admin):
    tenant, member = new_member(cli, admin)
    assert cli("configure", "--endpoint", cli.endpoint, "--access-key", admin.access_key,
               "--secret-key", admin.secret_key, key=None).code == 0
    # A new profile starts on the default settings' platform; the key is checked before it is saved.
    r = cli("configure", "--profile", "team", "--access-key", member.access_key, "--secret-key", member.secret_key,
            key=None)
    assert r.code == 0, r.err
    assert ["Profile:", "team"] in table(r.out) and ["Verified:", f"tenant {tenant}, role member"] in table(r.out)
    with open(cli.config_path) as f:
        saved = json.load(f)
    assert saved["access_key"] == admin.access_key  # the default settings are untouched
    assert saved["profiles"] == {"team": {"endpoint": cli.endpoint, "access_key": member.access_key,
                                          "secret_key": member.secret_key}}
    # --profile after the command, before it, or CLOUDML_PROFILE: the member's tenant, its quota applies.
    assert cli("auth", "whoami", "--profile", "team", "-o", "json", key=None).json()["tenant"] == tenant
    assert cli("--profile", "team", "auth", "whoami", "-o", "json", key=None).json()["tenant"] == tenant
    env = dict(cli.env(None), CLOUDML_PROFILE="team")
    proc = subprocess.run([sys.executable, "-m", "cloudml.cli.main", "quota", "get", "-o", "json"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout)["tenant"] == tenant, proc.stderr
    assert cli("tenants", "create", unique(), "--profile", "team", key=None).error_line().startswith(
        "error: PERMISSION_DENIED")
    assert cli("auth", "whoami", "-o", "json", key=None).json()["tenant"] == "admin"
    # The SDK takes the same profile.
    with cloudml.Client(profile="team", config_path=cli.config_path) as client:
        assert client.whoami().tenant == tenant
    unknown = cli("auth", "whoami", "--profile", "nope", key=None)
    assert unknown.code == 2 and unknown.error_line().startswith("error: no profile 'nope'") and "team" in unknown.err


def test_configure_refuses_a_bad_key_and_saves_nothing(cli, admin):
    r = cli("configure", "--endpoint", cli.endpoint, "--access-key", admin.access_key, "--secret-key", "wrong",
            key=None)
    assert r.code == 2
    assert r.error_line() == (f"error: the platform at {cli.endpoint} refused access key {admin.access_key}: "
                              "invalid access key or secret key; nothing was saved")
    assert not os.path.exists(cli.config_path)
    r = cli("configure", "--profile", "p", "--endpoint", "127.0.0.1:1", "--access-key", admin.access_key,
            "--secret-key", admin.secret_key, key=None)
    assert r.code == 2 and r.error_line().startswith("error: cannot verify the key: cannot reach the platform at "
                                                     "127.0.0.1:1"), r.err
    assert not os.path.exists(cli.config_path)
    # --no-verify saves without asking the platform (e.g. before it is up).
    assert cli("configure", "--profile", "p", "--endpoint", "127.0.0.1:1", "--access-key", "AK", "--secret-key",
               "s", "--no-verify", key=None).code == 0
    with open(cli.config_path) as f:
        assert json.load(f)["profiles"]["p"]["endpoint"] == "127.0.0.1:1"


# --- tokens ---------------------------------------------------------------------------


def _b64json(segment: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def test_print_access_token_prints_a_jwt(cli, admin):
    r = cli("auth", "print-access-token", key=admin)
    assert r.code == 0, r.err
    token = r.out.strip()
    assert r.out == token + "\n"
    header, payload, signature = token.split(".")
    assert _b64json(header)["alg"] == "EdDSA"
    claims = _b64json(payload)
    assert claims["sub"] == "admin" and claims["exp"] > time.time()
    assert signature
    data = cli("auth", "print-access-token", "-o", "json", key=admin).json()
    assert data["token"].count(".") == 2 and data["expire_time"].endswith("Z")


# --- tenants --------------------------------------------------------------------------


def test_tenants_create_list_describe_delete(cli, admin):
    name = unique()
    created = cli("tenants", "create", name, "--description", "CLI test", "-o", "json", key=admin).json()
    assert created["name"] == name and created["description"] == "CLI test" and created["create_time"]

    listed = cli("tenants", "list", "-o", "json", key=admin).json()
    names = [t["name"] for t in listed]
    assert name in names and "admin" in names and names == sorted(names)
    assert all(list(t) == ["name", "description", "create_time"] for t in listed)

    rows = table(cli("tenants", "list", key=admin).out)
    assert rows[0] == ["NAME", "DESCRIPTION", "CREATED"]
    assert [name, "CLI test"] == [r for r in rows if r[0] == name][0][:2]

    described = cli("tenants", "describe", name, "-o", "json", key=admin).json()
    assert described == created
    text = cli("tenants", "describe", name, key=admin).out
    assert f"Name:         {name}" in text and "Quota:" in text and "cpu=" in text

    deleted = cli("tenants", "delete", name, "-o", "json", key=admin).json()
    assert deleted == {"name": name, "deleted": True}
    assert cli("tenants", "describe", name, key=admin).error_line() == f"error: NOT_FOUND: tenant '{name}' not found"
    assert cli("tenants", "delete", name, key=admin).code == 1


def test_tenant_table_output_on_create_and_delete(cli, admin):
    name = unique()
    r = cli("tenants", "create", name, key=admin)
    assert r.code == 0 and table(r.out)[0] == ["NAME", "DESCRIPTION", "CREATED"] and table(r.out)[1][0] == name
    r = cli("tenants", "delete", name, key=admin)
    assert r.code == 0 and r.out == f"deleted tenant {name}\n"


@pytest.mark.parametrize("bad", ["Bad_Name", "trailing-", "x" * 64])
def test_bad_tenant_name_is_invalid_argument_in_one_line(cli, admin, bad):
    r = cli("tenants", "create", bad, key=admin)
    assert r.code == 1 and r.out == ""
    assert r.error_line().startswith("error: INVALID_ARGUMENT: name ")


def test_creating_an_existing_tenant_is_already_exists(cli, admin):
    name = unique()
    assert cli("tenants", "create", name, key=admin).code == 0
    assert cli("tenants", "create", name, key=admin).error_line().startswith("error: ALREADY_EXISTS: ")


# --- members --------------------------------------------------------------------------


def test_member_cannot_create_tenants_nor_see_another_tenant(cli, admin):
    own, member = new_member(cli, admin)
    other, _ = new_member(cli, admin)

    r = cli("tenants", "create", unique(), key=member)
    assert r.code == 1 and r.error_line().startswith("error: PERMISSION_DENIED: ")
    r = cli("tenants", "describe", other, key=member)
    assert r.error_line() == f"error: NOT_FOUND: tenant '{other}' not found"
    assert cli("quota", "get", "--tenant", other, key=member).error_line().startswith("error: NOT_FOUND: ")
    assert cli("keys", "list", "--tenant", other, key=member).error_line().startswith("error: NOT_FOUND: ")
    r = cli("quota", "set", "--cpu", "64", key=member)
    assert r.error_line().startswith("error: PERMISSION_DENIED: ")

    # What a member does see: only its own tenant.
    assert [t["name"] for t in cli("tenants", "list", "-o", "json", key=member).json()] == [own]
    assert cli("auth", "whoami", "-o", "json", key=member).json()["role"] == "ROLE_MEMBER"


# --- keys -----------------------------------------------------------------------------


def test_keys_create_list_revoke_and_revoked_key_gets_no_token(cli, admin):
    tenant, member = new_member(cli, admin)

    # Default tenant: the caller's own.
    r = cli("keys", "create", "--description", "laptop", key=member)
    assert r.code == 0, r.err
    rows = table(r.out)
    assert rows[0] == ["ACCESS_KEY_ID", "SECRET_KEY", "TENANT", "ROLE", "DESCRIPTION"]
    new_id, new_secret = rows[1][0], rows[1][1]
    assert rows[1][2:] == [tenant, "member", "laptop"]
    assert "Save the secret key now" in r.err
    second = Key(new_id, new_secret)
    assert cli("auth", "whoami", "-o", "json", key=second).json()["access_key_id"] == new_id

    listed = cli("keys", "list", "--tenant", tenant, "-o", "json", key=admin).json()
    assert {k["access_key_id"] for k in listed} == {member.access_key, new_id}
    assert all("secret" not in json.dumps(k).lower() for k in listed)
    assert all(k["revoked"] is False for k in listed)
    rows = table(cli("keys", "list", key=member).out)
    assert rows[0] == ["ACCESS_KEY_ID", "TENANT", "ROLE", "STATUS", "DESCRIPTION", "CREATED"]
    assert {r[0] for r in rows[1:]} == {member.access_key, new_id}

    revoked = cli("keys", "revoke", new_id, "-o", "json", key=member).json()
    assert revoked["access_key_id"] == new_id and revoked["revoked"] is True and revoked["revoke_time"]
    statuses = {r[0]: r[3] for r in table(cli("keys", "list", "--tenant", tenant, key=admin).out)[1:]}
    assert statuses == {member.access_key: "active", new_id: "revoked"}

    r = cli("auth", "print-access-token", key=second)
    assert r.code == 1 and r.out == ""
    assert r.error_line() == "error: UNAUTHENTICATED: invalid access key or secret key"
    assert cli("keys", "revoke", "AKNOSUCHKEY000000000", key=member).error_line().startswith("error: NOT_FOUND: ")


# --- quota ----------------------------------------------------------------------------


def test_quota_set_parses_units_and_keeps_unspecified_fields(cli, admin):
    tenant, member = new_member(cli, admin)
    before = cli("quota", "get", "--tenant", tenant, "-o", "json", key=admin).json()["limits"]

    after = cli("quota", "set", "--tenant", tenant, "--cpu", "0.5", "--memory", "100M", "-o", "json", key=admin).json()
    assert after["tenant"] == tenant
    assert after["limits"]["cpu_millis"] == "500" and after["limits"]["memory_bytes"] == "100000000"
    for field in ("gpus", "train_jobs", "model_replicas", "studies"):
        assert after["limits"][field] == before[field]

    r = cli("quota", "get", key=member)  # the member's own tenant by default
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0] == f"Tenant: {tenant}"
    rows = table("\n".join(lines[1:]))
    assert rows[0] == ["RESOURCE", "LIMIT", "USED", "FREE"]
    assert rows[1] == ["cpu", "500m", "0", "500m"] and rows[2] == ["memory", "100M", "0", "100M"]

    r = cli("quota", "set", "--tenant", tenant, "--memory", "1Gi", "--gpus", "2", "--studies", "7", key=admin)
    assert r.code == 0, r.err
    limits = cli("quota", "get", "--tenant", tenant, "-o", "json", key=member).json()["limits"]
    assert limits["cpu_millis"] == "500" and limits["memory_bytes"] == str(2**30)
    assert limits["gpus"] == "2" and limits["studies"] == "7"


def test_quota_set_below_usage_warns_and_names_what_keeps_running(cli, admin, auth_service):
    tenant, member = new_member(cli, admin)
    assert cli("quota", "set", "--tenant", tenant, "--cpu", "2", key=admin).code == 0
    with cloudml.Client(auth_service.address, member.access_key, member.secret_key) as client:
        client.reserve("jobs/train/big", cpu="1.5")
    r = cli("quota", "set", "--tenant", tenant, "--cpu", "1", key=admin)
    assert r.code == 0, r.err
    assert f"warning: the cpu limit 1 is below what tenant {tenant} uses now (1500m)" in r.err, r.err
    assert "what runs keeps running" in r.err and "jobs/train/big  cpu=1500m" in r.err, r.err
    quiet = cli("quota", "set", "--tenant", tenant, "--cpu", "4", key=admin)
    assert quiet.code == 0 and "warning" not in quiet.err


def test_quota_set_absurd_value_is_invalid_argument(cli, admin):
    tenant, _ = new_member(cli, admin)
    r = cli("quota", "set", "--tenant", tenant, "--gpus", "100000000", key=admin)
    assert r.error_line().startswith("error: INVALID_ARGUMENT: ")
    r = cli("quota", "set", "--tenant", tenant, "--cpu", "-1", key=admin)
    assert r.code == 2 and "must not be negative" in r.error_line()


# --- the SDK --------------------------------------------------------------------------


def test_sdk_refreshes_an_expired_token_transparently(auth_service, admin):
    with cloudml.Client(auth_service.address, admin.access_key, admin.secret_key, token_ttl=2, timeout=10) as client:
        first = client.token()
        assert client.whoami().tenant == "admin"
        time.sleep(3)  # the token is expired now
        assert client.whoami().tenant == "admin"
        assert client.token() != first
        assert _b64json(client.token().split(".")[1])["exp"] - _b64json(first.split(".")[1])["exp"] >= 2


def test_sdk_retries_once_when_the_server_says_the_token_expired(auth_service, admin):
    with cloudml.Client(auth_service.address, admin.access_key, admin.secret_key, token_ttl=1, timeout=10) as client:
        stale = client.token()
        time.sleep(2)
        # Make the client believe its token is still fresh: the server refuses
        # it as expired, and the client gets a new one and retries.
        client._tokens._refresh_at = time.monotonic() + 3600
        invalidated = []
        invalidate = client._tokens.invalidate
        client._tokens.invalidate = lambda token: (invalidated.append(token), invalidate(token))
        assert client.get_quota("admin").tenant == "admin"
        assert invalidated == [stale]
        assert client.token() != stale


def test_sdk_typed_methods_and_errors(auth_service, admin):
    name = unique("sdk")
    with cloudml.Client(auth_service.address, admin.access_key, admin.secret_key) as client:
        tenant = client.create_tenant(name, "via SDK")
        assert tenant.name == name
        assert client.get_tenant(name).description == "via SDK"
        assert name in [t.name for t in client.list_tenants(page_size=1)]  # pages of one
        key = client.create_access_key(name, "sdk")
        assert key.secret_key and key.access_key.tenant == name
        client.set_quota(name, cpu="1", memory="1Gi")
        quota = client.get_quota(name)
        assert (quota.limits.cpu_millis, quota.limits.memory_bytes) == (1000, 2**30)

        with cloudml.Client(auth_service.address, key.access_key.access_key_id, key.secret_key) as member:
            assert member.whoami().tenant == name
            assert member.reserve("jobs/a", {"cpu": "0.75"}).created is True
            assert member.reserve("jobs/a", cpu="750m").created is False  # idempotent
            with pytest.raises(errors.QuotaBusy):
                member.reserve("jobs/b", cpu="0.5")  # fits the limit, not the usage now
            with pytest.raises(errors.ResourceExhausted, match="cpu"):
                member.reserve("jobs/c", cpu="2")  # can never fit
            assert [r.owner_id for r in member.list_reservations()] == ["jobs/a"]
            assert member.release("jobs/a") is True and member.release("jobs/a") is False
            assert member.get_quota().usage.cpu_millis == 0
            with pytest.raises(errors.PermissionDenied) as info:
                member.create_tenant(unique())
            assert info.value.code == "PERMISSION_DENIED"
            with pytest.raises(errors.NotFound):
                member.get_tenant("admin")
            assert [k.access_key_id for k in member.list_access_keys()] == [key.access_key.access_key_id]
            assert member.revoke_access_key(key.access_key.access_key_id).revoked

        with pytest.raises(errors.InvalidArgument):
            client.create_tenant("Not_A_Name")
        with pytest.raises(errors.AlreadyExists):
            client.create_tenant(name)
        client.delete_tenant(name)
        with pytest.raises(errors.NotFound):
            client.get_tenant(name)


def test_sdk_stub_on_the_authenticated_channel(auth_service, admin):
    from cloudml.auth.v1 import auth_service_pb2 as pb
    from cloudml.auth.v1 import auth_service_pb2_grpc as pb_grpc

    with cloudml.Client(auth_service.address, admin.access_key, admin.secret_key) as client:
        stub = client.stub(pb_grpc.AuthServiceStub)
        assert stub.WhoAmI(pb.WhoAmIRequest()).tenant == "admin"  # token and deadline added
        with pytest.raises(errors.NotFound):
            client.call(stub.GetTenant, pb.GetTenantRequest(name=unique()))


def test_sdk_wrong_secret_is_unauthenticated(auth_service, admin):
    with cloudml.Client(auth_service.address, admin.access_key, "not-the-secret") as client:
        with pytest.raises(errors.Unauthenticated):
            client.whoami()
