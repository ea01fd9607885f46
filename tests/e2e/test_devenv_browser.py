"""Dev environments (JupyterLab) through the gateway, in a real browser, on a
whole platform (`cloudml-platform up --detach`), tenants `acme` and `rival`.

1. `cloudml dev create nb` -> RUNNING; `cloudml dev open nb` prints a
   one-time login link; headless Chromium opens it and lands on JupyterLab
   with an HttpOnly, SameSite=Strict cookie scoped to /dev/acme/nb/ and no
   token anywhere in the page; a notebook in acme's storage is opened, its
   cell (import cloudml and tensorflow, list acme's jobs with the SDK and the
   CLI) runs and its output appears; saved;
2. `cloudml dev stop nb`: the page is gone (404), the CPU and memory are
   back in acme's quota, one dev environment still counted; `cloudml dev
   start nb`: the notebook is still there, with its output;
3. no cookie, rival's token: no page and no WebSocket;
4. bad input (a name taken, over the dev-environment count set with
   `cloudml quota set --dev-environments`, an image on the local runtime):
   one error line each, nothing created;
5. the platform restarted (`down`, `up`): the server comes back with the
   notebook; the jobs service killed: its successor adopts the running server (same
   process) and the page still answers; `cloudml dev delete` returns the
   quota and revokes the environment's key.

One browser session for all of it. Screenshots land in the test's tmp dir,
`artifacts/`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from deploy.local.service_process import read_port_file
from tests.e2e.browser import chromium, require_browser
from tests.e2e.serving_platform import ROOT, ServingPlatform, clean_env, wait_until
from tests.e2e.test_tensorboard_browser import COOKIE, get, token_of

# JupyterLab and a TensorFlow kernel start in seconds on an idle machine, in minutes on a saturated one.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NOTEBOOK = "check.ipynb"
CELL = ("import subprocess, cloudml, tensorflow as tf\n"
        "jobs = sorted(j.name for j in cloudml.Client().list_jobs())\n"
        "cli = subprocess.run(['cloudml', 'jobs', 'list'], capture_output=True, text=True).stdout.split()\n"
        "print('TF', tf.__version__, 'JOBS', jobs, 'CLI sees hello:', 'hello' in cli)")


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    require_browser()
    workdir = tmp_path_factory.mktemp("devenv_browser")
    platform = ServingPlatform(str(workdir / "data")).start()
    try:
        build = subprocess.run(
            [sys.executable, os.path.join(ROOT, "examples", "build_packages.py"), str(workdir / "packages"),
             "--only", "plain", "--json"], capture_output=True, text=True, timeout=120, env=clean_env())
        assert build.returncode == 0, build.stderr
        package = json.loads(build.stdout)["plain"]
        platform.workdir = str(workdir)
        platform.artifacts = str(workdir / "artifacts")
        platform.wait_up()
        platform.acme = platform.new_tenant("acme")
        platform.rival = platform.new_tenant("rival")
        # a job of acme's for the notebook to list (it need not finish)
        platform.cli("jobs", "submit", "-n", "hello", "-m", "plain_trainer.task", "-u", package,
                     config=platform.acme)
        yield platform
    finally:
        platform.down()
        print(f"\nscreenshots: {workdir / 'artifacts'}")


@pytest.fixture(scope="module")
def browser(platform):
    with chromium(platform.artifacts) as browser:
        yield browser


@pytest.fixture(scope="module")
def nb(platform) -> dict:
    started = time.monotonic()
    env = platform.cli_json("dev", "create", "nb", "--cpu", "1", "--memory", "3Gi", config=platform.acme,
                            timeout=240)
    print(f"\ndev create -> RUNNING in {time.monotonic() - started:.2f} s")
    assert env["state"] == "DEV_ENVIRONMENT_STATE_RUNNING" and env["path"] == "/dev/acme/nb/", env
    return env


def login(platform, browser, name="nb") -> str:
    link = platform.cli_json("dev", "open", name, config=platform.acme)["login_link"]
    browser.driver.get(link)
    return browser.driver.current_url


def devenv_reservations(platform) -> dict:
    """{owner suffix: Resources} of acme's dev-environment reservations ("" the count, "/run" the resources)."""
    return {r.owner_id.split("/", 3)[3][8:]: r.resources for r in platform.client().list_reservations("acme")
            if r.owner_id.startswith("jobs/devenv/")}


def run_first_cell(browser) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    wait_for(browser, lambda: browser.driver.find_element(By.CSS_SELECTOR, ".jp-Cell .cm-content"),
             "the cell's editor")
    wait_for(browser, lambda: "Idle" in browser.body_text() or None, "the kernel to be idle", timeout=120)

    def click():  # found again each time: JupyterLab re-renders the cell while it settles
        browser.driver.find_element(By.CSS_SELECTOR, ".jp-Cell .cm-content").click()
        return True

    wait_for(browser, click, "a clickable cell editor", timeout=30)
    ActionChains(browser.driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()


def save(browser) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    ActionChains(browser.driver).key_down(Keys.CONTROL).send_keys("s").key_up(Keys.CONTROL).perform()


def wait_for(browser, find, what: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = find()
            if found:
                return found
        except Exception:  # noqa: BLE001 - not there yet
            pass
        if time.monotonic() > deadline:
            browser.screenshot("timeout-" + what.replace(" ", "-").replace("'", ""))
            raise AssertionError(f"{what} never appeared; the page shows:\n{browser.body_text()[:2000]}")
        time.sleep(0.5)


def notebook_file(platform) -> str:
    return os.path.join(platform.data_dir, "storage", "acme", NOTEBOOK)


def test_login_link_opens_jupyterlab_and_a_cell_lists_the_tenants_jobs(platform, browser, nb):
    landed = login(platform, browser)
    assert landed.startswith(platform.rest_endpoint + "/dev/acme/nb/") and "code=" not in landed, landed
    cookie = {c["name"]: c for c in browser.driver.get_cookies()}[COOKIE]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/dev/acme/nb/"
    source = browser.driver.page_source
    assert cookie["value"] not in landed and cookie["value"] not in source
    assert '"token": ""' in source or "token%22%3A%20%22%22" in source  # JupyterLab's page config: no token
    # A notebook in acme's storage, written through the page's own API (same origin, the cookie).
    content = {"type": "notebook", "content": {
        "cells": [{"cell_type": "code", "source": CELL, "metadata": {}, "outputs": [], "execution_count": None}],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4, "nbformat_minor": 5}}
    status = browser.driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"fetch('/dev/acme/nb/api/contents/{NOTEBOOK}', {{method: 'PUT', headers: {{'Content-Type': "
        "'application/json'}, body: arguments[0]}).then(r => done(r.status), e => done(String(e)));",
        json.dumps(content))
    assert status == 201, status
    assert os.path.exists(notebook_file(platform))
    browser.driver.get(platform.rest_endpoint + f"/dev/acme/nb/lab/tree/{NOTEBOOK}")
    run_first_cell(browser)
    # "JOBS [" only in the output (the source prints 'JOBS', jobs); a traceback ends the wait too.
    text = wait_for(browser, lambda: any(w in browser.body_text() for w in ("JOBS [", "Traceback", "Error"))
                    and browser.body_text(), "the cell's output", timeout=180)
    browser.screenshot("notebook-cell-output")
    assert "JOBS ['hello'] CLI sees hello: True" in text, text[-2000:]
    save(browser)
    wait_until(lambda: "JOBS ['hello']" in open(notebook_file(platform)).read(), 30, "the notebook saved")


def test_stop_frees_resources_and_start_brings_the_notebook_back(platform, browser, nb):
    held = devenv_reservations(platform)
    assert held[""].dev_environments == 1 and held["/run"].cpu_millis == 1000, held
    stopped = platform.cli_json("dev", "stop", "nb", config=platform.acme)
    assert stopped["state"] in ("DEV_ENVIRONMENT_STATE_STOPPING", "DEV_ENVIRONMENT_STATE_STOPPED"), stopped
    wait_until(lambda: platform.cli_json("dev", "describe", "nb", config=platform.acme)["state"]
               == "DEV_ENVIRONMENT_STATE_STOPPED", 60, "the env stopped")
    held = devenv_reservations(platform)
    assert list(held) == [""] and held[""].dev_environments == 1, held  # CPU and memory returned, still counted
    # The gateway may still hold the stopped server's address for a moment (the
    # few seconds ResolvePage allows): that load says "did not answer", drops the
    # address, and a reload asks the jobs service again.
    def says_not_running():
        browser.driver.get(platform.rest_endpoint + "/dev/acme/nb/lab")
        return "not running" in browser.body_text()

    wait_for(browser, says_not_running, "the stopped page", timeout=60)
    browser.screenshot("stopped")
    described = platform.cli("dev", "describe", "nb", config=platform.acme).stdout
    assert "stopped" in described and "stops after 4 h" in described, described
    started = time.monotonic()
    running = platform.cli_json("dev", "start", "nb", config=platform.acme, timeout=240)
    print(f"\ndev start -> RUNNING in {time.monotonic() - started:.2f} s")
    assert running["state"] == "DEV_ENVIRONMENT_STATE_RUNNING", running
    login(platform, browser)
    browser.driver.get(platform.rest_endpoint + f"/dev/acme/nb/lab/tree/{NOTEBOOK}")
    wait_for(browser, lambda: "JOBS ['hello']" in browser.body_text(), "the saved output after start")
    browser.screenshot("notebook-after-restart")


def test_platform_restart_brings_the_server_back_with_the_notebook(platform, browser, nb):
    assert platform.devenv_processes()  # what down() waits for is found while it runs
    platform.down()  # stops every replica, the notebook server too (and waits until they have exited)
    # A process the server forked for a kernel the open page asked for again
    # carries the server's command line until it execs (seen twice in
    # fresh-clone runs, right after down); a real surviving server stays.
    wait_until(lambda: not server_processes(platform), 10, "no notebook server after down")
    platform.start().wait_up()
    wait_until(lambda: platform.cli_json("dev", "describe", "nb", config=platform.acme)["state"]
               == "DEV_ENVIRONMENT_STATE_RUNNING" and server_processes(platform), 180, "the server back after up")
    token = token_of(platform, platform.acme)
    status, _, body = get(platform, f"/dev/acme/nb/api/contents/{NOTEBOOK}", token)
    assert status == 200 and "JOBS ['hello']" in body.decode(), (status, body[:300])


def test_no_cookie_or_another_tenants_gets_no_page_and_no_websocket(platform, nb):
    rival = token_of(platform, platform.rival)
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    for cookie, expected in ((None, 401), (rival, 404), ("x.y.z", 401)):
        assert get(platform, "/dev/acme/nb/api/contents", cookie)[0] == expected
        assert get(platform, "/dev/acme/nb/api/kernels/x/channels", cookie, headers=upgrade)[0] == expected
    result = platform.cli("dev", "open", "nb", "--tenant", "acme", config=platform.rival, check=False)
    assert result.returncode == 1 and "NOT_FOUND" in result.stderr, result.stderr


@pytest.mark.parametrize("case", ["name taken", "over count", "image on local"])
def test_bad_create_is_one_error_line_and_creates_nothing(platform, nb, case):
    def listed():
        return [(e["name"], e["uid"], e["state"]) for e in platform.cli_json("dev", "list", config=platform.acme)]

    before = listed()
    held = sorted(r.owner_id for r in platform.client().list_reservations("acme"))
    args = {"name taken": ["nb"], "over count": ["second"],
            "image on local": ["img", "--image", "jupyter/scipy-notebook"]}[case]
    expected = {"name taken": "ALREADY_EXISTS", "over count": "RESOURCE_EXHAUSTED",
                "image on local": "INVALID_ARGUMENT"}[case]
    if case == "over count":
        platform.cli("quota", "set", "--tenant", "acme", "--dev-environments", "1")
    try:
        result = platform.cli("dev", "create", *args, "--no-wait", config=platform.acme, check=False)
    finally:
        if case == "over count":
            platform.cli("quota", "set", "--tenant", "acme", "--dev-environments", "2")
    assert result.returncode == 1 and expected in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert listed() == before
    assert sorted(r.owner_id for r in platform.client().list_reservations("acme")) == held


def server_processes(platform):
    """acme/nb's notebook servers (not a child of one caught between its fork and exec, not a zombie)."""
    found = {}
    for proc in psutil.process_iter(["cmdline", "ppid", "status"]):
        cmd = proc.info["cmdline"] or []
        if "services.jobs.devenv_replica" in cmd and "/dev/acme/nb/" in cmd \
                and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found[proc.pid] = proc
    return [p for p in found.values() if p.info["ppid"] not in found]


def test_killed_jobs_service_adopts_the_server_and_delete_returns_everything(platform, nb):
    token = token_of(platform, platform.acme)
    port_file = os.path.join(platform.data_dir, "run", "jobs.port")
    old_pid = read_port_file(port_file)["pid"]
    # One server (one the earlier tests' restarts left may still be on its way out for a moment).
    pids = wait_until(lambda: (lambda found: found if len(found) == 1 else None)(
        [p.pid for p in server_processes(platform)]), 15, "exactly one notebook server")
    os.kill(old_pid, 9)
    wait_until(lambda: (read_port_file(port_file) or {}).get("pid") not in (None, old_pid), 60, "a new jobs service")
    time.sleep(3)  # a leader pass or two
    wait_until(lambda: get(platform, "/dev/acme/nb/api/status", token)[0] == 200, 30, "the page after the restart")
    # Only the adopted server (a process it forks, e.g. for a kernel the earlier test's page asks for again, may
    # show its cmdline for a moment; a second server would stay).
    wait_until(lambda: [p.pid for p in server_processes(platform)] == pids, 10, f"only the adopted server {pids}")
    key_id = platform.cli_json("dev", "describe", "nb", config=platform.acme)["access_key_id"]
    platform.cli("dev", "delete", "nb", config=platform.acme)
    wait_until(lambda: not platform.cli_json("dev", "list", config=platform.acme), 60, "the env deleted")
    wait_until(lambda: not server_processes(platform), 15, "the server stopped")
    owners = [r.owner_id for r in platform.client().list_reservations("acme")]
    assert not [o for o in owners if o.startswith("jobs/devenv/")], owners
    keys = {k.access_key_id: k for k in platform.client().list_access_keys("acme")}
    assert key_id not in keys or keys[key_id].revoked, keys.get(key_id)
    assert os.path.exists(notebook_file(platform))  # the notebook stays in acme's storage
