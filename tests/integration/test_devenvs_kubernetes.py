"""A dev environment on the kubernetes runtime, against a real kube-apiserver:
the jobs service (a real process, real auth and gateway around it) makes one
Pod of the platform's image running the notebook server on a TCP port, its
keys and Jupyter token in a Secret of its own (the Pod's spec names them,
never holds them); the test plays the kubelet. A real notebook server
(`services.jobs.devenv_replica`) listens on loopback where the Pod's IP and
port say, started with the Pod's command and environment (the Secret's
values resolved as the kubelet would), standing in for the container. Once
the Pod is Ready the environment is RUNNING and its page, HTTP and a
kernel's WebSocket, answers through the gateway's page proxy after a login
link; another tenant gets 404; stop removes the Pod and its Secret, the
notebooks stay in the tenant's storage."""
from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import uuid

import aiohttp
import grpc
import pytest

from cloudml.auth.v1 import auth_service_pb2 as auth_pb
from cloudml.common.v1 import resources_pb2
from cloudml.jobs.v1 import dev_environments_pb2 as pb
from cloudml.jobs.v1 import dev_environments_pb2_grpc as pb_grpc
from deploy.local import stack as harness
from deploy.local.etcd import free_port
from services.common.runtime.kube_objects import SELECTOR
from services.gateway.pages import COOKIE
from services.jobs.devenvs import DevEnvironments, DevEnvSettings, Env
from tests.integration.conftest import ADMIN_ACCESS_KEY, connect
from tests.integration.jupyter_kernel import ROOT, execute, wait_answers
from tests.integration.models_stack import wait_for

S = pb.DevEnvironmentState
IMAGE = "registry.example/cloudml/trainer:7"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, etcd_server, kube_env):
    workdir = str(tmp_path_factory.mktemp("devenv-kube"))
    namespace = f"dev-{uuid.uuid4().hex[:6]}"
    kube_env.create_namespace(namespace)
    kube_env.create_node("node-1", cpu="4", memory="16Gi")
    port = free_port()
    secret = uuid.uuid4().hex
    stack = harness.Stack(workdir, etcd_endpoint=etcd_server.endpoint, admin=(ADMIN_ACCESS_KEY, secret),
                          service=None, lease_ttl=3, service_flags={"jobs": [
                              "--runtime", "kubernetes", "--kubeconfig", kube_env.kubeconfig, "--namespace",
                              namespace, "--image", IMAGE, "--storage-claim", "cloudml-storage",
                              "--dev-port", str(port), "--stop-grace", "1"]})
    containers: list[subprocess.Popen] = []
    try:
        stack.start()
        jobs = stack.start_service("jobs", "jobs", wait=90)
        stack.start_gateway()
        auth = connect(stack.auth, secret)
        with grpc.insecure_channel(jobs.address) as channel:
            yield {"kube": kube_env, "namespace": namespace, "port": port, "stack": stack, "auth": auth,
                   "stub": pb_grpc.DevEnvironmentServiceStub(channel), "containers": containers,
                   "workdir": workdir}
        auth.channel.close()
    finally:
        for container in containers:
            container.terminate()
            container.wait(30)
        stack.stop()


def _pods(kube, namespace):
    return [p for p in kube.core.list_namespaced_pod(namespace, label_selector=SELECTOR).items
            if p.metadata.deletion_timestamp is None]


def _container_env(kube, namespace, pod) -> dict[str, str]:
    """The container's environment as the kubelet gives it (secretKeyRef resolved)."""
    env = {}
    for var in pod.spec.containers[0].env:
        if var.value_from is not None:
            ref = var.value_from.secret_key_ref
            data = kube.core.read_namespaced_secret(ref.name, namespace).data
            env[var.name] = base64.b64decode(data[ref.key]).decode()
        else:
            env[var.name] = var.value or ""
    return env


def _run_container(setup, pod, home: str) -> subprocess.Popen:
    """The Pod's command on loopback (its IP here), in this checkout's Python."""
    command = list(pod.spec.containers[0].command)
    assert command[0] == "python"
    command[0] = sys.executable
    command[command.index("--listen") + 1] = f"127.0.0.1:{setup['port']}"
    env = {**_container_env(setup["kube"], setup["namespace"], pod), "HOME": home, "TMPDIR": home,
           "PYTHONPATH": ROOT, "PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin"}
    os.makedirs(home, exist_ok=True)
    log = open(os.path.join(setup["workdir"], "container.log"), "ab")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    setup["containers"].append(process)
    return process


async def _through_gateway(rest: str, login_path: str, base: str, rival_cookie: str) -> dict:
    """Logs in with the link, then the page, Jupyter's API and a kernel through the gateway."""
    out = {}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        async with session.get(rest + login_path, allow_redirects=False) as response:
            assert response.status == 303, await response.text()
            cookie = {"Cookie": f"{COOKIE}={response.cookies[COOKIE].value}"}
        async with session.get(rest + base + "lab", headers=cookie) as response:
            out["lab"] = (response.status, await response.text())
        async with session.get(rest + base + "api/contents", headers=cookie) as response:
            out["contents"] = (response.status, await response.json())
        async with session.get(rest + base + "api/contents", headers={"Cookie": f"{COOKIE}={rival_cookie}"}) \
                as response:
            out["rival"] = response.status
        async with session.post(rest + base + "api/kernels", json={"name": "python3"}, headers=cookie) as response:
            assert response.status == 201, await response.text()
            kernel = await response.json()
        session_id = uuid.uuid4().hex
        async with session.ws_connect(rest + f"{base}api/kernels/{kernel['id']}/channels?session_id={session_id}",
                                      headers=cookie) as socket:
            out["kernel"] = await execute(socket, "import os; print(os.environ.get('CLOUDML_ACCESS_KEY'), "
                                                  "'CLOUDML_JUPYTER_TOKEN' in os.environ, os.getcwd())", session_id)
        async with session.delete(rest + f"{base}api/kernels/{kernel['id']}", headers=cookie):
            pass
    return out


async def _cookie_of(rest: str, login_path: str) -> str:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        async with session.get(rest + login_path, allow_redirects=False) as response:
            assert response.status == 303
            return response.cookies[COOKIE].value


@pytest.mark.timeout(300)
def test_a_dev_environment_is_a_pod_reached_through_the_gateway_while_ready(setup):
    kube, namespace, port, stub = setup["kube"], setup["namespace"], setup["port"], setup["stub"]
    team, rival = setup["auth"].new_tenant("dk"), setup["auth"].new_tenant("dr")
    md = team.md
    storage = os.path.join(setup["stack"].data_dir, "storage", team.tenant)

    def get():
        return stub.GetDevEnvironment(pb.GetDevEnvironmentRequest(name="nb"), metadata=md,
                                      timeout=10).dev_environment

    created = stub.CreateDevEnvironment(pb.CreateDevEnvironmentRequest(name="nb", resources=resources_pb2.Resources(
        cpu_millis=500, memory_bytes=1 << 30)), metadata=md, timeout=10).dev_environment
    base = created.path
    assert base == f"/dev/{team.tenant}/nb/"

    [pod] = wait_for(lambda: _pods(kube, namespace), 30, "the dev environment's Pod")
    [container] = pod.spec.containers
    assert container.image == IMAGE
    assert container.command[:3] == ["python", "-m", "services.jobs.devenv_replica"]
    assert container.command[container.command.index("--listen") + 1] == f"0.0.0.0:{port}"
    assert container.command[container.command.index("--base-url") + 1] == base
    assert container.command[container.command.index("--root-dir") + 1] == storage
    assert [p.container_port for p in container.ports] == [port]
    assert container.readiness_probe.tcp_socket.port == port
    assert container.resources.limits == container.resources.requests == {"cpu": "500m", "memory": str(1 << 30)}
    mounts = {m.name: (m.mount_path, m.sub_path) for m in container.volume_mounts}
    assert mounts["storage"] == (storage, team.tenant)
    assert pod.metadata.labels["cloudml.io/tenant"] == team.tenant
    assert pod.spec.automount_service_account_token is False
    # The keys are in the replica's own Secret; the Pod's spec only refers to it.
    secret_name = pod.metadata.annotations["cloudml.io/secret"]
    refs = {v.name: v.value_from.secret_key_ref.name for v in container.env if v.value_from is not None}
    assert refs == {"CLOUDML_ACCESS_KEY": secret_name, "CLOUDML_SECRET_KEY": secret_name,
                    "CLOUDML_JUPYTER_TOKEN": secret_name}
    resolved = _container_env(kube, namespace, pod)
    assert resolved["CLOUDML_ACCESS_KEY"] == created.access_key_id
    plain = " ".join(f"{v.name}={v.value}" for v in container.env if v.value_from is None)
    for name in ("CLOUDML_SECRET_KEY", "CLOUDML_JUPYTER_TOKEN"):
        assert len(resolved[name]) >= 32 and resolved[name] not in plain + " ".join(container.command)
    secret = kube.core.read_namespaced_secret(secret_name, namespace)
    assert secret.metadata.labels["cloudml.io/tenant"] == team.tenant
    assert [o.kind for o in secret.metadata.owner_references] == ["Service"]

    # The kubelet's part: scheduled, the container running but not Ready yet.
    kube.bind(namespace, pod.metadata.name, "node-1")
    kube.set_running(namespace, pod.metadata.name, pod_ip="127.0.0.1", ready=False)
    _run_container(setup, pod, os.path.join(setup["workdir"], "pod-home"))

    async def server_answers():
        async with aiohttp.ClientSession() as session:
            await wait_answers(session, f"http://127.0.0.1:{port}{base}api/status", timeout=120)
    asyncio.run(server_answers())
    assert get().state == S.DEV_ENVIRONMENT_STATE_STARTING  # not Ready: not RUNNING, no page
    kube.set_running(namespace, pod.metadata.name, pod_ip="127.0.0.1", ready=True)
    wait_for(lambda: get().state == S.DEV_ENVIRONMENT_STATE_RUNNING, 20, "the environment RUNNING")

    login = team.call("CreateLoginLink", auth_pb.CreateLoginLinkRequest(path=base)).login_path
    rival_login = rival.call("CreateLoginLink", auth_pb.CreateLoginLinkRequest(path=f"/dev/{rival.tenant}/nb/"))
    rest = setup["stack"].rest
    rival_cookie = asyncio.run(_cookie_of(rest, rival_login.login_path))
    seen = asyncio.run(_through_gateway(rest, login, base, rival_cookie))
    assert seen["lab"][0] == 200 and "JupyterLab" in seen["lab"][1]
    assert seen["contents"][0] == 200 and seen["contents"][1]["type"] == "directory"
    assert seen["rival"] == 404
    text, reply = seen["kernel"]
    assert reply["status"] == "ok", reply
    assert text.split() == [created.access_key_id, "False", storage]
    # The idle check (the jobs service's own request, with the token) over TCP too.
    devenvs = DevEnvironments(None, None, object(), DevEnvSettings(data_dir=setup["stack"].data_dir))
    probe = Env(tenant=team.tenant, name="nb", uid=created.uid, address=f"http://127.0.0.1:{port}")
    assert asyncio.run(devenvs._kernel_activity(probe)) is not None
    with pytest.raises(grpc.RpcError) as info:
        stub.GetDevEnvironment(pb.GetDevEnvironmentRequest(tenant=team.tenant, name="nb"), metadata=rival.md,
                               timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    # Stop: the Pod, its Secret and Service go (the test confirms the kubelet's part); files stay.
    with open(os.path.join(storage, "kept.ipynb"), "w") as f:
        f.write("{}")
    stub.StopDevEnvironment(pb.StopDevEnvironmentRequest(name="nb"), metadata=md, timeout=10)

    def left():
        kube.finish_deletions(namespace)
        return [f"{kind} {o.metadata.name}" for kind, objects in (
            ("Pod", kube.core.list_namespaced_pod(namespace).items),
            ("Service", kube.core.list_namespaced_service(namespace).items),
            ("Secret", kube.core.list_namespaced_secret(namespace, label_selector=SELECTOR).items))
            for o in objects] + [get().message]

    seen: list = []
    try:
        wait_for(lambda: len(seen.append(left()) or seen[-1]) == 1, 30, "the Pod, its Service and Secret deleted")
    except AssertionError:
        raise AssertionError(f"left after stop: {seen[-1:]}") from None
    wait_for(lambda: get().state == S.DEV_ENVIRONMENT_STATE_STOPPED, 20, "the environment STOPPED")
    assert os.path.exists(os.path.join(storage, "kept.ipynb"))

    stub.DeleteDevEnvironment(pb.DeleteDevEnvironmentRequest(name="nb"), metadata=md, timeout=10)

    def deleted():
        try:
            get()
        except grpc.RpcError as err:
            return err.code() == grpc.StatusCode.NOT_FOUND
        return False

    wait_for(deleted, 20, "the environment deleted")
    assert not _pods(kube, namespace)
