"""The server under load: 64 concurrent clients, a client that disconnects, a full queue, /health while
loading, and the SIGTERM drain, each against a real `gpt2kit serve` process."""
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_helpers import REPO, ServerProcess, wait_until  # noqa: E402

WORDS = "the king my lord of what thou art good night sweet prince and to be or not".split()


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--max-num-seqs", "16", "--no-ui")
    yield srv
    assert srv.stop() == 0, "".join(srv.stderr)


def running(url) -> float:
    text = httpx.get(url + "/metrics").text
    line = next(l for l in text.splitlines() if l.startswith("gpt2kit:num_requests_running"))
    return float(line.split()[-1])


def make_requests(n=64, seed=0):
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
        body = {"prompt": prompt, "max_tokens": rng.randint(2, 14), "stream": i % 2 == 0}
        if i % 3 == 0:
            body["temperature"] = 0
        else:  # sampled with its own seed and parameters: its draw must not depend on the batch
            body.update(temperature=rng.choice([0.7, 1.0, 1.3]), seed=rng.randint(0, 10 ** 6),
                        top_k=rng.choice([-1, 5, 40]), top_p=rng.choice([1.0, 0.9]),
                        frequency_penalty=rng.choice([0.0, 0.5]), repetition_penalty=rng.choice([1.0, 1.2]))
        reqs.append(body)
    return reqs


EXTRA = ("top_k", "repetition_penalty", "ignore_eos", "min_tokens")  # vLLM's fields: the client sends them in extra_body


async def run_one(client, body):
    body = dict(body)
    stream = body.pop("stream")
    extra = {k: body.pop(k) for k in EXTRA if k in body}
    if extra:
        body["extra_body"] = extra
    if stream:
        text, finish = "", None
        async for chunk in await client.completions.create(model="gpt2kit-default", stream=True, **body):
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish
    out = await client.completions.create(model="gpt2kit-default", **body)
    return out.choices[0].text, out.choices[0].finish_reason


def test_64_concurrent_clients_each_get_their_answer_alone(server):
    reqs = make_requests()

    async def main():
        async with openai.AsyncOpenAI(base_url=server.base, api_key="x", max_retries=0, timeout=300) as client:
            alone = [await run_one(client, r) for r in reqs]
            together = await asyncio.gather(*(run_one(client, r) for r in reqs))
        return alone, together

    alone, together = asyncio.run(main())
    assert together == alone
    assert wait_until(lambda: running(server.url) == 0)


def test_disconnect_mid_stream_frees_the_slot_while_others_stream(server):
    # 240 tokens (near the embedded model's 256 positions): the kept stream must outlast the dropped one's release
    body = {"prompt": "ROMEO:", "max_tokens": 240, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=120) as h:
        alone = "".join(json.loads(l[6:])["choices"][0]["text"] for l in h.post("/v1/completions", json=body).text.split("\n\n")
                        if l.startswith("data: {"))
    keep_text = []

    def keep_streaming():
        with httpx.Client(base_url=server.url, timeout=120) as h:
            with h.stream("POST", "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        keep_text.append(json.loads(line[6:])["choices"][0]["text"])

    keeper = threading.Thread(target=keep_streaming)
    keeper.start()
    with httpx.Client(base_url=server.url, timeout=120) as h:
        with h.stream("POST", "/v1/completions", json=body) as r:
            for i, line in enumerate(r.iter_lines()):
                if i > 10:
                    break  # leaving the block closes the connection mid-stream
    assert wait_until(lambda: running(server.url) <= 1, timeout=5), "the dropped stream kept its slot"
    assert keeper.is_alive(), "the other stream should still be running"
    keeper.join()
    assert "".join(keep_text) == alone


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_health_503_while_loading_then_200():
    port = free_port()  # a fixed port, so /health can be asked before the ready line
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gpt2kit", "serve", "--port", str(port), "--no-ui"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    seen = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
            except httpx.TransportError:
                time.sleep(0.005)
                continue
            seen.append(r.status_code)
            if r.status_code == 503:
                assert r.json()["error"]["message"].startswith("Not ready")
                c = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi"}, timeout=5)
                assert c.status_code in (503, 200)
            if r.status_code == 200:
                break
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert seen and seen[0] == 503 and seen[-1] == 200, seen


def test_full_queue_is_503_with_retry_after():
    srv = ServerProcess("--max-num-seqs", "1", "--max-waiting", "1", "--no-ui")
    try:
        body = {"prompt": "ROMEO:", "max_tokens": 60, "temperature": 0, "ignore_eos": True}

        async def main():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as h:
                return await asyncio.gather(*(h.post("/v1/completions", json=body) for _ in range(5)))

        responses = asyncio.run(main())
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 503 in codes, codes
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "overloaded"
    finally:
        assert srv.stop() == 0


def test_sigterm_drains_running_requests_then_exits_0():
    """The running request must outlast the checks made while the server drains: it asks for 4 x 200 tokens with
    20 logprobs each (about a megabyte of stream, slower to compute than plain tokens), and its client stops
    reading after the first chunk until those checks are done, so the server's writes wait on it."""
    srv = ServerProcess("--no-ui")
    body = {"prompt": "ROMEO:", "max_tokens": 200, "n": 4, "logprobs": 20, "temperature": 0, "ignore_eos": True,
            "stream": True}
    events, first, go = [], threading.Event(), threading.Event()

    def stream():
        with httpx.Client(base_url=srv.url, timeout=120) as h:
            with h.stream("POST", "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line:
                        events.append(line)
                        first.set()
                        go.wait(60)

    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(60)
    srv.proc.send_signal(signal.SIGTERM)
    try:
        assert wait_until(lambda: any("draining" in l for l in srv.stderr), timeout=10)
        assert httpx.get(srv.url + "/health").status_code == 503
        late = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi"}, timeout=10)
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    finally:
        go.set()
    t.join(60)
    assert srv.proc.wait(60) == 0
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]} == {"length"}
    assert sum(1 for c in chunks if c["choices"][0]["text"]) >= 4 * 180  # nearly every token its own chunk
