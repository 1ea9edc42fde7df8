"""Training data: text files -> token ids, tokenized once and cached as a uint16 memory map.

A cache file holds the ids of one byte range of one text file under one vocabulary; its name is a
hash of the three, so a changed file or tokenizer is tokenized afresh and an unchanged one never is.
Batches are drawn in a fixed order derived from a seed, so that the number of samples consumed is the
whole data position: a resumed run, or a run split across N processes, sees exactly the same windows.
"""
from __future__ import annotations

import array
import hashlib
import json
import mmap
import os

import torch

from ..utils import atomic_path
from ..errors import GPT2KitFileError, InvalidInputError, MissingFileError

CACHE_VERSION = 1
EOT_ID = 50256
_CHUNK = 1 << 18  # characters tokenized per progress-bar step


def default_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "gpt2kit", "tokens")


def load_tokenizer(name_or_path=None):
    """The model's tokenizer (a directory or Hub name), or the bundled GPT-2 vocabulary when None."""
    from ..tokenizer import AutoTokenizer

    if name_or_path is None:
        return AutoTokenizer.from_pretrained("gpt2")
    return AutoTokenizer.from_pretrained(name_or_path)


def _tokenizer_fingerprint(tok) -> str:
    vocab = tok.get_vocab()
    h = hashlib.sha256(type(tok).__name__.encode())
    h.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1])[:64] + [len(vocab)]).encode())
    h.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1])[-64:]).encode())
    return h.hexdigest()


def read_text(path: str) -> bytes:
    """A text file's bytes, with errors a person can act on."""
    if not os.path.exists(path):
        raise MissingFileError(f"Text file {path!r} does not exist.")
    if os.path.isdir(path):
        raise GPT2KitFileError(f"{path!r} is a directory; pass text files (or a glob of them).")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise GPT2KitFileError(f"Cannot read text file {path!r}: {e.strerror or e}.") from e
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"{path!r} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8 first.") from None
    return data


def split_point(data: bytes, fraction: float) -> int:
    """Byte offset `fraction` of the way through `data`, moved forward to the next UTF-8 character start."""
    cut = int(len(data) * fraction)
    while cut < len(data) and (data[cut] & 0xC0) == 0x80:
        cut += 1
    return cut


def _pieces(text: str):
    """Split text where GPT-2's pre-tokenizer always splits (a newline right after a non-space), so that
    encoding the pieces one by one gives exactly the ids of encoding the whole."""
    start = 0
    while start < len(text):
        end = min(len(text), start + _CHUNK)
        while end < len(text) and not (text[end] == "\n" and not text[end - 1].isspace()):
            end += 1
        yield text[start:end]
        start = end


def _encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False, split_special_tokens=True)


def tokenize_to_cache(path: str, tok, *, start: int = 0, end: int | None = None, cache_dir: str | None = None,
                      progress: bool = True, data: bytes | None = None) -> str:
    """Tokenize bytes [start, end) of `path` (whose bytes are `data`, when already read) into a uint16 cache
    file, unless cached already; return its path."""
    data = read_text(path) if data is None else data
    end = len(data) if end is None else end
    part = data[start:end]
    if len(tok) > 65536:
        raise InvalidInputError(f"The tokenizer has {len(tok)} tokens; the uint16 cache holds ids below 65536 only.")
    key = hashlib.sha256(part)
    key.update(f"{CACHE_VERSION}:{_tokenizer_fingerprint(tok)}".encode())
    cache_dir = cache_dir or default_cache_dir()
    out = os.path.join(cache_dir, key.hexdigest()[:32] + ".u16")
    if os.path.exists(out):
        return out
    from .progress import progress_bar

    text = part.decode("utf-8")
    ids = array.array("H")
    label = os.path.basename(path) + (f" [{start}:{end}]" if (start, end) != (0, len(data)) else "")
    with progress_bar(len(part), f"tokenizing {label}", "B", progress, unit_scale=True) as bar:  # stays, at 100%
        for piece in _pieces(text):
            ids.extend(_encode(tok, piece))
            bar.update(len(piece.encode("utf-8")))
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            ids.tofile(f)
    with atomic_path(out + ".json") as tmp:
        with open(tmp, "w") as f:
            json.dump({"source": os.path.abspath(path), "bytes": [start, end], "tokens": len(ids)}, f)
    return out


def open_tokens(cache_file: str) -> torch.Tensor:
    """The cached ids as a 1-D uint16 tensor over a copy-on-write memory map (nothing read up front)."""
    size = os.path.getsize(cache_file)
    if size == 0:
        return torch.zeros(0, dtype=torch.uint16)
    with open(cache_file, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return torch.frombuffer(mm, dtype=torch.uint16)


def load_split(paths: list[str], tok, *, part: str, val_fraction: float, cache_dir=None, progress=True) -> torch.Tensor:
    """Token ids of all `paths`, documents separated by <|endoftext|>.

    part="train": the first (1 - val_fraction) of each file by bytes; "val": the rest; "all": everything.
    """
    streams = []
    for path in paths:
        data = read_text(path)
        if part == "all" or val_fraction == 0:
            if part == "val":
                continue
            lo, hi = 0, len(data)
        else:
            cut = split_point(data, 1.0 - val_fraction)
            lo, hi = (0, cut) if part == "train" else (cut, len(data))
        ids = open_tokens(tokenize_to_cache(path, tok, start=lo, end=hi, cache_dir=cache_dir, progress=progress,
                                            data=data))
        if streams:
            streams.append(torch.tensor([EOT_ID], dtype=torch.uint16))
        streams.append(ids)
    if not streams:
        return torch.zeros(0, dtype=torch.uint16)
    return streams[0] if len(streams) == 1 else torch.cat(streams)


class WindowSampler:
    """Training windows of seq_len + 1 tokens, in an order fixed by `seed`.

    Epoch e cuts the stream into windows starting at offset_e + i * seq_len (offset_e in [0, seq_len),
    so window boundaries move between epochs) and visits them in a random permutation; both come
    from a generator seeded with (seed, e). Sample k is therefore a pure function of k: the data
    position of a run is the number of samples it has consumed.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.n_windows = (len(tokens) - 1 - (seq_len - 1)) // seq_len if len(tokens) > seq_len else 0
        if self.n_windows < 1:
            raise InvalidInputError(f"The training text has {len(tokens)} tokens, fewer than one window of "
                             f"seq_len + 1 = {seq_len + 1} tokens (plus room to shift it): use more text or a shorter --seq-len.")
        self._epoch, self._order, self._offset = None, None, 0

    def _epoch_plan(self, epoch: int):
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._offset = int(torch.randint(0, self.seq_len, (1,), generator=g))
            self._order = torch.randperm(self.n_windows, generator=g)
            self._epoch = epoch
        return self._order, self._offset

    def batch(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples first .. first+count-1 as (inputs, targets), each (count, seq_len) int64."""
        rows = []
        for k in range(first, first + count):
            order, offset = self._epoch_plan(k // self.n_windows)
            s = offset + int(order[k % self.n_windows]) * self.seq_len
            rows.append(self.tokens[s: s + self.seq_len + 1].to(torch.int64))
        xy = torch.stack(rows)  # (count, seq_len + 1)
        return xy[:, :-1], xy[:, 1:]
