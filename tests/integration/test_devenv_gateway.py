"""A real notebook server (`python -m services.jobs.devenv_replica`,
JupyterLab on a Unix socket) behind the gateway's page proxy
(`services.gateway.pages.BrowserPages`), with the address lookup answering
what `ResolvePage` answers for a dev environment: its socket and the
Authorization header that carries Jupyter's token.

- the page and Jupyter's API answer through the proxy with a good cookie;
  the server refuses the same requests without its token (so the gateway is
  what presents it) and the browser never sees the token;
- a kernel's WebSocket through the proxy runs code;
- no cookie, another tenant's, an expired or revoked token: 401/404 for the
  page and the WebSocket handshake, and the server never sees them.

The whole platform in a browser: tests/e2e/test_devenv_browser.py."""
from __future__ import annotations

import asyncio
import json
import os
import stat
import time
import uuid

import aiohttp
import psutil
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloudml.jobs.v1 import dev_environments_pb2 as dev_pb
from services.common.tokens import AUDIENCE, ISSUER, ROLE_ADMIN, ROLE_MEMBER, TokenVerifier
from services.gateway.pages import COOKIE, BrowserPages
from services.jobs.devenv_replica import kernel_ipc_prefix
from services.jobs.devenvs import DevEnvironments, DevEnvSettings, Env
from tests.integration.jupyter_kernel import execute, message, start_server, wait_answers

S = dev_pb.DevEnvironmentState
TOKEN = ""

BASE = "/dev/acme/nb/"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("devenv_gateway")
    # The token the jobs service would derive for this env (so its idle probe can ask the server too).
    devenvs = DevEnvironments(None, None, object(), DevEnvSettings(data_dir=str(workdir / "data")))
    env = Env(tenant="acme", name="nb", uid="0123abcd", state=S.DEV_ENVIRONMENT_STATE_RUNNING)
    global TOKEN
    TOKEN = devenvs.jupyter_token(env)
    sock, proc = start_server(str(workdir), BASE, TOKEN)
    env.address = "unix:" + sock
    yield {"sock": sock, "workdir": workdir, "devenvs": devenvs, "env": env, "proc": proc}
    proc.terminate()
    proc.wait(15)


@pytest.fixture
async def env(server):
    key = Ed25519PrivateKey.generate()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    verifier = TokenVerifier()
    verifier.update({"k1": pem}, set())

    def token(tenant="acme", ttl=600, akid="AK1", role=ROLE_MEMBER):
        now = int(time.time())
        return jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": tenant, "role": role, "akid": akid,
                           "iat": now, "exp": now + ttl}, key, algorithm="EdDSA", headers={"kid": "k1"})

    async def resolve(kind, tenant, name, _token):
        assert (kind, tenant, name) == ("dev", "acme", "nb")
        return "unix:" + server["sock"], f"token {TOKEN}"

    pages = BrowserPages(verifier, None, resolve)
    app = web.Application()
    pages.add_routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
    direct = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=server["sock"]))
    await wait_answers(direct, f"http://nb{BASE}api/status")
    yield {"server": server, "url": f"http://127.0.0.1:{port}", "token": token, "verifier": verifier, "pem": pem, "session": session,
           "direct": direct}
    await session.close()
    await direct.close()
    await pages.close()
    await runner.cleanup()


def cookie(token: str) -> dict:
    return {"Cookie": f"{COOKIE}={token}"}


async def last_api_activity(env) -> str:
    async with env["direct"].get(f"http://nb{BASE}api/status", headers={"Authorization": f"token {TOKEN}"}) as r:
        return (await r.json())["last_activity"]


async def test_page_answers_through_the_gateway_which_alone_presents_jupyters_token(env):
    good = cookie(env["token"]())
    async with env["session"].get(env["url"] + BASE + "lab", headers=good) as response:
        body = await response.text()
        assert response.status == 200 and "JupyterLab" in body, body[:500]
        assert "Set-Cookie" not in response.headers
        assert TOKEN not in body and TOKEN not in json.dumps(dict(response.headers))
    async with env["session"].get(env["url"] + BASE + "api/contents", headers=good) as response:
        assert response.status == 200 and (await response.json())["type"] == "directory"
    # The same requests straight to the server, without its token: refused.
    for path in ("api/contents", "api/status"):
        async with env["direct"].get(f"http://nb{BASE}{path}") as response:
            assert response.status == 403, path
    # A browser's own "token" (a guess, or a leaked link) is dropped, never passed on.
    async with env["session"].get(env["url"] + BASE + "api/contents",
                                  headers={**good, "Authorization": "token guessed"}) as response:
        assert response.status == 200


async def test_kernel_websocket_through_the_gateway_runs_code(env):
    good = cookie(env["token"]())
    async with env["session"].post(env["url"] + BASE + "api/kernels", json={"name": "python3"},
                                   headers=good) as response:
        assert response.status == 201, await response.text()
        kernel = await response.json()
    session_id = uuid.uuid4().hex
    try:
        async with env["session"].ws_connect(
                env["url"] + f"{BASE}api/kernels/{kernel['id']}/channels?session_id={session_id}",
                headers=good) as socket:
            text, reply = await execute(socket, "import os; print(6 * 7, os.getcwd())", session_id)
            assert reply["status"] == "ok" and text.split()[0] == "42", text
            # The kernel's channels are Unix sockets beside the server's (over TCP, any user of the
            # machine could subscribe to its iopub port and read every output). The server listens on
            # no TCP port; the kernel on one at most: ipykernel's pipe for its subprocesses' output,
            # which takes only messages that start with its random key and sends nothing.
            server = psutil.Process(env["server"]["proc"].pid)
            kernels = [p for p in server.children(recursive=True) if "ipykernel_launcher" in p.cmdline()]
            assert len(kernels) == 1, [p.cmdline() for p in server.children(recursive=True)]
            cmdline = kernels[0].cmdline()
            with open(cmdline[cmdline.index("-f") + 1]) as f:
                connection = json.load(f)
            sock = env["server"]["sock"]
            prefix = kernel_ipc_prefix(sock)
            assert (connection["transport"], connection["ip"]) == ("ipc", prefix), connection
            assert os.path.dirname(prefix) == os.path.dirname(sock)
            for channel in ("shell", "iopub", "stdin", "control", "hb"):
                assert stat.S_ISSOCK(os.stat(f"{prefix}-{connection[channel + '_port']}").st_mode)

            def listening(process):
                return [c for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]

            assert not listening(server) and len(listening(kernels[0])) <= 1, listening(kernels[0])
            # The idle probe of the jobs service (its own token, straight to the socket): a kernel
            # busy with a silent cell counts as activity now.
            devenvs, dev_env = env["server"]["devenvs"], env["server"]["env"]
            devenvs.clock = lambda: 4e9
            idle = await devenvs._kernel_activity(dev_env)
            assert idle is not None and idle < 4e9
            await socket.send_json(message("execute_request", {"code": "import time; time.sleep(4)", "silent": False,
                                                               "store_history": False, "user_expressions": {},
                                                               "allow_stdin": False}, session_id))
            busy = None
            for _ in range(30):
                busy = await devenvs._kernel_activity(dev_env)
                if busy == 4e9:
                    break
                await asyncio.sleep(0.1)
            assert busy == 4e9
    finally:
        async with env["session"].delete(env["url"] + f"{BASE}api/kernels/{kernel['id']}", headers=good):
            pass


@pytest.mark.parametrize("case,status", [
    ("no cookie", 401), ("expired", 401), ("revoked", 401), ("other tenant", 404), ("admin", 404)])
async def test_refused_requests_get_no_page_and_no_websocket(env, case, status):
    token = env["token"]
    if case == "revoked":
        env["verifier"].update({"k1": env["pem"]}, {"AK-revoked"})
    value = {"no cookie": None, "expired": token(ttl=-5), "revoked": token(akid="AK-revoked"),
             "other tenant": token(tenant="rival"),
             # Not even an admin: the page runs the tenant's script where the admin's cookie would be sent.
             "admin": token(tenant="admin", role=ROLE_ADMIN)}[case]
    headers = cookie(value) if value else {}
    before = await last_api_activity(env)
    async with env["session"].get(env["url"] + BASE + "api/contents", headers=headers) as response:
        assert response.status == status, (case, await response.text())
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await env["session"].ws_connect(env["url"] + f"{BASE}api/kernels/any/channels", headers=headers)
    assert info.value.status == status
    assert await last_api_activity(env) == before  # the server saw neither
