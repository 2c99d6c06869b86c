"""The chat page in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`, via selenium)
opens /, sends a message, and sees the reply stream in and then match the API's greedy answer. Skipped where
Chromium, its driver or selenium is missing."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
uvicorn = pytest.importorskip("uvicorn")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip("needs chromium and chromedriver (apt install chromium chromium-driver)", allow_module_level=True)

from helpers.serving import running_server  # noqa: E402

import leanlm  # noqa: E402


@pytest.fixture(scope="module")
def page_server(smol_path: Path) -> Iterator[tuple[str, leanlm.LLM]]:
    llm = leanlm.load(smol_path, compile="off", progress=False)
    with running_server(llm, max_batch=2) as url:
        yield url, llm


def test_chat_page_streams_a_reply(page_server: tuple[str, leanlm.LLM]) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, llm = page_server
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    opts.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "smol")
        driver.execute_script("document.getElementById('temperature').value = '0';"
                              "document.getElementById('max_tokens').value = '24';")
        # count the updates of the reply bubble: a streamed reply arrives in several pieces, not one
        driver.execute_script("window.__updates = 0; new MutationObserver(() => window.__updates++)"
                              ".observe(document.getElementById('log'), {subtree: true, childList: true, "
                              "characterData: true});")
        box = driver.find_element(By.ID, "input")
        box.send_keys("What is the capital of France?")
        driver.find_element(By.ID, "send").click()
        reply = lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant")  # noqa: E731
        wait.until(lambda d: reply(d) and reply(d)[-1].text and d.find_element(By.ID, "send").is_enabled())
        final = reply(driver)[-1].text
        expect = "".join(llm.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=24,
                                  temperature=0))
        assert final == expect.strip() or final == expect
        assert driver.find_elements(By.CSS_SELECTOR, ".msg.user")[-1].text == "What is the capital of France?"
        assert driver.execute_script("return window.__updates") > 5  # user bubble, reply bubble, then its pieces
    finally:
        driver.quit()
