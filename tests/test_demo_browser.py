"""End to end: `streamlit run app/demo.py` on 127.0.0.1, driven by headless Chromium (selenium).

Needs Debian's chromium and chromium-driver (CI installs them). Set VITAD_DEMO_SCREENSHOT to
keep the screenshot of the page after the upload somewhere (default: pytest's tmp dir); its path
is printed either way.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from test_demo import APP
from tiny_project import BACKBONE, build_project
from vitad.serving import demo
from vitad.core.data import index_category, split_samples

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT_ENV = "VITAD_DEMO_SCREENSHOT"
SERVER_START_TIMEOUT_S = 60
PAGE_TIMEOUT_S = 90
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1100",
)

if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
    pytest.skip(
        f"{CHROMIUM} or {CHROMEDRIVER} missing: install Debian's chromium and chromium-driver "
        "(apt-get install -y chromium chromium-driver) to run the browser test",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"streamlit exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().strip() == b"ok":
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"streamlit did not answer on {url} within {SERVER_START_TIMEOUT_S} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dataset):
    """(url, project): the demo served from a tiny project on a free port of 127.0.0.1."""
    work = tmp_path_factory.mktemp("browser")
    project = build_project(work / "project", tiny_dataset)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / "streamlit.log"
    command = [
        sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", "127.0.0.1", "--server.port", str(port),
        "--server.headless", "true", "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false",
    ]
    with log.open("w") as log_file:
        process = subprocess.Popen(
            command, env={**os.environ, demo.PROJECT_ENV: str(project)}, stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        _wait_until_healthy(url, process, log)
        yield url, project
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _texts(driver, selector: str) -> list[str]:
    return [element.text for element in driver.find_elements(By.CSS_SELECTOR, selector)]


def _upload(driver, path: Path) -> None:
    file_input = WebDriverWait(driver, PAGE_TIMEOUT_S).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, 'input[type="file"]')
    )[0]
    file_input.send_keys(str(path))


def test_upload_in_chromium_shows_the_score_of_the_pipeline(server, browser, tiny_dataset, tmp_path):
    url, project = server
    # The page opens on the first category and run of params.yaml: weave, knn.
    detector = demo.load_detector(project, demo.Run(f"{BACKBONE}-knn", BACKBONE, "weave"))
    sample = next(s for s in split_samples(index_category(tiny_dataset, "weave"), "test") if s.is_anomalous)
    image_path = tiny_dataset / sample.image_path
    _, expected = demo.score_upload(detector, image_path.read_bytes(), image_path.name)
    not_an_image = tmp_path / "readme.txt"
    not_an_image.write_text("this is not an image")

    browser.get(url)
    wait = WebDriverWait(browser, PAGE_TIMEOUT_S)
    _upload(browser, not_an_image)
    wait.until(lambda d: any("readme.txt: not an image" in text for text in _texts(d, '[data-testid="stAlert"]')))

    _upload(browser, image_path)
    shown = wait.until(lambda d: [text for text in _texts(d, '[data-testid="stMetricValue"]') if text])
    assert shown == [demo.format_score(expected.score)]
    decision = "Anomalous" if expected.is_anomalous(detector.model.threshold) else "Normal"
    wait.until(lambda d: decision in d.find_element(By.TAG_NAME, "body").text)
    assert not _texts(browser, '[data-testid="stException"]')
    assert not any("not an image" in text for text in _texts(browser, '[data-testid="stAlert"]'))

    screenshot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "demo-after-upload.png")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(screenshot)), f"could not write {screenshot}"
    print(f"screenshot of the page after the upload: {screenshot}")
