"""Every user error is a 4xx with the OpenAI error body (never a 500), through the openai client and raw HTTP."""
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_helpers import ServerProcess  # noqa: E402

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--api-key", KEY, "--max-body-bytes", "4096", "--max-logprobs", "5", "--max-num-seqs", "4",
                        "--no-ui")
    yield srv
    assert srv.stop() == 0, "".join(srv.stderr)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as h:
        yield h


def check_error(response, status, param=None, words=()):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    for w in words:
        assert w in err["message"], err["message"]
    return err


CASES = [
    # (body, status, param, words in the message)
    ({"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens", ["integer"]),
    ({"prompt": "hi", "max_tokens": 5.5}, 400, "max_tokens", []),
    ({"max_tokens": 5}, 400, "prompt", ["Missing"]),
    ({"prompt": 17}, 400, "prompt", []),
    ({"prompt": "hi", "temperature": -1}, 400, "temperature", []),
    ({"prompt": "hi", "temperature": "hot"}, 400, "temperature", []),
    ({"prompt": "hi", "n": 0}, 400, "n", []),
    ({"prompt": "hi", "n": 10 ** 9}, 400, "n", []),
    ({"prompt": "hi", "max_tokens": -3}, 400, "max_tokens", []),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p", []),
    ({"prompt": "hi", "presence_penalty": 9}, 400, "presence_penalty", []),
    ({"prompt": "hi", "frobnicate": True}, 400, "frobnicate", ["Unrecognized"]),
    ({"prompt": "hi", "max_tokens": 300}, 400, "max_tokens", ["300", "256"]),
    ({"prompt": "hi " * 300, "max_tokens": 1}, 400, "prompt", ["256"]),
    ({"prompt": "hi", "logprobs": 6}, 400, "logprobs", ["5"]),
    ({"prompt": [1, 2, 50257]}, 400, "prompt", ["50257", "50256"]),
    ({"prompt": [[1, 2], [-1]]}, 400, "prompt", ["-1"]),
    ({"prompt": []}, 400, "prompt", []),
    ({"prompt": ""}, 400, "prompt", ["empty"]),
    ({"prompt": "hi", "logit_bias": {"abc": 1}}, 400, "logit_bias", []),
    ({"prompt": "hi", "logit_bias": {"60000": 1}}, 400, "logit_bias", ["60000"]),
    ({"prompt": "hi", "logit_bias": {"5": 1000}}, 400, "logit_bias", []),
    ({"prompt": "hi", "stop": ""}, 400, "stop", []),
    ({"prompt": "hi", "stop_token_ids": [99999]}, 400, "stop_token_ids", []),
    ({"prompt": "hi", "min_tokens": 20, "max_tokens": 5}, 400, "min_tokens", []),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options", []),
    ({"prompt": "hi", "n": 5}, 400, "n", ["--max-num-seqs"]),
    ({"prompt": "hi", "suffix": "x"}, 400, "suffix", []),
    ({"prompt": "hi", "best_of": 3}, 400, "best_of", []),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model", ["gpt-4"]),
    ({"prompt": "hi", "temperature": 0.5, "seed": "x"}, 400, "seed", []),
]


@pytest.mark.parametrize("body,status,param,words", CASES)
def test_completion_errors(http, body, status, param, words):
    check_error(http.post("/v1/completions", json=body), status, param, words)


CHAT_CASES = [
    ({"messages": []}, 400, "messages", []),
    ({"messages": [{"content": "x"}]}, 400, "messages.0.role", []),
    ({"messages": [{"role": "user", "content": 5}]}, 400, None, []),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs", []),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 9}, 400, "top_logprobs", []),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 1000}, 400, "max_completion_tokens", ["256"]),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages.0.content", []),
    ({"messages": [{"role": "user", "content": "x"}], "model": "nope"}, 404, "model", []),
    ({"messages": [{"role": "assistant", "content": "x"}], "continue_final_message": True}, 400,
     "continue_final_message", ["add_generation_prompt"]),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, "tools", ["not supported"]),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, 400, "tool_choice", ["tools"]),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, 400,
     "response_format", ["text"]),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "text", "json_schema": {}}}, 400,
     "response_format", []),
    ({"messages": [{"role": "user", "content": "x"}], "store": True}, 400, "store", []),
    ({"messages": [{"role": "user", "content": "x"}], "service_tier": "flex"}, 400, "service_tier", ["flex"]),
    ({"messages": [{"role": "user", "content": "x"}], "modalities": ["text", "audio"]}, 400, "modalities", []),
    ({"messages": [{"role": "user", "content": "x"}], "metadata": {"a": 1}}, 400, "metadata.a", []),
]


@pytest.mark.parametrize("body,status,param,words", CHAT_CASES)
def test_chat_errors(http, body, status, param, words):
    check_error(http.post("/v1/chat/completions", json=body), status, param, words)


def test_malformed_bodies(http):
    for raw in (b"{not json", b"[1, 2]", b"", b'{"prompt": NaN}', b"\xff\xfe"):
        check_error(http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"}), 400)


def test_body_too_large_is_413(http):
    check_error(http.post("/v1/completions", json={"prompt": "x" * 5000}), 413, words=["4096"])
    chunks = (b"x" * 1024 for _ in range(8))  # no Content-Length: counted while it arrives
    check_error(http.post("/v1/completions", content=chunks, headers={"Content-Type": "application/json"}), 413)


def test_api_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        with httpx.Client(base_url=server.url, headers=headers) as h:
            check_error(h.get("/v1/models"), 401)
            check_error(h.post("/v1/completions", json={"prompt": "hi"}), 401)
    bad = openai.OpenAI(base_url=server.base, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=server.url, prompt="hi")
    good = openai.OpenAI(base_url=server.base, api_key=KEY, max_retries=0)
    assert good.completions.create(model="gpt2kit-default", prompt="hi", max_tokens=2).choices[0].text is not None
    with httpx.Client(base_url=server.url) as h:  # outside /v1 no key is needed (as in vLLM)
        assert h.get("/health").status_code == 200 and h.get("/metrics").status_code == 200


def test_unknown_route_and_method(http):
    check_error(http.get("/v1/nothing"), 404)
    check_error(http.get("/v1/completions"), 405)


def test_openai_client_raises_typed_errors(server):
    c = openai.OpenAI(base_url=server.base, api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="gpt2kit-default", prompt="hi", max_tokens=10_000)
    assert e.value.body["param"] == "max_tokens" and "256" in e.value.body["message"]
