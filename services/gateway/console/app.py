"""The console's pages, login and session checks (see the package docstring)."""
from __future__ import annotations

import hashlib
import hmac
import html
import logging
import os
import re
import time
from dataclasses import dataclass

import grpc
from aiohttp import web

from cloudml.auth.v1 import auth_service_pb2 as auth_pb
from cloudml.auth.v1 import auth_service_pb2_grpc as auth_grpc
from services.common import errors
from services.common.tokens import Principal
from services.gateway.pages import COOKIE

log = logging.getLogger(__name__)

PATH = "/ui/"
#: seconds a console session lasts (the token behind the cookie; as a login link's)
SESSION_SECONDS = 3600
CALL_TIMEOUT = 10.0
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
_TENANT = re.compile(r"^[a-z0-9][-a-z0-9]{0,62}$")
MAX_LOGIN_BODY = 4096
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # "no-referrer" would make a form POST's Origin "null"
    "Cache-Control": "no-store",
}


def api_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=SECURITY_HEADERS)


class Refused(Exception):
    """Answers the request with an error (raised deep in a handler)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.response = api_error(status, message)


def csrf_of(token: str) -> str:
    """The CSRF token of a session: only a page that can read /ui/api/session
    (this origin) learns it; the cookie's token itself stays HttpOnly."""
    return hashlib.sha256(b"cloudml-console-csrf\0" + token.encode()).hexdigest()[:40]


@dataclass(frozen=True)
class Session:
    token: str
    principal: Principal
    #: the tenant this request looks at: the caller's, or `?tenant=` for an admin
    tenant: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)


class Console:
    def __init__(self, verifier, directory, rest=None):
        self.verifier = verifier
        self.directory = directory
        #: the gateway's RestServer: model routes, request metrics, REST Predict
        self.rest = rest
        self.files = {}
        for name in os.listdir(STATIC_DIR):
            ext = os.path.splitext(name)[1]
            if ext in _TYPES:
                with open(os.path.join(STATIC_DIR, name), "rb") as f:
                    self.files[name] = (f.read(), _TYPES[ext])
        from services.gateway.console.api import ConsoleApi

        self.api = ConsoleApi(self)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self.root)
        app.router.add_get("/ui", self.root)
        app.router.add_get(PATH, self.index)
        app.router.add_get(PATH + "static/{file}", self.static)
        app.router.add_post(PATH + "login", self.login)
        app.router.add_post(PATH + "logout", self.logout)
        self.api.add_routes(app)

    # --- pages ----------------------------------------------------------------------------

    async def root(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(PATH)

    def _file(self, name: str, status: int = 200, replace: tuple[bytes, bytes] | None = None) -> web.Response:
        body, content_type = self.files[name]
        if replace:
            body = body.replace(*replace)
        return web.Response(status=status, body=body, content_type=content_type, charset="utf-8",
                            headers=SECURITY_HEADERS)

    async def index(self, request: web.Request) -> web.StreamResponse:
        try:
            self.session(request)
        except Refused:
            return self._file("login.html")
        return self._file("index.html")

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["file"]
        if name not in self.files or name.endswith(".html"):
            return api_error(404, "no such file")
        return self._file(name)

    # --- login ----------------------------------------------------------------------------

    def same_origin(self, request: web.Request) -> None:
        """Refuses a request whose Origin is not this console's own (CSRF)."""
        origin = request.headers.get("Origin", "")
        expected = f"{request.scheme}://{request.host}"
        if origin != expected:
            raise Refused(403, f"cross-site request refused: Origin {origin or '(none)'} is not {expected}")
        if request.headers.get("Sec-Fetch-Site", "same-origin") != "same-origin":
            raise Refused(403, "cross-site request refused (Sec-Fetch-Site)")

    def _login_failed(self, message: str, status: int) -> web.Response:
        text = html.escape(message).encode()
        return self._file("login.html", status, (b'<p id="error" class="error"></p>',
                                                 b'<p id="error" class="error">' + text + b"</p>"))

    async def login(self, request: web.Request) -> web.StreamResponse:
        try:
            self.same_origin(request)
        except Refused as refused:
            return self._login_failed(str(refused), 403)
        if request.content_length is None or request.content_length > MAX_LOGIN_BODY:
            return self._login_failed("The login form is too large.", 413)
        form = await request.post()
        key, secret = str(form.get("access_key", "")).strip(), str(form.get("secret_key", "")).strip()
        if not key or not secret:
            return self._login_failed("Enter an access key and its secret.", 400)
        stub = auth_grpc.AuthServiceStub(self.directory.channel("auth"))
        try:
            issued = await stub.IssueToken(auth_pb.IssueTokenRequest(access_key_id=key, secret_key=secret,
                                                                     ttl_seconds=SESSION_SECONDS),
                                           timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT,
                              grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
                return self._login_failed("Unknown access key or wrong secret.", 401)
            log.info("console login: IssueToken failed: %s %s", err.code().name, err.details())
            return self._login_failed("The platform cannot log you in right now: try again.", 503)
        response = web.Response(status=303, headers={**SECURITY_HEADERS, "Location": PATH})
        self._set_cookie(request, response, issued.token, int(issued.expire_time.seconds - time.time()))
        return response

    @staticmethod
    def _set_cookie(request: web.Request, response: web.StreamResponse, token: str, max_age: int) -> None:
        response.set_cookie(COOKIE, token, path=PATH, max_age=max(0, max_age), httponly=True, samesite="Strict",
                            secure=request.secure or None)

    async def logout(self, request: web.Request) -> web.StreamResponse:
        try:
            self.same_origin(request)
        except Refused as refused:
            return refused.response
        response = web.Response(status=303, headers={**SECURITY_HEADERS, "Location": PATH})
        self._set_cookie(request, response, "", 0)
        return response

    # --- sessions -------------------------------------------------------------------------

    def session(self, request: web.Request) -> Session:
        """The request's verified session and the tenant it looks at; raises Refused."""
        token = request.cookies.get(COOKIE, "")
        if not token:
            raise Refused(401, "not logged in: open the console and log in (or use `cloudml console`)")
        try:
            principal = self.verifier.verify(token)
        except errors.CloudMLError as err:
            raise Refused(401, f"not logged in: {err.message}") from None
        tenant = request.query.get("tenant") or principal.tenant
        if not _TENANT.match(tenant):
            raise Refused(400, f"invalid tenant name {tenant!r}")
        if not principal.may_access(tenant):
            raise Refused(404, f"tenant {tenant!r} not found")
        return Session(token, principal, tenant)

    def mutating(self, request: web.Request) -> Session:
        """A session for a state-changing call: same origin and the CSRF token."""
        session = self.session(request)
        self.same_origin(request)
        if not hmac.compare_digest(request.headers.get("X-CSRF-Token", ""), csrf_of(session.token)):
            raise Refused(403, "cross-site request refused: missing or wrong X-CSRF-Token")
        return session
