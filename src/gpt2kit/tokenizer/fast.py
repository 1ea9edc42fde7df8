"""GPT2TokenizerFast and AutoTokenizer.

GPT2TokenizerFast is GPT2Tokenizer with the BPE merges of new words run by tiktoken's Rust core (the
`fast` extra), built offline from the same vocabulary (bpe.TiktokenBPE says why only that step).
Everything around it (added tokens, offsets, padding, decoding) is the shared code, so both classes give the same ids by construction. Without tiktoken it
falls back to the pure-Python engine.
"""
from __future__ import annotations

from .base import GPT2Tokenizer
from .bpe import tiktoken_available
from ..errors import InvalidArgumentError


class GPT2TokenizerFast(GPT2Tokenizer):
    engine_kind = "tiktoken" if tiktoken_available() else "python"

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """ids of many texts at once (special tokens parsed, no padding): the fastest bulk path."""
        return self._encode_many(list(texts), None, None)


GPT2Tokenizer.encode_batch = GPT2TokenizerFast.encode_batch


class AutoTokenizer:
    """`AutoTokenizer.from_pretrained(name)`: GPT2TokenizerFast (or GPT2Tokenizer with use_fast=False)."""

    def __init__(self):
        raise InvalidArgumentError("Use AutoTokenizer.from_pretrained(name_or_directory).")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *inputs, use_fast: bool = True, **kwargs):
        target = GPT2TokenizerFast if use_fast else GPT2Tokenizer
        return target.from_pretrained(pretrained_model_name_or_path, *inputs, **kwargs)
