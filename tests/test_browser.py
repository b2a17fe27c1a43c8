"""Step 8's web page in a real headless browser (Debian's chromium driven by Playwright), against
the server on a tiny random model: type a message and classify it, click a "final boss" example,
and use the page when the server wants an API key; the page's Content-Security-Policy blocks
nothing it needs."""

import os
import re
from pathlib import Path

import pytest

from smslora import scoring
from smslora.artifacts import read_jsonl
from smslora.model import load_model
from smslora.paths import STRESS_SUITE
from smslora.server.app import create_app
from smslora.server.info import model_info
from smslora.server.run import BackgroundServer
from smslora.server.settings import Settings
from smslora.threshold import read_threshold

CHROMIUM = Path(os.environ.get("SMS_CHROMIUM", "/usr/bin/chromium"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

if not CHROMIUM.exists() and not os.environ.get("CI"):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium); CI must have it",
                allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402  (CI: an ImportError is a failure)


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_model(tiny_model)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()


def start(loaded, tiny_model, **settings):
    model, tokenizer = loaded
    threshold = read_threshold(tiny_model)
    info = model_info(tiny_model, None, threshold)
    app = create_app(model, tokenizer, threshold, info, Settings(**settings))
    return BackgroundServer(app)


def wait_done(page, done: int):
    """Until the page has shown `done` results (a selector, not a script: the page's own policy
    forbids evaluating strings)."""
    page.locator(f"#result[data-done='{done}']").wait_for(state="attached", timeout=15_000)


def classify_on_page(page, done: int):
    page.click("#classify")
    wait_done(page, done)


def shown(page) -> tuple[str, float]:
    verdict = page.inner_text("#verdict").strip()
    m = re.fullmatch(r"P\(spam\) = (\d\.\d{3})", page.inner_text("#p-spam").strip())
    assert m, page.inner_text("#p-spam")
    return verdict, float(m.group(1))


def expected(loaded, text: str, threshold: float) -> tuple[str, float]:
    p = float(scoring.p_spam(*loaded, [text])[0])
    return ("SPAM" if p > threshold else "NOT SPAM"), p


def test_type_a_message_and_click_an_example(browser, loaded, tiny_model, tmp_path):
    threshold = read_threshold(tiny_model)
    boss = [r for r in read_jsonl(STRESS_SUITE) if r["category"] == "final-boss"]
    with start(loaded, tiny_model) as srv:
        page = browser.new_page()
        errors, console = [], []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
        response = page.goto(srv.url + "/")
        assert "default-src 'none'" in response.headers["content-security-policy"]
        assert page.title() == "SMS spam classifier"
        assert page.is_hidden("#key-row") and page.is_hidden("#result")
        assert page.inner_text("#threshold") == f"{threshold:.3f}"

        text = "WINNER!! Claim your free prize now, call 09061701461 😀"
        page.fill("#message", text)
        classify_on_page(page, 1)
        verdict, p = shown(page)
        want_verdict, want_p = expected(loaded, text, threshold)
        assert verdict == want_verdict and p == pytest.approx(want_p, abs=6e-4)
        assert page.is_hidden("#error")
        width = page.eval_on_selector("#bar-fill", "e => e.style.width")
        assert width == f"{100 * float(page.get_attribute('#result', 'data-p-spam')):.1f}%"

        buttons = page.locator("button.example")
        assert buttons.count() == 5
        assert [buttons.nth(i).inner_text().strip() for i in range(5)] == \
            [r["text"].strip() for r in boss]
        buttons.nth(2).click()  # one click: fills the box and classifies
        wait_done(page, 2)
        assert page.input_value("#message") == boss[2]["text"]
        verdict, p = shown(page)
        want_verdict, want_p = expected(loaded, boss[2]["text"], threshold)
        assert verdict == want_verdict and p == pytest.approx(want_p, abs=6e-4)
        label = "SPAM" if boss[2]["label"] == "spam" else "NOT SPAM"
        assert page.inner_text("#expected") == f"expected: {label}"

        page.fill("#message", "   ")  # nothing to classify: said on the page, no request
        page.click("#classify")
        assert page.inner_text("#error") == "Type a message first."
        assert page.is_hidden("#result")  # no stale verdict beside it
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        assert errors == [] and console == []  # nothing the page's own policy blocked


def test_the_page_with_an_api_key(browser, loaded, tiny_model):
    with start(loaded, tiny_model, api_key="page-key") as srv:
        page = browser.new_page()
        page.goto(srv.url + "/")
        assert page.is_visible("#api-key")
        page.fill("#message", "See you at 6 by the station?")
        classify_on_page(page, 1)  # no key yet: the server's error is shown
        assert page.is_visible("#error") and "API key" in page.inner_text("#error")
        assert page.is_hidden("#result")
        page.fill("#api-key", "page-key")
        classify_on_page(page, 2)
        assert page.is_hidden("#error") and shown(page)[0] in ("SPAM", "NOT SPAM")
