"""The chat page in a real browser: headless Chromium (Debian's package) driven by Playwright
types messages into the page served by `openllama serve`'s app and watches the replies stream in:
with the server's and the page's defaults on a 256-token model (a multi-turn chat must keep
working as the history outgrows the context), and after an error (the page stays usable)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from openllama.generate import load_for_inference
from openllama.model import save_model
from openllama.serve.app import build_app
from openllama.serve.engine import Engine, Limits
from serving_helpers import make_tiny_model_dir, running_server, torch_threads

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="/usr/bin/chromium is absent (apt-get install chromium; .ci/run does)")


def talkative_model_dir(out: Path) -> Path:
    """The tiny random model, changed so it (practically) never ends its reply at once: the EOS
    logit is pinned at 0 while the others spread ten times wider, so a sampled reply runs long."""
    base = make_tiny_model_dir(out / "base")
    loaded = load_for_inference(base)
    with torch.no_grad():
        w = loaded.model.output.weight
        w.mul_(10.0)
        w[loaded.tokenizer.eos_id] = 0.0
    save_model(loaded.model, out / "model")
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(base / name, out / "model" / name)
    return out / "model"


def test_chat_page_streams_a_reply(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with torch_threads(1):
        engine = Engine(load_for_inference(talkative_model_dir(tmp_path)), Limits(max_new_tokens=200))
        with running_server(build_app(engine)) as url, sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(url + "/")
                box = page.locator("#chat-input textarea")
                box.wait_for(timeout=30_000)
                # record every length the reply bubble takes while it streams
                page.evaluate("""() => {
                    window.__lengths = [];
                    new MutationObserver(() => {
                        const bot = document.querySelector('[data-testid="bot"]');
                        if (bot) window.__lengths.push(bot.innerText.trim().length);
                    }).observe(document.body, {subtree: true, childList: true, characterData: true});
                }""")
                box.fill("Hello there, how are you?")
                box.press("Enter")
                page.locator('[data-testid="user"]').filter(has_text="Hello there, how are you?").wait_for()
                bot = page.locator('[data-testid="bot"]').first
                bot.wait_for(timeout=30_000)
                # done when the engine has finished and the page shows a reply
                page.wait_for_function("() => window.__lengths.length > 0", timeout=30_000)
                deadline_ms = 60_000
                page.wait_for_timeout(200)
                while engine.stats["completed"] < 1 and deadline_ms > 0:
                    page.wait_for_timeout(100)
                    deadline_ms -= 100
                page.wait_for_timeout(500)  # the last update reaches the page
                reply = bot.inner_text().strip()
                # measured the way the observer measures (JS trim, not Python's strip)
                final_length = page.evaluate(
                    """() => document.querySelector('[data-testid="bot"]').innerText.trim().length""")
                lengths = [n for n in page.evaluate("window.__lengths") if n > 0]
                page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
            finally:
                browser.close()
        engine.close()
    assert engine.stats["completed"] == 1 and engine.stats["failed"] == 0
    assert len(reply) > 20
    assert len(set(lengths)) >= 2, f"the reply arrived in one piece, not streamed: {lengths}"
    # the page ends showing the whole reply (a random model's bytes may briefly render as a
    # replacement character that the next piece completes, so compare the last state, not the max)
    assert lengths[-1] == final_length
    assert (tmp_path / "chat.png").stat().st_size > 10_000


OBSERVE_LAST_BOT = """() => {
    window.__replies = [];  // [index of the last bot message, its length] at every change
    new MutationObserver(() => {
        const bots = document.querySelectorAll('[data-testid="bot"]');
        if (bots.length) window.__replies.push([bots.length - 1, bots[bots.length - 1].innerText.trim().length]);
    }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def _send_and_wait(page, engine, text: str, n_bots: int, timeout_ms: int = 60_000,
                   generates: bool = True) -> tuple[str, list[int]]:
    """Type a message, wait until the engine has answered it (when it `generates`) and the page
    shows reply `n_bots`; -> (the reply's text, the lengths it took on the page while streaming)."""
    done_before = engine.stats["completed"] + engine.stats["failed"]
    box = page.locator("#chat-input textarea")
    page.wait_for_function("() => !document.querySelector('#chat-input textarea').disabled", timeout=timeout_ms)
    box.fill(text)
    box.press("Enter")
    page.locator('[data-testid="bot"]').nth(n_bots - 1).wait_for(timeout=timeout_ms)
    waited = 0
    while generates and engine.stats["completed"] + engine.stats["failed"] == done_before and waited < timeout_ms:
        page.wait_for_timeout(100)
        waited += 100
    page.wait_for_timeout(500)  # the last update reaches the page
    reply = page.locator('[data-testid="bot"]').nth(n_bots - 1).inner_text().strip()
    lengths = [n for i, n in page.evaluate("window.__replies") if i == n_bots - 1 and n > 0]
    return reply, lengths


def test_small_context_with_default_settings_then_an_error(tmp_path):
    """`make demo`'s model has 256 tokens of context and the page's default "Max new tokens" is
    256: every message must still get a streamed reply (the reply budget is what the context
    leaves; the history is trimmed), and a message that cannot fit shows an error reply while
    the input box stays usable for the next message."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with torch_threads(1):
        engine = Engine(load_for_inference(talkative_model_dir(tmp_path)), Limits())  # every default
        assert engine.context == 256
        with running_server(build_app(engine)) as url, sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(url + "/")
                page.locator("#chat-input textarea").wait_for(timeout=30_000)
                page.evaluate(OBSERVE_LAST_BOT)
                replies = [_send_and_wait(page, engine, f"Message number {i}, tell me more.", i) for i in (1, 2, 3)]
                error, _ = _send_and_wait(page, engine, "word " * 400, 4, generates=False)
                after, after_lengths = _send_and_wait(page, engine, "And now a short one.", 5)
                box_enabled = page.locator("#chat-input textarea").is_enabled()
                page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
            finally:
                browser.close()
        engine.close()
    assert engine.stats["failed"] == 0 and engine.stats["completed"] == 4  # the error never reached the engine
    for n, (reply, lengths) in enumerate(replies + [(after, after_lengths)], start=1):
        assert "Error" not in reply and len(reply) > 20, (n, reply)
        assert len(set(lengths)) >= 2, f"reply {n} arrived in one piece, not streamed: {lengths}"
    assert "Error" in error and "fit in the context" in error
    assert box_enabled
