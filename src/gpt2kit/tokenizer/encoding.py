"""BatchEncoding and the sequence plumbing around BPE: truncation, special tokens, padding.

The rules follow Hugging Face transformers (its Rust `tokenizers` backend, which transformers 5 uses
for GPT2Tokenizer), checked case by case in tests/test_tokenizer_api.py. Where transformers ignores a
request silently (max_length below the number of special tokens) this module raises instead.
"""
from __future__ import annotations

import logging
from ..errors import InvalidInputError

logger = logging.getLogger("gpt2kit.tokenizer")

TRUNCATION_STRATEGIES = ("longest_first", "only_first", "only_second", "do_not_truncate")
PADDING_STRATEGIES = ("longest", "max_length", "do_not_pad")
# A model_max_length at or above this means "unset" (transformers' VERY_LARGE_INTEGER is 1e30).
UNSET_MAX_LENGTH = int(1e29)


class BatchEncoding(dict):
    """The tokenizer's output: a dict (input_ids, attention_mask, ...) with attribute access.

    `.to(device)` moves tensor values (after return_tensors="pt") and returns self, so
    `model(**tok(text, return_tensors="pt").to(model.device))` works."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no field {name!r}; it has {list(self)}.") from None

    def __getstate__(self):
        return dict(self)

    def __setstate__(self, state):
        self.update(state)

    @property
    def data(self) -> dict:
        return dict(self)

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> "BatchEncoding":
        for key, value in self.items():
            if hasattr(value, "to") and callable(value.to):
                # ids and masks keep their integer dtype: only floating tensors follow `dtype`
                cast = dtype if dtype is not None and value.is_floating_point() else None
                self[key] = value.to(device=device, dtype=cast, non_blocking=non_blocking)
        return self

    def convert_to_tensors(self, tensor_type) -> "BatchEncoding":
        if tensor_type is None:
            return self
        if tensor_type == "pt":
            import torch

            make = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
        elif tensor_type == "np":
            import numpy as np

            make = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
        else:
            raise InvalidInputError(f"return_tensors={tensor_type!r} is not supported: use 'pt', 'np' or None.")
        for key, value in self.items():
            if value and isinstance(value[0], list):  # batched: every row must have one length
                widths = {len(v) for v in value}
                if len(widths) > 1:
                    raise InvalidInputError(
                        f"Unable to create a tensor: the sequences have different lengths {sorted(widths)}. "
                        "Pass padding=True (and truncation=True) to get batched tensors of one length.")
            self[key] = make(value)
        return self


def resolve_strategies(padding, truncation, max_length, model_max_length, verbose=True):
    """Normalise the padding/truncation arguments as transformers does -> (padding, truncation, max_length)."""
    if padding is True:
        padding = "longest"
    elif padding is False or padding is None:
        padding = "do_not_pad"
    elif padding not in PADDING_STRATEGIES:
        raise InvalidInputError(f"padding={padding!r}: use True/'longest', 'max_length' or False/'do_not_pad'.")
    if truncation is None and max_length is not None and padding == "do_not_pad":
        if verbose:  # transformers does this too: max_length alone turns truncation on, with a warning
            logger.warning("max_length=%s was given without truncation: truncating to it ('longest_first'). "
                           "Pass truncation=True to silence this warning.", max_length)
        truncation = "longest_first"
    if truncation is True:
        truncation = "longest_first"
    elif truncation is False or truncation is None:
        truncation = "do_not_truncate"
    elif truncation not in TRUNCATION_STRATEGIES:
        raise InvalidInputError(f"truncation={truncation!r}: use True/'longest_first', 'only_first', 'only_second' or False.")
    if max_length is None:
        if padding == "max_length" or truncation != "do_not_truncate":
            if model_max_length >= UNSET_MAX_LENGTH:
                if padding == "max_length":
                    raise InvalidInputError("padding='max_length' needs max_length=...: this tokenizer has no model_max_length.")
            else:
                max_length = model_max_length
    elif not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 0:
        raise InvalidInputError(f"max_length must be a non-negative int, got {max_length!r}.")
    if max_length is None:
        truncation = "do_not_truncate"
    return padding, truncation, max_length


def _keep(seq: list, n: int, side: str) -> list:
    if len(seq) <= n:
        return seq
    return seq[len(seq) - n:] if side == "left" else seq[:n]


def truncate(a: list, b: list | None, target: int, strategy: str, side: str):
    """Cut a (and b) to `target` tokens in all -> (a, b). Items may be ids or (id, offset) rows."""
    if strategy == "do_not_truncate":
        return a, b
    total = len(a) + (len(b) if b is not None else 0)
    if total <= target:
        return a, b
    excess = total - target
    if strategy == "only_second" and b is None:
        raise InvalidInputError("truncation='only_second' needs a second sequence (text_pair).")
    if b is None or strategy == "only_first":
        if len(a) <= excess and b is not None:
            raise InvalidInputError(f"Cannot truncate the first sequence ({len(a)} tokens) enough to fit max_length; "
                             "use truncation='longest_first' or a larger max_length.")
        return _keep(a, max(len(a) - excess, 0), side), b
    if strategy == "only_second":
        if len(b) <= excess:
            raise InvalidInputError(f"Cannot truncate the second sequence ({len(b)} tokens) enough to fit max_length; "
                             "use truncation='longest_first' or a larger max_length.")
        return a, _keep(b, len(b) - excess, side)
    # longest_first, as the Rust backend: the shorter sequence (the first on a tie) keeps up to half.
    if len(a) > len(b):
        keep_b = min(len(b), target // 2)
        return _keep(a, target - keep_b, side), _keep(b, keep_b, side)
    keep_a = min(len(a), target // 2)
    return _keep(a, keep_a, side), _keep(b, target - keep_a, side)


def pad_rows(rows: list[dict], length: int, pad_id: int, side: str) -> None:
    """Pad every encoding dict in `rows` in place to `length` tokens."""
    fill = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0, "special_tokens_mask": 1,
            "offset_mapping": (0, 0)}
    for row in rows:
        missing = length - len(row["input_ids"])
        if missing <= 0:
            continue
        for key, value in row.items():
            if key in fill:
                pad = [fill[key]] * missing
                row[key] = pad + value if side == "left" else value + pad
