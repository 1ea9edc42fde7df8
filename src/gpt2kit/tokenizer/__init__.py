"""GPT-2 byte-level BPE tokenizers: GPT2Tokenizer (plain Python), GPT2TokenizerFast (tiktoken engine
when installed), AutoTokenizer, BatchEncoding. See base.py for the extras beyond the reference page
(`decode_bytes`, `split_special_tokens`, `encode_batch`)."""
from .base import GPT2Tokenizer
from .encoding import BatchEncoding
from .fast import AutoTokenizer, GPT2TokenizerFast
from .vocab import AddedToken

__all__ = ["AddedToken", "AutoTokenizer", "BatchEncoding", "GPT2Tokenizer", "GPT2TokenizerFast"]
