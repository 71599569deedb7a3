"""The playground page in headless Chromium: ask, read the streamed answer, vote."""

import shutil

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):  # a failure, not a skip: `make test` installs both
        pytest.fail("the playground test needs chromium and chromium-driver (`make browser`)")

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_ask_stream_and_vote_in_the_browser(served, browser, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    from components.inference.store import InferenceStore

    wait = WebDriverWait(browser, 60)
    browser.get(served.url)
    wait.until(ready.text_to_be_present_in_element((By.ID, "model"), "flywheel-llm-tiny"))
    assert "version 1" in browser.find_element(By.ID, "model").text

    browser.find_element(By.ID, "prompt").send_keys("How do I run the tests?")
    browser.find_element(By.ID, "send").click()
    wait.until(ready.visibility_of_element_located((By.ID, "feedback")))
    assert "Was this answer good?" in browser.find_element(By.ID, "status").text
    request_id = browser.execute_script("return requestId;")
    assert request_id and request_id.startswith("chatcmpl-")

    browser.find_element(By.ID, "down").click()
    wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "feedback stored"))
    browser.save_screenshot(str(tmp_path / "playground.png"))

    store = InferenceStore()  # the served FLYWHEEL_HOME's store
    try:
        logged = store.get(request_id)
        assert logged is not None and logged.prompt == "How do I run the tests?"
        assert [f.rating for f in store.feedback_since(0) if f.request_id == request_id] == ["down"]
    finally:
        store.close()
