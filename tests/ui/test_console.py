"""The web console end to end in headless Chromium (Debian's chromium + chromedriver, installed
by scripts/install-chromium.sh) against a real gateway process and a real Celery worker on
Redis: log in with a key, submit a job, watch it reach 100 %, compare the panels, start a
sampling job as admin, and be refused the admin pages as a submitter.

Screenshots of every page go to ``$SCORERECON_SCREENSHOTS`` (``make screenshots`` sets
``docs/ui`` and reconstructs a phantom with the bundled ``ct-default``; the test suite uses a
tiny 32² model and a temporary folder).
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.service.conftest import tiny_model
from tests.site import Site

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="Chromium missing: run scripts/install-chromium.sh (make test does)",
)
DOCS_MODE = bool(os.environ.get("SCORERECON_SCREENSHOTS"))


@pytest.fixture
def site(tmp_path):
    with Site(tmp_path / "home", redis_db=14) as running:
        tiny_model(running.home / "models")
        submitter = running.key("recon:submit,recon:read", "radiology")
        admin = running.key("admin", "physics")
        running.start_gateway()
        running.start_worker()
        yield running.base, submitter, admin


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _measurement(path: Path) -> tuple[str, str, str, int]:
    """(file, spec preset: views, image size, model, nfe): a phantom for the docs, else tiny."""
    if DOCS_MODE:
        from models.phantoms import ct_phantoms
        from models.physics import from_spec

        op = from_spec({"modality": "ct", "image_size": 128, "n_views": 23})
        with torch.no_grad():
            y = op.forward(ct_phantoms(1, 128, seed=1))
        np.save(path, y.numpy())
        return "23", "128", "ct-default", 60
    y = np.random.default_rng(0).random((1, 1, 8, 48)).astype(np.float32)
    np.save(path, y)
    return "8", "32", "tiny32", 4


def test_console_end_to_end(site, browser, tmp_path):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    base, submitter, admin = site
    shots = Path(os.environ.get("SCORERECON_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    # Pages replace themselves on navigation and live refresh: an element found
    # a moment ago may be gone, so the wait retries instead of failing.
    wait = WebDriverWait(
        browser,
        300 if DOCS_MODE else 90,
        ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
    )

    def shot(name):
        browser.save_screenshot(str(shots / f"{name}.png"))

    def log_in(key):
        browser.get(base + "/ui/login")
        browser.find_element(By.ID, "key").send_keys(key)
        browser.find_element(By.ID, "login").click()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "h1").text == "Jobs")

    browser.get(base + "/ui/")
    assert browser.current_url.endswith("/ui/login")  # deny by default
    browser.find_element(By.ID, "key").send_keys("sr_wrong_key")
    browser.find_element(By.ID, "login").click()
    refused = wait.until(lambda d: d.find_elements(By.CLASS_NAME, "error"))
    assert "unknown, revoked or expired" in refused[0].text
    shot("login")
    log_in(submitter)

    # Submit through the form, with the CT preset.
    views, size, model, nfe = _measurement(tmp_path / "sinogram.npy")
    browser.get(base + "/ui/new")
    for field, value in (("views", views), ("size", size), ("nfe", str(nfe)), ("samples", "4")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "preset-ct").click()
    spec = json.loads(browser.find_element(By.ID, "spec").get_attribute("value"))
    assert spec == {"modality": "ct", "image_size": int(size), "n_views": int(views)}
    Select(browser.find_element(By.ID, "model")).select_by_visible_text(model)
    browser.find_element(By.ID, "measurement").send_keys(str(tmp_path / "sinogram.npy"))
    shot("new")
    browser.find_element(By.ID, "submit").click()

    # The job page follows the job to 100 % and then shows the comparison.
    wait.until(lambda d: "/ui/jobs/" in d.current_url)
    wait.until(lambda d: d.find_element(By.ID, "job-state").text == "succeeded")
    wait.until(lambda d: d.find_element(By.ID, "panels").get_attribute("data-ready") == "1")
    assert browser.find_element(By.ID, "job-pct").text == "100 %"
    for name in ("measurement", "reconstruction", "baseline", "uncertainty"):
        canvas = browser.find_element(By.ID, f"panel-{name}")
        assert canvas.get_attribute("data-drawn") == "1"
        spread = browser.execute_script(
            "const c = arguments[0], d = c.getContext('2d').getImageData(0, 0, c.width, c.height)"
            ".data; let lo = 255, hi = 0; for (let i = 0; i < d.length; i += 4) "
            "{ lo = Math.min(lo, d[i]); hi = Math.max(hi, d[i]); } return hi - lo;",
            canvas,
        )
        assert spread > 0, f"{name} panel is blank"
    lung = next(b for b in browser.find_elements(By.CLASS_NAME, "preset") if b.text == "lung")
    lung.click()
    assert browser.find_element(By.ID, "panels").get_attribute("data-window") == "lung"
    browser.find_element(By.CSS_SELECTOR, "button.preset[data-default]").click()
    assert "nfe" in browser.find_element(By.ID, "metrics").text
    shot("job")

    browser.get(base + "/ui/")
    assert "succeeded" in browser.find_element(By.ID, "jobs").text
    shot("jobs")
    browser.get(base + "/ui/models/ct-default")
    assert "image_size" in browser.page_source
    shot("model")

    # A submitter is refused the admin pages.
    browser.get(base + "/ui/admin")
    assert "Forbidden" in wait.until(lambda d: d.find_elements(By.CLASS_NAME, "error"))[0].text
    assert not browser.find_elements(By.ID, "sampling-form")
    shot("admin-refused")

    # The admin starts a sampling job.
    browser.find_element(By.CSS_SELECTOR, "form.who button").click()
    log_in(admin)
    browser.get(base + "/ui/admin")
    form = browser.find_element(By.ID, "sampling-form")
    Select(form.find_element(By.NAME, "model")).select_by_visible_text(model)
    Select(form.find_element(By.NAME, "sampler")).select_by_visible_text(
        "pc" if DOCS_MODE else "fast"
    )
    steps = form.find_element(By.ID, "sampling-steps")
    steps.clear()
    steps.send_keys("200" if DOCS_MODE else "4")
    n = form.find_element(By.NAME, "n")
    n.clear()
    n.send_keys("4")
    shot("admin")
    browser.find_element(By.ID, "start-sampling").click()
    wait.until(lambda d: "/ui/jobs/" in d.current_url)
    wait.until(lambda d: d.find_element(By.ID, "job-state").text == "succeeded")
    wait.until(lambda d: d.find_element(By.ID, "panels").get_attribute("data-ready") == "1")
    assert browser.find_element(By.ID, "panel-samples").get_attribute("data-drawn") == "1"
    shot("sampling")
