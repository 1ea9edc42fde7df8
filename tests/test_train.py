"""Training: the loss falls, a killed run resumes exactly, and the pieces (data cache, sampler, schedule,
weight-decay groups, fused loss) do what they claim."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from gpt2kit.training import data as data_mod
from gpt2kit.training.checkpointing import latest_checkpoint
from gpt2kit.training.loop import train
from gpt2kit.training.settings import TrainConfig
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


def test_killed_run_resumes_with_the_same_losses(tmp_path, text_file):
    # dropout on, so that the restored RNG state matters; the resumed run must continue at the same data position
    common = dict(files=[text_file], max_steps=6, save_every=3, dropout=0.1, cache_dir=str(tmp_path / "cache"), **TINY_RUN)
    full = train(TrainConfig(out_dir=str(tmp_path / "a"), **common))["losses"]
    crashed = train(TrainConfig(out_dir=str(tmp_path / "b"), stop_after=4, **common))
    assert crashed["stopped"] and crashed["step"] == 4
    assert latest_checkpoint(str(tmp_path / "b")).endswith("step-000003")  # step 4 was lost with the "crash"
    resumed = train(TrainConfig(out_dir=str(tmp_path / "b"), resume=True, **common))["losses"]
    assert sorted(resumed) == list(range(4, 7))
    assert [resumed[s] for s in range(4, 7)] == [full[s] for s in range(4, 7)]
    assert log_losses(str(tmp_path / "b")) == full  # the log reads as one run


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
