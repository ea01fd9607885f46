"""Browser pages on the gateway's HTTP port: the login link and the proxy.

    GET  /login?code=<code>                      (a link from AuthService.CreateLoginLink)
    *    /tensorboard/<tenant>/<name>/...        HTTP and WebSocket, to the TensorBoard's replica
    *    /dev/<tenant>/<name>/...                HTTP and WebSocket (kernels), to the notebook server

Login: the gateway redeems the one-time code with the auth service
(RedeemLoginLink), sets the cookie `cloudml_page` = the platform token it
got (HttpOnly, SameSite=Strict, Path=/<kind>/<tenant>/<name>/, Max-Age = the
token's lifetime, Secure when the request came over TLS) and answers 303 to
the page, so no token or code stays in the address bar or reaches the page.
A link to the web console (path "/ui/") sets the same cookie with Path=/ui/
(services.gateway.console checks it there).

Every page request, HTTP or WebSocket, is checked before anything is sent
to the replica: the cookie's token is verified as a Bearer token is
(`TokenVerifier.verify`: signature, expiry, revoked access key), and its
tenant must be the page's (admins' too: they open only their own tenant's
pages, so no tenant's script runs where an admin's cookie is sent). No cookie or a bad one:
401; another tenant's page: 404 (as for the APIs, its existence is not
revealed). The address comes from the service that owns the page
(`cloudml.internal.v1.PageBackends.ResolvePage`, called with the same token,
so that service checks again), cached for the seconds it says: a Unix
socket `unix:PATH` (the local runtime) or `http://HOST:PORT` (a Pod's IP on
the kubernetes runtime; nothing else over TCP: no path, no user).

What the replica (tenant code) receives: the method, path and query, the
body streamed, and the request's headers except the cookie,
`Authorization`, `Host` and hop-by-hop ones: it never sees a platform
token. When the owning service names one (`ResolvePageResponse.authorization`:
a notebook server's own Jupyter token), the gateway sends that as the
`Authorization` header instead; the browser never sees it. What
the browser receives: the replica's status, headers (but `Set-Cookie` and
hop-by-hop ones) and body, streamed in chunks (never buffered whole), still
compressed if the replica compressed it.

Known limit: pages share the gateway's origin, so script on one page (a
TensorBoard shows tenant data; a notebook runs tenant code) can send
same-origin requests to another page path for which the same browser holds
a cookie. Since a page serves only its own tenant's callers, such a cookie
is its own tenant's (that member's other pages, or the console with that
member's rights); HttpOnly keeps the token itself out of reach; a separate
origin per page (a host name per page) would close the rest.
"""
from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import grpc
from aiohttp import web
from yarl import URL

from cloudml.auth.v1 import auth_service_pb2 as auth_pb
from cloudml.auth.v1 import auth_service_pb2_grpc as auth_grpc
from cloudml.internal.v1 import pages_pb2, pages_pb2_grpc
from services.common import errors

log = logging.getLogger(__name__)

COOKIE = "cloudml_page"
KINDS = {"tensorboard": "jobs", "dev": "jobs"}
CALL_TIMEOUT = 5.0
CHUNK = 64 * 1024
#: connection pools kept, one per page server address
MAX_SESSIONS = 256
# Never forwarded either way (RFC 9110 hop-by-hop, plus what carries credentials).
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "host"}
_REQUEST_DROP = _HOP | {"cookie", "authorization", "forwarded", "x-forwarded-for", "x-forwarded-host",
                        "x-forwarded-proto", "sec-websocket-key", "sec-websocket-version",
                        "sec-websocket-extensions", "sec-websocket-accept"}
_RESPONSE_DROP = _HOP | {"set-cookie"}


def _page(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text + "\n", content_type="text/plain",
                        headers={"Cache-Control": "no-store"})


class BrowserPages:
    def __init__(self, verifier, directory, resolve=None):
        self.verifier = verifier
        self.directory = directory
        #: async (kind, tenant, name, token) -> address or (address, Authorization for the
        #: server); default: ask the owning service
        self.resolve = resolve or self._resolve
        self._addresses: dict[tuple[str, str, str], tuple[tuple[str, str], float]] = {}
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/login", self.login)
        for kind in KINDS:
            app.router.add_route("*", f"/{kind}/{{tenant}}/{{name}}", self.add_slash)
            app.router.add_route("*", f"/{kind}/{{tenant}}/{{name}}/{{tail:.*}}", self.page)

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()

    # --- login ----------------------------------------------------------------------------

    async def login(self, request: web.Request) -> web.StreamResponse:
        code = request.query.get("code", "")
        stub = auth_grpc.AuthServiceStub(self.directory.channel("auth"))
        try:
            redeemed = await stub.RedeemLoginLink(auth_pb.RedeemLoginLinkRequest(code=code), timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                return _page(401, "This login link is invalid, used or expired: ask for a new one.")
            log.info("login: RedeemLoginLink failed: %s %s", err.code().name, err.details())
            return _page(503, "The platform cannot log you in right now: try again.")
        response = web.Response(status=303, headers={
            "Location": redeemed.path, "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})
        max_age = max(0, int(redeemed.expire_time.seconds - time.time()))
        response.set_cookie(COOKIE, redeemed.token, path=redeemed.cookie_path, max_age=max_age, httponly=True,
                            samesite="Strict", secure=request.secure or None)
        return response

    # --- the proxy ----------------------------------------------------------------------------

    async def add_slash(self, request: web.Request) -> web.StreamResponse:
        # The cookie's path ends in "/", so the browser sends none here: say
        # only where the page is (no check is possible, none is needed).
        query = f"?{request.query_string}" if request.query_string else ""
        raise web.HTTPPermanentRedirect(request.path + "/" + query)

    def _caller(self, request: web.Request) -> str:
        """The verified token of the request's cookie; raises a 401/404 answer."""
        token = request.cookies.get(COOKIE, "")
        if not token:
            raise _Answer(_page(401, "Not logged in: open the page through a login link "
                                     "(e.g. `cloudml tensorboard open NAME`, `cloudml dev open NAME`)."))
        try:
            caller = self.verifier.verify(token)
        except errors.CloudMLError as err:
            raise _Answer(_page(401, f"Not logged in: {err.message}.")) from None
        # Only the page's own tenant, admins included: a page runs its
        # tenant's script on the gateway's origin, and an admin's cookie in
        # the same browser would then act for it (see "Known limit" above).
        if caller.tenant != request.match_info["tenant"]:
            raise _Answer(_page(404, "No such page."))
        return token

    async def _resolve(self, kind: str, tenant: str, name: str, token: str) -> tuple[str, str]:
        key = (kind, tenant, name)
        cached = self._addresses.get(key)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0]
        stub = pages_pb2_grpc.PageBackendsStub(self.directory.channel(KINDS[kind]))
        try:
            found = await stub.ResolvePage(pages_pb2.ResolvePageRequest(kind=kind, tenant=tenant, name=name),
                                           metadata=(("authorization", f"Bearer {token}"),), timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as err:
            self._addresses.pop(key, None)
            if err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
                raise _Answer(_page(404, "No such page, or it is not running (yet).")) from None
            if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise _Answer(_page(401, f"Not logged in: {err.details()}.")) from None
            raise _Answer(_page(503, "The page's service is unavailable: try again.")) from None
        if len(self._addresses) > 10_000:
            self._addresses.clear()
        answer = (found.address, found.authorization)
        self._addresses[key] = (answer, now + max(0, found.cache_seconds))
        return answer

    def _session(self, address: str) -> tuple[aiohttp.ClientSession, str]:
        """(connection pool, URL base) of a page server: `unix:PATH` or `http://HOST:PORT`."""
        tcp = _tcp_base(address)
        session = self._sessions.get(address)
        if session is None or session.closed:
            if not address.startswith("unix:") and not tcp:
                raise _Answer(_page(502, "The page's server has no usable address."))
            self._sessions.pop(address, None)
            if len(self._sessions) >= MAX_SESSIONS:  # replicas come and go: keep the newest
                oldest = self._sessions.pop(next(iter(self._sessions)))
                asyncio.get_running_loop().create_task(oldest.close())
            connector = (aiohttp.TCPConnector(limit=64, use_dns_cache=False) if tcp
                         else aiohttp.UnixConnector(path=address[len("unix:"):], limit=64))
            session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=300))
            self._sessions[address] = session
        return session, tcp or "http://page"

    async def _drop_session(self, address: str) -> None:
        session = self._sessions.pop(address, None)
        if session is not None:
            await session.close()

    async def page(self, request: web.Request) -> web.StreamResponse:
        try:
            token = self._caller(request)
            kind = request.path.split("/", 2)[1]
            found = await self.resolve(kind, request.match_info["tenant"], request.match_info["name"], token)
            address, authorization = (found, "") if isinstance(found, str) else found
            session, base = self._session(address)
        except _Answer as answer:
            return answer.response
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _REQUEST_DROP}
        if authorization:
            headers["Authorization"] = authorization
        url = URL(base + request.raw_path, encoded=True)
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._websocket(request, session, url, headers)
        try:
            upstream = await session.request(request.method, url, headers=headers, allow_redirects=False,
                                             data=request.content if request.body_exists else None)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as err:
            self._addresses.pop((kind, request.match_info["tenant"], request.match_info["name"]), None)
            await self._drop_session(address)
            log.info("page %s: its server did not answer: %s", request.path, err)
            return _page(502, "The page's server did not answer: try again in a moment.")
        try:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in _RESPONSE_DROP:
                    response.headers.add(key, value)
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(CHUNK):
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            upstream.release()

    async def _websocket(self, request, session, url, headers) -> web.StreamResponse:
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        headers.pop("Sec-WebSocket-Protocol", None)
        try:
            upstream = await session.ws_connect(url, headers=headers, protocols=protocols, autoping=False,
                                                max_msg_size=0)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as err:
            log.info("page %s: WebSocket refused by its server: %s", request.path, err)
            return _page(502, "The page's server refused the WebSocket.")
        downstream = web.WebSocketResponse(protocols=(upstream.protocol,) if upstream.protocol else (),
                                           autoping=False, max_msg_size=0)
        await downstream.prepare(request)

        async def pump(source, sink) -> None:
            async for message in source:
                if message.type == aiohttp.WSMsgType.TEXT:
                    await sink.send_str(message.data)
                elif message.type == aiohttp.WSMsgType.BINARY:
                    await sink.send_bytes(message.data)
                elif message.type == aiohttp.WSMsgType.PING:
                    await sink.ping(message.data)
                elif message.type == aiohttp.WSMsgType.PONG:
                    await sink.pong(message.data)
                else:
                    break

        tasks = [asyncio.create_task(pump(downstream, upstream)), asyncio.create_task(pump(upstream, downstream))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await upstream.close()
            await downstream.close()
        return downstream


def _tcp_base(address: str) -> str:
    """"http://HOST:PORT" of a page server on TCP (a Pod's IP), "" for anything else."""
    if not address.startswith("http://"):
        return ""
    try:
        url = URL(address)
    except ValueError:
        return ""
    if not url.host or url.explicit_port is None or url.path not in ("", "/") or url.query_string or url.user:
        return ""
    return f"http://{url.raw_authority}"


class _Answer(Exception):
    def __init__(self, response: web.Response):
        super().__init__()
        self.response = response
