"""Headless Chromium for the browser tests: Debian's `chromium` driven by its
`chromedriver` through Selenium (nothing downloads a browser: Selenium
Manager is never used, the binaries are named). Not a test module.

    with chromium(artifacts_dir) as browser:
        browser.driver.get(url)
        browser.screenshot("page")      # <artifacts_dir>/page.png
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def require_browser() -> None:
    """Fails (never skips) without the browser: scripts/setup.sh installs it."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run scripts/setup.sh (apt-get install chromium chromium-driver)")


class Browser:
    def __init__(self, driver, artifacts: str):
        self.driver = driver
        self.artifacts = artifacts

    def screenshot(self, name: str) -> str:
        os.makedirs(self.artifacts, exist_ok=True)
        path = os.path.join(self.artifacts, f"{name}.png")
        self.driver.save_screenshot(path)
        return path

    def body_text(self) -> str:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.TAG_NAME, "body").text

    def wait_for_text(self, text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        body = ""
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                body = self.body_text()
                if text in body:
                    return body
            time.sleep(0.5)
        raise AssertionError(f"{text!r} never appeared on {self.driver.current_url}; the page shows:\n{body[:2000]}")


@contextlib.contextmanager
def chromium(artifacts: str, width: int = 1280, height: int = 900):
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--window-size={width},{height}", "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield Browser(driver, artifacts)
    finally:
        driver.quit()
