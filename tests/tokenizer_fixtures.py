"""Shared helpers for the tokenizer tests: offline oracles built from the shipped vocabulary."""
from __future__ import annotations

import functools
import json
import os
import sysconfig
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

from gpt2kit.tokenizer import GPT2Tokenizer, GPT2TokenizerFast

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "gpt2kit" / "tokenizer" / "assets"
SHARED = ROOT.parent / "shared"
PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

CLASSES = [GPT2Tokenizer, GPT2TokenizerFast]


@functools.lru_cache(maxsize=1)
def tiktoken_encoding():
    """tiktoken built here from vocab.json alone (independent of gpt2kit's code), <|endoftext|> = 50256."""
    tiktoken = pytest.importorskip("tiktoken")
    byte_chars = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in byte_chars}
    extra = iter(range(256, 512))
    chars.update({b: chr(next(extra)) for b in range(256) if b not in chars})
    decode = {c: b for b, c in chars.items()}
    vocab = json.loads((ASSETS / "vocab.json").read_text(encoding="utf-8"))
    ranks = {bytes(decode[c] for c in tok): i for tok, i in vocab.items() if tok != "<|endoftext|>"}
    return tiktoken.Encoding("gpt2-test", pat_str=PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


@functools.lru_cache(maxsize=None)
def hf_tokenizer(**kwargs):
    """transformers' GPT2Tokenizer from the same files (its Rust backend in transformers 5)."""
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2Tokenizer.from_pretrained(str(ASSETS), **kwargs)


def fresh_hf(**kwargs):
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2Tokenizer.from_pretrained(str(ASSETS), **kwargs)


def shared_file(*parts) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared data folder ../shared beside the repo; CI has it)")
    return path


@functools.lru_cache(maxsize=1)
def stdlib_text(min_bytes: int = 5_000_000) -> str:
    """At least `min_bytes` of the running interpreter's own standard-library sources."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(lib.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        size += len(text.encode("utf-8"))
        if size >= min_bytes:
            return "".join(parts)
    pytest.skip(f"the standard library at {lib} holds only {size} bytes of source")
