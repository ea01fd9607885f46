"""`client.tensorboards` and `client.dev` against a real platform slice
(etcd, auth, jobs and a gateway on loopback), as a tenant of its own: a
TensorBoard on a logdir of its storage and a dev environment, each waited
for until it runs, its login link followed to its page through the gateway,
listed, and deleted; a dev environment stopped and its link refused.
(The CLI on these calls, and the pages in a browser: tests/e2e/.)"""
from __future__ import annotations

import http.cookiejar
import os
import urllib.request
import uuid

import pytest

import cloudml
from cloudml import errors
from deploy.local.stack import Stack

# A TensorBoard and a JupyterLab server start in seconds idle, tens of seconds on a loaded 2-core machine.
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def client(tmp_path_factory, etcd_server):
    workdir = tmp_path_factory.mktemp("sdk-boards")
    stack = Stack(str(workdir / "stack"), etcd_endpoint=etcd_server.endpoint, lease_ttl=3)
    try:
        stack.start("jobs", "gateway")
        tenant = f"sdkb-{uuid.uuid4().hex[:8]}"
        access_key, secret = stack.create_tenant(tenant)
        with cloudml.Client(stack.gateway.address, *stack.admin) as admin:
            admin.set_quota(tenant, cpu="4", memory="8Gi", tensorboards=1, dev_environments=1)
        with cloudml.Client(stack.gateway.address, access_key, secret,
                            config_path=str(workdir / "none.json")) as c:
            c.rest_endpoint = stack.rest
            c.storage = os.path.join(stack.data_dir, "storage", tenant)
            yield c
    finally:
        stack.stop()


def page(link: str) -> tuple[int, str]:
    """Follows a login link (its redirect sets the page cookie) to the page: (status, body)."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    with opener.open(link, timeout=30) as response:
        return response.status, response.read().decode(errors="replace")


def test_tensorboard_on_a_logdir(client):
    os.makedirs(os.path.join(client.storage, "runs"), exist_ok=True)
    board = client.tensorboards.create("board", logdir="file://" + os.path.join(client.storage, "runs"))
    assert board.running and board.path.endswith(f"/{board.tenant}/board/"), board
    status, body = page(client.tensorboards.login_link("board"))
    assert status == 200 and "TensorBoard" in body
    assert [b.name for b in client.tensorboards.list()] == ["board"]
    with pytest.raises(errors.AlreadyExists):
        client.tensorboards.create("board", logdir="file://" + os.path.join(client.storage, "runs"))
    with pytest.raises(errors.NotFound, match="job 'nojob' not found"):
        client.tensorboards.for_job("nojob")
    client.tensorboards.delete("board")
    assert all(b.state == "DELETING" for b in client.tensorboards.list())


def test_dev_environment_runs_stops_and_is_deleted(client):
    env = client.dev.create("nb", cpu="1", memory="2Gi")
    assert env.running and (env.cpu_millis, env.memory_bytes) == (1000, 2 << 30), env
    status, body = page(client.dev.login_link(env))
    assert status == 200 and "JupyterLab" in body
    assert [e.name for e in client.dev.list()] == ["nb"]
    stopped = client.dev.stop("nb")
    assert stopped.state in ("STOPPING", "STOPPED")
    with pytest.raises(errors.FailedPrecondition, match="dev environment nb is stopp"):
        client.dev.login_link("nb")
    client.dev.delete("nb")
    assert all(e.state == "DELETING" for e in client.dev.list())
