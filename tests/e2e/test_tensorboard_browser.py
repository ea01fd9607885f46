"""TensorBoard through the gateway, in a real browser, on a whole platform.

One platform (`cloudml-platform up --detach`), tenants `acme` and `rival`:

1. acme trains the linear example trainer; `cloudml jobs tensorboard linear`
   starts a TensorBoard on the job's event files and prints a one-time login
   link; headless Chromium opens it, lands on the page with no token in the
   URL and an HttpOnly, SameSite=Strict cookie scoped to the page, and the
   scalars page lists the `loss` series (which `cloudml jobs metrics` shows
   too);
2. no cookie, rival's token as the cookie, an expired or a revoked token, a
   used login link: no page (401/404), and the request never reaches the
   TensorBoard replica (its access log never shows it);
3. bad input: a logdir outside acme's storage, a taken name, over quota:
   one error line each, nothing created;
4. the jobs service killed with SIGKILL: its replacement adopts the running
   replica (same process) and the page still answers.

Screenshots land in the test's tmp dir, `artifacts/`.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import grpc
import pytest

from cloudml.auth.v1 import auth_service_pb2 as auth_pb
from cloudml.auth.v1 import auth_service_pb2_grpc as auth_grpc
from deploy.local.service_process import read_port_file
from tests.e2e.browser import chromium, require_browser
from tests.e2e.serving_platform import ROOT, ServingPlatform, clean_env, wait_until

pytestmark = pytest.mark.slow

COOKIE = "cloudml_page"


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    require_browser()
    workdir = tmp_path_factory.mktemp("tensorboard_browser")
    platform = ServingPlatform(str(workdir / "data")).start()
    try:
        build = subprocess.run(
            [sys.executable, os.path.join(ROOT, "examples", "build_packages.py"), str(workdir / "packages"),
             "--only", "linear", "--json"], capture_output=True, text=True, timeout=120, env=clean_env())
        assert build.returncode == 0, build.stderr
        platform.package = json.loads(build.stdout)["linear"]
        platform.workdir = str(workdir)
        platform.artifacts = str(workdir / "artifacts")
        platform.wait_up()
        platform.acme = platform.new_tenant("acme")
        platform.rival = platform.new_tenant("rival")
        yield platform
    finally:
        platform.down()
        print(f"\nscreenshots: {workdir / 'artifacts'}")


@pytest.fixture(scope="module")
def board(platform) -> dict:
    """acme's trained linear job and its TensorBoard (`cloudml jobs tensorboard`)."""
    submitted = platform.cli_json("jobs", "submit", "-n", "linear", "-m", "trainer.task", "-u", platform.package,
                                  "-a", "--max_epochs 5", config=platform.acme)
    assert submitted["created"], submitted

    def finished():
        job = platform.cli_json("jobs", "describe", "linear", config=platform.acme)
        return job if job["state"] in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED") else None

    job = wait_until(finished, 240, "the linear job to finish", interval=1.0)
    assert job["state"] == "JOB_STATE_SUCCEEDED", platform.cli("jobs", "logs", "linear", config=platform.acme,
                                                               check=False).stdout[-3000:]
    started = time.monotonic()
    board = platform.cli_json("jobs", "tensorboard", "linear", config=platform.acme, timeout=180)
    print(f"\njobs tensorboard -> RUNNING + link in {time.monotonic() - started:.2f} s")
    assert board["state"] == "TENSORBOARD_STATE_RUNNING" and board["path"] == "/tensorboard/acme/linear/", board
    assert board["logdir"].endswith("/tensorboard") and board["job"] == "linear", board
    return board


def link(platform, config: str, name: str = "linear", tenant: str = "acme") -> str:
    return platform.cli_json("tensorboard", "open", name, "--tenant", tenant, config=config)["login_link"]


def get(platform, path: str, cookie: str | None = None, follow: bool = False,
        headers: dict | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of a GET on the gateway's HTTP port, redirects not followed."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(*([] if follow else [NoRedirect()]))
    sent = dict(headers or {})
    if cookie:
        sent["Cookie"] = f"{COOKIE}={cookie}"
    request = urllib.request.Request(platform.rest_endpoint + path, headers=sent)
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def replica_log(platform) -> str:
    text = ""
    for path in glob.glob(os.path.join(platform.data_dir, "tensorboards", "acme", "linear.*", "tensorboard.log")):
        with open(path, errors="replace") as f:
            text += f.read()
    return text


def token_of(platform, config: str, ttl: int = 0) -> str:
    with open(config) as f:
        creds = json.load(f)
    with grpc.insecure_channel(platform.endpoint) as channel:
        return auth_grpc.AuthServiceStub(channel).IssueToken(auth_pb.IssueTokenRequest(
            access_key_id=creds["access_key"], secret_key=creds["secret_key"], ttl_seconds=ttl), timeout=10).token


def test_login_link_opens_the_scalars_page_with_the_loss_series(platform, board):
    url = link(platform, platform.acme)
    assert "/login?code=" in url
    with chromium(platform.artifacts) as browser:
        browser.driver.get(url)
        landed = browser.driver.current_url
        # TensorBoard's script may already have set its own fragment (#timeseries)
        assert landed.split("#")[0] == platform.rest_endpoint + "/tensorboard/acme/linear/", landed
        cookies = {c["name"]: c for c in browser.driver.get_cookies()}
        cookie = cookies[COOKIE]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/tensorboard/acme/linear/"
        assert cookie["value"] not in landed and "code=" not in landed
        browser.driver.get(platform.rest_endpoint + "/tensorboard/acme/linear/#scalars")
        body = browser.wait_for_text("loss", timeout=90)
        browser.screenshot("tensorboard-scalars")
        assert "w" in body.split() or "w" in body
    metrics = platform.cli_json("jobs", "metrics", "linear", config=platform.acme)
    assert "loss" in json.dumps(metrics), metrics


def test_login_link_works_once(platform, board):
    path = link(platform, platform.acme)[len(platform.rest_endpoint):]
    status, headers, _ = get(platform, path)
    assert status == 303 and headers["Location"] == "/tensorboard/acme/linear/", (status, headers)
    assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
    assert get(platform, path)[0] == 401


def test_no_cookie_or_a_bad_one_gets_no_page_and_never_reaches_the_replica(platform, board):
    marker = f"marker-{uuid.uuid4().hex}"
    page = f"/tensorboard/acme/linear/{marker}"
    rival = token_of(platform, platform.rival)
    expired = token_of(platform, platform.acme, ttl=1)
    time.sleep(2.5)
    cases = {"no cookie": (None, 401), "garbage": ("x.y.z", 401), "rival's token": (rival, 404),
             "expired token": (expired, 401)}
    for what, (cookie, expected) in cases.items():
        status, _, body = get(platform, page, cookie)
        assert status == expected, (what, status, body)
    # A WebSocket handshake without the cookie is refused the same way.
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    assert get(platform, page + "/ws", headers=upgrade)[0] == 401
    assert get(platform, page + "/ws", rival, headers=upgrade)[0] == 404
    with chromium(platform.artifacts) as browser:
        browser.driver.get(platform.rest_endpoint + "/tensorboard/acme/linear/")
        browser.wait_for_text("Not logged in")
        browser.screenshot("no-cookie")
    # The replica saw none of them; a good cookie does reach it.
    good = token_of(platform, platform.acme)
    assert get(platform, page + "-ok", good)[0] == 404  # TensorBoard's own 404 for an unknown path
    wait_until(lambda: f"{marker}-ok" in replica_log(platform), 10, "the good request in the replica's log")
    assert f"{marker} " not in replica_log(platform) and f"{marker}/ws" not in replica_log(platform)


def test_revoked_key_cookie_gets_no_page(platform, board):
    admin = platform.client()
    created = admin.create_access_key("acme", description="revoked in a test")
    config = os.path.join(platform.workdir, "revoked.json")
    with open(config, "w") as f:
        json.dump({"endpoint": platform.endpoint, "rest_endpoint": platform.rest_endpoint,
                   "access_key": created.access_key.access_key_id, "secret_key": created.secret_key}, f)
    token = token_of(platform, config)
    assert get(platform, "/tensorboard/acme/linear/", token)[0] == 200
    admin.revoke_access_key(created.access_key.access_key_id, tenant="acme")
    wait_until(lambda: get(platform, "/tensorboard/acme/linear/", token)[0] == 401, 10, "the revoked token refused")


def test_rival_cannot_make_a_link_to_acmes_page(platform, board):
    result = platform.cli("tensorboard", "open", "linear", "--tenant", "acme", config=platform.rival, check=False)
    assert result.returncode == 1 and "NOT_FOUND" in result.stderr, result.stderr


@pytest.mark.parametrize("case", ["outside storage", "name taken", "over quota"])
def test_bad_create_is_one_error_line_and_creates_nothing(platform, board, case):
    before = platform.cli_json("tensorboard", "list", config=platform.acme)
    storage = os.path.join(platform.data_dir, "storage", "acme")
    args = {"outside storage": ["other", "--logdir", "/etc"],
            "name taken": ["linear", "--logdir", storage],
            "over quota": ["huge", "--logdir", storage]}[case]
    expected = {"outside storage": "PERMISSION_DENIED", "name taken": "ALREADY_EXISTS",
                "over quota": "RESOURCE_EXHAUSTED"}[case]
    admin = platform.client()
    if case == "over quota":
        limits = admin.get_quota("acme").limits
        admin.set_quota("acme", cpu="0.1")
    try:
        result = platform.cli("tensorboard", "create", *args, "--no-wait", config=platform.acme, check=False)
    finally:
        if case == "over quota":
            admin.set_quota("acme", limits=limits)
    assert result.returncode == 1 and expected in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert platform.cli_json("tensorboard", "list", config=platform.acme) == before
    owners = [r.owner_id for r in admin.list_reservations("acme")]
    assert sum(o.startswith("jobs/tensorboard/") for o in owners) == len(before), owners


def test_killed_jobs_service_adopts_the_running_tensorboard(platform, board):
    token = token_of(platform, platform.acme)
    port_file = os.path.join(platform.data_dir, "run", "jobs.port")
    old_pid = read_port_file(port_file)["pid"]
    replica_pids = [p.pid for p in tensorboard_processes(platform)]
    assert len(replica_pids) == 1, replica_pids
    os.kill(old_pid, 9)
    wait_until(lambda: (read_port_file(port_file) or {}).get("pid") not in (None, old_pid), 60, "a new jobs service")
    time.sleep(3)  # a leader pass or two
    wait_until(lambda: get(platform, "/tensorboard/acme/linear/", token)[0] == 200, 30, "the page after the restart")
    assert [p.pid for p in tensorboard_processes(platform)] == replica_pids
    described = platform.cli_json("tensorboard", "describe", "linear", config=platform.acme)
    assert described["state"] == "TENSORBOARD_STATE_RUNNING", described


def tensorboard_processes(platform):
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "services.jobs.tensorboard_replica" in cmd and any("/tensorboard/acme/linear" in a for a in cmd):
            found.append(proc)
    return found


def test_delete_stops_the_replica_and_returns_the_quota(platform, board):
    platform.cli("tensorboard", "delete", "linear", config=platform.acme)
    wait_until(lambda: not platform.cli_json("tensorboard", "list", config=platform.acme), 30, "the board deleted")
    wait_until(lambda: not tensorboard_processes(platform), 15, "the replica stopped")
    owners = [r.owner_id for r in platform.client().list_reservations("acme")]
    assert not [o for o in owners if o.startswith("jobs/tensorboard/")], owners
    assert get(platform, "/tensorboard/acme/linear/", token_of(platform, platform.acme))[0] == 404
