"""The gpt2kit command: generation on the embedded default and on a checkpoint, and one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from gpt2kit.cli import main

from test_eval import make_checkpoint


def run(argv, capsys):
    """(exit status, stdout, stderr) of `gpt2kit ARGV` run in this process."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's exits
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), n_layer=1, n_embd=16, n_head=2, n_positions=24)


def test_demo_command_streams_from_the_embedded_default():
    """What `make demo` runs, as a fresh process: a continuation of the prompt, exit 0."""
    prompt = "Hello, I'm a language model"
    proc = subprocess.run([sys.executable, "-m", "gpt2kit", "generate", prompt, "--max-new-tokens", "12", "--seed", "0"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(prompt) and len(proc.stdout.strip()) > len(prompt)


def test_generate_streams_piece_by_piece(tiny_model, capsys, monkeypatch):
    from gpt2kit.generate_io import CommandStreamer

    pieces = []
    original = CommandStreamer.on_finalized_text
    monkeypatch.setattr(CommandStreamer, "on_finalized_text",
                        lambda self, text, stream_end=False: (pieces.append(text), original(self, text, stream_end)))
    code, out, _ = run(["generate", "The king", "--model", tiny_model, "--max-new-tokens", "6", "--seed", "1"], capsys)
    assert code == 0
    assert len(pieces) >= 3  # printed as tokens arrived, not at the end
    assert out == "The king" + "".join(pieces) + "\n"


def test_generate_json_and_stdin(tiny_model, capsys, monkeypatch):
    code, out, _ = run(["generate", "Once", "--model", tiny_model, "--max-new-tokens", "4", "-n", "2", "--seed", "3",
                        "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["prompt"] == "Once" and len(result["generated"]) == 2
    assert all(g["generated_text"] == "Once" + g["continuation"] for g in result["generated"])
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("From stdin"))
    code, out, _ = run(["generate", "--model", tiny_model, "--max-new-tokens", "3", "--greedy"], capsys)
    assert code == 0 and out.startswith("From stdin")


@pytest.fixture(scope="module")
def ending_model(tmp_path_factory, tiny_model):
    """The tiny model made to end every sequence at once: ln_f outputs a constant vector v and the
    end token's (tied) embedding is 10 v, so <|endoftext|> is always the most likely next token."""
    from gpt2kit import GPT2LMHeadModel
    from gpt2kit.training.data import load_tokenizer

    model = GPT2LMHeadModel.from_pretrained(tiny_model)
    with torch.no_grad():
        body = model.transformer
        v = torch.randn(body.ln_f.bias.shape, generator=torch.Generator().manual_seed(0))
        body.ln_f.weight.zero_()
        body.ln_f.bias.copy_(v)
        body.wte.weight[model.config.eos_token_id] = 10 * v
    path = tmp_path_factory.mktemp("ending")
    model.save_pretrained(path)
    load_tokenizer().save_pretrained(path)
    return str(path)


def test_generate_json_gives_new_tokens_and_finish_reason(tiny_model, ending_model, capsys):
    code, out, _ = run(["generate", "Once", "--model", tiny_model, "--max-new-tokens", "4", "-n", "2", "--seed", "3",
                        "--json"], capsys)
    assert code == 0
    for g in json.loads(out)["generated"]:
        assert g["finish_reason"] == "length" and g["new_tokens"] == 4, g
    code, out, _ = run(["generate", "Once", "--model", ending_model, "--max-new-tokens", "4", "--greedy", "--json"],
                       capsys)
    assert code == 0
    [g] = json.loads(out)["generated"]
    assert g == {"generated_text": "Once", "continuation": "", "new_tokens": 1, "finish_reason": "stop"}


def test_generate_text_ends_every_sequence_with_one_newline_and_no_end_token(tiny_model, ending_model, capsys):
    code, out, _ = run(["generate", "Once", "--model", ending_model, "--max-new-tokens", "4", "--greedy"], capsys)
    assert code == 0 and out == "Once\n"  # streamed; the end token is not text
    code, out, _ = run(["generate", "Once", "--model", tiny_model, "--max-new-tokens", "3", "-n", "3", "--seed", "2"],
                       capsys)
    assert code == 0
    blocks = out.split("-" * 40 + "\n")
    assert len(blocks) == 3 and all(b.startswith("Once") and b.endswith("\n") for b in blocks), out
    code, out, _ = run(["generate", "Once", "--model", tiny_model, "--max-new-tokens", "3", "--num-beams", "2"], capsys)
    assert code == 0 and out.startswith("Once") and out.endswith("\n") and out.count("\n") >= 1


def test_a_prompt_on_stdin_loses_the_newline_echo_adds(tiny_model, capsys, monkeypatch):
    import io

    for data, prompt in ((b"From stdin\n", "From stdin"), (b"two lines\n\n", "two lines\n"), (b"crlf\r\n", "crlf"),
                         (b"no newline", "no newline"), ("caf\u00e9\n".encode(), "caf\u00e9")):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
        code, out, err = run(["generate", "--model", tiny_model, "--max-new-tokens", "2", "--json"], capsys)
        assert code == 0, err
        assert json.loads(out)["prompt"] == prompt


def test_a_prompt_that_is_not_utf8_is_refused_with_where(capsys, monkeypatch):
    import io

    # argv arrives decoded with surrogateescape: b"caf\xe9 au lait" is "caf\udce9 au lait"
    code, _, err = run(["generate", "caf\udce9 au lait"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "The prompt is not valid UTF-8: byte e9 at byte offset 3 (character 3, after 'caf')" in err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\u00e9t\u00e9 ".encode() + b"\xff\xfe end\n")))
    code, _, err = run(["generate"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "standard input is not valid UTF-8: byte ff at byte offset 6 (character 4, after '\u00e9t\u00e9 ')" in err
    code, _, err = run(["generate", "lone \ud800 surrogate"], capsys)
    assert code == 1 and "lone surrogate '\\ud800' at character 5" in err and "Traceback" not in err


def test_a_non_utf8_command_line_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gpt2kit", "generate", b"caf\xe9"], capture_output=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "LC_ALL": "C.UTF-8"})
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err.count("\n") == 1, err
    assert "not valid UTF-8: byte e9 at byte offset 3" in err and "surrogates not allowed" not in err


@pytest.mark.parametrize("argv, expected", [
    (["generate", "hi", "--model", "/no/such/model"], "does not exist"),
    (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens: expected a positive integer"),
    (["generate", "hi", "--top-p", "1.5"], "--top-p"),
    (["generate", "hi", "--temperature", "warm"], "--temperature"),
    (["generate", "hi", "--dtype", "int3"], "--dtype"),
    (["train", "x.txt", "--out", "o", "--lr", "-1"], "--lr"),
    (["eval"], "required"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_command_lines_give_one_line_and_a_nonzero_exit(argv, expected, capsys):
    code, out, err = run(argv, capsys)
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and expected in err and "Traceback" not in err


def test_user_errors_give_one_line_and_a_nonzero_exit(tiny_model, tmp_path, capsys):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait".encode("latin-1"))
    cases = [
        (["generate", "word " * 30, "--model", tiny_model], "Shorten the prompt"),  # 30 tokens > n_positions 24
        (["generate", "word " * 10, "--model", tiny_model, "--max-new-tokens", "20"], "exceeds this model's 24-token context"),
        (["generate", "hi", "--model", tiny_model, "--device", "cuda:7"], "cuda"),
        (["generate", "hi", "--model", str(tmp_path / "missing")], "does not exist"),
        (["eval", str(tmp_path / "missing.txt"), "--model", tiny_model], "does not exist"),
        (["eval", str(latin1), "--model", tiny_model], "not UTF-8"),
        (["eval", str(tmp_path), "--model", tiny_model], "directory"),
        (["train", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "run"), "--n-layer", "1", "--n-embd", "8",
          "--n-head", "2"], "does not exist"),
        (["train", str(latin1), "--out", str(tmp_path / "run"), "--preset", "gpt2", "--model", tiny_model], "not both"),
    ]
    if torch.cuda.is_available():
        cases.pop(2)
    for argv, expected in cases:
        code, out, err = run(argv, capsys)
        assert code == 1, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
        assert expected in err and "Traceback" not in err, (argv, err)


def test_help_describes_every_command(capsys):
    for command in ("generate", "train", "eval"):
        code, out, _ = run([command, "--help"], capsys)
        assert code == 0 and f"gpt2kit {command}" in out and "--model" in out


def test_the_command_keeps_freed_memory_for_reuse_unless_told_not_to(monkeypatch):
    """The gpt2kit command tunes glibc's malloc for its own process (allocator.py); a user's own malloc
    settings, a preloaded allocator or GPT2KIT_DEFAULT_MALLOC=1 leave it alone."""
    import sys

    from gpt2kit import allocator

    for name in ("GPT2KIT_DEFAULT_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES",
                 "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (("GPT2KIT_DEFAULT_MALLOC", "1"), ("LD_PRELOAD", "/usr/lib/libjemalloc.so"),
                        ("MALLOC_TRIM_THRESHOLD_", "0")):
        monkeypatch.setenv(name, value)
        assert allocator.keep_freed_memory_for_reuse() is False
        monkeypatch.delenv(name)
    import ctypes.util

    glibc = sys.platform.startswith("linux") and "libc.so" in (ctypes.util.find_library("c") or "")
    assert allocator.keep_freed_memory_for_reuse() is glibc


def test_an_unrecognized_argument_next_to_a_long_prompt_gives_a_short_line(capsys):
    prompt = "word " * 400
    code, out, err = run(["generate", "--bogus-flag", "3", prompt], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "--bogus-flag" in err and "more characters" in err and len(err) < 400


def test_help_shows_every_default(capsys):
    """Each option that has a default says it in --help: the formatter adds "(default: X)" to a non-None
    default; train and eval options without one (None) say in words what happens without them."""
    import argparse

    from gpt2kit.cli import DefaultsHelpFormatter, build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, parser in sub.choices.items():
        for action in parser._actions:
            if not action.option_strings or action.required or action.help == argparse.SUPPRESS or isinstance(
                    action, (argparse._HelpAction, argparse._StoreTrueAction, argparse._StoreFalseAction)):
                continue
            text = DefaultsHelpFormatter(command)._get_help_string(action)
            if action.default is not None or command in ("train", "eval"):
                assert "default" in text, (command, action.option_strings, text)
    code, out, _ = run(["train", "--help"], capsys)
    flat = " ".join(out.split())
    for shown in ("--seed SEED seed of the initial weights, data order and dropout (default: 1337)",
                  "(default: 200)", "(default: 0.1)", "(default: 1.0)", "micro-steps per optimizer step (default: 1)",
                  "(default: 0.0006 from scratch, 0.0001 when fine-tuning with --model)"):
        assert shown in flat, shown


@pytest.mark.parametrize("argv, hint", [
    (["generate", "hi", "--max-tokens", "5"], "(did you mean --max-new-tokens?)"),
    (["train", "x.txt", "--out", "o", "--batchsize", "4"], "(did you mean --batch-size?)"),
    (["eval", "x.txt", "--strides", "4"], "(did you mean --stride?)"),
])
def test_an_unknown_option_suggests_the_close_one(argv, hint, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "unrecognized arguments" in err and hint in err


def test_train_command_line_checks_and_defaults(tmp_path, capsys, monkeypatch):
    code, _, err = run(["train", "x.txt", "--out", str(tmp_path / "o"), "--preset", "gpt2", "--max-steps", "5",
                        "--warmup-steps", "9"], capsys)
    assert code == 1 and "--warmup-steps (9) exceeds --max-steps (5)" in err and len(err.strip().splitlines()) == 1
    seen = []
    monkeypatch.setattr("gpt2kit.training.loop.train", lambda cfg: seen.append(cfg) or {})
    for extra, lr in ((["--model", "some/model"], 1e-4), (["--preset", "gpt2"], 6e-4),
                      (["--model", "some/model", "--lr", "3e-5"], 3e-5)):
        assert main(["train", "x.txt", "--out", "o", *extra]) == 0
        assert seen.pop().lr == lr, extra


def test_train_into_a_used_directory_needs_resume_or_overwrite(tiny_model, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be " * 50)
    code, _, err = run(["train", str(text), "--out", tiny_model, "--model", tiny_model], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "already holds a training run or model (config.json, model.safetensors)" in err
    assert "--resume" in err and "--overwrite" in err


def test_eval_shows_a_progress_bar_on_a_terminal(tiny_model, tmp_path, monkeypatch, capsys):
    from test_train import FakeTerminal

    text = tmp_path / "t.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 20)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # tokenized afresh: its bar shows too
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert main(["eval", str(text), "--model", tiny_model, "--batch-size", "2"]) == 0
    assert "perplexity" in capsys.readouterr().out
    shown = [line.split("\r")[-1] for line in term.buffer.getvalue().split("\n")]
    assert any(s.startswith("scoring: 100%") for s in shown) and shown[-1] == ""  # ends on a line of its own
    assert any(s.startswith("tokenizing t.txt: 100%") for s in shown)
    code, _, _ = run(["eval", str(text), "--model", tiny_model, "--no-progress"], capsys)
    assert code == 0
