"""The rest of the tokenizer surface: reference examples, decoding, tokens, errors, files, loading."""
from __future__ import annotations

import json

import pytest
import torch

from tokenizer_fixtures import ASSETS, CLASSES, fresh_hf

from gpt2kit.tokenizer import AutoTokenizer, BatchEncoding, GPT2Tokenizer, GPT2TokenizerFast

cls_param = pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)


@pytest.mark.parametrize("name", ["gpt2", "openai-community/gpt2", "distilgpt2", "gpt2-xl"])
@pytest.mark.parametrize("loader", [GPT2Tokenizer, GPT2TokenizerFast, AutoTokenizer])
def test_reference_examples_offline(loader, name):
    tok = loader.from_pretrained(name)
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok(" Hello world")["input_ids"] == [18435, 995]
    assert tok("Hello world", add_prefix_space=True)["input_ids"] == [18435, 995]
    assert loader.from_pretrained(name, add_prefix_space=True)("Hello world")["input_ids"] == [18435, 995]
    assert tok.model_max_length == 1024 and tok.eos_token_id == 50256 and tok.pad_token_id is None
    assert tok.padding_side == "right" and len(tok) == 50257


def test_auto_tokenizer_classes():
    assert type(AutoTokenizer.from_pretrained("gpt2")) is GPT2TokenizerFast
    assert type(AutoTokenizer.from_pretrained("gpt2", use_fast=False)) is GPT2Tokenizer


@cls_param
def test_call_returns_tensors_and_moves(cls):
    tok = cls()
    enc = tok("Hello, I'm a language model", return_tensors="pt")
    assert isinstance(enc, BatchEncoding) and enc.input_ids.shape == (1, 7)
    assert enc.to("cpu") is enc and enc["attention_mask"].dtype == torch.long
    assert tok.decode(enc.input_ids[0]) == "Hello, I'm a language model"
    with pytest.raises(AttributeError, match="no field"):
        enc.token_type_ids


@cls_param
def test_decode_forms_and_modes(cls):
    tok = cls()
    ids = tok.encode("a<|endoftext|>b")
    assert ids == [64, 50256, 65]
    assert tok.decode(ids) == "a<|endoftext|>b" and tok.decode(ids, skip_special_tokens=True) == "ab"
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids) and tok.decode(50256) == "<|endoftext|>"
    assert tok.batch_decode(torch.tensor([ids, ids]), skip_special_tokens=True) == ["ab", "ab"]
    assert tok.decode([447]) == "\ufffd"  # half of a 3-byte character, errors="replace"
    assert tok.decode_bytes([447]) == b"\xe2\x80" and tok.decode_bytes(torch.tensor(ids)) == b"a<|endoftext|>b"
    with pytest.raises(UnicodeDecodeError):
        tok.decode([447], errors="strict")
    assert cls(errors="ignore").decode([447, 64]) == "a"
    text = "He is . do n't , x !"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text), clean_up_tokenization_spaces=True) == "He is. don't, x!"


@cls_param
def test_tokens_and_special_tokens_match_transformers(cls):
    ours, ref = cls(), fresh_hf()
    for tok in (ours, ref):
        assert tok.add_special_tokens({"cls_token": "[CLS]"}) == 1
        assert tok.add_tokens(["hello", "new_word_xyz"]) == 2  # "hello" keeps its vocabulary id
        tok.pad_token = tok.eos_token
    assert len(ours) == len(ref) == 50259
    assert ours.cls_token_id == ref.cls_token_id and ours.pad_token_id == ref.pad_token_id == 50256
    text = "x[CLS] y hello new_word_xyz <|endoftext|>"
    ids = ours.encode(text)
    assert ids == ref.encode(text)
    assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    assert ours.convert_tokens_to_ids(ours.convert_ids_to_tokens(ids)) == ids
    assert ours.convert_tokens_to_ids("not-a-token-at-all") == ours.unk_token_id  # as the reference documents
    assert ours.convert_tokens_to_string(["Hello", "Ġworld", "[CLS]"]) == "Hello world[CLS]"
    assert ours.decode(ids) == text and ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert sorted(ours.all_special_ids) == sorted(ref.all_special_ids)
    ours.pad_token = None
    assert ours.pad_token_id is None
    ours.pad_token_id = 50256
    assert ours.pad_token == "<|endoftext|>"


@cls_param
def test_split_special_tokens_option(cls):
    assert cls()("<|endoftext|>")["input_ids"] == [50256]
    plain = [27, 91, 437, 1659, 5239, 91, 29]
    assert cls()("<|endoftext|>", split_special_tokens=True)["input_ids"] == plain
    assert cls(split_special_tokens=True).encode("<|endoftext|>") == plain


@cls_param
def test_bad_input_raises_clearly(cls):
    tok = cls()
    with pytest.raises(TypeError, match="str"):
        tok(5)
    with pytest.raises(TypeError, match="str"):
        tok.encode(None)
    with pytest.raises(TypeError):
        tok("x", not_an_option=1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([50257])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="pad_token"):
        tok(["a", "b c"], padding=True)
    with pytest.raises(ValueError, match="padding=True"):
        tok(["a", "b c"], return_tensors="pt")
    with pytest.raises(ValueError, match="second sequence"):
        tok("a b c", truncation="only_second", max_length=1)
    with pytest.raises(ValueError, match="special token"):
        cls(add_bos_token=True)("a b", "c", truncation=True, max_length=1)
    with pytest.raises(ValueError, match="add_special_tokens"):
        tok.pad_token = "[NOT-IN-VOCAB]"
    with pytest.raises(ValueError, match="max_length"):
        cls(pad_token="<|endoftext|>")("a", padding="max_length")
    with pytest.raises(TypeError):
        tok.from_pretrained("gpt2", bogus=True)


def test_offline_unknown_name_says_how_to_use_a_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="local directory"):
        GPT2TokenizerFast.from_pretrained("someone/not-bundled-model")
    with pytest.raises(OSError, match="does not exist"):
        GPT2Tokenizer.from_pretrained("./no/such/dir")


@cls_param
def test_save_pretrained_loads_in_transformers_with_same_results(cls, tmp_path):
    tok = cls(add_bos_token=True)
    tok.add_special_tokens({"cls_token": "[CLS]"})
    tok.add_tokens(["new_word_xyz"])
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    files = tok.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"vocab.json", "merges.txt", "tokenizer_config.json"}
    assert len(files) == 3
    ref = pytest.importorskip("transformers").GPT2Tokenizer.from_pretrained(str(tmp_path))
    again = cls.from_pretrained(tmp_path)
    texts = ["x[CLS] new_word_xyz <|endoftext|> é", "short"]
    for other in (ref, again):
        assert _lists(other(texts, padding=True)) == _lists(tok(texts, padding=True))
        assert other.pad_token_id == tok.pad_token_id and len(other) == len(tok)
    assert (tmp_path / "vocab.json").read_bytes() == (ASSETS / "vocab.json").read_bytes() or \
        json.loads((tmp_path / "vocab.json").read_text()) == json.loads((ASSETS / "vocab.json").read_text())


@cls_param
def test_loads_a_transformers_tokenizer_json(cls, tmp_path):
    ref = fresh_hf()
    ref.add_tokens(["new_word_xyz"])
    ref.save_pretrained(str(tmp_path))
    assert not (tmp_path / "vocab.json").exists()  # transformers 5 writes tokenizer.json only
    tok = cls.from_pretrained(tmp_path)
    text = "a new_word_xyz <|endoftext|> b"
    assert tok.encode(text) == ref.encode(text) and len(tok) == len(ref)


@cls_param
def test_pad_method(cls):
    tok = cls(pad_token="<|endoftext|>")
    feats = [{"input_ids": [1, 2, 3]}, {"input_ids": [4]}]
    out = tok.pad(feats, return_tensors="pt")
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, 50256, 50256]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def _lists(enc):
    return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in enc.items()}
