"""The web console in headless Chromium, through the gateway, on a whole platform.

One platform (`cloudml-platform up --detach`), tenants `acme` and `rival`,
one browser session for the module. acme runs, at once:

- `linear`: the seed's linear trainer (reports `loss` per epoch), then
  deployed as model `linear`;
- `sleeper`: the plain trainer for minutes, cancelled from the page;
- study `branin`: three explicit trials of the plain trainer, the middle one best;
- later `slow`: the plain trainer, 30 steps of 0.4 s, whose logs the page
  follows from its submission to its last line.

Then, in the browser: a `cloudml console` link logs acme in (no code or token
in the address bar; an HttpOnly, SameSite=Strict cookie for /ui/ only); the
job page follows `slow`'s logs and plots `linear`'s loss (points in the
SVG); the study page highlights the best trial; the models page shows
replicas 1/1 and a Predict answer; the quota page shows bars; rival, logged
in through the form, sees none of it (pages and API: 404); an admin switches
to acme. Screenshots in the test's tmp dir, `artifacts/`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.e2e.browser import chromium, require_browser
from tests.e2e.serving_platform import ROOT, ServingPlatform, clean_env, wait_until

pytestmark = pytest.mark.slow

COOKIE = "cloudml_page"
TERMINAL = ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED")
BEST = {"x1": 3.14159, "x2": 2.275}  # Branin's minimum (0.397887)


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    require_browser()
    workdir = tmp_path_factory.mktemp("console_browser")
    platform = ServingPlatform(str(workdir / "data")).start()
    try:
        build = subprocess.run(
            [sys.executable, os.path.join(ROOT, "examples", "build_packages.py"), str(workdir / "packages"),
             "--only", "linear", "plain", "--json"], capture_output=True, text=True, timeout=120, env=clean_env())
        assert build.returncode == 0, build.stderr
        platform.packages = json.loads(build.stdout)
        platform.workdir = str(workdir)
        platform.artifacts = str(workdir / "artifacts")
        platform.wait_up()
        platform.acme = platform.new_tenant("acme")
        platform.rival = platform.new_tenant("rival")
        platform.client().set_quota("acme", cpu="4", memory="16Gi", train_jobs=10, model_replicas=2, studies=2)
        submit_everything(platform)
        yield platform
    finally:
        platform.down()
        print(f"\nscreenshots: {workdir / 'artifacts'}")


def submit_everything(platform) -> None:
    acme, plain = platform.acme, platform.packages["plain"]
    jobs = {"linear": ["-m", "trainer.task", "-u", platform.packages["linear"], "-a", "--max_epochs 20"],
            "sleeper": ["-m", "plain_trainer.task", "-u", plain, "-a", "--x1 1 --x2 2 --steps 600 --sleep 1",
                        "-c", "0.2", "-M", "512Mi"]}
    for name, args in jobs.items():
        assert platform.cli_json("jobs", "submit", "-n", name, *args, config=acme)["created"]
    spec = {"job_name": "branin", "module_name": "plain_trainer.task", "trainer_uri": plain,
            "job_args": "--steps 3", "cpu_limit": "0.2", "memory_limit": "512M",
            "hyperparameters": {"goal": "MINIMIZE", "metric": "objective", "maxParallelTrials": 3,
                                "params": [{"x1": 0.0, "x2": 0.0}, BEST, {"x1": 5.0, "x2": 5.0}]}}
    path = os.path.join(platform.workdir, "study.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    platform.cli_json("hp", "submit", "-f", path, config=acme)


@pytest.fixture(scope="module")
def browser(platform):
    with chromium(platform.artifacts) as browser:
        yield browser


def job(platform, name: str) -> dict:
    return platform.cli_json("jobs", "describe", name, config=platform.acme)


def finished(platform, name: str, timeout: float = 300) -> dict:
    done = wait_until(lambda: (lambda j: j if j["state"] in TERMINAL else None)(job(platform, name)), timeout,
                      f"job {name} to finish", interval=1.0)
    assert done["state"] == "JOB_STATE_SUCCEEDED", platform.cli("jobs", "logs", name, config=platform.acme,
                                                                check=False).stdout[-3000:]
    return done


def css(browser, selector: str):
    from selenium.webdriver.common.by import By

    return browser.driver.find_elements(By.CSS_SELECTOR, selector)


def wait_css(browser, selector: str, count: int = 1, timeout: float = 60):
    return wait_until(lambda: (lambda found: found if len(found) >= count else None)(css(browser, selector)),
                      timeout, f"{count}+ of {selector!r} on {browser.driver.current_url}", interval=0.3)


def api(platform, path: str, token: str) -> int:
    request = urllib.request.Request(platform.rest_endpoint + path, headers={"Cookie": f"{COOKIE}={token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def go(platform, browser, fragment: str) -> None:
    browser.driver.get(platform.rest_endpoint + "/ui/#" + fragment)


def test_console_link_logs_in_with_no_token_in_the_url(platform, browser):
    link = platform.cli_json("console", config=platform.acme)["login_link"]
    assert "/login?code=" in link
    browser.driver.get(link)
    landed = browser.driver.current_url
    assert landed == platform.rest_endpoint + "/ui/", landed
    cookie = {c["name"]: c for c in browser.driver.get_cookies()}[COOKIE]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui/", cookie
    body = browser.wait_for_text("Jobs of acme")
    for name in ("linear", "sleeper"):
        assert name in body
    browser.screenshot("jobs")
    assert browser.driver.execute_script("return document.cookie") == ""  # HttpOnly: not readable by script


def test_job_page_follows_a_running_jobs_logs(platform, browser):
    submitted = platform.cli_json("jobs", "submit", "-n", "slow", "-m", "plain_trainer.task",
                                  "-u", platform.packages["plain"], "-a", "--x1 1 --x2 2 --steps 30 --sleep 0.4",
                                  "-c", "0.2", "-M", "512Mi", config=platform.acme)
    assert submitted["created"]
    go(platform, browser, "/jobs/slow")
    wait_until(lambda: "following" in css(browser, "#log-count")[0].text if css(browser, "#log-count") else None,
               30, "the log panel following")
    assert "Step: 29," not in css(browser, "#logs")[0].text  # still running when the page opened
    # New lines arrive on the open page, without a reload, up to the trainer's last line.
    wait_until(lambda: '"objective"' in css(browser, "#logs")[0].text, 120, "the last log line, followed")
    logs = css(browser, "#logs")[0].text
    assert "[master-0 #1] Step: 0, objective:" in logs and "Step: 29, objective:" in logs, logs[-2000:]
    assert "[job] submitted" in logs, logs[:2000]
    browser.screenshot("job-slow-followed")
    search = css(browser, "#log-search")[0]
    search.send_keys("Step: 2")
    shown = css(browser, "#logs")[0].text.strip().splitlines()
    assert shown and all("Step: 2" in line for line in shown) and len(shown) == 11, shown  # 2, 20..29
    assert css(browser, "#logs mark")


def test_job_page_plots_the_loss_per_epoch(platform, browser):
    finished(platform, "linear")
    go(platform, browser, "/jobs/linear")
    browser.wait_for_text("Job linear SUCCEEDED")
    points = wait_css(browser, "#metric-plot svg circle.pt", 20)
    assert len(points) == 20, len(points)  # 20 epochs, one line (master-0, attempt 0)
    assert len(css(browser, "#metric-plot svg polyline")) == 1
    assert css(browser, "#metric-name")[0].get_attribute("value") == "loss"
    css(browser, "#metric-log")[0].click()  # log scale: the same 20 points (every loss > 0)
    assert "log scale" in css(browser, "#metric-plot svg")[0].text
    assert len(css(browser, "#metric-plot svg circle.pt")) == 20
    wait_until(lambda: "Epoch: 19, loss:" in css(browser, "#logs")[0].text, 30, "the logs of linear")
    from selenium.webdriver.support.ui import Select

    Select(css(browser, "#log-replica")[0]).select_by_value("master-0")
    wait_until(lambda: "Done exporting!" in css(browser, "#logs")[0].text, 30, "master-0's logs")
    browser.screenshot("job-linear-loss")


def test_cancel_from_the_job_page(platform, browser):
    wait_until(lambda: job(platform, "sleeper")["state"] == "JOB_STATE_RUNNING", 240, "sleeper to run", interval=0.5)
    go(platform, browser, "/jobs/sleeper")
    wait_css(browser, "#cancel-job")[0].click()
    browser.driver.switch_to.alert.accept()
    wait_until(lambda: job(platform, "sleeper")["state"] in ("JOB_STATE_CANCELLING", "JOB_STATE_CANCELLED"), 30,
               "sleeper cancelled")
    browser.wait_for_text("CANCEL")
    browser.screenshot("job-cancelled")


def test_study_page_highlights_the_best_trial(platform, browser):
    study = wait_until(lambda: (lambda s: s if s["state"] != "STUDY_STATE_RUNNING" else None)(
        platform.cli_json("hp", "describe", "branin", config=platform.acme)["study"]), 240, "the study to end",
        interval=1.0)
    assert study["state"] == "STUDY_STATE_SUCCEEDED", study
    go(platform, browser, "/studies/branin")
    best = wait_css(browser, "tr.best")
    assert len(best) == 1 and "x1=3.14159" in best[0].text and "x2=2.275" in best[0].text, best[0].text
    assert len(wait_css(browser, "#objective-plot svg circle.pt", 3)) >= 3
    assert len(css(browser, "#objective-plot svg circle.best")) == 1
    assert {e.get_attribute("data-param") for e in css(browser, ".scatter")} == {"x1", "x2"}
    assert len(css(browser, ".scatter svg circle.best")) == 2
    browser.screenshot("study-branin")


def test_models_page_shows_replicas_and_answers_predict(platform, browser):
    linear = finished(platform, "linear")
    output = linear["spec"]["output_path"].removeprefix("file://")
    created = platform.cli_json("models", "create", "-n", "linear", "-v", "v1", "-u",
                                os.path.join(output, "model", "1"), "--wait", "--timeout", "180",
                                config=platform.acme)
    assert created["model_version"]["state"] == "MODEL_VERSION_STATE_AVAILABLE", created
    go(platform, browser, "/models")
    wait_until(lambda: "1/1" in (css(browser, "td.replicas") or [None])[0].text, 60, "replicas 1/1")
    css(browser, "details summary")[0].click()
    box = css(browser, "textarea.predict-input")[0]
    box.clear()
    box.send_keys('{"instances": [{"keys": [1], "X": [10.0]}]}')
    next(b for b in css(browser, "details button") if b.text == "Predict").click()
    wait_until(lambda: "predictions" in css(browser, "pre.predict-output")[0].text, 60, "the Predict answer")
    answer = json.loads(css(browser, "pre.predict-output")[0].text)
    prediction = answer["predictions"][0]["prediction"]
    assert abs((prediction[0] if isinstance(prediction, list) else prediction) - 30.0) < 0.5, answer  # 2x + 10
    browser.driver.refresh()  # the gateway counted that call for version 1
    assert int(wait_css(browser, "td.requests")[0].text) >= 1
    assert float(css(browser, "td.latency")[0].text) > 0
    # A TensorFlow Lite export is listed as an artifact of the version, with a download link.
    exported = platform.cli_json("models", "export", "linear", "-v", "1", "--format", "tflite", "--wait",
                                 config=platform.acme)
    browser.driver.refresh()
    [row] = wait_css(browser, "tr.artifact")
    assert "tflite" in row.text and "SUCCEEDED" in row.text and exported["export"]["artifact"]["sha256"][:16] in row.text
    link = row.find_elements("css selector", "a")[0].get_attribute("href")
    assert link.endswith("/ui/api/models/linear/versions/1/artifacts/tflite")
    browser.screenshot("models")


def test_quota_page_shows_limits_and_usage_as_bars(platform, browser):
    go(platform, browser, "/quota")
    body = browser.wait_for_text("Quota of acme")
    assert "of 4" in body and "of 16 GiB" in body, body
    assert len(css(browser, ".bar")) == 8   # CPU, memory, GPUs, jobs, replicas, studies, dev environments, TensorBoards
    browser.screenshot("quota")


def test_another_tenant_sees_none_of_it(platform, browser):
    css(browser, "#logout")[0].click()
    wait_css(browser, "#access_key")
    with open(platform.rival) as f:
        rival = json.load(f)
    css(browser, "#access_key")[0].send_keys(rival["access_key"])
    css(browser, "#secret_key")[0].send_keys(rival["secret_key"])
    css(browser, "#login")[0].click()
    body = browser.wait_for_text("Jobs of rival")
    assert css(browser, "#no-jobs") and "linear" not in body and "sleeper" not in body, body
    go(platform, browser, "/jobs/linear")
    assert "not found" in wait_css(browser, "#page-error")[0].text.lower()
    browser.screenshot("rival-job-linear")
    go(platform, browser, "/studies/branin")
    browser.driver.refresh()
    assert "not found" in wait_css(browser, "#page-error")[0].text.lower()
    go(platform, browser, "/models")
    assert "No models." in browser.wait_for_text("Models of rival")
    token = platform.token(platform.rival)
    for path in ("jobs/linear", "jobs/linear/metrics", "jobs/linear/logs", "studies/branin", "jobs?tenant=acme",
                 "quota?tenant=acme"):
        assert api(platform, "/ui/api/" + path, token) == 404, path
    for path in ("/ui/api/jobs/linear", "/ui/api/models"):  # and no cookie: nothing
        request = urllib.request.Request(platform.rest_endpoint + path)
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=30)
        assert info.value.code == 401


def test_admin_switches_to_a_tenant(platform, browser):
    browser.driver.get(platform.cli_json("console")["login_link"])
    browser.wait_for_text("admin (admin)")
    from selenium.webdriver.support.ui import Select

    Select(wait_css(browser, "#tenant-switch")[0]).select_by_value("acme")
    body = browser.wait_for_text("Jobs of acme")
    assert "linear" in body and "sleeper" in body
    browser.screenshot("admin-acme")
