"""GPT2Tokenizer: vocabulary, special and added tokens, text <-> ids, files.

The call surface (`__call__`: batches, pairs, padding, truncation) lives in call.py; the BPE itself
in bpe.py. Text is encoded as: split out added tokens (special ones too, unless
split_special_tokens), then run plain BPE on each piece in between.
"""
from __future__ import annotations

import os
from operator import itemgetter

import regex

from . import bpe, call, vocab as files
from .vocab import AddedToken, as_added_token
from ..errors import InvalidInputError, InvalidArgumentError

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
EOT = "<|endoftext|>"


_ENGINES: dict = {}


def _engine(kind: str, vocab: dict, merges: list, specials: frozenset):
    """Engines are immutable apart from the word cache, so tokenizers over the same (cached) file
    contents share one: building one costs ~0.3 s."""
    key = (kind, id(vocab), id(merges), specials)
    hit = _ENGINES.get(key)
    if hit is not None and hit[0] is vocab and hit[1] is merges:
        return hit[2]
    to_id = {bpe.token_to_bytes(t): i for t, i in vocab.items() if t not in specials}
    engine = bpe.TiktokenBPE(to_id) if kind == "tiktoken" else bpe.PythonBPE(to_id, bpe.read_merges(merges))
    if len(_ENGINES) >= 8:
        _ENGINES.clear()
    _ENGINES[key] = (vocab, merges, engine)
    return engine


class GPT2Tokenizer:
    """GPT-2 byte-level BPE tokenizer in plain Python (see the reference page for the arguments).

    Without vocab_file/merges_file (or vocab/merges) it uses the bundled GPT-2 vocabulary.
    Beyond the reference: `split_special_tokens=True` treats "<|endoftext|>" written in the text as
    plain text, and `decode_bytes(ids)` returns the raw bytes of tokens (for streaming decoders that
    must wait for a complete UTF-8 character).
    """

    engine_kind = "python"
    model_input_names = ["input_ids", "attention_mask"]
    vocab_files_names = {"vocab_file": files.VOCAB_FILE, "merges_file": files.MERGES_FILE}

    def __init__(self, vocab_file=None, merges_file=None, errors="replace", unk_token=EOT, bos_token=EOT,
                 eos_token=EOT, pad_token=None, add_prefix_space=False, add_bos_token=False, vocab=None, merges=None,
                 *, cls_token=None, sep_token=None, mask_token=None, additional_special_tokens=None,
                 model_max_length=None, padding_side="right", truncation_side="right", split_special_tokens=False,
                 clean_up_tokenization_spaces=False, name_or_path="", added_tokens=()):
        if vocab is None and merges is None:
            vocab_file = os.fspath(vocab_file or files.ASSETS / files.VOCAB_FILE)
            merges_file = os.fspath(merges_file or files.ASSETS / files.MERGES_FILE)
            vocab, merges = files.read_vocab_merges(vocab_file, merges_file)
        elif vocab is None or merges is None:
            raise InvalidArgumentError("Pass both vocab and merges (or vocab_file and merges_file).")
        if isinstance(vocab, str):
            vocab = files._read_json(vocab)
        if isinstance(merges, str):
            merges = files.read_merges_file(merges)
        self.encoder: dict[str, int] = vocab
        self._merges = merges if all(isinstance(m, str) for m in merges) else [
            m if isinstance(m, str) else " ".join(m) for m in merges]
        self.errors = errors
        self.add_prefix_space, self.add_bos_token = bool(add_prefix_space), bool(add_bos_token)
        self.split_special_tokens = bool(split_special_tokens)
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.model_max_length = int(1e30) if model_max_length is None else int(model_max_length)
        self.padding_side, self.truncation_side = padding_side, truncation_side
        self.name_or_path = os.fspath(name_or_path)
        self._id_to_token = {i: t for t, i in vocab.items()}
        self._added: dict[int, AddedToken] = {}
        self._added_ids: dict[str, int] = {}
        self._special: dict[str, str | None] = dict.fromkeys(SPECIAL_NAMES)
        self._extra_special: list[str] = []
        for id_, tok in added_tokens:
            self._register(as_added_token(tok, False), id_)
        given = dict(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
                     cls_token=cls_token, sep_token=sep_token, mask_token=mask_token)
        self.add_special_tokens({k: v for k, v in given.items() if v is not None})
        if additional_special_tokens:
            self.add_special_tokens({"additional_special_tokens": list(additional_special_tokens)})
        self._build()

    # ------------------------------------------------------------------ vocabulary and added tokens
    def _register(self, token: AddedToken, id_: int | None = None) -> bool:
        """Make `token` an added token; True if it was not one yet (as transformers counts, even when
        the string is already in vocab.json: it is then matched before BPE under its existing id)."""
        if id_ is None:
            id_ = self._token_id(token.content)
            id_ = len(self) if id_ is None else id_
        new = token.content not in self._added_ids
        self._added[id_] = token
        self._added_ids[token.content] = id_
        self._id_to_token[id_] = token.content
        return new

    def _token_id(self, token: str) -> int | None:
        id_ = self._added_ids.get(token)
        return self.encoder.get(token) if id_ is None else id_

    def _build(self) -> None:
        """Recompute what depends on the added tokens: engine, splitters, id -> bytes table."""
        # special tokens inside vocab.json (<|endoftext|>) are never produced by BPE
        specials = frozenset(t.content for t in self._added.values() if t.special and t.content in self.encoder)
        self._engine = _engine(self.engine_kind, self.encoder, self._merges, specials | {EOT})
        self._special_ids = frozenset(i for i, t in self._added.items() if t.special)
        size = max(max(self._id_to_token) + 1, len(self.encoder))
        table: list = [None] * size
        for t, i in self.encoder.items():
            table[i] = bpe.token_to_bytes(t) if all(c in bpe.BYTE_DECODER for c in t) else t.encode()
        for i, t in self._added.items():
            if i >= len(self.encoder) or table[i] is None:
                table[i] = t.content.encode("utf-8")
        self._id_bytes = table
        self._holes = frozenset(i for i, b in enumerate(table) if b is None)  # a sparse vocabulary's gaps
        self._splitters = {flag: self._splitter(flag) for flag in (False, True)}

    def _splitter(self, split_special: bool):
        tokens = sorted(((t, i) for i, t in self._added.items() if not (split_special and t.special)),
                        key=lambda ti: -len(ti[0].content))
        if not tokens:
            return None
        ws = r"\s*"  # lstrip / rstrip: the match swallows the whitespace on that side
        parts = [f"(?P<t{i}>{ws if t.lstrip else ''}{regex.escape(t.content)}{ws if t.rstrip else ''})"
                 for t, i in tokens]
        quick = [t.content for t, _ in tokens] if len(tokens) <= 8 else None
        return regex.compile("|".join(parts)), quick

    def __len__(self) -> int:
        return len(self._id_to_token)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def get_vocab(self) -> dict[str, int]:
        return {t: i for i, t in self._id_to_token.items()}

    def add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        if isinstance(new_tokens, (str, AddedToken)) or hasattr(new_tokens, "content"):
            new_tokens = [new_tokens]
        count = sum(self._register(as_added_token(t, special_tokens)) for t in new_tokens)
        self._build()
        return count

    def add_special_tokens(self, special_tokens_dict: dict, replace_additional_special_tokens: bool = True) -> int:
        count = 0
        for key, value in special_tokens_dict.items():
            if key == "additional_special_tokens":
                toks = [as_added_token(v, True) for v in value]
                count += sum(self._register(t) for t in toks)
                names = [t.content for t in toks]
                self._extra_special = names if replace_additional_special_tokens else self._extra_special + names
            elif key in SPECIAL_NAMES:
                if value is None:
                    self._special[key] = None
                    continue
                tok = as_added_token(value, True)
                count += self._register(AddedToken(tok.content, True, tok.lstrip, tok.rstrip))
                self._special[key] = tok.content
            else:
                raise InvalidInputError(f"Unknown special token name {key!r}: use one of {SPECIAL_NAMES} "
                                 "or 'additional_special_tokens'.")
        if hasattr(self, "_engine"):
            self._build()
        return count

    @property
    def all_special_tokens(self) -> list[str]:
        out = [v for v in self._special.values() if v is not None] + self._extra_special
        return list(dict.fromkeys(out))

    @property
    def all_special_ids(self) -> list[int]:
        return [self._token_id(t) for t in self.all_special_tokens]

    @property
    def special_tokens_map(self) -> dict:
        out = {k: v for k, v in self._special.items() if v is not None}
        if self._extra_special:
            out["additional_special_tokens"] = list(self._extra_special)
        return out

    @property
    def additional_special_tokens(self) -> list[str]:
        return list(self._extra_special)

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return dict(sorted(self._added.items()))

    # ------------------------------------------------------------------ text -> ids
    def _encode_text(self, text: str, split_special: bool | None = None, prefix: bool | None = None,
                     offsets: bool = False):
        """Plain ids of one text (no bos), or (ids, offsets) when `offsets`.

        A str holding surrogates (not encodable as UTF-8) is encoded as tiktoken encodes it: a
        surrogate pair as the character it spells, a lone surrogate as U+FFFD. The UTF-8 encode of
        each word finds them, so text without surrogates pays nothing for this."""
        if not isinstance(text, str):
            raise InvalidArgumentError(f"Expected text as str, got {type(text).__name__}: {text!r:.80}. "
                            "Pass a str, a list of str, or (text, text_pair).")
        try:
            return self._encode_valid(text, split_special, prefix, offsets)
        except UnicodeEncodeError:
            fixed = bpe.replace_surrogates(text)
            out = self._encode_valid(fixed, split_special, prefix, offsets)
            return (out[0], bpe.surrogate_spans(text, fixed, out[1])) if offsets else out

    def _encode_valid(self, text: str, split_special, prefix, offsets):
        split_special = self.split_special_tokens if split_special is None else split_special
        prefix = self.add_prefix_space if prefix is None else prefix
        splitter = self._splitters[bool(split_special)]
        if splitter is not None and (splitter[1] is None or any(c in text for c in splitter[1])):
            pieces = self._split_added(text, splitter[0])
        elif not offsets and not prefix:
            return self._engine.encode_ordinary(text)
        else:
            pieces = [(0, len(text), None)]
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        for start, end, token_id in pieces:
            if token_id is not None:
                ids.append(token_id)
                spans.append((start, end))
                continue
            seg = text[start:end]
            if not seg:  # an empty text gets no prefix space either
                continue
            shifted = prefix and not seg.startswith(" ")
            seg_ids = self._engine.encode_ordinary(" " + seg if shifted else seg)
            ids += seg_ids
            if offsets:
                spans += self._offsets(seg, seg_ids, start, shifted)
        return (ids, spans) if offsets else ids

    @staticmethod
    def _split_added(text: str, pattern) -> list[tuple[int, int, int | None]]:
        pieces, pos = [], 0
        for m in pattern.finditer(text):
            if m.start() > pos:
                pieces.append((pos, m.start(), None))
            pieces.append((m.start(), m.end(), int(m.lastgroup[1:])))
            pos = m.end()
        if pos < len(text):
            pieces.append((pos, len(text), None))
        return pieces

    def _offsets(self, seg: str, ids: list[int], base: int, shifted: bool) -> list[tuple[int, int]]:
        """Character spans of the tokens of `seg` (which starts at `base` in the text). A token that
        holds part of a multi-byte character spans the whole character, as in transformers."""
        char_of = [i for i, ch in enumerate(seg) for _ in range(len(ch.encode("utf-8")))]
        if shifted:  # the inserted space belongs to the first character
            char_of = [0] + char_of
        out, pos, table = [], 0, self._id_bytes
        for i in ids:
            n = len(table[i])
            out.append((base + char_of[pos], base + char_of[pos + n - 1] + 1))
            pos += n
        return out

    def tokenize(self, text: str, **kwargs) -> list[str]:
        return self.convert_ids_to_tokens(self.encode(text, add_special_tokens=False, **kwargs))

    def convert_tokens_to_ids(self, tokens):
        """Token string(s) -> id(s); an unknown token gives unk_token_id, as the reference documents."""
        if isinstance(tokens, str):
            id_ = self._token_id(tokens)
            return self.unk_token_id if id_ is None else id_
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        if isinstance(ids, int) or (hasattr(ids, "ndim") and ids.ndim == 0):
            return self.convert_ids_to_tokens([int(ids)])[0]
        ids = self._check_ids(ids)
        return [self._id_to_token[i] for i in ids if not (skip_special_tokens and i in self._special_ids)]

    # ------------------------------------------------------------------ ids -> text
    def _check_ids(self, ids) -> list[int]:
        if hasattr(ids, "tolist"):  # torch / numpy
            if getattr(ids, "ndim", 1) > 1:
                raise InvalidInputError(f"Expected a 1-D sequence of ids, got shape {tuple(ids.shape)}; use batch_decode.")
            ids = ids.tolist()
        elif isinstance(ids, int):
            ids = [ids]
        elif not isinstance(ids, list):
            ids = list(ids)
        try:
            low, high = min(ids, default=0), max(ids, default=0)
        except TypeError:
            raise InvalidArgumentError(f"Token ids must be ints, got {ids!r:.80}.") from None
        if low < 0 or high >= len(self._id_bytes) or (self._holes and not self._holes.isdisjoint(ids)):
            bad = next(i for i in ids if not 0 <= i < len(self._id_bytes) or self._id_bytes[i] is None)
            raise InvalidInputError(f"Token id {bad} is outside the vocabulary (0..{len(self._id_bytes) - 1}).")
        return ids

    def decode_bytes(self, token_ids, skip_special_tokens: bool = False) -> bytes:
        """The raw bytes of `token_ids`, without UTF-8 decoding. A token may end inside a multi-byte
        character; streaming code should decode only complete characters."""
        ids = self._check_ids(token_ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        if len(ids) < 2:
            return self._id_bytes[ids[0]] if ids else b""
        return b"".join(itemgetter(*ids)(self._id_bytes))  # one C call fetches every token's bytes

    def decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None,
               errors: str | None = None) -> str:
        text = self.decode_bytes(token_ids, skip_special_tokens).decode("utf-8", errors or self.errors)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return call.clean_up_tokenization(text) if clean else text

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(seq, **kwargs) for seq in sequences]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        added = {t.content for t in self._added.values()}
        parts = [t.encode() if t in added else bytes(bpe.BYTE_DECODER.get(c, ord(c) & 0xFF) for c in t)
                 if all(c in bpe.BYTE_DECODER for c in t) else t.encode() for t in tokens]
        return b"".join(parts).decode("utf-8", self.errors)

    # ------------------------------------------------------------------ call surface (call.py)
    __call__ = call.tokenizer_call
    encode = call.encode
    encode_plus = call.tokenizer_call
    batch_encode_plus = call.tokenizer_call
    pad = call.pad

    def _encode_many(self, texts: list[str], split_special, prefix) -> list[list[int]]:
        return [self._encode_text(t, split_special, prefix) for t in texts]

    # ------------------------------------------------------------------ files
    save_pretrained = call.save_pretrained
    save_vocabulary = call.save_vocabulary
    from_pretrained = classmethod(call.from_pretrained)

    def __repr__(self):
        return (f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"model_max_length={self.model_max_length}, padding_side={self.padding_side!r}, "
                f"special_tokens={self.special_tokens_map})")


def _special_property(name: str):
    def get(self):
        return self._special[name]

    def set_(self, value):
        if value is not None:
            value = as_added_token(value, True).content
            if self._token_id(value) is None:
                raise InvalidInputError(f"{value!r} is not in the vocabulary; add it with "
                                 f"tokenizer.add_special_tokens({{{name!r}: {value!r}}}).")
        self._special[name] = value

    def get_id(self):
        token = self._special[name]
        return None if token is None else self._token_id(token)

    def set_id(self, value):
        set_(self, None if value is None else self.convert_ids_to_tokens(int(value)))

    return property(get, set_), property(get_id, set_id)


for _name in SPECIAL_NAMES:
    _tok, _id = _special_property(_name)
    setattr(GPT2Tokenizer, _name, _tok)
    setattr(GPT2Tokenizer, _name + "_id", _id)
