"""The playground page (src/gpt2kit/serving/static) in a real headless browser against a real `gpt2kit serve`.

The browser is Debian's `chromium` package driven by playwright, pointed at that executable (playwright's own
browser download is never used). The server is a `gpt2kit serve` process on 127.0.0.1 with the embedded
default model. Each check compares what the page shows with what the server's public API answers to the
very request the page sent, replayed by the test.

Screenshots (idle, streaming, token view, error, phone) go to a temporary folder; with GPT2KIT_SCREENSHOTS=1
they are written to docs/playground/ for the README instead.
"""
import math
import os
import pathlib
import re
import time
import urllib.request

import pytest

from playground_helpers import TOL, Server, Tab, launch_chromium, screenshot, sync_playwright_or_skip, unstreamed
from serve_helpers import wait_until

REPO = pathlib.Path(__file__).resolve().parents[1]
STATIC = REPO / "src" / "gpt2kit" / "serving" / "static"
API_KEY = "playground-test-key"


@pytest.fixture(scope="module")
def browser():
    with sync_playwright_or_skip()() as p:
        b = launch_chromium(p)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(browser):  # after the browser, so that a missing browser skips before a server starts
    with Server() as s:
        yield s


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    if os.environ.get("GPT2KIT_SCREENSHOTS") == "1":
        folder = REPO / "docs" / "playground"
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return tmp_path_factory.mktemp("playground-shots")


@pytest.fixture
def tab(browser, server):
    t = Tab(browser, server, viewport={"width": 1100, "height": 760})
    yield t
    t.close()


def chips(page, scope):
    return page.eval_on_selector_all(f"{scope} .tokens .chip", """cs => cs.map(c => ({
        token: c.dataset.token, logprob: c.dataset.logprob === undefined ? null : Number(c.dataset.logprob),
        none: c.classList.contains('none'), shade: Number(c.style.getPropertyValue('--t') || 'NaN')}))""")


def tip_token(page):
    return page.get_attribute("#tip .head .tok", "data-token")


def assert_tip_shows(page, token, logprob, top):
    """The tip open on a chip names its token and probability, and lists the API's top alternatives."""
    assert page.is_visible("#tip") and tip_token(page) == token
    head = page.inner_text("#tip .head")
    assert f"logprob {logprob:.3f}" in head, (head, logprob)
    assert float(re.search(r"([0-9.e+-]+)% ·", head).group(1)) == pytest.approx(100 * math.exp(logprob), rel=0.06)
    shown = page.eval_on_selector_all(
        "#tip tr.alt", "rs => rs.map(r => [r.dataset.token, Number(r.dataset.logprob), r.querySelector('.p').textContent])")
    assert [t for t, _, _ in shown] == [t for t, _ in top], (shown, top)
    for (_, lp, pct), (_, lp_api) in zip(shown, top):
        assert lp == pytest.approx(lp_api, abs=TOL)
        assert float(pct.rstrip("%")) == pytest.approx(100 * math.exp(lp_api), rel=0.06), (pct, lp_api)


def by_logprob(top_logprobs):
    """A completions top_logprobs entry ({token: logprob}) as [(token, logprob)], most likely first."""
    return sorted(top_logprobs.items(), key=lambda kv: -kv[1])


def test_assets_are_small_local_and_served(tab, server, shots):
    sizes = {p.name: p.stat().st_size for p in STATIC.iterdir()}
    assert set(sizes) == {"index.html", "app.css", "app.js"}
    assert sum(sizes.values()) < 100_000, sizes
    for name in sizes:  # the server hands out exactly the packaged files
        with urllib.request.urlopen(server.base + ("/" if name == "index.html" else f"/static/{name}")) as r:
            assert r.read() == (STATIC / name).read_bytes(), name
    page = tab.open()
    model = server.model()
    assert page.input_value("#model") == model["id"]
    assert f"context {model['max_model_len']} tokens" == page.inner_text("#modelInfo")
    page.fill("#prompt", "ROMEO:\nWhat light through yonder window breaks?")
    page.wait_for_function("document.getElementById('promptInfo').textContent.includes('tokens')")
    _, counted = server.request("/tokenize", {"model": model["id"], "prompt": page.input_value("#prompt")})
    assert page.inner_text("#promptInfo") == f"{counted['count']} tokens of the {counted['max_model_len']}-token context"
    screenshot(page, shots, "idle.png")
    outside = [r.url for r in tab.requests if not r.url.startswith(server.base + "/")]
    assert not outside, f"the page asked for something outside the server: {outside}"


def test_greedy_completion_streams_the_api_text_and_the_token_view_shows_its_logprobs(tab, server, shots):
    page = tab.open()
    page.fill("#prompt", "ROMEO:\nWhat light")
    page.fill("#max_tokens", "20")
    page.fill("#temperature", "0")
    page.fill("#alts", "4")
    # Count the pieces the text arrives in, to see that it streams in rather than lands at once.
    page.evaluate("""() => { window.pieces = 0; new MutationObserver(ms => { for (const m of ms) for (const n of m.addedNodes)
        if (n.nodeType === 3 && n.parentElement.classList.contains('gen')) window.pieces++; })
        .observe(document.getElementById('outputs'), {childList: true, subtree: true}); }""")
    page.click("#generate")
    assert tab.wait_state() == "done", page.inner_text("#error")
    [sent] = tab.bodies("/v1/completions")
    assert sent["stream"] is True and sent["temperature"] == 0 and sent["max_tokens"] == 20 and sent["logprobs"] == 4
    status, api = server.request("/v1/completions", unstreamed(sent))
    assert status == 200, api
    choice = api["choices"][0]
    assert page.inner_text("#outputs .gen") == choice["text"]
    assert page.evaluate("window.pieces") > 1
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == api["usage"]["completion_tokens"]
    assert page.inner_text("#context") == f"{api['usage']['prompt_tokens']} + {len(lp['tokens'])} of {server.model()['max_model_len']}"

    page.check("input[name=view][value=tokens]")
    shown = chips(page, "#outputs")
    assert [c["token"] for c in shown] == lp["tokens"]  # one chip per generated token
    assert [c["logprob"] for c in shown] == pytest.approx(lp["token_logprobs"], abs=TOL)
    ranked = sorted(shown, key=lambda c: c["logprob"])  # shaded by probability: the likelier, the greener
    assert all(a["shade"] <= b["shade"] for a, b in zip(ranked, ranked[1:])) and ranked[0]["shade"] < ranked[-1]["shade"]
    for i, token in enumerate(lp["tokens"]):
        page.hover(f"#outputs .tokens .chip[data-i='{i}']")
        assert_tip_shows(page, token, lp["token_logprobs"][i], by_logprob(lp["top_logprobs"][i]))
    page.evaluate("window.scrollTo(0, 0)")
    page.hover("#outputs .tokens .chip[data-i='7']")
    screenshot(page, shots, "tokens.png")
    page.focus("#outputs .tokens .chip[data-i='0']")  # by keyboard: the arrow moves to the next chip, the tip follows
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.dataset.i") == "1" and tip_token(page) == lp["tokens"][1]


def test_stop_mid_stream_ends_the_request_on_the_server(tab, server, shots):
    page = tab.open()
    model = server.model()
    page.fill("#prompt", "ROMEO:\n")
    _, counted = server.request("/tokenize", {"model": model["id"], "prompt": "ROMEO:\n"})
    max_tokens = model["max_model_len"] - counted["count"]  # the longest stream the context allows
    page.fill("#max_tokens", str(max_tokens))
    page.fill("#temperature", "0.9")  # sampled (seeded): the picture shows tokens of all likelihoods
    page.fill("#seed", "7")
    page.check("#ignore_eos")
    page.check("input[name=view][value=tokens]")
    generated_before = server.metric("generation_tokens_total")
    page.click("#generate")
    page.wait_for_selector("#outputs .tokens .chip[data-i='24']")
    # Freeze the server while the page shows the stream and the user presses Stop: however fast the server,
    # the request is still running when it is stopped.
    server.pause()
    try:
        screenshot(page, shots, "streaming.png")
        assert page.evaluate("document.body.dataset.state") == "running"
        page.click("#stop")
        assert tab.wait_state() == "stopped", page.inner_text("#error")
    finally:
        server.resume()
    assert wait_until(lambda: server.metric("num_requests_running") == 0, timeout=10), \
        "the server still runs the request 10 s after the page stopped it"
    generated = server.metric("generation_tokens_total") - generated_before
    assert generated < max_tokens, f"the server generated all {max_tokens} tokens although the page stopped it"
    shown = len(chips(page, "#outputs"))
    assert 25 <= shown <= generated
    time.sleep(0.3)
    assert len(chips(page, "#outputs")) == shown  # nothing arrives after Stop
    assert page.inner_text("#runState").startswith("Stopped")
    assert page.is_enabled("#generate") and not page.is_enabled("#stop")


def test_prompt_scoring_shows_the_echo_logprobs(tab, server):
    page = tab.open()
    page.check("input[name=mode][value=score]")
    page.fill("#prompt", "ROMEO:\nBut soft, what light through yonder window breaks?")
    page.fill("#alts", "3")
    page.click("#generate")
    assert tab.wait_state() == "done", page.inner_text("#error")
    [sent] = tab.bodies("/v1/completions")
    assert sent["echo"] is True and sent["max_tokens"] == 0 and sent["logprobs"] == 3
    status, api = server.request("/v1/completions", sent)
    assert status == 200, api
    lp = api["choices"][0]["logprobs"]
    shown = chips(page, "#score")
    assert [c["token"] for c in shown] == lp["tokens"]
    assert lp["token_logprobs"][0] is None and shown[0]["none"] and shown[0]["logprob"] is None
    assert [c["logprob"] for c in shown[1:]] == pytest.approx(lp["token_logprobs"][1:], abs=TOL)
    scored = lp["token_logprobs"][1:]
    figure = lambda name: float(page.get_attribute(f"#{name}", "data-value"))
    assert figure("scoreTotal") == pytest.approx(sum(scored), abs=TOL)
    assert figure("scorePpl") == pytest.approx(math.exp(-sum(scored) / len(scored)), rel=TOL)
    worst = min(range(1, len(lp["tokens"])), key=lambda i: lp["token_logprobs"][i])
    page.hover(f"#score .tokens .chip[data-i='{worst}']")
    assert_tip_shows(page, lp["tokens"][worst], lp["token_logprobs"][worst], by_logprob(lp["top_logprobs"][worst]))
    perplexity = page.inner_text("#tip").split("e^(−logprob) = ")[1].split("\n")[0]
    assert float(perplexity) == pytest.approx(math.exp(-lp["token_logprobs"][worst]), rel=1e-2)
    page.hover(f"#score .tokens .chip[data-i='0']")
    assert "no probability" in page.inner_text("#tip")


def test_server_errors_are_shown_in_words(tab, server, shots):
    page = tab.open()
    page.fill("#prompt", "O Romeo, Romeo, wherefore art thou Romeo? " * 40)  # far past the 256-token context
    page.fill("#temperature", "0")
    page.click("#generate")
    assert tab.wait_state() == "error"
    [sent] = tab.bodies("/v1/completions")
    status, api = server.request("/v1/completions", sent)
    assert 400 <= status < 500 and api["error"]["message"], api
    shown = page.inner_text("#error")
    assert api["error"]["message"] in shown and f"HTTP {status}" in shown, shown
    page.wait_for_function("document.getElementById('promptInfo').textContent.includes('too long')")
    screenshot(page, shots, "error.png")
    page.fill("#prompt", "ROMEO:\n")  # a bad value: the server's own message, naming the field
    page.fill("#temperature", "-1")
    page.click("#generate")
    assert tab.wait_state() == "error"
    status, api = server.request("/v1/completions", tab.bodies("/v1/completions")[-1])
    assert 400 <= status < 500, api
    assert api["error"]["message"] in page.inner_text("#error")
    page.fill("#temperature", "0")  # a model the server does not serve
    page.fill("#model", "no-such-model")
    page.click("#generate")
    assert tab.wait_state() == "error"
    status, api = server.request("/v1/completions", tab.bodies("/v1/completions")[-1])
    assert status == 404 and api["error"]["message"] in page.inner_text("#error") and "HTTP 404" in page.inner_text("#error")


def test_chat_streams_the_api_reply_and_keeps_the_conversation(tab, server):
    page = tab.open()
    page.check("input[name=mode][value=chat]")
    page.fill("#system", "You are a player in a Shakespeare company.")
    page.fill("#prompt", "Who goes there?")
    page.fill("#max_tokens", "10")
    page.fill("#temperature", "0")
    page.fill("#alts", "2")
    page.click("#generate")
    assert tab.wait_state() == "done", page.inner_text("#error")
    [sent] = tab.bodies("/v1/chat/completions")
    assert sent["messages"] == [{"role": "system", "content": "You are a player in a Shakespeare company."},
                                {"role": "user", "content": "Who goes there?"}]
    assert sent["max_completion_tokens"] == 10 and sent["logprobs"] is True and sent["top_logprobs"] == 2
    status, api = server.request("/v1/chat/completions", unstreamed(sent))
    assert status == 200, api
    reply = api["choices"][0]["message"]["content"]
    assert page.inner_text("#outputs .gen") == reply
    content = api["choices"][0]["logprobs"]["content"]
    shown = chips(page, "#outputs")
    assert [c["token"] for c in shown] == [e["token"] for e in content]
    assert [c["logprob"] for c in shown] == pytest.approx([e["logprob"] for e in content], abs=TOL)
    page.check("input[name=view][value=tokens]")
    page.hover("#outputs .tokens .chip[data-i='0']")
    assert_tip_shows(page, content[0]["token"], content[0]["logprob"],
                     [(t["token"], t["logprob"]) for t in content[0]["top_logprobs"]])
    page.fill("#prompt", "Speak again.")  # the next message carries the conversation so far
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")
    assert tab.wait_state() == "done", page.inner_text("#error")
    second = tab.bodies("/v1/chat/completions")[1]
    assert second["messages"][1:] == [{"role": "user", "content": "Who goes there?"},
                                      {"role": "assistant", "content": reply},
                                      {"role": "user", "content": "Speak again."}]
    assert reply in page.inner_text("#transcript")


def test_phone_sized_screen_by_touch_and_keyboard(browser, server, shots):
    tab = Tab(browser, server, viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True)
    try:
        page = tab.open()
        fits = "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
        assert page.evaluate(fits)
        assert not page.is_visible("#temperature")  # the settings start folded on a phone
        page.tap("#settings summary")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "8")
        page.focus("#prompt")
        page.keyboard.type("JULIET:\n")
        page.keyboard.press("Control+Enter")
        assert tab.wait_state() == "done", page.inner_text("#error")
        page.tap("input[name=view][value=tokens]")
        page.tap("#outputs .tokens .chip[data-i='1']")
        box = page.locator("#tip").bounding_box()
        assert page.is_visible("#tip") and box["x"] >= 0 and box["x"] + box["width"] <= 390
        assert page.evaluate(fits)
        screenshot(page, shots, "phone.png")
        page.keyboard.press("Escape")
        assert not page.is_visible("#tip")
    finally:
        tab.close()


def test_api_key_is_asked_once_and_kept_in_the_tab(browser):
    keyed = Server("--api-key", API_KEY)
    try:
        tab = Tab(browser, keyed)
        page = tab.open(wait_models=False)
        page.wait_for_selector("#keyDialog[open]")
        page.fill("#keyInput", "wrong-key")
        page.click("#keySave")
        page.wait_for_selector("#keyDialog[open] #keyMessage:not([hidden])")
        status, api = keyed.request("/v1/models", key="wrong-key")
        assert status == 401 and api["error"]["message"] in page.inner_text("#keyMessage")
        page.fill("#keyInput", API_KEY)
        page.click("#keySave")
        tab.wait_models()
        assert not page.is_visible("#keyDialog") and not page.is_visible("#error")
        assert page.evaluate("[sessionStorage.length, localStorage.length]") == [1, 0]
        page.fill("#prompt", "ROMEO:\n")
        page.fill("#max_tokens", "4")
        page.click("#generate")
        assert tab.wait_state() == "done", page.inner_text("#error")
        [req] = [r for r in tab.requests if r.url.endswith("/v1/completions")]
        assert req.headers["authorization"] == f"Bearer {API_KEY}"
        page.reload()  # the same tab keeps the key: not asked again
        tab.wait_models()
        assert not page.is_visible("#keyDialog")
        other = Tab(browser, keyed)  # another tab asks again
        other.open(wait_models=False).wait_for_selector("#keyDialog[open]")
        other.close()
        keyed.stop()  # a server that is gone is said so
        page.click("#generate")
        assert tab.wait_state() == "error"
        assert page.inner_text("#error").startswith("Could not reach the server")
        tab.close()
    finally:
        keyed.stop()
