"""The Prefect UI of a running set, in headless Debian chromium: open a light deployment's run form, change a
parameter, submit, wait for the run to complete, screenshot it (tests/e2e/artifacts/, gitignored).

Needs chromium + chromedriver (Debian: apt-get install -y chromium chromium-driver) and selenium in the venv.
The set runs on SQLite here (the UI does not care; test_scaled.py covers PostgreSQL)."""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from alignflow import infra
from tests.conftest import make_project

pytestmark = pytest.mark.scaled

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1000"]


def _missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"chromium not found ({CHROMIUM}); Debian: apt-get install -y chromium chromium-driver"
    if not Path(CHROMEDRIVER).exists():
        return f"chromedriver not found ({CHROMEDRIVER}); Debian: apt-get install -y chromium-driver"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed in the venv (pip install selenium==4.51.0)"
    return None


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    root = make_project(tmp_path_factory.mktemp("ui"))
    settings = infra.Settings(root=root, prefect_port=0, mlflow_port=0, deployments=["cpu"])
    with infra.running(settings) as state:
        yield state


@pytest.fixture
def browser():
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium never downloads a driver or browser
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    profile = tempfile.mkdtemp(prefix="alignflow-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")
    return ARTIFACTS


def _wait(predicate, timeout: float, what: str, step: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_run_form_starts_a_run_with_a_changed_parameter(stack, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    api = infra.api_client(stack["api_url"])
    deployment = api.get("deployments/name/infra-check/cpu").json()
    token = f"from-the-ui-{secrets.token_hex(3)}"

    browser.get(f"{stack['ui_url']}/deployments/deployment/{deployment['id']}/run")
    field = _wait(lambda: browser.find_elements(By.TAG_NAME, "textarea"), 90, "the run form's message field")[0]
    assert field.get_attribute("value") == "ping"  # the deployment's default, shown in the form

    def typed() -> bool:  # keystrokes into a reactive form can be dropped on a loaded machine: retype until it holds
        if field.get_attribute("value") != token:
            field.send_keys(Keys.CONTROL, "a")
            field.send_keys(Keys.DELETE)
            field.send_keys(token)
        return field.get_attribute("value") == token

    _wait(typed, 30, "the typed value in the message field", step=2)
    submit = _wait(lambda: next((b for b in browser.find_elements(By.CSS_SELECTOR, "button[type=submit]")
                                 if b.text == "Submit" and b.is_enabled()), None), 30, "an enabled Submit button")
    submit.click()

    def run_of_token():
        runs = api.post("flow_runs/filter", json={"deployments": {"id": {"any_": [deployment["id"]]}},
                                                  "sort": "EXPECTED_START_TIME_DESC", "limit": 50}).json()
        return next((r for r in runs if r["parameters"].get("message") == token), None)

    try:  # a loaded 2-core CI machine once took more than 30 s here; the page says why if it never comes
        run = _wait(run_of_token, 120, "the flow run created by the form")
    except AssertionError as err:
        _artifacts()
        browser.save_screenshot(str(ARTIFACTS / "ui-submit-timeout.png"))
        page = browser.find_element(By.TAG_NAME, "body").text[-1500:]
        raise AssertionError(f"{err}; url {browser.current_url}; page text:\n{page}") from None
    run = _wait(lambda: (r := api.get(f"flow_runs/{run['id']}").json())["state_type"] in
                ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") and r, 180, "the run to finish", step=1)
    assert run["state_type"] == "COMPLETED", run["state"]
    assert run["work_pool_name"] == "cpu"
    assert run["parameters"] == {"message": token, "sleep_s": 0}

    browser.get(f"{stack['ui_url']}/runs/flow-run/{run['id']}")
    _wait(lambda: "Completed" in browser.find_element(By.TAG_NAME, "body").text, 60, "'Completed' on the run page")
    _wait(lambda: run["name"] in browser.find_element(By.TAG_NAME, "body").text, 30, "the run's name on its page")
    try:  # the flow's own log line, with the parameter the form set, for the screenshot
        _wait(lambda: f"'{token}'" in browser.find_element(By.TAG_NAME, "body").text, 20, "the run's log line")
    except AssertionError:
        pass  # logs arrive in batches; the API checks above already proved the run
    shot = _artifacts() / "ui-completed-run.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    print(f"\nUI run {run['name']} ({run['id']}) completed; screenshot {shot}")
