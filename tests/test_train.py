"""Training: the loss falls, a killed run resumes exactly, and the pieces (data cache, sampler, schedule,
weight-decay groups, fused loss) do what they claim."""
import json
import math
import os
import shutil
import signal

import pytest
import torch
import torch.nn.functional as F

from gpt2kit.errors import CheckpointFileError, InvalidInputError
from gpt2kit.training import data as data_mod
from gpt2kit.training.checkpointing import STATE_NAME, kept_checkpoints, latest_checkpoint
from gpt2kit.training.loop import train
from gpt2kit.training.settings import FINETUNE_LR, PRETRAIN_LR, TrainConfig
from gpt2kit.training.loss import linear_cross_entropy
from gpt2kit.training.optim import param_groups
from gpt2kit.training.schedule import WarmupCosine

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 40
TINY_RUN = dict(n_layer=2, n_embd=32, n_head=4, n_positions=32, batch_size=4, lr=3e-3, warmup_steps=2,
                log_every=1, eval_every=0, eval_batches=1, progress=False, dtype="float32")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def log_losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_loss_falls_and_run_directory_is_complete(tmp_path, text_file):
    out = str(tmp_path / "run")
    result = train(TrainConfig(files=[text_file], out_dir=out, max_steps=12, save_every=0,
                               cache_dir=str(tmp_path / "cache"), **TINY_RUN))
    losses = result["losses"]
    assert losses[1] > math.log(50257) - 0.5  # starts near uniform over the vocabulary
    assert sum(list(losses.values())[-3:]) / 3 < losses[1] - 1.0
    for name in ("config.json", "generation_config.json", "model.safetensors", "vocab.json", "merges.txt", "log.jsonl"):
        assert os.path.isfile(os.path.join(out, name)), name
    from gpt2kit import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(out)  # the Hugging Face layout, loadable as any checkpoint
    assert model.config.n_layer == 2 and model.config.vocab_size == 50257


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_killed_run_resumes_with_the_same_losses(tmp_path, text_file, capsys):
    # dropout on, so that the restored RNG state matters; several epochs, so the data order matters
    common = dict(files=[text_file], max_steps=9, save_every=3, dropout=0.1, cache_dir=str(tmp_path / "cache"), **TINY_RUN)
    full = train(TrainConfig(out_dir=str(tmp_path / "a"), **common))["losses"]
    crashed = train(TrainConfig(out_dir=str(tmp_path / "b"), stop_after=5, **common))
    assert crashed["stopped"] and crashed["step"] == 5
    assert latest_checkpoint(str(tmp_path / "b")).endswith("step-000003")  # steps 4-5 were lost with the "crash"
    capsys.readouterr()
    resumed = train(TrainConfig(out_dir=str(tmp_path / "b"), resume=True, **common))["losses"]
    assert sorted(resumed) == list(range(4, 10))
    assert [resumed[s] for s in range(4, 10)] == [full[s] for s in range(4, 10)]
    assert log_losses(str(tmp_path / "b")) == full  # the log reads as one run
    # where it resumed: said on stderr and recorded in the log
    assert f"resuming from {os.path.join(str(tmp_path / 'b'), 'checkpoints', 'step-000003')} at step 3/9" in capsys.readouterr().err
    events = [r for r in read_log(str(tmp_path / "b")) if r.get("event") == "resume"]
    assert events == [{"event": "resume", "step": 3, "samples": 12, "checkpoint": os.path.join("checkpoints", "step-000003")}]


def test_a_damaged_training_state_falls_back_to_the_previous_checkpoint(tmp_path, text_file, capsys):
    common = dict(files=[text_file], max_steps=4, save_every=1, dropout=0.1, cache_dir=str(tmp_path / "cache"), **TINY_RUN)
    full = train(TrainConfig(out_dir=str(tmp_path / "a"), **common))["losses"]
    out, alone = str(tmp_path / "b"), str(tmp_path / "c")
    train(TrainConfig(out_dir=out, stop_after=3, **common))  # keeps step-000002 and step-000003
    shutil.copytree(out, alone)
    state = os.path.join(latest_checkpoint(out), STATE_NAME)
    data = open(state, "rb").read()
    open(state, "wb").write(data[: len(data) // 2])
    capsys.readouterr()
    resumed = train(TrainConfig(out_dir=out, resume=True, **common))["losses"]
    err = capsys.readouterr().err
    assert sorted(resumed) == [3, 4] and [resumed[3], resumed[4]] == [full[3], full[4]]
    assert f"Training state {state!r} is unreadable" in err and "previous kept checkpoint, step-000002" in err
    assert "PytorchStreamReader" not in err

    # nothing older to fall back to: the error names the file and what to do
    shutil.rmtree(os.path.join(alone, "checkpoints", "step-000002"))
    state = os.path.join(latest_checkpoint(alone), STATE_NAME)
    open(state, "wb").write(b"\x00" * 64)
    with pytest.raises(CheckpointFileError) as info:
        train(TrainConfig(out_dir=alone, resume=True, **common))
    assert repr(state) in str(info.value) and "--overwrite" in str(info.value)
    assert "PytorchStreamReader" not in str(info.value) and "weights_only" not in str(info.value)


def test_a_run_directory_is_replaced_only_with_overwrite(tmp_path, text_file):
    out = str(tmp_path / "run")
    common = dict(files=[text_file], save_every=1, cache_dir=str(tmp_path / "cache"), **{**TINY_RUN, "warmup_steps": 1})
    train(TrainConfig(out_dir=out, max_steps=2, **common))
    before = open(os.path.join(out, "log.jsonl")).read(), kept_checkpoints(out)
    with pytest.raises(InvalidInputError, match="already holds a training run.*--resume.*--overwrite"):
        train(TrainConfig(out_dir=out, max_steps=1, **common))
    assert (open(os.path.join(out, "log.jsonl")).read(), kept_checkpoints(out)) == before  # untouched
    with pytest.raises(InvalidInputError, match="pass one of them"):
        train(TrainConfig(out_dir=out, max_steps=2, resume=True, overwrite=True, **common))
    train(TrainConfig(out_dir=out, max_steps=1, overwrite=True, **common))
    assert [os.path.basename(d) for d in kept_checkpoints(out)] == ["step-000001"]  # the old run's step 2 is gone
    assert [r["event"] for r in read_log(out) if "event" in r] == ["start", "end"]


@pytest.fixture
def terminal_sigint():
    """SIGINT as a terminal's Python has it: a shell that starts the suite in the background (`pytest &`)
    makes the process ignore SIGINT, and a run then rightly keeps ignoring it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_resumes_exactly(tmp_path, text_file, monkeypatch, capsys,
                                                                          terminal_sigint):

    from gpt2kit.cli import main

    argv = [text_file, "--n-layer", "2", "--n-embd", "32", "--n-head", "4", "--n-positions", "32", "--batch-size", "4",
            "--lr", "3e-3", "--warmup-steps", "2", "--log-every", "1", "--eval-every", "0", "--dtype", "float32",
            "--eval-batches", "1", "--max-steps", "4", "--save-every", "0", "--dropout", "0.1",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert main(["train", *argv, "--out", str(tmp_path / "a")]) == 0
    full = log_losses(str(tmp_path / "a"))
    batch, calls = data_mod.WindowSampler.batch, []

    def batch_then_ctrl_c(self, first, count):  # Ctrl-C in the middle of step 2
        calls.append(first)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return batch(self, first, count)

    monkeypatch.setattr(data_mod.WindowSampler, "batch", batch_then_ctrl_c)
    out = str(tmp_path / "b")
    capsys.readouterr()
    assert main(["train", *argv, "--out", out]) == 130
    err = capsys.readouterr().err
    assert f"interrupted: saved a checkpoint of step 2 to {os.path.join(out, 'checkpoints', 'step-000002')}" in err
    assert "--resume" in err and latest_checkpoint(out).endswith("step-000002")
    monkeypatch.setattr(data_mod.WindowSampler, "batch", batch)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    assert main(["train", *argv, "--out", out, "--resume"]) == 0
    assert log_losses(out) == full


def test_an_ignored_ctrl_c_stays_ignored(tmp_path, text_file):
    """A run started with SIGINT ignored (nohup, `cmd &` in a script) must not start answering Ctrl-C."""
    from gpt2kit.training import interrupt

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupt.StopRequest(print, enabled=True) as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            assert not stop.requested
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


class FakeTerminal:
    """stderr as a terminal: tqdm draws its bars (\r updates) into it."""

    def __init__(self):
        import io

        self.buffer = io.StringIO()

    def write(self, text):
        return self.buffer.write(text)

    def flush(self):
        pass

    def isatty(self):
        return True


def test_training_and_tokenizing_show_bars_that_end_cleanly_on_a_terminal(tmp_path, text_file, monkeypatch):
    term = FakeTerminal()
    monkeypatch.setattr("sys.stderr", term)
    train(TrainConfig(files=[text_file], out_dir=str(tmp_path / "run"), max_steps=3, save_every=0,
                      cache_dir=str(tmp_path / "cache"), **{**TINY_RUN, "progress": True}))
    lines = term.buffer.getvalue().split("\n")
    shown = [line.split("\r")[-1] for line in lines]  # what a terminal shows on each line at the end
    assert any(s.startswith("tokenizing corpus.txt") and "100%" in s for s in shown)  # not blanked at 0%
    assert any(s.startswith("training: 100%") and "3/3" in s for s in shown)
    assert shown[-2] == f"saved the model to {tmp_path / 'run'}" and shown[-1] == ""  # on a line of its own
    assert "step 2/3  loss" in "\n".join(shown)  # the log lines are still printed, above the bar


def test_warmup_longer_than_the_run_and_the_fine_tuning_lr_default():
    with pytest.raises(InvalidInputError, match=r"--warmup-steps \(9\) exceeds --max-steps \(5\)"):
        TrainConfig(files=["x.txt"], out_dir="o", n_layer=1, n_embd=8, n_head=2, max_steps=5, warmup_steps=9).validate()
    TrainConfig(files=["x.txt"], out_dir="o", n_layer=1, n_embd=8, n_head=2, max_steps=5, warmup_steps=5).validate()
    assert TrainConfig(files=[], out_dir="o", model="gpt2").lr == FINETUNE_LR == 1e-4
    assert TrainConfig(files=[], out_dir="o", preset="gpt2").lr == PRETRAIN_LR == 6e-4
    assert TrainConfig(files=[], out_dir="o", model="gpt2", lr=3e-5).lr == 3e-5


def test_resume_refuses_changed_settings_and_missing_checkpoints(tmp_path, text_file):
    common = dict(files=[text_file], save_every=2, cache_dir=str(tmp_path / "cache"), **TINY_RUN)
    train(TrainConfig(out_dir=str(tmp_path / "r"), max_steps=2, **common))
    with pytest.raises(ValueError, match="max_steps"):
        train(TrainConfig(out_dir=str(tmp_path / "r"), max_steps=5, resume=True, **common))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(TrainConfig(out_dir=str(tmp_path / "empty"), max_steps=2, resume=True, **common))


def test_fine_tuning_starts_from_the_checkpoint(tmp_path, text_file):
    common = dict(files=[text_file], save_every=0, cache_dir=str(tmp_path / "cache"), progress=False,
                  batch_size=4, log_every=1, eval_every=0)
    first = train(TrainConfig(out_dir=str(tmp_path / "base"), max_steps=10, n_layer=1, n_embd=32, n_head=2,
                              n_positions=32, lr=3e-3, **common))["losses"]
    tuned = train(TrainConfig(out_dir=str(tmp_path / "tuned"), model=str(tmp_path / "base"), max_steps=2, lr=1e-4,
                              **common))["losses"]
    assert tuned[1] < first[1] - 1.0  # far below a fresh model's loss


def test_token_cache_is_exact_and_reused(tmp_path, monkeypatch, text_file):
    tok = data_mod.load_tokenizer()
    monkeypatch.setattr(data_mod, "_CHUNK", 50)  # force many pieces
    cache = data_mod.tokenize_to_cache(text_file, tok, cache_dir=str(tmp_path), progress=False)
    ids = data_mod.open_tokens(cache).tolist()
    assert ids == tok.encode(TEXT, add_special_tokens=False)  # piecewise == whole
    with monkeypatch.context() as m:
        m.setattr(data_mod, "_encode", lambda *a: pytest.fail("re-tokenized a cached file"))
        assert data_mod.tokenize_to_cache(text_file, tok, cache_dir=str(tmp_path), progress=False) == cache
    raw = open(text_file, "rb").read()
    cut = data_mod.split_point(raw, 0.9)
    val = data_mod.load_split([text_file], tok, part="val", val_fraction=0.1, cache_dir=str(tmp_path), progress=False)
    assert val.tolist() == tok.encode(raw[cut:].decode(), add_special_tokens=False)


def test_text_file_errors(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        data_mod.read_text(str(bad))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data_mod.read_text(str(tmp_path / "missing.txt"))
    with pytest.raises(OSError, match="is a directory"):
        data_mod.read_text(str(tmp_path))


def test_window_sampler_order_is_a_function_of_seed_and_position():
    tokens = torch.arange(1000, dtype=torch.int64).to(torch.uint16)
    a, b = data_mod.WindowSampler(tokens, 16, seed=1), data_mod.WindowSampler(tokens, 16, seed=1)
    x1, y1 = a.batch(5, 3)
    b.batch(100, 4)  # visiting other positions first changes nothing
    x2, _ = b.batch(5, 3)
    assert torch.equal(x1, x2) and torch.equal(y1[:, :-1], x1[:, 1:])
    n = a.n_windows
    starts = {int(a.batch(k, 1)[0][0, 0]) for k in range(n)}  # one epoch: every window once
    assert len(starts) == n and len({s % 16 for s in starts}) == 1
    assert not torch.equal(data_mod.WindowSampler(tokens, 16, seed=2).batch(5, 3)[0], x1)


def test_warmup_cosine_schedule():
    f = WarmupCosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1)
    assert f(100) == pytest.approx(0.1)


def test_weight_decay_groups_skip_biases_and_norms_and_count_tied_once():
    from gpt2kit import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=8))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_parameters()


@pytest.mark.parametrize("chunk", [3, 64])
def test_fused_loss_matches_cross_entropy_and_its_gradients(chunk):
    torch.manual_seed(0)
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(37, 8, requires_grad=True)
    t = torch.randint(0, 37, (10,))
    t[[2, 7]] = -100
    ours = linear_cross_entropy(h, w, t, chunk=chunk)
    ours.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)


def test_saved_files_get_the_umask_mode_not_0600(tmp_path, text_file):
    """Every file a run writes (model, tokenizer, configs, checkpoints, training state, log, plot, token cache)
    and a pytorch_model.bin get 0o666 less the umask, as open() gives; 0o027 tells that from both mkstemp's
    0o600 and a fixed 0o644."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    old = os.umask(0o027)
    try:
        train(TrainConfig(files=[text_file], out_dir=str(out), max_steps=2, save_every=1, cache_dir=str(cache),
                          **TINY_RUN))
        from gpt2kit import GPT2LMHeadModel

        GPT2LMHeadModel.from_pretrained(out).save_pretrained(tmp_path / "bin", safe_serialization=False)
    finally:
        os.umask(old)
    files = [os.path.join(d, f) for top in (out, cache, tmp_path / "bin") for d, _, fs in os.walk(top) for f in fs]
    names = {os.path.basename(f) for f in files}
    assert {"model.safetensors", "training_state.pt", "latest", "vocab.json", "config.json", "log.jsonl",
            "pytorch_model.bin"} <= names
    assert {f: oct(os.stat(f).st_mode & 0o777) for f in files} == {f: oct(0o640) for f in files}
