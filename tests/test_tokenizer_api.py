"""Acceptance 2: the call surface matches transformers' GPT2Tokenizer built from the same files.

A deterministic sweep over padding x truncation x sides x pairs x return_tensors x offsets x added
special tokens compares input_ids, attention_mask, offset_mapping (and token_type_ids) case by case;
where transformers raises, gpt2kit must raise too.
"""
from __future__ import annotations

import itertools

import pytest

from tokenizer_fixtures import CLASSES, fresh_hf

TEXTS = ["Hello world, this is a longer sentence with émojis 😀 and <|endoftext|> inside.", "short one",
         "say hello [CLS] to ab c friends", "x"]
PAIRS = ["the second text is here", "two"]


def _variant(name, make):
    """The same setup applied to a gpt2kit or transformers tokenizer."""
    tok = make(add_bos_token=True) if name == "bos" else make()
    if name == "added":
        tok.add_special_tokens({"cls_token": "[CLS]"})
        tok.add_tokens(["hello", "ab c"])
    tok.pad_token = tok.eos_token
    return tok


VARIANTS = ("plain", "bos", "added")
_CACHE: dict = {}


def _pair(cls, variant, truncation_side):
    key = (cls, variant)
    if key not in _CACHE:
        _CACHE[key] = (_variant(variant, lambda **kw: cls(**kw)), _variant(variant, fresh_hf))
    ours, ref = _CACHE[key]
    ours.truncation_side = ref.truncation_side = truncation_side
    return ours, ref


def _cases():
    inputs = [("single", TEXTS[0], None), ("batch", TEXTS, None), ("pair", TEXTS[0], PAIRS[0]),
              ("batch-pair", TEXTS[:2], PAIRS)]
    settings = [(False, None, None), (True, None, None), ("longest", True, 8), ("max_length", None, 12),
                ("max_length", True, 9), (False, True, 5), (False, "only_first", 10), (False, "only_second", 9),
                (True, "longest_first", 7), (False, None, 6)]
    rows = itertools.product(VARIANTS, inputs, settings, ("right", "left"), ("right", "left"), (None, "pt"),
                             (False, True))
    for i, (variant, inp, (padding, truncation, max_length), pside, tside, tensors, offsets) in enumerate(rows):
        if i % 7 == 0:  # a spread-out deterministic sample keeps the sweep to a few hundred cases
            yield pytest.param(variant, inp[1], inp[2], padding, truncation, max_length, pside, tside, tensors,
                               offsets, id=f"{variant}-{inp[0]}-{padding}-{truncation}-{max_length}-{pside}{tside}"
                                           f"-{tensors}-{'off' if offsets else 'nooff'}")


def _norm(enc):
    out = {}
    for key, value in enc.items():
        value = value.tolist() if hasattr(value, "tolist") else value
        if key == "offset_mapping":  # tuples vs lists vs tensor rows
            value = [[tuple(p) for p in row] for row in value] if value and isinstance(value[0], list) and \
                value[0] and isinstance(value[0][0], (list, tuple)) else [tuple(p) for p in value]
        out[key] = value
    return out


CASES = list(_cases())


def test_sweep_is_large_enough():
    assert len(CASES) >= 50


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("variant,text,pair,padding,truncation,max_length,pside,tside,tensors,offsets", CASES)
def test_call_matches_transformers(cls, variant, text, pair, padding, truncation, max_length, pside, tside,
                                   tensors, offsets):
    ours, ref = _pair(cls, variant, tside)
    kwargs = dict(padding=padding, truncation=truncation, max_length=max_length, padding_side=pside,
                  return_tensors=tensors, return_offsets_mapping=offsets, return_token_type_ids=pair is not None)
    try:
        expected = ref(text, pair, **kwargs)
    except Exception:  # transformers refuses: so must we
        with pytest.raises((ValueError, TypeError)):
            ours(text, pair, **kwargs)
        return
    got = ours(text, pair, **kwargs)
    assert _norm(got) == _norm(expected)
    if tensors == "pt":
        assert got["input_ids"].dtype == expected["input_ids"].dtype


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("kwargs", [{}, {"return_special_tokens_mask": True}, {"return_length": True},
                                    {"padding": True, "pad_to_multiple_of": 4, "return_length": True},
                                    {"padding": "max_length", "max_length": 30, "return_attention_mask": False}])
def test_extra_outputs_match_transformers(cls, kwargs):
    ours, ref = _pair(cls, "bos", "right")
    for text, pair in ((TEXTS, None), (TEXTS[0], PAIRS[1]), (TEXTS[:2], PAIRS)):
        assert _norm(ours(text, pair, **kwargs)) == _norm(ref(text, pair, **kwargs))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_longest_first_tie_and_sides(cls):
    ours, ref = _pair(cls, "plain", "right")
    a, b = "one two three four five", "six seven eight nine ten"
    for side in ("right", "left"):
        ours.truncation_side = ref.truncation_side = side
        for n in range(2, 12):
            assert ours(a, b, truncation=True, max_length=n)["input_ids"] == \
                ref(a, b, truncation=True, max_length=n)["input_ids"], (side, n)
    ours.truncation_side = ref.truncation_side = "right"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_split_into_words_matches_transformers(cls):
    ours, ref = cls(add_prefix_space=True), fresh_hf(add_prefix_space=True)
    cases = [(["hello  world", "x<|endoftext|>y", " z"], None), ([["ab", "c"], ["d"]], None),
             (["ab", "c"], ["d", "e f"])]
    for words, pair in cases:
        kw = dict(is_split_into_words=True, return_offsets_mapping=pair is None)
        assert _norm(ours(words, pair, **kw)) == _norm(ref(words, pair, **kw))
    with pytest.raises(ValueError, match="add_prefix_space"):
        cls()(["a", "b"], is_split_into_words=True)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_prefix_space_and_added_token_offsets_match_transformers(cls):
    for kwargs in ({}, {"add_prefix_space": True}):
        ours, ref = cls(**kwargs), fresh_hf(**kwargs)
        for tok in (ours, ref):
            tok.add_tokens(["hello", "ab c", "héllo"])
        for text in ("a<|endoftext|>b", " a", "\nb", "Hello world", "<|endoftext|>x", "", "sayhello world ab c d",
                     "héllo 😀👨‍👩‍👧 wörld\u0301 日本語 <|endoftext|>  x"):
            assert _norm(ours(text, return_offsets_mapping=True)) == _norm(ref(text, return_offsets_mapping=True))
            assert ours.tokenize(text) == ref.tokenize(text)
