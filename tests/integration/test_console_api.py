"""The web console's login and JSON endpoints' authorization, on real
processes (etcd, auth, jobs, a gateway; `deploy.local.stack.Stack`), over
plain HTTP: no cookie, a garbage or expired cookie, a revoked key's cookie,
another tenant's cookie (404, as the gRPC APIs answer), an admin switching
tenants, and CSRF (a POST without Origin, with another Origin, without the
X-CSRF-Token). The pages themselves are tested in a browser
(tests/e2e/test_console_browser.py)."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request

import grpc
import pytest

from cloudml.auth.v1 import auth_service_pb2 as auth_pb
from cloudml.auth.v1 import auth_service_pb2_grpc as auth_grpc
from deploy.local.stack import Stack

COOKIE = "cloudml_page"
GETS = ["session", "jobs", "jobs/nope", "jobs/nope/metrics", "jobs/nope/logs", "models", "studies", "studies/nope",
        "quota"]


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


@pytest.fixture(scope="module")
def stack(tmp_path_factory, etcd_server):
    stack = Stack(tmp_path_factory.mktemp("console"), etcd_server.endpoint, flags=["--log-level", "WARNING"])
    stack.start("jobs", "gateway")
    stack.acme = stack.create_tenant("acme")
    stack.rival = stack.create_tenant("rival")
    yield stack
    stack.stop()


def http(stack, method: str, path: str, token: str | None = None, headers: dict | None = None,
         body: bytes | None = None) -> tuple[int, dict, bytes]:
    sent = dict(headers or {})
    if token is not None:
        sent["Cookie"] = f"{COOKIE}={token}"
    request = urllib.request.Request(stack.rest + path, data=body, method=method, headers=sent)
    try:
        with urllib.request.build_opener(NoRedirect()).open(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def session(stack, token: str) -> dict:
    status, _, body = http(stack, "GET", "/ui/api/session", token)
    assert status == 200, body
    return json.loads(body)


def post(stack, path: str, token: str, origin: str | None = "own", csrf: str | None = "own"):
    headers = {}
    if origin is not None:
        headers["Origin"] = stack.rest if origin == "own" else origin
    if csrf is not None:
        headers["X-CSRF-Token"] = session(stack, token)["csrf"] if csrf == "own" else csrf
    return http(stack, "POST", path, token, headers, b"")


@pytest.mark.parametrize("path", GETS)
def test_every_endpoint_refuses_no_cookie_and_a_garbage_one(stack, path):
    for token in (None, "x.y.z"):
        status, headers, body = http(stack, "GET", "/ui/api/" + path, token)
        assert status == 401 and "not logged in" in json.loads(body)["error"], (path, token, status, body)
        assert headers["Cache-Control"] == "no-store"


def test_expired_and_revoked_tokens_are_refused(stack):
    expired = stack.issue_token(stack.acme, ttl_seconds=1)
    admin = stack.issue_token()
    created = stack._auth_call("CreateAccessKey", auth_pb.CreateAccessKeyRequest(tenant="acme"), admin)
    key = (created.access_key.access_key_id, created.secret_key)
    token = stack.issue_token(key)
    assert http(stack, "GET", "/ui/api/jobs", token)[0] == 200
    stack._auth_call("RevokeAccessKey", auth_pb.RevokeAccessKeyRequest(access_key_id=key[0], tenant="acme"), admin)
    deadline = time.monotonic() + 10
    while http(stack, "GET", "/ui/api/jobs", token)[0] != 401:
        assert time.monotonic() < deadline, "the revoked key's cookie still works"
        time.sleep(0.2)
    time.sleep(1.2)  # the 1 s token has expired by now
    status, _, body = http(stack, "GET", "/ui/api/quota", expired)
    assert status == 401 and "expired" in json.loads(body)["error"], body


def test_a_tenant_sees_its_own_and_not_another_tenants(stack):
    acme, rival = stack.issue_token(stack.acme), stack.issue_token(stack.rival)
    assert session(stack, acme)["tenant"] == "acme" and not session(stack, acme)["admin"]
    status, _, body = http(stack, "GET", "/ui/api/quota", acme)
    assert status == 200 and json.loads(body)["tenant"] == "acme", body
    for path in ("jobs", "quota", "jobs/anything", "jobs/anything/logs"):
        status, _, body = http(stack, "GET", f"/ui/api/{path}?tenant=acme", rival)
        assert status == 404, (path, status, body)
    # The services answer for themselves too: a job rival does not have is 404 from the jobs service.
    status, _, body = http(stack, "GET", "/ui/api/jobs/anything", rival)
    assert status == 404 and json.loads(body)["code"] == "NOT_FOUND", body
    assert json.loads(http(stack, "GET", "/ui/api/jobs", rival)[2]) == {"tenant": "rival", "jobs": []}


def test_an_admin_sees_every_tenant_and_switches(stack):
    admin = stack.issue_token()
    me = session(stack, admin)
    assert me["admin"] and {"acme", "rival"} <= set(me["tenants"]), me
    status, _, body = http(stack, "GET", "/ui/api/quota?tenant=rival", admin)
    assert status == 200 and json.loads(body)["tenant"] == "rival", body
    assert http(stack, "GET", "/ui/api/jobs?tenant=Bad/Name", admin)[0] == 400


@pytest.mark.parametrize("origin,csrf", [(None, "own"), ("http://evil.example", "own"), ("own", None),
                                         ("own", "0" * 40)])
def test_state_changing_calls_need_the_origin_and_the_csrf_token(stack, origin, csrf):
    acme = stack.issue_token(stack.acme)
    for path in ("/ui/api/jobs/nope/cancel", "/ui/api/tensorboards/nope/open", "/ui/api/models/nope/predict"):
        status, _, body = post(stack, path, acme, origin, csrf)
        assert status == 403 and "cross-site" in json.loads(body)["error"], (path, status, body)


def test_state_changing_call_with_origin_and_csrf_reaches_the_service(stack):
    acme = stack.issue_token(stack.acme)
    status, _, body = post(stack, "/ui/api/jobs/nope/cancel", acme)
    assert status == 404 and json.loads(body)["code"] == "NOT_FOUND", body
    # A login link for a TensorBoard of acme's (the page checks that it exists when opened).
    status, _, body = post(stack, "/ui/api/tensorboards/board/open", acme)
    assert status == 200 and json.loads(body)["link"].startswith("/login?code="), body
    # Not for an admin looking at acme: pages serve only their own tenant's members.
    status, _, body = post(stack, "/ui/api/tensorboards/board/open?tenant=acme", stack.issue_token())
    assert status == 403 and "own members" in json.loads(body)["error"], body


def form(stack, key: str, secret: str, origin: str | None = "own"):
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if origin:
        headers["Origin"] = stack.rest if origin == "own" else origin
    return http(stack, "POST", "/ui/login", None, headers,
                urllib.parse.urlencode({"access_key": key, "secret_key": secret}).encode())


def test_login_form_sets_a_strict_httponly_cookie_for_the_console_only(stack):
    status, headers, _ = form(stack, *stack.acme)
    assert status == 303 and headers["Location"] == "/ui/", (status, headers)
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui/" in cookie, cookie
    token = cookie.split(";", 1)[0].split("=", 1)[1]
    assert session(stack, token)["tenant"] == "acme"
    status, _, page = http(stack, "GET", "/ui/", token)
    assert status == 200 and b"/ui/static/console.js" in page
    status, headers, page = http(stack, "GET", "/ui/")
    assert status == 200 and b'action="/ui/login"' in page
    assert "script-src 'self'" in headers["Content-Security-Policy"] and headers["X-Frame-Options"] == "DENY"
    assert http(stack, "GET", "/")[1]["Location"] == "/ui/"


@pytest.mark.parametrize("case", ["wrong secret", "no origin", "other origin"])
def test_login_form_refusals(stack, case):
    key, secret = stack.acme
    status, headers, page = {"wrong secret": lambda: form(stack, key, secret + "x"),
                             "no origin": lambda: form(stack, key, secret, None),
                             "other origin": lambda: form(stack, key, secret, "http://evil.example")}[case]()
    assert status == (401 if case == "wrong secret" else 403), (case, status)
    assert "Set-Cookie" not in headers
    assert b'class="error">' in page and b'class="error"></p>' not in page


def test_console_login_link_lands_on_the_console_with_no_code_in_the_url(stack):
    acme = stack.issue_token(stack.acme)
    with grpc.insecure_channel(stack.gateway.address) as channel:
        link = auth_grpc.AuthServiceStub(channel).CreateLoginLink(
            auth_pb.CreateLoginLinkRequest(path="/ui/"), metadata=(("authorization", f"Bearer {acme}"),),
            timeout=10).login_path
    status, headers, _ = http(stack, "GET", link)
    assert status == 303 and headers["Location"] == "/ui/", (status, headers)
    assert "Path=/ui/" in headers["Set-Cookie"] and "HttpOnly" in headers["Set-Cookie"]
    assert http(stack, "GET", link)[0] == 401  # once


def test_static_files_and_unknown_ones(stack):
    for name in ("console.js", "plot.js", "console.css"):
        status, headers, _ = http(stack, "GET", f"/ui/static/{name}")
        assert status == 200 and headers["X-Content-Type-Options"] == "nosniff", name
    assert http(stack, "GET", "/ui/static/..%2Fapp.py")[0] == 404
    assert http(stack, "GET", "/ui/static/index.html")[0] == 404
