"""A tokenizer saved with a model truncates to that model's context (its config.json's n_positions),
so `truncation=True` gives inputs the model accepts."""
import json
import os

import torch

from gpt2kit import AutoModelForCausalLM, AutoTokenizer
from gpt2kit.training.default_model import default_model_dir
from gpt2kit.training.loop import train
from gpt2kit.training.settings import TrainConfig

LONG_TEXT = "To be, or not to be, that is the question: " * 40  # ~480 tokens


def _accepts(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    enc = tok(LONG_TEXT, truncation=True, return_tensors="pt")
    assert enc["input_ids"].shape[1] == model.config.n_positions  # cut to the context, not longer
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape[1] == model.config.n_positions
    return tok, model


def test_a_trained_run_dir_truncates_to_its_model(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Speak, speak. You are all resolved rather to die than to famish?\n" * 30, encoding="utf-8")
    out = tmp_path / "run"
    train(TrainConfig(files=[str(corpus)], out_dir=str(out), n_layer=1, n_embd=16, n_head=2, n_positions=20,
                      batch_size=2, max_steps=1, save_every=0, eval_every=1, eval_batches=1, log_every=1,
                      progress=False, dtype="float32", cache_dir=str(tmp_path / "cache")))
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert saved["model_max_length"] == 20
    tok, _ = _accepts(str(out))
    assert tok.model_max_length == 20


def test_the_embedded_model_truncates_to_its_256_positions():
    tok, model = _accepts(default_model_dir())
    assert tok.model_max_length == model.config.n_positions == 256


def _model_dir(path, tokenizer_settings):
    from gpt2kit import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=24)).save_pretrained(path)
    GPT2Tokenizer().save_pretrained(path)
    config_file = os.path.join(path, "tokenizer_config.json")
    with open(config_file) as f:
        config = json.load(f)
    config.pop("model_max_length")
    config.update(tokenizer_settings)
    with open(config_file, "w") as f:
        json.dump(config, f)
    return str(path)


def test_without_model_max_length_the_model_config_gives_it(tmp_path):
    """A tokenizer_config.json without model_max_length (or with transformers' 'unset' value) beside a
    config.json: the model's n_positions."""
    assert _accepts(_model_dir(tmp_path / "a", {}))[0].model_max_length == 24
    unset = {"model_max_length": 1000000000000000019884624838656}
    assert AutoTokenizer.from_pretrained(_model_dir(tmp_path / "b", unset)).model_max_length == 24


def test_a_given_model_max_length_wins(tmp_path):
    """transformers' semantics: tokenizer_config.json's value (or the caller's) is kept."""
    path = _model_dir(tmp_path / "c", {"model_max_length": 1024})
    assert AutoTokenizer.from_pretrained(path).model_max_length == 1024
    assert AutoTokenizer.from_pretrained(path, model_max_length=16).model_max_length == 16
    assert AutoTokenizer.from_pretrained(_model_dir(tmp_path / "d", {"model_max_length": 12})).model_max_length == 12
