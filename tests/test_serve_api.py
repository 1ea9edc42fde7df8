"""`gpt2kit serve` driven by the official openai client: results against transformers on the same checkpoint."""
import json

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_helpers import (ServerProcess, reference, reference_greedy, reference_logprobs)  # noqa: E402

PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed any further, hear me speak.", "O, what a", "KING"]


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--max-num-seqs", "8", "--no-ui")
    yield srv
    assert srv.stop() == 0, "".join(srv.stderr)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base, api_key="unused", max_retries=0)


def ids_of(text):
    return reference()[1].encode(text)


def test_greedy_completions_equal_transformers_generate(client):
    out = client.completions.create(model="gpt2kit-default", prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.index for c in out.choices] == list(range(len(PROMPTS)))
    tok = reference()[1]
    for prompt, choice in zip(PROMPTS, out.choices):
        expected = reference_greedy(ids_of(prompt), 12)
        assert choice.text == tok.decode(expected), prompt
        assert choice.finish_reason == ("length" if len(expected) == 12 else "stop")
    assert out.usage.prompt_tokens == sum(len(ids_of(p)) for p in PROMPTS)
    assert out.usage.completion_tokens == 12 * len(PROMPTS)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_token_id_prompts(client):
    ids = [ids_of(p) for p in PROMPTS[:2]]
    one = client.completions.create(model="gpt2kit-default", prompt=ids[0], max_tokens=6, temperature=0)
    many = client.completions.create(model="gpt2kit-default", prompt=ids, max_tokens=6, temperature=0)
    tok = reference()[1]
    assert one.choices[0].text == tok.decode(reference_greedy(ids[0], 6))
    assert [c.text for c in many.choices] == [tok.decode(reference_greedy(i, 6)) for i in ids]


def test_stream_joins_to_the_whole_text(client):
    kwargs = dict(model="gpt2kit-default", prompt=PROMPTS[1], max_tokens=20, temperature=0)
    whole = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.text
    finishes = [c.choices[0].finish_reason for c in text_chunks if c.choices[0].finish_reason]
    assert finishes == [whole.finish_reason]
    assert text_chunks[-1].choices[0].finish_reason == whole.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_logprobs_equal_transformers_log_softmax(client):
    prompt = PROMPTS[1]
    out = client.completions.create(model="gpt2kit-default", prompt=prompt, max_tokens=5, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    tok = reference()[1]
    gen = reference_greedy(ids_of(prompt), 5)
    full = reference_logprobs(ids_of(prompt) + gen)
    P = len(ids_of(prompt))
    assert lp.tokens == [tok.decode([t]) for t in gen]
    for j, t in enumerate(gen):
        assert abs(lp.token_logprobs[j] - float(full[P - 1 + j, t])) < 1e-3
        best = full[P - 1 + j].topk(3)
        for i, v in zip(best.indices.tolist(), best.values.tolist()):
            assert abs(lp.top_logprobs[j][tok.decode([i])] - v) < 1e-3
    offsets, n = [], 0
    for t in gen:
        offsets.append(n)
        n += len(tok.decode([t]))
    assert lp.text_offset == offsets


def test_echo_scores_the_prompt_as_lm_eval_sends_it(client):
    ids = ids_of(PROMPTS[1])
    out = client.completions.create(model="gpt2kit-default", prompt=ids, max_tokens=0, echo=True, logprobs=1,
                                    temperature=0)
    choice = out.choices[0]
    tok = reference()[1]
    assert choice.text == tok.decode(ids)
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    full = reference_logprobs(ids)
    assert len(lp.token_logprobs) == len(ids)
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - float(full[i - 1, ids[i]])) < 1e-3
        assert tok.decode([ids[i]]) in lp.top_logprobs[i]
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(tok.decode(ids[:1]))
    assert out.usage.completion_tokens == 0 and choice.finish_reason == "length"


def test_echo_with_generation_puts_prompt_first(client):
    out = client.completions.create(model="gpt2kit-default", prompt=PROMPTS[0], max_tokens=4, echo=True, temperature=0,
                                    logprobs=0)
    tok = reference()[1]
    ids = ids_of(PROMPTS[0])
    gen = reference_greedy(ids, 4)
    assert out.choices[0].text == PROMPTS[0] + tok.decode(gen)
    assert len(out.choices[0].logprobs.tokens) == len(ids) + len(gen)
    assert out.choices[0].logprobs.text_offset[len(ids)] == len(PROMPTS[0])


def test_n_with_seed_is_reproducible(client):
    kwargs = dict(model="gpt2kit-default", prompt="ROMEO:", max_tokens=16, n=4, seed=1234, temperature=1.0, top_p=0.95)
    a = [c.text for c in client.completions.create(**kwargs).choices]
    b = [c.text for c in client.completions.create(**kwargs).choices]
    assert a == b
    assert len(set(a)) > 1, "the n choices of one request should differ"
    c = [c.text for c in client.completions.create(**{**kwargs, "seed": 99}).choices]
    assert c != a


def test_stop_string_straddling_tokens(client):
    prompt = PROMPTS[0]
    gen = reference_greedy(ids_of(prompt), 20)
    tok = reference()[1]
    pieces = [tok.decode([t]) for t in gen]
    full = "".join(pieces)
    stop = None
    for k in range(2, len(pieces) - 1):  # the last character of one token and the start of the next
        boundary = len("".join(pieces[: k + 1]))
        candidate = pieces[k][-1:] + pieces[k + 1][:2]
        if len(candidate) >= 2 and full.find(candidate) == boundary - 1:
            stop = candidate
            break
    assert stop is not None, pieces
    expected = full[: full.find(stop)]
    kwargs = dict(model="gpt2kit-default", prompt=prompt, max_tokens=20, temperature=0, stop=[stop, "zzzz-never"])
    whole = client.completions.create(**kwargs).choices[0]
    assert whole.text == expected and whole.finish_reason == "stop"
    streamed = [c.choices[0] for c in client.completions.create(stream=True, **kwargs)]
    text = "".join(c.text for c in streamed)
    assert text == expected and streamed[-1].finish_reason == "stop"
    assert stop not in text


def test_chat_whole_and_streamed(client):
    messages = [{"role": "system", "content": "Speak as in a play."}, {"role": "user", "content": "Who is there?"}]
    whole = client.chat.completions.create(model="gpt2kit-default", messages=messages, max_tokens=10, temperature=0)
    msg = whole.choices[0].message
    assert msg.role == "assistant" and whole.object == "chat.completion"
    prompt = "system: Speak as in a play.\nuser: Who is there?\nassistant:"  # the documented built-in template
    tok = reference()[1]
    assert msg.content == tok.decode(reference_greedy(ids_of(prompt), 10))
    assert whole.usage.prompt_tokens == len(ids_of(prompt))
    chunks = list(client.chat.completions.create(model="gpt2kit-default", messages=messages, max_tokens=10,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_chat_accepts_the_default_values_clients_send(client):
    """Fields OpenAI clients fill in with their defaults (plain text, no tools, nothing stored) change nothing."""
    messages = [{"role": "user", "content": "Who is there?"}]
    plain = client.chat.completions.create(model="gpt2kit-default", messages=messages, max_tokens=6, temperature=0)
    dressed = client.chat.completions.create(
        model="gpt2kit-default", messages=messages, max_tokens=6, temperature=0, response_format={"type": "text"},
        tool_choice="none", parallel_tool_calls=False, store=False, metadata={"run": "test"}, service_tier="auto",
        modalities=["text"], tools=[])
    assert dressed.choices[0].message.content == plain.choices[0].message.content


def test_chat_logprobs(client):
    out = client.chat.completions.create(model="gpt2kit-default", messages=[{"role": "user", "content": "Hail"}],
                                         max_completion_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 4
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    assert "".join(c.token for c in content) == out.choices[0].message.content


def test_prefix_reuse_reports_cached_tokens_and_changes_nothing(client):
    doc = "First Citizen:\nWe are accounted poor citizens, the patricians good. What authority surfeits on would " \
          "relieve us: if they would yield us but the superfluity, while it were wholesome, we might guess"
    first = client.completions.create(model="gpt2kit-default", prompt=doc + " they", max_tokens=8, temperature=0)
    second = client.completions.create(model="gpt2kit-default", prompt=doc + " we", max_tokens=8, temperature=0)
    tok = reference()[1]
    assert second.usage.prompt_tokens_details.cached_tokens >= len(ids_of(doc)) - 1
    assert second.choices[0].text == tok.decode(reference_greedy(ids_of(doc + " we"), 8))
    assert first.choices[0].text == tok.decode(reference_greedy(ids_of(doc + " they"), 8))


def test_models_tokenize_detokenize_version_metrics(server):
    with httpx.Client(base_url=server.url) as h:
        models = h.get("/v1/models").json()["data"]
        assert models[0]["id"] == "gpt2kit-default" and models[0]["max_model_len"] == 256 and models[0]["root"]
        t = h.post("/tokenize", json={"prompt": "Hello world"}).json()
        assert t["tokens"] == ids_of("Hello world") and t["count"] == 2
        assert h.post("/detokenize", json={"tokens": t["tokens"]}).json() == {"prompt": "Hello world"}
        assert h.get("/version").json()["version"]
        assert h.get("/health").status_code == 200
        h.post("/v1/completions", json={"prompt": "KING", "max_tokens": 2})  # the counters below need a generation
        metrics = h.get("/metrics").text
        for name in ("gpt2kit:num_requests_running", "gpt2kit:num_requests_waiting", "gpt2kit:prompt_tokens_total",
                     "gpt2kit:generation_tokens_total", "gpt2kit:time_to_first_token_seconds_bucket",
                     "gpt2kit:inter_token_latency_seconds_bucket", "gpt2kit:e2e_request_latency_seconds_bucket",
                     "gpt2kit:request_queue_time_seconds_bucket"):
            assert name in metrics, name
        generated = [l for l in metrics.splitlines() if l.startswith("gpt2kit:generation_tokens_total")]
        assert float(generated[0].split()[-1]) > 0


def test_models_retrieve_and_ping(client, server):
    card = client.models.retrieve("gpt2kit-default")  # GET /v1/models/{id}
    assert card.id == "gpt2kit-default" and card.model_extra["max_model_len"] == 256
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"
    with httpx.Client(base_url=server.url) as h:
        assert h.get("/ping").status_code == 200 and h.post("/ping").status_code == 200


def test_raw_sse_format(server):
    body = {"prompt": "ROMEO:", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.url) as h:
        raw = h.post("/v1/completions", json=body).text
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
    assert sum(json.loads(e[6:])["choices"][0]["finish_reason"] is not None for e in events[:-2]) == 1
