"""The call surface shared by both tokenizer classes: __call__/encode/pad, and files in and out.

These are plain functions bound as methods in base.py, so the class body stays about vocabulary and
BPE. Every keyword is explicit: an unknown one is a TypeError, not silently ignored.
"""
from __future__ import annotations

import inspect
import os

from . import vocab as files
from .encoding import UNSET_MAX_LENGTH, BatchEncoding, pad_rows, resolve_strategies, truncate
from ..errors import InvalidArgumentError, InvalidInputError, NotSupportedError

_PAD_ERROR = ("Asking to pad but the tokenizer does not have a padding token. Set one, e.g. "
              "`tokenizer.pad_token = tokenizer.eos_token`, or add one with "
              "`tokenizer.add_special_tokens({'pad_token': '[PAD]'})`.")


def _is_words(x) -> bool:
    return isinstance(x, (list, tuple)) and all(isinstance(w, str) for w in x)


def _examples(text, text_pair, split_words: bool):
    """-> (batched, firsts, seconds or None). Raises TypeError on shapes it cannot read."""
    bad = TypeError(
        f"Cannot tokenize {type(text).__name__} {text!r:.60}: pass a str, a list of str, (text, text_pair)"
        + (", or with is_split_into_words=True a list of words / a list of such lists." if split_words else "."))
    if split_words:
        if _is_words(text):
            batched, firsts = False, [text]
        elif isinstance(text, (list, tuple)) and all(_is_words(x) for x in text):
            batched, firsts = True, list(text)
        else:
            raise bad
    elif isinstance(text, str):
        batched, firsts = False, [text]
    elif isinstance(text, (list, tuple)) and all(isinstance(x, str) for x in text):
        batched, firsts = True, list(text)
    elif isinstance(text, (list, tuple)) and text_pair is None and all(
            isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(s, str) for s in x) for x in text):
        return True, [x[0] for x in text], [x[1] for x in text]
    else:
        raise bad
    if text_pair is None:
        return batched, firsts, None
    pairs = [text_pair] if not batched else text_pair
    if not isinstance(pairs, (list, tuple)) or len(pairs) != len(firsts):
        raise InvalidInputError(f"text_pair must match text: {len(firsts)} first sequence(s), got {text_pair!r:.60}.")
    for p in pairs:
        if not (_is_words(p) if split_words else isinstance(p, str)):
            raise InvalidArgumentError(f"text_pair items must be {'lists of words' if split_words else 'str'}, got {p!r:.60}.")
    return batched, firsts, list(pairs)


def _encode_seq(tok, seq, split_special, prefix, words: bool, offsets: bool):
    """ids (and offsets) of one sequence: a text, or a list of words each encoded with a space before."""
    if not words:
        return tok._encode_text(seq, split_special, prefix, offsets)
    ids, spans = [], []
    for w in seq:
        out = tok._encode_text(w, split_special, True, offsets)
        if offsets:
            ids += out[0]
            spans += out[1]
        else:
            ids += out
    return (ids, spans) if offsets else ids


def tokenizer_call(self, text=None, text_pair=None, *, add_special_tokens=True, padding=False, truncation=None,
                   max_length=None, stride=0, is_split_into_words=False, pad_to_multiple_of=None,
                   padding_side=None, truncation_side=None, return_tensors=None, return_token_type_ids=None,
                   return_attention_mask=None, return_overflowing_tokens=False, return_special_tokens_mask=False,
                   return_offsets_mapping=False, return_length=False, verbose=True, add_prefix_space=None,
                   split_special_tokens=None) -> BatchEncoding:
    """Tokenize a str, a list of str, pairs, or pre-split words, as transformers' tokenizer call."""
    if text is None:
        raise InvalidArgumentError("Expected text as str, got None: pass a str, a list of str, or (text, text_pair).")
    if stride or return_overflowing_tokens:
        raise NotSupportedError("stride / return_overflowing_tokens are not supported; split long texts yourself.")
    prefix = self.add_prefix_space if add_prefix_space is None else add_prefix_space
    if is_split_into_words and not prefix:
        raise InvalidInputError("is_split_into_words=True needs add_prefix_space=True (on the tokenizer or in the call): "
                         "each word is encoded with a space before it.")
    padding_side = padding_side or self.padding_side
    truncation_side = truncation_side or self.truncation_side
    for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
        if side not in ("left", "right"):
            raise InvalidInputError(f"{name}={side!r}: use 'left' or 'right'.")
    padding, truncation, max_length = resolve_strategies(padding, truncation, max_length, self.model_max_length, verbose)
    if padding != "do_not_pad" and self.pad_token_id is None:
        raise InvalidInputError(_PAD_ERROR)
    batched, firsts, seconds = _examples(text, text_pair, is_split_into_words)
    bos = []
    if add_special_tokens and self.add_bos_token:
        if self.bos_token_id is None:
            raise InvalidInputError("add_bos_token=True but the tokenizer has no bos_token; set one.")
        bos = [self.bos_token_id]
    n_special = len(bos) * (1 if seconds is None else 2)
    if truncation != "do_not_truncate" and max_length < n_special:
        raise InvalidInputError(f"max_length={max_length} leaves no room for the {n_special} special token(s) added.")
    want_mask = return_attention_mask is not False
    if not is_split_into_words and seconds is None and not return_offsets_mapping:
        encoded = [(ids, None) for ids in self._encode_many(firsts, split_special_tokens, prefix)]
    else:
        encoded = [_encode_seq(self, s, split_special_tokens, prefix, is_split_into_words, True) for s in firsts]
    pair_encoded = None if seconds is None else [
        _encode_seq(self, s, split_special_tokens, prefix, is_split_into_words, True) for s in seconds]
    rows = []
    for k, (ids, offs) in enumerate(encoded):
        b_ids, b_offs = pair_encoded[k] if pair_encoded is not None else (None, None)
        if truncation != "do_not_truncate":
            a_keep, b_keep = truncate(list(range(len(ids))), None if b_ids is None else list(range(len(b_ids))),
                                      max_length - n_special, truncation, truncation_side)
            ids = [ids[i] for i in a_keep]
            offs = offs and [offs[i] for i in a_keep]
            if b_ids is not None:
                b_ids, b_offs = [b_ids[i] for i in b_keep], [b_offs[i] for i in b_keep]
        row = {"input_ids": bos + ids + ([] if b_ids is None else bos + b_ids)}
        n_a = len(bos) + len(ids)
        if return_token_type_ids:
            row["token_type_ids"] = [0] * n_a + [1] * (len(row["input_ids"]) - n_a)
        if want_mask:
            row["attention_mask"] = [1] * len(row["input_ids"])
        if return_special_tokens_mask:
            row["special_tokens_mask"] = [1] * len(bos) + [0] * len(ids) + (
                [] if b_ids is None else [1] * len(bos) + [0] * len(b_ids))
        if return_offsets_mapping:
            row["offset_mapping"] = [(0, 0)] * len(bos) + offs + ([] if b_ids is None else [(0, 0)] * len(bos) + b_offs)
        rows.append(row)
    _pad(self, rows, padding, max_length, pad_to_multiple_of, padding_side)
    if return_length:
        for row in rows:
            row["length"] = len(row["input_ids"])
    if batched or return_tensors is not None:
        out = BatchEncoding({key: [row[key] for row in rows] for key in rows[0]} if rows else
                            {"input_ids": [], **({"attention_mask": []} if want_mask else {})})
    else:
        out = BatchEncoding(rows[0])
        if return_length:
            out["length"] = [out["length"]]
    return out.convert_to_tensors(return_tensors)


def _pad(tok, rows, padding, max_length, multiple, side):
    if padding == "do_not_pad" or not rows:
        return
    length = max(len(r["input_ids"]) for r in rows) if padding == "longest" else max_length
    if multiple and length % multiple:
        length += multiple - length % multiple
    pad_rows(rows, length, tok.pad_token_id, side)


def encode(self, text, text_pair=None, add_special_tokens=True, **kwargs):
    """ids of one text (or pair): a list, or a tensor with return_tensors."""
    if text_pair is None and not kwargs and isinstance(text, str):  # the hot path: no dict, no copies
        ids = self._encode_text(text)
        return [self.bos_token_id] + ids if add_special_tokens and self.add_bos_token else ids
    if isinstance(text, (list, tuple)) and not kwargs.get("is_split_into_words"):
        raise InvalidArgumentError("encode takes one text; use tokenizer(list_of_texts) or encode_batch for several.")
    return tokenizer_call(self, text, text_pair, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]


def pad(self, encoded_inputs, padding=True, max_length=None, pad_to_multiple_of=None, padding_side=None,
        return_attention_mask=None, return_tensors=None, verbose=True) -> BatchEncoding:
    """Pad already-encoded inputs (a dict of lists, or a list of dicts) as a data collator needs."""
    if isinstance(encoded_inputs, (list, tuple)):
        rows = [dict(r) for r in encoded_inputs]
    else:
        first = encoded_inputs["input_ids"]
        if first and isinstance(first[0], int):
            rows = [dict(encoded_inputs)]
        else:
            rows = [dict(zip(encoded_inputs, vals)) for vals in zip(*encoded_inputs.values())]
    rows = [{k: (v.tolist() if hasattr(v, "tolist") else list(v)) for k, v in r.items()} for r in rows]
    padding, _, max_length = resolve_strategies(padding, False, max_length, self.model_max_length, verbose)
    if padding != "do_not_pad" and self.pad_token_id is None:
        raise InvalidInputError(_PAD_ERROR)
    for r in rows:
        if return_attention_mask is not False and "attention_mask" not in r:
            r["attention_mask"] = [1] * len(r["input_ids"])
    _pad(self, rows, padding, max_length, pad_to_multiple_of, padding_side or self.padding_side)
    out = BatchEncoding({k: [r[k] for r in rows] for k in rows[0]}) if rows else BatchEncoding(input_ids=[])
    return out.convert_to_tensors(return_tensors)


def clean_up_tokenization(text: str) -> str:
    """Remove the spaces before punctuation and contractions that word-level tokenizers leave."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text


# ---------------------------------------------------------------------------------------- files
def save_vocabulary(self, save_directory, filename_prefix=None) -> tuple[str, str]:
    return files.write_vocabulary(save_directory, self.encoder, self._merges, filename_prefix)


def save_pretrained(self, save_directory, legacy_format=None, filename_prefix=None, push_to_hub=False, **kwargs):
    """Write vocab.json, merges.txt and tokenizer_config.json (settings, special and added tokens)."""
    if push_to_hub or kwargs:
        raise InvalidArgumentError(f"save_pretrained does not support {'push_to_hub' if push_to_hub else sorted(kwargs)}.")
    if os.path.isfile(save_directory):
        raise InvalidInputError(f"{save_directory!r} is a file; save_pretrained needs a directory.")
    paths = save_vocabulary(self, save_directory, filename_prefix)
    config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": self.add_prefix_space,
              "add_bos_token": self.add_bos_token, "errors": self.errors, "model_max_length": self.model_max_length,
              "padding_side": self.padding_side, "truncation_side": self.truncation_side,
              "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
              "split_special_tokens": self.split_special_tokens,
              **{k: v for k, v in self.special_tokens_map.items()},
              "added_tokens_decoder": {str(i): t.to_json() for i, t in sorted(self._added.items())}}
    return (*paths, files.write_config(save_directory, config))


_LOADER_ARGS = ("cache_dir", "revision", "local_files_only", "token", "subfolder")


def from_pretrained(cls, pretrained_model_name_or_path, *init_inputs, cache_dir=None, force_download=False,
                    local_files_only=False, token=None, revision=None, subfolder="", use_auth_token=None,
                    trust_remote_code=False, use_fast=None, **kwargs):
    """Load from a local directory, the bundled vocabulary ("gpt2", "openai-community/gpt2", its
    larger siblings and distilgpt2), or a Hub repo (through huggingface_hub, honouring offline mode)."""
    if init_inputs:
        raise InvalidArgumentError("from_pretrained takes keyword arguments only after the name.")
    params = set(inspect.signature(cls.__init__).parameters) - {"self", "vocab_file", "merges_file", "vocab", "merges"}
    unknown = sorted(set(kwargs) - params)
    if unknown:
        raise InvalidArgumentError(f"Unknown argument(s) {unknown} for {cls.__name__}.from_pretrained; known: {sorted(params)}.")
    label, resolve, default_max = files.resolve_source(
        pretrained_model_name_or_path, cache_dir=cache_dir, revision=revision,
        local_files_only=local_files_only, token=token if token is not None else use_auth_token, subfolder=subfolder)
    loaded = files.load_files(label, resolve)
    config = {k: _content(v) for k, v in loaded.config.items() if k in params}
    if default_max is None and "model_max_length" not in kwargs:
        _fit_to_model(config, files.model_context_length(resolve))
    for key in ("additional_special_tokens", "extra_special_tokens"):
        extra = loaded.config.get(key)
        if isinstance(extra, list) and extra:
            config["additional_special_tokens"] = [_content(t) for t in extra]
    if default_max is not None:
        config.setdefault("model_max_length", default_max)
    config.update(kwargs)
    config.setdefault("name_or_path", os.fspath(pretrained_model_name_or_path))
    return cls(vocab=loaded.vocab, merges=loaded.merges, added_tokens=loaded.added, **config)


def _fit_to_model(config: dict, n_positions: int | None) -> None:
    """A tokenizer that lives beside a model truncates to that model's context: without a
    model_max_length in tokenizer_config.json (or with transformers' "unset" value) it takes
    config.json's n_positions. A model_max_length that is there wins, as in transformers."""
    given = config.get("model_max_length")
    if n_positions is not None and (given is None or given >= UNSET_MAX_LENGTH):
        config["model_max_length"] = n_positions


def _content(value):
    return value.get("content") if isinstance(value, dict) and "content" in value else value
