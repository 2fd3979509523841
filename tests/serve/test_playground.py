"""The playground page in a real headless browser (Debian's chromium driven by selenium through chromedriver)."""

from __future__ import annotations

import shutil

import pytest

INSTALL = ("no headless browser: install Debian's chromium and its driver (`apt-get install -y chromium "
           "chromium-driver`, as .ci/run does) and selenium (`pip install -e '.[dev]'`)")


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip(INSTALL)
    return chromium, driver


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("selenium", reason=INSTALL)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1000,1400"):
        options.add_argument(arg)
    # an explicit chromedriver path keeps Selenium Manager from trying to download one (the tests run offline)
    session = webdriver.Chrome(service=Service(driver), options=options)
    session.set_page_load_timeout(60)
    yield session
    session.quit()


def token_of(server) -> str:
    with server.client() as client:
        return client.headers["Authorization"].removeprefix("Bearer ")


def fill(browser, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    box = browser.find_element(By.ID, element_id)
    box.clear()
    box.send_keys(value)


def submit(browser, url: str, *, prompt: str, token: str, mode: str = "causal", max_new_bytes: int = 8,
           c_floor: str = "", s_floor: str = "") -> dict[str, str]:
    """Open the page, fill the form, click Generate and wait for the answer; returns the rendered parts."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    fill(browser, "prompt", prompt)
    Select(browser.find_element(By.ID, "mode")).select_by_value(mode)
    fill(browser, "max_new_bytes", str(max_new_bytes))
    fill(browser, "c_floor", c_floor)
    fill(browser, "s_floor", s_floor)
    fill(browser, "token", token)
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 120).until(lambda b: b.find_element(By.ID, "status").text in ("done", "failed"))
    text = {name: browser.find_element(By.ID, name).text
            for name in ("status", "output", "gate", "telemetry", "attempts", "error")}
    text["passed"] = browser.find_element(By.ID, "gate").get_attribute("data-passed")
    return text


def telemetry_row(rendered: dict[str, str], metric: str) -> list[str]:
    rows = [line.split() for line in rendered["telemetry"].splitlines()]
    return next(row for row in rows if row and row[0] == metric)


def test_page_renders_a_passed_generation(browser, server):
    prompt = "To be, or not"
    page = submit(browser, f"{server.url}/", prompt=prompt, token=token_of(server), c_floor="0", s_floor="0")
    assert page["status"] == "done", page
    assert page["output"].startswith(prompt) and len(page["output"]) > len(prompt)
    assert page["passed"] == "true"
    assert page["gate"] == "passed after 1 attempt"
    assert telemetry_row(page, "C")[2:] == ["0.0000", "yes"]
    assert telemetry_row(page, "S")[2:] == ["0.0000", "yes"]
    assert telemetry_row(page, "K")[2:4] == ["not", "gated"]


def test_page_renders_a_blocked_generation_with_its_attempts(browser, server):
    # floors of 1.0 block every sample of the test models (see conftest.REFERENCE)
    page = submit(browser, f"{server.url}/", prompt="blocked", token=token_of(server), c_floor="1", s_floor="1")
    assert page["status"] == "done", page
    assert page["passed"] == "false"
    assert page["output"] == "(blocked: no text returned)"
    assert page["gate"].startswith("blocked after 3 attempts")  # 1 + the default max_retries of 2
    assert telemetry_row(page, "S")[-2:] == ["below", "floor"]
    assert len(page["attempts"].splitlines()) == 2 + 3  # caption, header, one row per attempt


def test_page_renders_a_diffusion_generation_under_a_route_prefix(browser, server):
    page = submit(browser, f"{server.diffusion_url}/", prompt="Once", token=token_of(server), mode="diffusion",
                  c_floor="0", s_floor="0")
    assert page["status"] == "done", page
    assert page["output"].startswith("Once") and page["passed"] == "true"
    assert all(a.split()[1] == "diffusion" for a in page["attempts"].splitlines()[2:])


def test_page_shows_the_error_detail(browser, server):
    page = submit(browser, f"{server.url}/", prompt="hello", token="wrong-token")
    assert page["status"] == "failed"
    assert page["error"].startswith("HTTP 401: authorization")
    assert page["output"] == "" and page["passed"] == ""
