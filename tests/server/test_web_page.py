"""The web page in headless Chromium (Debian's package, driven by Playwright): create a memory by pasting text and
uploading a file, ask, watch the answer stream, and see the cited spans highlighted in their documents. Saves a
screenshot to runs/test-screenshots/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from extended_mind import ExtendedMind
from extended_mind.server import ServerConfig, create_app
from extended_mind.server.background import HEADLESS_CHROMIUM_ARGS, BackgroundServer, chromium_path
from tests.conftest import byte_tokenizer, tiny_model

CHROMIUM = chromium_path()
SCREENSHOTS = Path(__file__).resolve().parents[2] / "runs" / "test-screenshots"

if CHROMIUM is None:
    if os.environ.get("CI"):
        raise RuntimeError("Chromium is missing: `make test` installs it (Debian packages chromium, chromium-driver)")
    pytest.skip("Chromium is not installed (make test installs it)", allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402

DOC = "The lighthouse of Varn was painted blue in 1911. Its keeper was called Ilse Brandt. Ships used it at night."


@pytest.fixture
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=HEADLESS_CHROMIUM_ARGS)
        yield b
        b.close()


def test_create_ask_and_see_cited_spans(browser, tmp_path):
    mind = ExtendedMind(tiny_model("llama"), byte_tokenizer(), "tiny-llama")
    app = create_app(mind, ServerConfig(memory_dir=tmp_path / "mem", max_tokens=32))
    upload = tmp_path / "keeper.txt"
    upload.write_text("Ilse Brandt kept the light for forty years.")
    with BackgroundServer(app) as server:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server.url + "/")
        expect(page.locator("#model")).to_have_text("model: tiny-llama")
        page.fill("#memory-name", "lighthouse")
        page.fill("#memory-text", DOC)
        page.set_input_files("#memory-files", str(upload))
        page.click("#create-memory")
        expect(page.locator("#memorize-status")).to_contain_text("memorized")
        entry = page.locator('#memories li[data-memory="lighthouse"]')
        expect(entry).to_contain_text("2 doc")
        expect(entry.locator("input")).to_be_checked()

        page.fill("#question", "What colour was the lighthouse?")
        page.fill("#max-tokens", "12")
        page.click("#ask")
        marks = page.locator("mark.cited")
        expect(marks.first).to_be_visible()
        expect(page.locator("#ask")).to_be_enabled()
        assert page.locator("#answer").inner_text() != ""
        assert page.locator("#citations li").count() >= 1
        documents = {"doc0": DOC, "keeper.txt": upload.read_text()}
        for i in range(marks.count()):
            cited = marks.nth(i).evaluate("m => m.firstChild.textContent")
            assert any(cited in text for text in documents.values())
        assert "weight" in marks.first.get_attribute("title")
        assert page.locator("#error").inner_text() == ""
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "web_page.png"), full_page=True)

        # the answer on the page is the API's answer
        import httpx

        api = httpx.post(
            server.url + "/v1/chat/completions",
            json={
                "model": "tiny-llama",
                "messages": [{"role": "user", "content": "What colour was the lighthouse?"}],
                "max_tokens": 12,
                "topk": 10,
                "memory": ["lighthouse"],
            },
        ).json()
        assert page.locator("#answer").inner_text().strip() == api["choices"][0]["message"]["content"].strip()

        page.on("dialog", lambda d: d.accept())
        entry.locator("button").click()
        expect(page.locator('#memories li[data-memory="lighthouse"]')).to_have_count(0)


def test_page_sends_the_api_key(browser, tmp_path):
    mind = ExtendedMind(tiny_model("llama"), byte_tokenizer(), "tiny-llama")
    app = create_app(mind, ServerConfig(memory_dir=tmp_path / "mem", api_key="k-123"))
    with BackgroundServer(app) as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        expect(page.locator("#error")).to_contain_text("API key")
        page.fill("#api-key", "k-123")
        page.dispatch_event("#api-key", "change")
        expect(page.locator("#model")).to_have_text("model: tiny-llama")
        expect(page.locator("#error")).to_have_text("")


def test_page_adds_and_removes_documents_and_says_what_went_wrong_where(browser, tmp_path):
    mind = ExtendedMind(tiny_model("llama"), byte_tokenizer(), "tiny-llama")
    app = create_app(mind, ServerConfig(memory_dir=tmp_path / "mem", max_tokens=32))
    with BackgroundServer(app) as server:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server.url + "/")
        expect(page.locator("#model")).to_have_text("model: tiny-llama")
        page.fill("#memory-text", DOC)
        page.click("#create-memory")  # no name: said next to the form, in words, not as a pattern
        expect(page.locator("#memorize-error")).to_have_text("give the memory a name first")
        page.fill("#memory-name", "bad name!")
        page.click("#create-memory")
        expect(page.locator("#memorize-error")).to_contain_text("letters, digits")
        assert page.locator("#error").inner_text() == ""  # the Ask panel stays clean
        page.fill("#memory-name", "notes")
        page.fill("#memory-text-name", "lighthouse.txt")
        page.click("#create-memory")
        expect(page.locator("#memorize-status")).to_contain_text("memorized")
        page.fill("#memory-text", "The harbour master was Jon Vik.")
        page.fill("#memory-text-name", "harbour.txt")
        page.click("#add-documents")
        expect(page.locator("#memorize-status")).to_contain_text("it now holds 2 doc")
        page.click("#create-memory")  # a second memory of that name: refused, next to the form
        expect(page.locator("#memorize-error")).to_contain_text("paste a document")
        page.fill("#memory-text", "again")
        page.click("#create-memory")
        expect(page.locator("#memorize-error")).to_contain_text("exists")

        entry = page.locator('#memories li[data-memory="notes"]')
        entry.locator("details.documents summary").click()
        docs = entry.locator("details.documents li")
        expect(docs).to_have_count(2)
        expect(docs.first).to_contain_text("lighthouse.txt")
        page.on("dialog", lambda d: d.accept())
        entry.locator('li[data-document="harbour.txt"] button').click()
        expect(page.locator('#memories li[data-memory="notes"]')).to_contain_text("1 doc")

        page.fill("#question", "What colour was the lighthouse?")
        page.fill("#answer-prefix", "The lighthouse was painted")
        page.fill("#max-tokens", "6")
        page.click("#ask")
        expect(page.locator("#ask")).to_be_enabled()
        assert page.locator("#answer").inner_text().startswith("The lighthouse was painted")
        shares = page.locator("#citations .weight").all_inner_texts()
        assert shares and sum(float(s.strip("[]% ")) for s in shares) <= 100.5
        page.reload()  # the memory asked with last is selected again
        expect(page.locator('#memories li[data-memory="notes"] input[type=checkbox]')).to_be_checked()
