"""Stopping criteria: each maps (input_ids (B, L), scores) -> a (B,) bool tensor, True where a row is done.

The engine handles max_length and end-of-sequence itself on device (they need no criterion objects in the
hot loop); these classes exist for users' own criteria and for stop strings, which need the tokenizer.
"""
from __future__ import annotations

import torch
from ..errors import InvalidInputError


class StoppingCriteria:
    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:  # pragma: no cover
        raise NotImplementedError


class StoppingCriteriaList(list):
    def __call__(self, input_ids, scores=None, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for criterion in self:
            done = done | criterion(input_ids, scores, **kwargs)
        return done

    @property
    def max_length(self):
        return next((c.max_length for c in self if isinstance(c, MaxLengthCriteria)), None)


class MaxLengthCriteria(StoppingCriteria):
    def __init__(self, max_length: int):
        self.max_length = max_length

    def __call__(self, input_ids, scores=None, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[-1] >= self.max_length, dtype=torch.bool,
                          device=input_ids.device)


class EosTokenCriteria(StoppingCriteria):
    def __init__(self, eos_token_id):
        self.eos_token_id = torch.as_tensor(eos_token_id).reshape(-1)

    def __call__(self, input_ids, scores=None, **kwargs):
        return torch.isin(input_ids[:, -1], self.eos_token_id.to(input_ids.device))


def token_bytes(tokenizer, ids) -> bytes:
    """The raw UTF-8 bytes of `ids`: gpt2kit's tokenizer has decode_bytes; a byte-level BPE tokenizer from
    elsewhere maps its token strings back through byte_decoder; anything else is decoded and re-encoded."""
    ids = [int(i) for i in ids]
    if hasattr(tokenizer, "decode_bytes"):
        return tokenizer.decode_bytes(ids)
    byte_decoder = getattr(tokenizer, "byte_decoder", None)
    if byte_decoder is not None:
        special = set(getattr(tokenizer, "all_special_ids", ()))
        out = bytearray()
        for i, tok in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
            out += tok.encode("utf-8") if i in special or tok is None else bytes(byte_decoder[c] for c in tok)
        return bytes(out)
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False).encode("utf-8")


class StopStringCriteria(StoppingCriteria):
    """Stop a row once its text contains a stop string that overlaps the last token (the reference's rule:
    a stop string counts when the newest token completes it, even if that token runs past its end; one that
    lies wholly in earlier tokens has already been acted on and does not count again).

    Works on the bytes of the last few tokens, so characters split across tokens match correctly.
    """

    def __init__(self, tokenizer, stop_strings):
        if tokenizer is None:
            raise InvalidInputError("stop_strings needs the tokenizer to read the generated text: pass "
                             "generate(..., stop_strings=..., tokenizer=tokenizer).")
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        if not stop_strings or not all(isinstance(s, str) and s for s in stop_strings):
            raise InvalidInputError(f"stop_strings must be a non-empty string or a list of them, got {stop_strings!r}.")
        self.tokenizer = tokenizer
        self.stops = [s.encode("utf-8") for s in stop_strings]
        self.longest = max(len(s) for s in self.stops)

    def __call__(self, input_ids, scores=None, **kwargs):
        rows = input_ids.tolist()
        done = []
        for row in rows:
            last = token_bytes(self.tokenizer, row[-1:])
            tail, n = last, 1
            while len(tail) - len(last) < self.longest - 1 and n < len(row):  # enough text before the last token
                n += 1
                tail = token_bytes(self.tokenizer, row[-n:])
            start_of_last = len(tail) - len(last)
            hit = False
            for stop in self.stops:
                at = tail.find(stop, max(0, start_of_last - len(stop) + 1))
                hit = hit or (at != -1 and at + len(stop) > start_of_last)
            done.append(hit)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
