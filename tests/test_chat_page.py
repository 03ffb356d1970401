"""The chat page at `/` in a real browser (Debian's chromium driven by Playwright) against the real server over a
tiny random model: the model's name, an answer streamed into the page, a second turn that sends the whole
conversation, and the API-key flow."""

from __future__ import annotations

import itertools
import json
import shutil
import urllib.request
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="the chat page test drives chromium with playwright")

from helpers_serve import running_server  # noqa: E402

# The browser's waits: an answer of a few tokens from the tiny model takes well under a second on a CPU.
ANSWER_TIMEOUT_MS = 20_000
# Few tokens, so that two turns stay inside the tiny model's context and the test stays fast.
MAX_TOKENS = 12


def find_chromium() -> str | None:
    """A system chromium: Playwright cannot download its own browsers here, so the test uses the distribution's."""
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium found (/usr/bin/chromium, or chromium / chromium-browser on PATH)"
)

# Records every text the newest assistant message is given, in order, in `window.answerTexts`.
RECORD_ANSWER_TEXTS = """() => {
  window.answerTexts = [];
  new MutationObserver((records) => {
    for (const record of records) {
      if (!record.target.classList?.contains("assistant")) continue;
      for (const node of record.addedNodes) window.answerTexts.push(node.textContent);
    }
  }).observe(document.getElementById("messages"), { childList: true, subtree: true });
}"""


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh page in its own context, so no API key is left in localStorage from another test."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(ANSWER_TIMEOUT_MS)
    yield page
    context.close()


def served_model(base_url: str, api_key: str | None = None) -> str:
    """The model id that `GET /v1/models` names, read without the browser."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with urllib.request.urlopen(urllib.request.Request(base_url + "/v1/models", headers=headers)) as response:
        return json.load(response)["data"][0]["id"]


def chat_requests(page) -> list[dict]:
    """The JSON bodies of the page's `POST /v1/chat/completions` requests, filled in as they are sent."""
    bodies = []

    def record_body(request) -> None:
        if request.url.endswith("/v1/chat/completions"):
            bodies.append(json.loads(request.post_data))

    page.on("request", record_body)
    return bodies


def send_and_wait(page, text: str) -> str:
    """Type `text`, send it, wait for the answer to finish streaming, and return the answer's text."""
    page.fill("#prompt", text)
    page.click("#send")
    sync_api.expect(page.locator("#send")).to_be_enabled(timeout=ANSWER_TIMEOUT_MS)
    sync_api.expect(page.locator("#error")).to_have_text("")
    answer = page.locator(".message.assistant").last.text_content()
    assert answer, "the answer is empty"
    return answer


def test_page_streams_answers_and_sends_the_whole_conversation(page):
    with running_server() as base_url:
        model_id = served_model(base_url)
        bodies = chat_requests(page)
        page.goto(base_url)
        sync_api.expect(page.locator("#model-name")).to_have_text(model_id)
        page.fill("#max-tokens", str(MAX_TOKENS))
        page.evaluate(RECORD_ANSWER_TEXTS)

        first = send_and_wait(page, "Hello there")
        sync_api.expect(page.locator(".message.user")).to_have_text(["Hello there"])
        # Streamed: the answer was shown growing, each text a prefix of the next, not only once at the end.
        texts = [t for t in page.evaluate("window.answerTexts") if t]
        assert len(texts) >= 2, f"the answer appeared in one piece: {texts}"
        assert all(b.startswith(a) for a, b in itertools.pairwise(texts)), texts
        assert texts[-1] == first

        send_and_wait(page, "And then?")
        sync_api.expect(page.locator(".message.user")).to_have_text(["Hello there", "And then?"])
        sync_api.expect(page.locator(".message.assistant")).to_have_count(2)
        assert [body["messages"] for body in bodies] == [
            [{"role": "user", "content": "Hello there"}],
            [
                {"role": "user", "content": "Hello there"},
                {"role": "assistant", "content": first},
                {"role": "user", "content": "And then?"},
            ],
        ]
        # The defaults the page starts with, but the max tokens set above.
        settings = {key: value for key, value in bodies[-1].items() if key != "messages"}
        assert settings == {"model": model_id, "stream": True, "temperature": 0.8, "max_tokens": MAX_TOKENS}


def test_page_asks_for_the_api_key_and_sends_it(page):
    with running_server(api_key="k") as base_url:
        authorizations = []

        def record_authorization(request) -> None:
            if request.url.startswith(base_url + "/v1/"):
                authorizations.append(request.headers.get("authorization"))

        page.on("request", record_authorization)
        page.goto(base_url)
        # The page itself is public; its first API call answers 401, which reveals the key field.
        sync_api.expect(page.locator("#api-key")).to_be_visible()
        sync_api.expect(page.locator("#error")).to_contain_text("API key")

        page.fill("#api-key", "k")
        page.press("#api-key", "Enter")
        model_id = served_model(base_url, "k")
        sync_api.expect(page.locator("#model-name")).to_have_text(model_id)
        page.fill("#max-tokens", str(MAX_TOKENS))
        send_and_wait(page, "Hello there")
        assert authorizations[0] is None and set(authorizations[1:]) == {"Bearer k"}, authorizations

        # Kept across a reload (in localStorage): the model loads with it straight away.
        page.reload()
        sync_api.expect(page.locator("#model-name")).to_have_text(model_id)
        sync_api.expect(page.locator("#api-key")).to_have_value("k")
