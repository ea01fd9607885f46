"""The gateway's page proxy (`services.gateway.pages.BrowserPages`) in front
of a stand-in page server on a Unix socket: what reaches the server (never
the cookie or an Authorization header), what comes back (never Set-Cookie;
large bodies streamed), WebSocket relaying, and who is refused before
anything is sent (no cookie, expired, revoked, another tenant).

The address lookup (PageBackends.ResolvePage) is replaced by the stand-in's
socket; the login redirect is tested on a whole platform
(tests/e2e/test_tensorboard_browser.py)."""
from __future__ import annotations

import json
import time

import aiohttp
import jwt
import pytest
from aiohttp import web
from yarl import URL
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.common.tokens import AUDIENCE, ISSUER, ROLE_ADMIN, ROLE_MEMBER, TokenVerifier
from services.gateway.pages import COOKIE, BrowserPages

BIG = 8 << 20


class StandIn:
    """The page server: records what reached it."""

    def __init__(self):
        self.seen: list[web.Request] = []
        self.app = web.Application()
        self.app.router.add_route("*", "/tensorboard/acme/board/echo", self.echo)
        self.app.router.add_get("/tensorboard/acme/board/big", self.big)
        self.app.router.add_get("/tensorboard/acme/board/ws", self.ws)

    async def echo(self, request):
        self.seen.append(request)
        body = await request.read()
        return web.json_response({"headers": dict(request.headers), "path": request.raw_path, "body": len(body)},
                                 headers={"Set-Cookie": "evil=1; Path=/", "X-Page": "yes"})

    async def big(self, request):
        self.seen.append(request)
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        chunk = b"x" * (1 << 16)
        for _ in range(BIG // len(chunk)):
            await response.write(chunk)
        await response.write_eof()
        return response

    async def ws(self, request):
        self.seen.append(request)
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for message in socket:
            if message.type == aiohttp.WSMsgType.TEXT:
                await socket.send_str("echo:" + message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                await socket.send_bytes(message.data[::-1])
        return socket


def fixed(address: str):
    """A page-address lookup that always answers `address`."""
    async def resolve(kind, tenant, name, token):
        return address
    return resolve


@pytest.fixture
async def env(tmp_path):
    key = Ed25519PrivateKey.generate()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    verifier = TokenVerifier()
    verifier.update({"k1": pem}, set())

    def token(tenant="acme", ttl=600, akid="AK1", role=ROLE_MEMBER):
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": tenant, "role": role, "akid": akid,
                  "iat": now, "exp": now + ttl}
        return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": "k1"})

    stand_in = StandIn()
    socket_path = str(tmp_path / "page.sock")
    backend = web.AppRunner(stand_in.app)
    await backend.setup()
    await web.UnixSite(backend, socket_path).start()
    pages = BrowserPages(verifier, None, fixed("unix:" + socket_path))
    front_app = web.Application()
    pages.add_routes(front_app)
    front = web.AppRunner(front_app)
    await front.setup()
    site = web.TCPSite(front, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False)
    yield {"url": f"http://127.0.0.1:{port}", "token": token, "verifier": verifier, "pem": pem,
           "stand_in": stand_in, "session": session}
    await session.close()
    await pages.close()
    await front.cleanup()
    await backend.cleanup()


def cookie(token: str) -> dict:
    return {"Cookie": f"{COOKIE}={token}"}


async def test_proxied_request_carries_no_credentials_and_no_cookie_comes_back(env):
    token = env["token"]()
    headers = {**cookie(token), "Authorization": f"Bearer {token}", "X-Custom": "kept"}
    url = URL(env["url"] + "/tensorboard/acme/board/echo?a=1&b=%2F", encoded=True)
    async with env["session"].post(url, data=b"payload",
                                   headers=headers) as response:
        assert response.status == 200
        assert "Set-Cookie" not in response.headers and response.headers["X-Page"] == "yes"
        seen = await response.json()
    sent = {k.lower(): v for k, v in seen["headers"].items()}
    assert "cookie" not in sent and "authorization" not in sent and sent["x-custom"] == "kept"
    assert token not in json.dumps(seen)
    assert seen["path"] == "/tensorboard/acme/board/echo?a=1&b=%2F" and seen["body"] == len(b"payload")


async def test_large_response_is_streamed_whole(env):
    async with env["session"].get(env["url"] + "/tensorboard/acme/board/big",
                                  headers=cookie(env["token"]())) as response:
        assert response.status == 200
        assert "Content-Length" not in response.headers  # relayed chunk by chunk, never buffered to measure
        total = 0
        async for chunk in response.content.iter_chunked(1 << 16):
            total += len(chunk)
    assert total == BIG


async def test_websocket_is_relayed_both_ways(env):
    async with env["session"].ws_connect(env["url"] + "/tensorboard/acme/board/ws",
                                         headers=cookie(env["token"]())) as socket:
        await socket.send_str("hello")
        assert (await socket.receive(timeout=5)).data == "echo:hello"
        await socket.send_bytes(b"\x01\x02\x03")
        assert (await socket.receive(timeout=5)).data == b"\x03\x02\x01"


@pytest.mark.parametrize("case,status", [
    ("no cookie", 401), ("garbage", 401), ("expired", 401), ("revoked", 401), ("other tenant", 404),
    ("wrong signature", 401)])
async def test_refused_requests_never_reach_the_page_server(env, case, status):
    token = env["token"]
    if case == "revoked":
        env["verifier"].update({"k1": env["pem"]}, {"AK-revoked"})
    value = {"no cookie": None, "garbage": "a.b.c", "expired": token(ttl=-5), "revoked": token(akid="AK-revoked"),
             "other tenant": token(tenant="rival"),
             "wrong signature": token()[:-4] + "AAAA"}[case]
    headers = cookie(value) if value else {}
    for path in ("/tensorboard/acme/board/echo", "/tensorboard/acme/board/ws"):
        async with env["session"].get(env["url"] + path, headers=headers) as response:
            assert response.status == status, (case, path, await response.text())
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await env["session"].ws_connect(env["url"] + "/tensorboard/acme/board/ws", headers=headers)
    assert info.value.status == status
    assert env["stand_in"].seen == []


async def test_an_admin_may_not_open_another_tenants_page(env):
    """A page runs its tenant's script on the gateway's origin: with an
    admin's cookie accepted there, that script could act as the admin."""
    async with env["session"].get(env["url"] + "/tensorboard/acme/board/echo",
                                  headers=cookie(env["token"](tenant="admin", role=ROLE_ADMIN))) as response:
        assert response.status == 404
    assert env["stand_in"].seen == []


async def test_page_root_without_slash_redirects_to_it(env):
    async with env["session"].get(env["url"] + "/tensorboard/acme/board", allow_redirects=False) as response:
        assert response.status == 308 and response.headers["Location"] == "/tensorboard/acme/board/"
