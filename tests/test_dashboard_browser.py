"""The dashboard in a real browser: Debian's chromium and chromium-driver, headless, with selenium, against a
server on loopback with two logical CPU devices running a small trace.

`make test` installs chromium and chromium-driver when missing, so a missing browser fails this test (CI must
not pass without it). A screenshot is saved to bench-results/dashboard-test.png (ignored by git).
"""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest

from serving import chat_model_dir, serving
from tangram.control import Deployment

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "bench-results"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1100"]


def chrome(profile: Path):
    """A headless chromium driven by chromium-driver, with its console log readable."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: `make test` installs them (as root: apt-get install -y chromium "
                    "chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[dev]'")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)


def until(driver, check, what: str, timeout: float = 30.0):
    """Poll `check(driver)` until it is truthy; fail naming `what` (and the page's text) after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        got = check(driver)
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; page: {driver.find_element('tag name', 'body').text[:2000]}")
        time.sleep(0.1)


def test_the_dashboard_maps_each_device_and_shows_retention_and_new_starts_live(tmp_path):
    from selenium.webdriver.common.by import By

    began = time.perf_counter()
    model = chat_model_dir(tmp_path / "tiny")
    dep = Deployment(name="tiny", checkpoint=str(model), keep_alive_s=1.0)
    with serving([dep], cpu_devices=2) as srv:
        driver = chrome(tmp_path / "profile")
        try:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
            devices = lambda d: d.find_elements(By.CSS_SELECTOR, "#devices [data-device]")  # noqa: E731
            starts = lambda d: d.find_elements(By.CSS_SELECTOR, "#starts .start")  # noqa: E731

            driver.get(srv.url + "/dashboard")  # no token yet: the login field, and no request for the map
            until(driver, lambda d: d.find_element(By.ID, "login").is_displayed(), "the login form")
            driver.find_element(By.ID, "token").send_keys("test-token")
            driver.find_element(By.CSS_SELECTOR, "#login button").click()
            until(driver, lambda d: len(devices(d)) == 2, "two device maps after logging in")

            driver.execute_script("sessionStorage.clear()")
            driver.get(srv.url + "/dashboard#token=test-token")
            until(driver, lambda d: len(devices(d)) == 2, "two device maps from the fragment's token")
            assert [e.get_attribute("data-device") for e in devices(driver)] == ["cpu#0", "cpu#1"]
            assert driver.execute_script("return location.hash") == ""  # the token left the address bar
            assert driver.execute_script("return sessionStorage.getItem('tangram-admin-token')") == "test-token"
            for e in devices(driver):
                assert e.find_element(By.CSS_SELECTOR, "canvas.map").size["width"] > 500

            assert c.completions.create(model="tiny", prompt="w5 w6", max_tokens=3).usage.completion_tokens == 3
            first = until(driver, starts, "the cold start in the timeline")
            assert len(first) == 1 and "cold" in first[0].text and "tiny" in first[0].text
            until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "[data-device] .retained-extent"),
                  "a retained extent after scale-to-zero")
            held = [e.get_attribute("data-device") for e in devices(driver)
                    if e.find_elements(By.CSS_SELECTOR, ".retained-extent")]
            assert len(held) == 1
            retained = driver.find_element(By.CSS_SELECTOR, f"[data-device='{held[0]}'] .retained-extent")
            assert retained.get_attribute("data-models") == "tiny" and "gain" in retained.text
            until(driver, lambda d: "scale-to-zero" in d.find_element(By.ID, "events").text, "scale-to-zero event")

            assert c.completions.create(model="tiny", prompt="w7", max_tokens=2).usage.completion_tokens == 2
            rows = until(driver, lambda d: len(starts(d)) == 2 and starts(d), "a second start in the timeline")
            assert "pool-hit" in rows[0].text  # newest first
            rows[0].click()
            detail = until(driver, lambda d: d.find_element(By.ID, "start-detail").is_displayed()
                           and d.find_element(By.ID, "start-detail"), "the start's numbers")
            assert "bytes reused" in detail.text and "prefill" in detail.text and "pool-hit" in detail.text
            assert "tiny" in driver.find_element(By.CSS_SELECTOR, "#deployments tbody").text

            ARTIFACTS.mkdir(exist_ok=True)
            driver.save_screenshot(str(ARTIFACTS / "dashboard-test.png"))
            logs = driver.get_log("browser")
            errors = [e for e in logs if e["level"] in ("SEVERE", "ERROR")]
            assert not errors, errors
        finally:
            driver.quit()
    print(f"browser test: {time.perf_counter() - began:.1f} s")
