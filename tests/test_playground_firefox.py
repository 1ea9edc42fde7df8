"""The playground page in Firefox: Debian's firefox-esr, headless, driven over Marionette (no geckodriver).

playwright cannot drive a stock Firefox (it needs its own patched build, which is a download), so these
checks use Mozilla's own Marionette client. They repeat the core of the Chromium tests: the greedy stream
equals the API's text, the token view equals its logprobs, Stop ends the request on the server, and the
server's error is shown in words.
"""
import pytest

from playground_helpers import TOL, Firefox, Server, unstreamed
from serve_helpers import wait_until

By = pytest.importorskip("marionette_driver", reason="marionette-driver is missing: `pip install marionette-driver` "
                                                     "(it is in the `test` extra)").By

# Record the bodies the page POSTs (Marionette sees no network), by wrapping fetch before the user acts.
RECORD = """window.sent = []; const f = window.fetch;
window.fetch = (url, opts) => { if (opts && opts.body) window.sent.push([String(url), JSON.parse(opts.body)]); return f(url, opts); };"""


@pytest.fixture(scope="module")
def firefox(tmp_path_factory):
    with Firefox(tmp_path_factory.mktemp("firefox-profile")) as client:
        yield client


@pytest.fixture(scope="module")
def server(firefox):  # after the browser, so that a missing browser skips before a server starts
    with Server() as s:
        yield s


def js(m, script, *args):
    # sandbox=None: run in the page's own scope, where app.js calls the fetch the test wraps
    return m.execute_script(f"return ({script});", script_args=list(args), sandbox=None)


def open_page(m, server):
    m.navigate(server.base + "/")
    assert wait_until(lambda: js(m, "document.getElementById('model').value") != "", timeout=30)
    m.execute_script(RECORD, sandbox=None)


def set_value(m, element_id, value):
    el = m.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(value)


def run(m, button="generate"):
    m.find_element(By.ID, button).click()
    assert wait_until(lambda: js(m, "document.body.dataset.state") in ("done", "stopped", "error"), timeout=60)
    return js(m, "document.body.dataset.state")


def sent(m, path):
    return [body for url, body in js(m, "window.sent") if url == path]


CHIPS = """[...document.querySelectorAll(arguments[0] + ' .tokens .chip')].map(c =>
    [c.dataset.token, c.dataset.logprob === undefined ? null : Number(c.dataset.logprob)])"""


def test_firefox_greedy_stream_and_token_view_match_the_api(firefox, server):
    m = firefox
    open_page(m, server)
    set_value(m, "prompt", "ROMEO:\nWhat light")
    set_value(m, "max_tokens", "10")
    set_value(m, "temperature", "0")
    set_value(m, "alts", "3")
    assert run(m) == "done", js(m, "document.getElementById('error').textContent")
    [body] = sent(m, "v1/completions")
    status, api = server.request("/v1/completions", unstreamed(body))
    assert status == 200, api
    lp = api["choices"][0]["logprobs"]
    assert js(m, "document.querySelector('#outputs .gen').textContent") == api["choices"][0]["text"]
    shown = js(m, CHIPS, "#outputs")
    assert [t for t, _ in shown] == lp["tokens"]
    assert [l for _, l in shown] == pytest.approx(lp["token_logprobs"], abs=TOL)
    js(m, "document.querySelector('input[name=view][value=tokens]').click()")
    # A click (a tap) on a chip opens its alternatives: the API's top logprobs, most likely first; the arrow
    # key moves to the next chip and its alternatives.
    m.find_element(By.CSS_SELECTOR, "#outputs .tokens .chip[data-i='1']").click()
    for i in (1, 2):
        rows = js(m, "[...document.querySelectorAll('#tip tr.alt')].map(r => [r.dataset.token, Number(r.dataset.logprob)])")
        top = sorted(lp["top_logprobs"][i].items(), key=lambda kv: -kv[1])
        assert js(m, "document.querySelector('#tip .head .tok').dataset.token") == lp["tokens"][i]
        assert [t for t, _ in rows] == [t for t, _ in top]
        assert [l for _, l in rows] == pytest.approx([l for _, l in top], abs=TOL)
        m.actions.sequence("key", "keyboard").key_down("\ue014").key_up("\ue014").perform()  # ArrowRight


def test_firefox_stop_ends_the_request_on_the_server(firefox, server):
    m = firefox
    open_page(m, server)
    model = server.model()
    set_value(m, "prompt", "ROMEO:\n")
    _, counted = server.request("/tokenize", {"model": model["id"], "prompt": "ROMEO:\n"})
    max_tokens = model["max_model_len"] - counted["count"]
    set_value(m, "max_tokens", str(max_tokens))
    set_value(m, "temperature", "0")
    js(m, "document.getElementById('ignore_eos').checked = true")
    before = server.metric("generation_tokens_total")
    m.find_element(By.ID, "generate").click()
    assert wait_until(lambda: js(m, "document.querySelectorAll('#outputs .tokens .chip').length") >= 2, timeout=30)
    server.pause()  # the request is certainly still running when Stop is pressed
    try:
        assert js(m, "document.body.dataset.state") == "running"
        assert run(m, "stop") == "stopped"
    finally:
        server.resume()
    assert wait_until(lambda: server.metric("num_requests_running") == 0, timeout=10)
    assert server.metric("generation_tokens_total") - before < max_tokens


def test_firefox_shows_the_servers_error(firefox, server):
    m = firefox
    open_page(m, server)
    set_value(m, "prompt", "O Romeo, Romeo, wherefore art thou Romeo? " * 40)
    assert run(m) == "error"
    status, api = server.request("/v1/completions", sent(m, "v1/completions")[0])
    assert 400 <= status < 500
    assert api["error"]["message"] in js(m, "document.getElementById('error').textContent")
