"""The demo's report.html in a real headless Chromium: the diagrams render, hovering a node
works, the console stays clean. Debian's chromium + chromium-driver are installed when
missing and possible (root with apt, as on CI); otherwise this module is skipped, saying why."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.slow
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000"]


def _browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths, installing Debian's packages once when possible."""
    def found():
        return shutil.which("chromium"), shutil.which("chromedriver")

    chromium, driver = found()
    if not (chromium and driver):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip("headless Chromium not installed and cannot be (needs root and apt-get): apt-get install chromium chromium-driver")
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium", "chromium-driver"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(cmd, capture_output=True, env=env, timeout=600).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            if r.returncode != 0:
                pytest.skip(f"apt-get could not install chromium: {r.stderr.strip().splitlines()[-1:]}")
        chromium, driver = found()
        if not (chromium and driver):
            pytest.skip("chromium or chromedriver still missing after apt-get install")
    return chromium, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, chromedriver = _browser()
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for f in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        opts.add_argument(f)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(chromedriver))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _severe(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_report_renders_its_diagrams_in_chromium(browser, quick_demo, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    out, _ = quick_demo
    browser.get((out / "report.html").resolve().as_uri())
    svgs = browser.find_elements(By.CSS_SELECTOR, "svg.csp-circuit")
    assert svgs, "no circuit diagram in the report"
    for svg in svgs:
        box = browser.execute_script("var r = arguments[0].getBoundingClientRect(); return [r.width, r.height];", svg)
        assert box[0] > 100 and box[1] > 100  # laid out, not collapsed
        assert svg.find_elements(By.CSS_SELECTOR, "g.node") and svg.find_elements(By.CSS_SELECTOR, "line.resid")
    # where each circuit starts and ends: its input tokens and its task's answer tokens, rendered
    for svg in svgs:
        roles = {g.get_attribute("data-role") for g in svg.find_elements(By.CSS_SELECTOR, "g.token") if g.is_displayed()}
        assert roles == {"input", "answer"}, roles
    frontier = browser.find_elements(By.CSS_SELECTOR, ".frontier svg")
    assert frontier and browser.execute_script("return arguments[0].getBoundingClientRect().width;", frontier[0]) > 100
    # Hover a node with edges: its edges light up and the panel shows its id and top tokens.
    nodes = [n for n in svgs[0].find_elements(By.CSS_SELECTOR, "g.node")
             if svgs[0].find_elements(By.CSS_SELECTOR, f'path.edge[data-src="{n.get_attribute("data-id")}"]')]
    node = nodes[0] if nodes else svgs[0].find_elements(By.CSS_SELECTOR, "g.node")[0]
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", node)
    ActionChains(browser).move_to_element(node).perform()
    panel = browser.find_element(By.ID, "panel")
    assert panel.is_displayed() and node.get_attribute("data-id") in panel.text
    if nodes:
        assert svgs[0].find_elements(By.CSS_SELECTOR, "path.edge.hl")
    shot = tmp_path / "report.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    shutil.copy(shot, out / "report-screenshot.png")  # kept beside the report for a look
    assert not _severe(browser), _severe(browser)


def test_a_circuit_page_renders_standalone(browser, quick_demo):
    from selenium.webdriver.common.by import By

    out, _ = quick_demo
    page = sorted((out / "figures" / "circuits").glob("*.html"))[0]
    browser.get(page.resolve().as_uri())
    svg = browser.find_element(By.CSS_SELECTOR, "svg.csp-circuit")
    assert len(svg.find_elements(By.CSS_SELECTOR, "g.node")) > 0
    assert browser.execute_script("return arguments[0].getBoundingClientRect().height;", svg) > 100
    # no text runs past the drawing's edge (the header's numbers line used to be cut at 580 px), the
    # nodes' printed labels (rotated) included
    overflow = browser.execute_script(
        "var s = arguments[0].getBoundingClientRect(), out = [];"
        "arguments[0].querySelectorAll('text').forEach(function (t) {"
        "  var b = t.getBoundingClientRect(); if (b.right > s.right + 0.5 || b.left < s.left - 0.5 || b.bottom > s.bottom + 0.5"
        "      || b.top < s.top - 0.5) out.push(t.textContent.slice(0, 60)); });"
        "return out;", svg)
    assert overflow == [], overflow
    assert not _severe(browser), _severe(browser)
