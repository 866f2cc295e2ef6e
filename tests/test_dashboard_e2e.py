"""The dashboard served by ``streamlit run`` and driven in headless Chromium: plot, limit slider, export
(into the deploy folder given at launch).

Needs the ``playwright`` package and a ``chromium`` executable (Debian's package); skipped otherwise.
"""
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dashboard_study import DEMO_TRIALS, write_study

pytest.importorskip("streamlit")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
CHROMIUM = shutil.which("chromium")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable on PATH (apt-get install chromium)")]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SERVER_START_S = 60
EXPORT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1) as response:
                if response.read() == b"ok":
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"streamlit did not answer at {url} within {timeout_s} s")


def wait_for_page(page) -> None:
    """Until the script run behind the page has finished and no stale element is left on it."""
    page.wait_for_timeout(300)  # let a rerun that a click or key press started begin
    page.wait_for_function("!document.querySelector('[data-testid=stStatusWidgetRunningIcon]')"
                           " && !document.querySelector('[data-stale=true]')", timeout=SERVER_START_S * 1000)


@pytest.fixture
def storage_url(tmp_path) -> str:
    """The demo study, its trials recorded against a real tiny checkpoint that export can rebuild."""
    from dse.core import models

    checkpoint = tmp_path / "tiny.pt"
    models.save_checkpoint(checkpoint, models.random_model("tiny"))
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    specs = [dataclasses.replace(spec, params=None) for spec in DEMO_TRIALS]  # export compares a recorded count
    write_study(url, "moe-demo", specs, model={"name": "tiny", "weights": f"checkpoint:{checkpoint}"})
    return url


@pytest.fixture
def dashboard_url(storage_url, tmp_path):
    port = free_port()
    environment = dict(os.environ, DSE_STORAGE="")  # the storage must come from "-- --storage"
    log = open(tmp_path / "streamlit.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--server.fileWatcherType", "none",
         "--browser.gatherUsageStats", "false", "--", "--storage", storage_url, "--deploy-dir", str(tmp_path / "deploy")],
        cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, env=environment)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, server, SERVER_START_S)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_dashboard_in_a_browser(dashboard_url, tmp_path):
    expect = sync_api.expect
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(dashboard_url)
            page.wait_for_selector(".js-plotly-plot", timeout=SERVER_START_S * 1000)
            # every completed trial is a point (the star and the diamond add two more)
            assert page.locator(".js-plotly-plot .scatterlayer .point").count() >= 9
            recommended = page.get_by_role("heading", name="Recommended: trial")
            expect(recommended).to_have_text("Recommended: trial 3")

            # click the WER limit's track at 45 % of its 0..55 % range: about 25 %
            track = page.get_by_role("group", name="Max WER (%)").locator("> div").first
            box = track.bounding_box()
            page.mouse.click(box["x"] + 0.45 * box["width"], box["y"] + box["height"] / 2)
            expect(recommended).to_have_text("Recommended: trial 2", timeout=30_000)
            wait_for_page(page)

            bundle = tmp_path / "deploy" / "bundle"  # a name under the deploy folder given at launch
            folder = page.get_by_role("textbox", name="Output folder")
            folder.fill("bundle")
            folder.press("Enter")
            wait_for_page(page)
            expect(folder).to_have_value("bundle")
            page.get_by_role("button", name="Export trial 2").click()
            expect(page.get_by_text("Bundle written to")).to_be_visible(timeout=EXPORT_S * 1000)
            assert (bundle / "config.json").is_file()

            # the page scrolls inside its main container: grow the window to it, then capture the whole page
            height_px = page.evaluate("document.querySelector('[data-testid=stMainBlockContainer]').scrollHeight")
            page.set_viewport_size({"width": 1400, "height": height_px + 120})
            page.evaluate("document.querySelector('[data-testid=stMain]').scrollTo(0, 0)")
            page.wait_for_timeout(1000)
            screenshot = tmp_path / "dashboard.png"
            page.screenshot(path=str(screenshot), full_page=True)
            print(f"screenshot: {screenshot}")
        finally:
            browser.close()
