"""Tokenizer files: finding them (bundled copy, local directory, Hub), reading and writing them.

Layouts read: vocab.json + merges.txt (GPT-2's own), or a Hugging Face tokenizer.json; either with an
optional tokenizer_config.json / special_tokens_map.json / added_tokens.json for settings and added
tokens. Layout written: vocab.json + merges.txt + tokenizer_config.json (added tokens in
`added_tokens_decoder`), which transformers loads with the same results.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from ..errors import InvalidArgumentError, InvalidInputError, MissingFileError, NotSupportedError

ASSETS = Path(__file__).with_name("assets")
VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"
TOKENIZER_FILE, CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"
SPECIAL_MAP_FILE, ADDED_FILE = "special_tokens_map.json", "added_tokens.json"
MODEL_CONFIG_FILE = "config.json"

# Hub names whose tokenizer is exactly the bundled one, with the settings their tokenizer_config sets.
_HUB_ALIASES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")
BUNDLED = {n: 1024 for n in _HUB_ALIASES}
BUNDLED.update({f"openai-community/{n}": 1024 for n in _HUB_ALIASES[:4]})
BUNDLED["distilbert/distilgpt2"] = 1024


@dataclass(frozen=True)
class AddedToken:
    """A token matched in the raw text before BPE (as transformers' AddedToken).

    lstrip / rstrip: the match also swallows the whitespace on that side. `normalized` is kept for
    file compatibility only (GPT-2 has no normalizer)."""

    content: str
    special: bool = False
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool | None = None

    def __post_init__(self):
        if not isinstance(self.content, str) or not self.content:
            raise InvalidArgumentError(f"An added token must be a non-empty string, got {self.content!r}.")
        if self.single_word:
            raise NotSupportedError("AddedToken(single_word=True) is not supported; match it without single_word.")

    def __str__(self):
        return self.content

    def to_json(self, id_: int | None = None) -> dict:
        d = asdict(self)
        d["normalized"] = (not self.special) if self.normalized is None else self.normalized
        return d if id_ is None else {"id": id_, **d}


def as_added_token(token, special: bool) -> AddedToken:
    if isinstance(token, AddedToken):
        return token
    if isinstance(token, str):
        return AddedToken(token, special=special)
    content = getattr(token, "content", None)  # a transformers/tokenizers AddedToken
    if isinstance(content, str):
        return AddedToken(content, special=special or bool(getattr(token, "special", False)),
                          lstrip=bool(getattr(token, "lstrip", False)), rstrip=bool(getattr(token, "rstrip", False)),
                          single_word=bool(getattr(token, "single_word", False)))
    raise InvalidArgumentError(f"Expected a token string or AddedToken, got {type(token).__name__}: {token!r}.")


@dataclass
class TokenizerFiles:
    vocab: dict[str, int]
    merges: list[str]  # "a b" lines in rank order, byte-level spelling
    config: dict  # tokenizer_config.json (+ special_tokens_map.json) settings
    added: list[tuple[int, AddedToken]]


def _read_json(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_merges_file(path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [ln.rstrip("\r\n") for ln in f if ln.strip() and not ln.startswith("#version")]


def read_vocab_merges(vocab_file, merges_file) -> tuple[dict[str, int], list[str]]:
    """Parsed files, cached by path and mtime: tokenizers over the same files then share one parsed
    copy and one BPE engine (see base._engine), so a second load costs nothing."""
    vocab_file, merges_file = os.path.abspath(vocab_file), os.path.abspath(merges_file)
    return _read_cached(vocab_file, merges_file, os.path.getmtime(vocab_file), os.path.getmtime(merges_file))


@lru_cache(maxsize=4)
def _read_cached(vocab_file, merges_file, *_mtimes):
    return _read_json(vocab_file), read_merges_file(merges_file)


def read_tokenizer_json(path) -> tuple[dict[str, int], list[str], list[tuple[int, AddedToken]], dict]:
    data = _read_json(path)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise InvalidInputError(f"{path}: not a byte-level BPE tokenizer.json (model.type is {model.get('type')!r}).")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    added = [(t["id"], AddedToken(t["content"], special=bool(t.get("special")), lstrip=bool(t.get("lstrip")),
                                  rstrip=bool(t.get("rstrip")), normalized=t.get("normalized")))
             for t in data.get("added_tokens") or []]
    settings = {}
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        settings["add_prefix_space"] = bool(pre.get("add_prefix_space", False))
    return model["vocab"], merges, added, settings


def load_files(directory: str, resolve) -> TokenizerFiles:
    """Read a tokenizer from `resolve(filename) -> path | None` (a directory or a Hub repo)."""
    config: dict = {}
    for name in (SPECIAL_MAP_FILE, CONFIG_FILE):
        path = resolve(name)
        if path:
            config.update(_read_json(path))
    added: list[tuple[int, AddedToken]] = []
    vocab_file, merges_file = resolve(VOCAB_FILE), resolve(MERGES_FILE)
    if vocab_file and merges_file:
        vocab, merges = read_vocab_merges(vocab_file, merges_file)
    else:
        tok_json = resolve(TOKENIZER_FILE)
        if not tok_json:
            raise MissingFileError(
                f"No tokenizer files in {directory!r}: expected vocab.json + merges.txt, or tokenizer.json. "
                "Pass a directory written by save_pretrained (gpt2kit or transformers).")
        vocab, merges, added, settings = read_tokenizer_json(tok_json)
        config = {**settings, **config}
    for id_str, spec in (config.pop("added_tokens_decoder", None) or {}).items():
        spec = {k: v for k, v in spec.items() if k in AddedToken.__dataclass_fields__}
        added.append((int(id_str), AddedToken(**spec)))
    added_json = resolve(ADDED_FILE)
    if added_json:
        added += [(i, AddedToken(c)) for c, i in _read_json(added_json).items()]
    return TokenizerFiles(vocab, merges, config, added)


def model_context_length(resolve) -> int | None:
    """n_positions from the config.json beside the tokenizer files (a model directory or repo), if any."""
    path = resolve(MODEL_CONFIG_FILE)
    if not path:
        return None
    try:
        value = _read_json(path).get("n_positions")
    except (OSError, ValueError, AttributeError):
        return None  # not a readable model config: the model loader reports that, not the tokenizer
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def resolve_source(name_or_path, *, cache_dir=None, revision=None, local_files_only=False, token=None, subfolder=""):
    """-> (label, resolve(filename) -> local path or None, default model_max_length or None)."""
    name = os.fspath(name_or_path)
    if not isinstance(name, str):
        raise InvalidArgumentError(f"from_pretrained expects a name or a directory, got {type(name_or_path).__name__}.")
    if not os.path.isdir(name) and name in BUNDLED and revision in (None, "main"):
        # The bundled files are identical to the Hub's for these names: no network, works offline.
        return name, lambda f: _existing(ASSETS / f), BUNDLED[name]
    from gpt2kit.weights.hub import resolve_file

    def resolve(filename):
        return resolve_file(name, filename, cache_dir=cache_dir, revision=revision, local_files_only=local_files_only,
                            token=token, subfolder=subfolder, required=False)

    if not os.path.isdir(name) and not any(resolve(f) for f in (VOCAB_FILE, TOKENIZER_FILE)):
        from gpt2kit.weights.hub import ModelNotFoundError, is_offline

        why = ("offline mode is on (local_files_only / HF_HUB_OFFLINE) and they are not in the local cache"
               if local_files_only or is_offline() else "the Hub repo has none or cannot be reached")
        raise ModelNotFoundError(
            f"Cannot load a tokenizer for {name!r}: no vocab.json + merges.txt or tokenizer.json ({why}). "
            f"Pass a local directory instead (one written by save_pretrained, holding vocab.json + merges.txt "
            f"or tokenizer.json); {', '.join(sorted(BUNDLED))} load offline from the bundled vocabulary.")
    return name, resolve, None


def _existing(path: Path) -> str | None:
    return str(path) if path.is_file() else None


def write_vocabulary(directory, vocab: dict[str, int], merges: list[str], prefix: str | None = None) -> tuple[str, str]:
    os.makedirs(directory, exist_ok=True)
    stem = f"{prefix}-" if prefix else ""
    vocab_path = os.path.join(directory, stem + VOCAB_FILE)
    merges_path = os.path.join(directory, stem + MERGES_FILE)
    from gpt2kit.utils import atomic_write_text  # imported here: gpt2kit.utils imports torch

    atomic_write_text(vocab_path, json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(merges_path, "#version: 0.2\n" + "".join(m + "\n" for m in merges))
    return vocab_path, merges_path


def write_config(directory, config: dict) -> str:
    from gpt2kit.utils import atomic_write_text

    path = os.path.join(directory, CONFIG_FILE)
    atomic_write_text(path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return path
