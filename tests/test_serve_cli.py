"""`gpt2kit serve` as a command: chat templates (tokenizer config, --chat-template, built-in) rendered as
transformers renders them, served model names, the playground switch, and start-up errors as one line."""
import json
import os
import shutil
import subprocess
import sys

import pytest

httpx = pytest.importorskip("httpx")

from serve_helpers import DEFAULT_MODEL, REPO, ServerProcess  # noqa: E402

TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'forbidden' %}{{ raise_exception('no forbidden role') }}{% endif %}"
            "<|{{ m['role'] }}|>{{ m['content'] | trim }}{% if not loop.last %}\n{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}\n<|assistant|>{% endif %}")
MESSAGES = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hello?"}]


def transformers_render(model_dir, template=None):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    return tok.apply_chat_template(MESSAGES, chat_template=template, tokenize=False, add_generation_prompt=True)


def rendered_ids(server, messages=MESSAGES):
    return httpx.post(server.url + "/tokenize", json={"messages": messages}).json()["tokens"]


def model_copy(tmp_path, chat_template=None):
    d = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, d)
    if chat_template is not None:
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg["chat_template"] = chat_template
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def test_tokenizer_config_template_is_used_as_transformers_renders_it(tmp_path):
    d = model_copy(tmp_path, TEMPLATE)
    srv = ServerProcess(str(d), "--no-ui", "--served-model-name", "shakespeare", "bard")
    try:
        from gpt2kit import GPT2Tokenizer

        expected = GPT2Tokenizer.from_pretrained(str(d)).encode(transformers_render(d))
        assert rendered_ids(srv) == expected
        models = httpx.get(srv.base + "/models").json()["data"]
        assert [m["id"] for m in models] == ["shakespeare", "bard"] and models[0]["root"] == str(d)
        for name in ("shakespeare", "bard"):
            r = httpx.post(srv.base + "/chat/completions", json={"model": name, "messages": MESSAGES, "max_tokens": 2})
            assert r.status_code == 200 and r.json()["model"] == name
        assert httpx.post(srv.base + "/completions", json={"model": str(d), "prompt": "x"}).status_code == 404
    finally:
        assert srv.stop() == 0


def test_chat_template_file_overrides_and_builtin_is_plain(tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text(TEMPLATE)
    # both servers start at once (each start-up imports torch)
    srv, plain = ServerProcess("--no-ui", "--chat-template", str(f), wait=False), ServerProcess("--no-ui", wait=False)
    try:
        from gpt2kit import GPT2Tokenizer

        srv.wait_ready()
        tok = GPT2Tokenizer.from_pretrained(str(DEFAULT_MODEL))
        assert rendered_ids(srv) == tok.encode(transformers_render(DEFAULT_MODEL, TEMPLATE))
        r = httpx.post(srv.base + "/chat/completions", json={"messages": [{"role": "forbidden", "content": "x"}],
                                                              "max_tokens": 1})
        assert r.status_code == 400 and "no forbidden role" in r.json()["error"]["message"]

        plain.wait_ready()
        assert rendered_ids(plain) == tok.encode("system:  Be brief. \nuser: Hello?\nassistant:")
        # a template error is the request's problem, never a 500
        r = httpx.post(plain.base + "/chat/completions", json={"messages": [{"role": "user"}], "max_tokens": 1})
        assert r.status_code == 200
        assert httpx.get(plain.url + "/").status_code == 404  # --no-ui: no playground page
    finally:
        assert [srv.stop(), plain.stop()] == [0, 0]


def run_clis(*arg_lists, timeout=120):
    """Each argument list as its own `gpt2kit serve` process, all at once (each start-up imports torch)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "gpt2kit", "serve", "--port", "0", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for args in arg_lists]
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:  # one that started serving instead of failing
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def test_startup_errors_are_one_line(tmp_path):
    missing, template, too_long, no_seqs = run_clis([str(tmp_path / "missing-model")],
                                                    ["--chat-template", str(tmp_path / "none.jinja")],
                                                    ["--max-model-len", "5000"], ["--max-num-seqs", "0"])
    r = missing
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "gpt2kit serve: error:" in r.stderr, r.stderr
    r = template
    assert r.returncode == 1 and "--chat-template" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = too_long
    assert r.returncode == 1 and "n_positions=256" in r.stderr, r.stderr
    r = no_seqs
    assert r.returncode == 2 and "positive integer" in r.stderr



CLOSING_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_continue_final_message_renders_as_transformers_does():
    """The last (assistant) message left open, its closing marker cut, as transformers' apply_chat_template
    (continue_final_message=True) renders it; both flags at once, or a template that rewrites the content,
    are the request's error."""
    transformers = pytest.importorskip("transformers")
    from gpt2kit.serving.chat import ChatTemplate
    from gpt2kit.serving.protocol import APIError

    messages = MESSAGES + [{"role": "assistant", "content": "Greetings, and well "}]
    tok = transformers.AutoTokenizer.from_pretrained(str(DEFAULT_MODEL))
    want = tok.apply_chat_template(messages, chat_template=CLOSING_TEMPLATE, tokenize=False,
                                   add_generation_prompt=False, continue_final_message=True)
    got = ChatTemplate(CLOSING_TEMPLATE, "test").render(messages, False, {}, continue_final_message=True)
    assert got == want and got.endswith("<|assistant|>Greetings, and well ")  # its own trailing space kept
    with pytest.raises(APIError, match="cannot both be true"):
        ChatTemplate(CLOSING_TEMPLATE, "test").render(messages, True, {}, continue_final_message=True)
    with pytest.raises(APIError, match="cannot be continued"):
        ChatTemplate("{{ messages[-1]['content'][:5] }}", "test").render(messages, False, {},  # cuts it short
                                                                       continue_final_message=True)


def test_continue_final_message_under_a_trimming_template():
    transformers = pytest.importorskip("transformers")
    from gpt2kit.serving.chat import ChatTemplate

    messages = MESSAGES + [{"role": "assistant", "content": "Greetings, and well "}]
    tok = transformers.AutoTokenizer.from_pretrained(str(DEFAULT_MODEL))
    want = tok.apply_chat_template(messages, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=False,
                                   continue_final_message=True)
    assert ChatTemplate(TEMPLATE, "test").render(messages, False, {}, continue_final_message=True) == want


def test_model_impl_transformers_as_the_page_writes_it(tmp_path):
    """`vllm serve MODEL --model-imp transformers` (the page's command, vLLM's --model-impl abbreviated) with gpt2kit:
    the model is checked against transformers' GPT2LMHeadModel at load, then served; with --quantize it is refused."""
    pytest.importorskip("transformers")
    srv = ServerProcess("--no-ui", "--model-imp", "transformers")
    try:
        assert any("--model-impl transformers" in line and "transformers' GPT2LMHeadModel" in line for line in srv.stdout)
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 3, "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        assert srv.stop() == 0
    (quantized,) = run_clis(["--model-impl", "transformers", "--quantize", "int8"])
    assert quantized.returncode == 1 and "--quantize" in quantized.stderr and "Traceback" not in quantized.stderr


def test_model_impl_check_refuses_a_model_that_computes_otherwise():
    pytest.importorskip("transformers")
    import torch

    from gpt2kit import GPT2Config, GPT2LMHeadModel
    from gpt2kit.errors import GPT2KitError
    from gpt2kit.serving.parity import check_against_transformers

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=64)).eval()
    assert check_against_transformers(model) < 1e-4
    model.transformer.h[1].ln_2.eps = 0.5  # not in the config transformers' model is built from: ours now differs
    with pytest.raises(GPT2KitError, match="differ from transformers"):
        check_against_transformers(model)
