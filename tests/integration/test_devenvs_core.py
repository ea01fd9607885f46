"""`services.jobs.devenvs.DevEnvironments` on a real etcd (a prefix per
test) with a stand-in runtime, quota and key maker: create's checks and its
clean-up when refused (count, CPU, a taken name, an image on local), the
quota held while it runs and while it exists, stop/start, idle stop, a
server that dies while running coming back, delete revoking the tenant's
key, another tenant seeing nothing, and a new leader adopting the running
replica. The real notebook server behind the real gateway proxy:
test_devenv_gateway.py; the whole platform in a browser:
tests/e2e/test_devenv_browser.py."""
from __future__ import annotations

import json
import os

import pytest

from cloudml.common.v1 import resources_pb2
from cloudml.jobs.v1 import dev_environments_pb2 as pb
from services.common import errors
from services.common.etcd import Etcd
from services.common.runtime.base import ReplicaPhase, ReplicaStatus, Unschedulable
from services.common.sockets import socket_root
from services.common.tokens import ROLE_MEMBER, Principal
from services.jobs.devenvs import DevEnvironments, DevEnvSettings, Env, socket_name
from tests.integration.planted_links import resolve_refuses_a_planted_link
from tests.integration.test_tensorboards_core import Clock, Runtime

S = pb.DevEnvironmentState
ACME = Principal("acme", ROLE_MEMBER, "AK1", 2e9)
RIVAL = Principal("rival", ROLE_MEMBER, "AK2", 2e9)


class LocalRuntime(Runtime):
    name = "local"

    def check_fits_ever(self, replicas, image=""):
        if sum(r.cpu_millis for r in replicas) > 8000:
            raise Unschedulable("needs more than the machine's 8 cores")


class Quota:
    """Limits on cpu and the dev-environment count, like the auth service's Reserve; access keys."""

    def __init__(self, cpu_limit=4000, count_limit=2):
        self.limits = {"cpu_millis": cpu_limit, "dev_environments": count_limit}
        self.held: dict[tuple[str, str], resources_pb2.Resources] = {}
        self.keys: dict[str, str] = {}
        self.revoked: list[str] = []

    def used(self, tenant, field):
        return sum(getattr(r, field) for (t, _), r in self.held.items() if t == tenant)

    async def reserve(self, tenant, owner, resources):
        if (tenant, owner) in self.held:
            return False
        for field, limit in self.limits.items():
            if self.used(tenant, field) + getattr(resources, field) > limit:
                raise errors.ResourceExhausted(f"{field}: over the limit {limit}")
        self.held[(tenant, owner)] = resources
        return True

    async def release(self, tenant, owner):
        return self.held.pop((tenant, owner), None) is not None

    async def create_access_key(self, tenant, description):
        key_id = f"AK{len(self.keys) + 100}"
        self.keys[key_id] = tenant
        return key_id, "secret-" + key_id

    async def revoke_access_key(self, tenant, key_id):
        assert self.keys[key_id] == tenant
        self.revoked.append(key_id)


@pytest.fixture
async def env(etcd_endpoint, etcd_prefix, tmp_path):
    etcd = await Etcd.connect(etcd_endpoint)
    clock, runtime, quota = Clock(), LocalRuntime(), Quota()
    data = tmp_path / "data"
    os.makedirs(data)

    def make(**settings):
        defaults = dict(data_dir=str(data), endpoint="127.0.0.1:1234", idle_seconds=600, start_timeout=30)
        return DevEnvironments(etcd, quota, runtime, DevEnvSettings(**{**defaults, **settings}), clock=clock,
                               prefix=etcd_prefix)

    yield {"make": make, "envs": make(), "runtime": runtime, "quota": quota, "clock": clock, "etcd": etcd,
           "data": str(data)}
    for listener in runtime.listeners.values():
        listener.close()
    await etcd.close()


async def settle(envs, name="nb", until=(S.DEV_ENVIRONMENT_STATE_RUNNING,)):
    for _ in range(20):
        await envs.reconcile()
        found = await envs.get(ACME, "", name)
        if found.state in until:
            return found
    return found


def held(quota, tenant="acme"):
    return {owner: (r.cpu_millis, r.dev_environments) for (t, owner), r in quota.held.items() if t == tenant}


async def test_create_runs_as_the_tenant_with_its_own_key_and_holds_quota(env):
    envs, quota = env["envs"], env["quota"]
    created = await envs.create(ACME, "", "nb", resources_pb2.Resources(cpu_millis=1500), "")
    assert created.state == S.DEV_ENVIRONMENT_STATE_STARTING and created.path == "/dev/acme/nb/"
    assert created.working_dir == "file://" + os.path.join(env["data"], "storage", "acme")
    running = await settle(envs)
    assert running.state == S.DEV_ENVIRONMENT_STATE_RUNNING, running
    uid = running.uid
    assert held(quota) == {f"jobs/devenv/nb/{uid}": (0, 1), f"jobs/devenv/nb/{uid}/run": (1500, 0)}
    # The kernels' config: a key of acme's (made for this env), the gateway's address; never in etcd.
    assert quota.keys[running.access_key_id] == "acme"
    config_path = os.path.join(env["data"], "devenvs", "acme", f"nb.{uid}", "config.json")
    with open(config_path) as f:
        config = json.load(f)
    assert config == {"endpoint": "127.0.0.1:1234", "access_key": running.access_key_id,
                      "secret_key": "secret-" + running.access_key_id}
    kvs, _, _ = await env["etcd"].get_prefix(envs.prefix)
    assert all(b"secret-" not in kv.value for kv in kvs)
    # The replica: the tenant's, its token only in its environment, the tenant's storage as root dir.
    (replica_id,) = env["runtime"].started
    address, authorization = await envs.resolve(ACME, "acme", "nb")
    assert address.startswith("unix:") and authorization == "token " + envs.jupyter_token(
        (await envs._all("acme"))[0])
    assert authorization[len("token "):] not in json.dumps(pb_dict(running))


def pb_dict(message) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message)


@pytest.mark.parametrize("case", ["name taken", "over count", "over cpu", "image on local", "never fits"])
async def test_bad_create_is_refused_and_leaves_nothing(env, case):
    envs, quota = env["envs"], env["quota"]
    await envs.create(ACME, "", "nb", resources_pb2.Resources(), "")
    if case == "over count":
        await envs.create(ACME, "", "nb2", resources_pb2.Resources(cpu_millis=100), "")
    before_held, before_keys = dict(quota.held), dict(quota.keys)
    before = [e.name for e in await envs.list(ACME, "")]
    name, resources, image, error = {
        "name taken": ("nb", resources_pb2.Resources(), "", errors.AlreadyExists),
        "over count": ("nb3", resources_pb2.Resources(cpu_millis=100), "", errors.ResourceExhausted),
        "over cpu": ("big", resources_pb2.Resources(cpu_millis=3500), "", errors.ResourceExhausted),
        "image on local": ("img", resources_pb2.Resources(), "jupyter/scipy-notebook", errors.InvalidArgument),
        "never fits": ("huge", resources_pb2.Resources(cpu_millis=9000), "", errors.ResourceExhausted),
    }[case]
    with pytest.raises(error) as info:
        await envs.create(ACME, "", name, resources, image)
    assert "\n" not in info.value.message
    if case == "image on local":
        assert "local runtime" in info.value.message and "--image" in info.value.message
    if case.startswith("over"):
        assert "quota" in info.value.message
    assert [e.name for e in await envs.list(ACME, "")] == before
    assert quota.held == before_held
    assert set(quota.keys) - set(before_keys) <= set(quota.revoked)  # a key made for it is revoked again


async def test_stop_frees_resources_keeps_the_count_and_start_reserves_again(env):
    envs, quota, runtime = env["envs"], env["quota"], env["runtime"]
    await envs.create(ACME, "", "nb", resources_pb2.Resources(cpu_millis=3000), "")
    running = await settle(envs)
    stopping = await envs.stop(ACME, "", "nb")
    assert stopping.state == S.DEV_ENVIRONMENT_STATE_STOPPING
    stopped = await settle(envs, until=(S.DEV_ENVIRONMENT_STATE_STOPPED,))
    assert stopped.state == S.DEV_ENVIRONMENT_STATE_STOPPED and not stopped.HasField("idle_stop_time")
    assert held(quota) == {f"jobs/devenv/nb/{running.uid}": (0, 1)}
    assert runtime.started[0] not in runtime.replicas and not runtime.groups  # stopped and forgotten
    # Another env takes the CPU meanwhile: start is refused at once, and it stays stopped.
    await envs.create(ACME, "", "other", resources_pb2.Resources(cpu_millis=2000), "")
    with pytest.raises(errors.ResourceExhausted):
        await envs.start(ACME, "", "nb")
    assert (await envs.get(ACME, "", "nb")).state == S.DEV_ENVIRONMENT_STATE_STOPPED
    await envs.delete(ACME, "", "other")
    await envs.reconcile()
    started = await envs.start(ACME, "", "nb")
    assert started.state == S.DEV_ENVIRONMENT_STATE_STARTING and started.uid == running.uid
    again = await settle(envs)
    assert again.state == S.DEV_ENVIRONMENT_STATE_RUNNING and len(runtime.started) == 2
    assert held(quota)[f"jobs/devenv/nb/{running.uid}/run"] == (3000, 0)


async def test_idle_env_is_stopped_and_says_so(env):
    envs, clock = env["envs"], env["clock"]
    await envs.create(ACME, "", "nb", resources_pb2.Resources(), "")
    running = await settle(envs)
    assert running.idle_stop_seconds == 600
    assert running.idle_stop_time.seconds == int(running.last_activity_time.seconds + 600)
    clock.now += 599
    await envs.resolve(ACME, "acme", "nb")  # a page request: the idle clock restarts
    clock.now += 599
    await envs.reconcile()
    assert (await envs.get(ACME, "", "nb")).state == S.DEV_ENVIRONMENT_STATE_RUNNING
    clock.now += 2
    stopped = await settle(envs, until=(S.DEV_ENVIRONMENT_STATE_STOPPED,))
    assert stopped.state == S.DEV_ENVIRONMENT_STATE_STOPPED
    assert stopped.message.startswith("stopped: idle for 10m"), stopped.message
    assert list(held(env["quota"]).values()) == [(0, 1)]
    with pytest.raises(errors.NotFound):
        await envs.resolve(ACME, "acme", "nb")


async def test_server_that_dies_while_running_comes_back(env):
    envs, runtime = env["envs"], env["runtime"]
    await envs.create(ACME, "", "nb", resources_pb2.Resources(), "")
    await settle(envs)
    runtime.end(runtime.started[0], "OOMKilled")
    await envs.reconcile()
    restarting = await envs.get(ACME, "", "nb")
    assert restarting.state == S.DEV_ENVIRONMENT_STATE_STARTING and "OOMKilled" in restarting.message
    assert (await settle(envs)).state == S.DEV_ENVIRONMENT_STATE_RUNNING and len(runtime.started) == 2


async def test_new_leader_adopts_the_running_server(env):
    await env["envs"].create(ACME, "", "nb", resources_pb2.Resources(), "")
    await settle(env["envs"])
    started = list(env["runtime"].started)
    successor = env["make"]()
    await successor.reconcile()
    await successor.reconcile()
    assert env["runtime"].started == started
    assert (await successor.get(ACME, "", "nb")).state == S.DEV_ENVIRONMENT_STATE_RUNNING
    # It presents the same Jupyter token (derived, never stored) as its predecessor.
    assert await successor.resolve(ACME, "acme", "nb") == await env["envs"].resolve(ACME, "acme", "nb")


async def test_delete_revokes_the_key_and_returns_everything(env):
    envs, quota = env["envs"], env["quota"]
    await envs.create(ACME, "", "nb", resources_pb2.Resources(), "")
    running = await settle(envs)
    env_dir = os.path.join(env["data"], "devenvs", "acme", f"nb.{running.uid}")
    assert os.path.isdir(env_dir)
    await envs.delete(ACME, "", "nb")
    await envs.reconcile()
    assert await envs.list(ACME, "") == [] and held(quota) == {}
    assert quota.revoked == [running.access_key_id] and not os.path.exists(env_dir)
    assert not env["runtime"].groups


async def test_another_tenant_sees_nothing(env):
    envs = env["envs"]
    await envs.create(ACME, "", "nb", resources_pb2.Resources(), "")
    await settle(envs)
    for call in (envs.get, envs.stop, envs.start, envs.delete, envs.resolve):
        with pytest.raises(errors.NotFound):
            await call(RIVAL, "acme", "nb")
    assert await envs.list(RIVAL, "") == []
    with pytest.raises(errors.NotFound):
        await envs.list(RIVAL, "acme")


def test_socket_paths_fit_the_limit_for_the_longest_names():
    env = Env(tenant="t" * 63, name="a" * 63, uid="01234567")
    path = os.path.join(socket_root("/" + "d" * 200), "t" * 40, socket_name(env))
    assert len(path.encode()) <= 107, len(path)


async def test_resolve_never_hands_out_a_socket_the_tenant_replaced(env, tmp_path):
    """As for TensorBoards: the gateway gets the platform's own link to the
    notebook server's socket; one the tenant replaced with a symbolic link
    (to another tenant's server, say) is never handed out."""
    envs = env["envs"]
    await envs.create(ACME, "", "nb", resources_pb2.Resources(cpu_millis=500), "")
    assert (await settle(envs)).state == S.DEV_ENVIRONMENT_STATE_RUNNING
    async def resolve():
        return (await envs.resolve(ACME, "acme", "nb"))[0]

    await resolve_refuses_a_planted_link(resolve, "acme", str(tmp_path / "elsewhere.sock"))
