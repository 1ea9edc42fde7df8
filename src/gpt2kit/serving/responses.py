"""Engine news -> OpenAI response objects (completions and chat, whole or as stream chunks).

Logprobs follow vLLM: completions report `tokens`, `token_logprobs`, `top_logprobs` (a dict of the top-N
alternatives plus the chosen token) and `text_offset` (characters into the choice's text, the prompt
included with echo); chat reports `content: [{token, logprob, bytes, top_logprobs}]`.
"""
from __future__ import annotations

import time
import uuid

from .scheduler import TokenInfo
from .stop import IncrementalDetokenizer


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class TokenText:
    """Token id -> its text, as logprobs show it (special tokens included; a partial character as U+FFFD)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._memo: dict[int, str] = {}

    def __call__(self, tok: int) -> str:
        s = self._memo.get(tok)
        if s is None:
            s = self._memo[tok] = self.tokenizer.decode_bytes([tok]).decode("utf-8", "replace")
        return s

    def bytes(self, tok: int) -> list[int]:
        return list(self.tokenizer.decode_bytes([tok]))


def prompt_offsets(tokenizer, ids: list[int]) -> list[int]:
    """Characters of the decoded prompt before each of its tokens."""
    detok, offsets, n = IncrementalDetokenizer(tokenizer, skip_special_tokens=False), [], 0
    for t in ids:
        offsets.append(n)
        n += len(detok.add(t))
    return offsets


def completion_logprobs(infos: list[TokenInfo], token_text: TokenText, base_offset: int = 0) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for info in infos:
        out["tokens"].append(token_text(info.id))
        out["token_logprobs"].append(info.logprob)
        if info.top is None:  # the prompt's first token: nothing predicts it
            out["top_logprobs"].append(None)
        else:
            top = {token_text(i): lp for i, lp in info.top}
            top.setdefault(token_text(info.id), info.logprob)
            out["top_logprobs"].append(top)
        out["text_offset"].append(base_offset + info.text_offset)
    return out


def chat_logprobs(infos: list[TokenInfo], token_text: TokenText, top_n: int) -> dict:
    content = []
    for info in infos:
        top = [{"token": token_text(i), "logprob": lp, "bytes": token_text.bytes(i)} for i, lp in (info.top or [])[:top_n]]
        content.append({"token": token_text(info.id), "logprob": info.logprob, "bytes": token_text.bytes(info.id),
                        "top_logprobs": top})
    return {"content": content}


class ChoiceState:
    """One choice's text and tokens as they arrive."""

    def __init__(self, index: int):
        self.index = index
        self.text: list[str] = []
        self.tokens: list[TokenInfo] = []
        self.finish_reason = None
        self.stop_reason = None
        self.completion_tokens = 0
