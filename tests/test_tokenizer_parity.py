"""Acceptance 1: ids identical to tiktoken (built offline from the shipped files) for both classes."""
from __future__ import annotations

import hashlib

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tokenizer_fixtures import ASSETS, CLASSES, shared_file, stdlib_text, tiktoken_encoding

EDGE_CASES = [
    "", " ", "  ", "\n", "\r\n", "\r\n\r\n", "a\r\nb", "   \n\n\n   x", "x   ", "x\n\n", "\t\tfoo\t",
    "Hello world", " Hello world", "HELLO  WORLD   ", "I'm you're he'd we'll they've it's", "I'M YOU'RE HE'D",
    "don't DON'T Don'T won't 'tis ''s' '", "3.14159 1,000,000 12345678901234567890 ½ ² Ⅻ ٣٤ १२३",
    "日本語のテキスト、中文文本。한국어 텍스트", "Ελληνικά Кириллица עברית العربية ไทย ქართული",
    "😀😃 👨‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🇫🇷 ❤️", "e\u0301 a\u0308\u0304 Z\u0351\u0353\u036c", "zero\u200bwidth\u200c\u200djoin\ufeff",
    "non\u00a0breaking\u202fspace\u2009thin\u3000ideo", "\x1c\x1d\x1e\x1f\x85\u2028\u2029", "".join(map(chr, range(128))),
    "tab\tvert\x0bform\x0ccr\r", "<|endoftext|>", "a<|endoftext|>b <|endoftext|> c<|endoftext|><|endoftext|>",
    "<|endoftext", "def f(x):\n    return x ** 2  # square\n\n\n", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕄𝕒𝕥𝕙 \U0010fffd \U000e0001",
    "\ud7ff\ue000\uffff", "  leading and trailing  \n  ", "mixed: café naïve résumé coöperate Ångström",
]
# past the chunk size (8192 chars), mixing ASCII and non-ASCII chunks around newline boundaries
LONG = ("x = 1\n" * 900 + "é\n  y\n\n z \n" + "def g():\n\treturn 'ü'\n" * 400 + "a\u00a0\n" * 3000
        + "word\n\n\n   " * 800 + "end")


def test_shipped_vocabulary_checksums():
    expected = {"vocab.json": "03087853bc70c618b66e7c7a43e787d2db4c469416beac9a483e53dad1f72f27",
                "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}
    for name, digest in expected.items():
        assert hashlib.sha256((ASSETS / name).read_bytes()).hexdigest() == digest, name


@pytest.fixture(scope="module", params=CLASSES, ids=lambda c: c.__name__)
def tok(request):
    return request.param()


def _check(tok, text, enc):
    ids = tok.encode(text)
    assert ids == enc.encode(text, allowed_special="all")
    assert tok.decode(ids) == text
    assert tok.encode(text, split_special_tokens=True) == enc.encode_ordinary(text)


@pytest.mark.parametrize("text", EDGE_CASES + [LONG, LONG.replace("\n", "\r\n")], ids=range(len(EDGE_CASES) + 2))
def test_edge_cases_match_tiktoken(tok, text):
    _check(tok, text, tiktoken_encoding())


def test_tinyshakespeare_matches_tiktoken(tok):
    text = shared_file("corpus", "tinyshakespeare.txt").read_text(encoding="utf-8")
    ids = tok.encode(text)
    assert ids == tiktoken_encoding().encode_ordinary(text)
    assert tok.decode(ids) == text


def test_stdlib_sources_match_tiktoken(tok):
    text = stdlib_text()
    assert len(text.encode("utf-8")) >= 5_000_000
    ids = tok.encode(text, split_special_tokens=True)
    assert ids == tiktoken_encoding().encode_ordinary(text)
    assert tok.decode(ids) == text


def test_batch_matches_single(tok):
    texts = EDGE_CASES * 3
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok(texts)["input_ids"] == [tok.encode(t) for t in texts]


_chars = st.characters(blacklist_categories=("Cs",))
_pieces = st.lists(st.one_of(st.text(_chars, max_size=12), st.sampled_from(
    ["<|endoftext|>", "'s", "'LL", " ", "\n", "\r\n", "  \n", "\u200d", "\u00a0", "x" * 9000])), max_size=12)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(_chars), _pieces.map("".join)))
def test_property_arbitrary_unicode(text):
    enc = tiktoken_encoding()
    for cls in CLASSES:
        _check(_instance(cls), text, enc)


_INSTANCES: dict = {}


def _instance(cls):
    if cls not in _INSTANCES:
        _INSTANCES[cls] = cls()
    return _INSTANCES[cls]
