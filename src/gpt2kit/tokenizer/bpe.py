"""GPT-2 byte-level BPE: the algorithm, in plain Python, plus an optional tiktoken engine.

How GPT-2 turns text into ids:

1. Pre-tokenize: split the text with PATTERN into "words" (a letter run with at most one leading
   space, a digit run, a punctuation run, whitespace). The pieces cover the text exactly.
2. Each word becomes its UTF-8 bytes, and BPE merges adjacent symbols, always the pair with the
   lowest merge rank (the line number in merges.txt), until no ranked pair is left.
3. Each final symbol (a byte string) is a vocabulary entry and so an id.

vocab.json and merges.txt spell bytes as printable characters (`bytes_to_unicode`, so that a space
is "Ġ"); this module maps them back to real bytes once at load time and then works on bytes only,
which spares a per-character translation of every word.

Both engines expose the same three things: `encode_ordinary(text)` (no special-token parsing),
`token_bytes` (id -> bytes) and `bytes_to_id`.
"""
from __future__ import annotations

import re
from heapq import heapify, heappop, heappush
from itertools import chain, islice

import regex
from ..errors import InvalidInputError

# GPT-2's pre-tokenization pattern, as released by OpenAI (and used by tiktoken and transformers).
PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Code points that `regex` releases from 2025.10 on (Unicode 17 and later) count as letters or digits, and that
# tiktoken's and transformers' tokenizers (Unicode 16) take as other symbols: the reference tokenizers split
# "\U0003d000's" as ["\U0003d000'", "s"], so gpt2kit counts them as symbols too. Found by comparing, for every code
# point Python's unicodedata leaves unassigned and `regex` 2026.11.19 calls L or N, gpt2kit's ids with tiktoken's
# (c + "'s", "x" + c, "1" + c); with an older `regex` these are symbols already and the exclusion changes nothing.
_NEWER_THAN_REFERENCE = (
    r"\U00000558\U0000058B-\U0000058C\U0000088F\U00000C5C\U00000CDC\U0000208F\U0000209D-\U0000209F"
    r"\U0000A7CE-\U0000A7CF\U0000A7D2\U0000A7D4\U0000A7DD\U0000A7E2\U0000A7F1\U0000AB6C-\U0000AB6D"
    r"\U000107BB-\U000107BF\U00010940-\U00010959\U00010EC5-\U00010EC7\U00010ED9-\U00010EEE\U00011B0A"
    r"\U00011DB0-\U00011DDB\U00011DE0-\U00011DE9\U00011DF1\U0001246F\U00012475-\U0001247F\U00012550-\U00012686"
    r"\U00016EA0-\U00016EB8\U00016EBB-\U00016ED3\U00016FF2-\U00016FF6\U000187F8-\U000187FF\U00018CD6-\U00018CDA"
    r"\U00018D09-\U00018D20\U00018D80-\U00018DF2\U00018E00-\U00019191\U000191A0-\U000191D2\U0001B123-\U0001B128"
    r"\U0001B168\U0001D6A6\U0001DF1F-\U0001DF24\U0001DF2B-\U0001DF81\U0001DF90-\U0001DF96\U0001DFCD-\U0001DFFF"
    r"\U0001E6C0-\U0001E6DE\U0001E6E0-\U0001E6E2\U0001E6E4-\U0001E6E5\U0001E6E7-\U0001E6ED\U0001E6F0-\U0001E6F4"
    r"\U0001E6FE-\U0001E6FF\U0002B73A-\U0002B73F\U0002B81E\U0002CEA2-\U0002CEAD\U000323B0-\U00033479"
    r"\U0003D000-\U0003FC3F"
)
_X = "[" + _NEWER_THAN_REFERENCE + "]"
# the pattern with those as symbols: 2.5x slower than PATTERN (set operations per character), so it runs only on
# text that may hold one of them, which the stdlib's scan for a coarser set (the few in the BMP, and the two
# astral spans that hold the rest) tells at ~5 ns a character
_SPLIT_NEWER = regex.compile(PATTERN.replace(r"\p{L}+", r"[\p{L}--" + _X + "]+")
                             .replace(r"\p{N}+", r"[\p{N}--" + _X + "]+")
                             .replace(r"[^\s\p{L}\p{N}]+", r"[[^\s\p{L}\p{N}]||" + _X + "]+"), flags=regex.V1)
_PLAIN_SPLIT = regex.compile(PATTERN)
_MAYBE_NEWER = re.compile("[\u0558\u058B\u058C\u088F\u0C5C\u0CDC\u208F\u209D-\u209F\uA7CE\uA7CF\uA7D2\uA7D4\uA7DD\uA7E2"
                          "\uA7F1\uAB6C\uAB6D\U000107BB-\U0001E6FF\U0002B73A-\U0003FC3F]")


def _unicode_split(text: str) -> list[str]:
    return (_SPLIT_NEWER if _MAYBE_NEWER.search(text) else _PLAIN_SPLIT).findall(text)


# The same pattern for pure-ASCII text, where letters are A-Za-z, digits 0-9 and whitespace the six
# ASCII White_Space characters (not \x1c-\x1f, which str.isspace counts). The stdlib `re` runs it
# about twice as fast as `regex` runs the Unicode pattern.
_ASCII_SPLIT = re.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^ \t\n\r\x0b\x0cA-Za-z0-9]+"""
    r"""|[ \t\n\r\x0b\x0c]+(?![^ \t\n\r\x0b\x0c])|[ \t\n\r\x0b\x0c]+""")
_CHUNK = 8192


def split_words(text: str) -> list[str]:
    """Pre-tokenize `text` with PATTERN.

    Mostly-ASCII text is cut into chunks at a newline that follows a printable non-space ASCII
    character; no piece of the pattern crosses such a point (a piece holding a non-space character
    never continues into whitespace), so each chunk can be split on its own, and ASCII chunks take
    the fast pattern."""
    if text.isascii():
        return _ASCII_SPLIT.findall(text)
    n = len(text)
    if n <= _CHUNK:
        return _unicode_split(text)
    words: list[str] = []
    start = 0
    while start < n:
        end = text.find("\n", start + _CHUNK)
        while end > 0 and not ("!" <= text[end - 1] <= "~"):
            end = text.find("\n", end + 1)
        if end < 0:
            end = n
        chunk = text[start:end]
        words += _ASCII_SPLIT.findall(chunk) if chunk.isascii() else _unicode_split(chunk)
        start = end
    return words


_BYTE = [bytes([b]) for b in range(256)]
_INF = float("inf")
# Words longer than this many bytes are merged by merge_heap (measured on this machine: the two tie
# at 2-4 bytes; from 5 bytes on the heap is faster, 2x at 12 bytes, 10x at 128).
LONG_WORD = 4
UNCACHED_WORD = 1024


def merge_heap(parts: list[bytes], rank) -> list[bytes]:
    """Merge `parts` by BPE in O(n log n): repeatedly merge the adjacent pair of lowest
    `rank(left, right)` (None: not mergeable), the leftmost one on a tie, until none is left.

    The idea is the well-known heap-based BPE (e.g. tiktoken's `_byte_pair_merge_large`, Hugging Face
    tokenizers' word merge): the live symbols form a doubly linked list over their start positions;
    a min-heap holds candidate merges keyed rank * n + start (one int compares faster than a tuple),
    and a candidate is stale, and skipped when popped, unless it still equals `pair_rank[start]`,
    the rank of the pair that now starts there. Each merge pushes at most two new candidates.
    Merging the leftmost lowest pair one at a time gives what merging every occurrence of it left to
    right gives (the plain loop in PythonBPE.merge), because a pair that a merge creates ranks after
    the merge that created it."""
    n = len(parts)
    sym = list(parts)
    nxt = list(range(1, n + 1))  # n: no next symbol
    prv = list(range(-1, n - 1))  # -1: no previous symbol
    pair_rank = [rank(sym[i], sym[i + 1]) for i in range(n - 1)] + [None]
    heap = [r * n + i for i, r in enumerate(pair_rank) if r is not None]
    heapify(heap)
    pop, push = heappop, heappush
    while heap:
        r, i = divmod(pop(heap), n)
        if pair_rank[i] != r:
            continue  # stale: the pair starting at i changed (or i was merged away)
        j = nxt[i]
        merged = sym[i] + sym[j]
        sym[i], sym[j] = merged, None
        pair_rank[j] = None
        k = nxt[i] = nxt[j]
        if k < n:
            prv[k] = i
            r = pair_rank[i] = rank(merged, sym[k])
            if r is not None:
                push(heap, r * n + i)
        else:
            pair_rank[i] = None
        p = prv[i]
        if p >= 0:
            r = pair_rank[p] = rank(sym[p], merged)
            if r is not None:
                push(heap, r * n + p)
    return [s for s in sym if s is not None]


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of GPT-2's files: printable Latin-1 bytes stand for
    themselves, the other 68 bytes (controls, space, ...) are shifted to U+0100 and up."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_ENCODER = bytes_to_unicode()
BYTE_DECODER = {c: b for b, c in BYTE_ENCODER.items()}


def token_to_bytes(token: str) -> bytes:
    """A vocabulary string ("Ġworld") -> its bytes (b" world"). KeyError if it is not byte-level."""
    return bytes(BYTE_DECODER[c] for c in token)


def bytes_to_token(data: bytes) -> str:
    return "".join(BYTE_ENCODER[b] for b in data)


class PythonBPE:
    """Byte-level BPE in plain Python with a bounded per-word cache.

    The cache maps a pre-tokenized word (str) to its tuple of ids. When it reaches `cache_size`
    entries the oldest half is dropped (dicts keep insertion order), which keeps memory bounded on
    endless streams while hot words stay.
    """

    cache_size = 1 << 18

    def __init__(self, bytes_to_id: dict[bytes, int], merges: list[tuple[bytes, bytes]]):
        self.bytes_to_id = bytes_to_id
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self._cache: dict[str, tuple[int, ...]] = {}

    def encode_ordinary(self, text: str) -> list[int]:
        words = split_words(text)
        cache = self._cache
        try:  # warm path: every word cached, the whole lookup runs in C
            return list(chain.from_iterable(map(cache.__getitem__, words)))
        except KeyError:
            pass
        out: list[int] = []
        get, bpe = cache.get, self._encode_word
        for w in words:
            ids = get(w)
            out += ids if ids is not None else bpe(w)
        return out

    def _encode_word(self, word: str) -> tuple[int, ...]:
        data = word.encode("utf-8")
        whole = self.bytes_to_id.get(data)
        if whole is not None:  # most words are one token; tiktoken takes the same shortcut
            return self._store(word, (whole,))
        return self._store(word, tuple(map(self.bytes_to_id.__getitem__, self._merge_piece(data))))

    def _merge_piece(self, data: bytes) -> list[bytes]:
        return self.merge(list(map(_BYTE.__getitem__, data)))

    def _store(self, word: str, ids: tuple[int, ...]) -> tuple[int, ...]:
        if len(word) > UNCACHED_WORD:  # a huge word is rarely seen twice: keep the cache small
            return ids
        cache = self._cache
        if len(cache) >= self.cache_size:
            for key in list(islice(cache, len(cache) // 2)):
                del cache[key]
        cache[word] = ids
        return ids

    def merge(self, parts: list[bytes]) -> list[bytes]:
        """Apply ranked merges to a list of byte symbols until none applies.

        Words of up to LONG_WORD symbols take the plain loop, which rescans every pair after each
        merge (O(n) per merge, quadratic in the word, as fast as the heap while n is tiny); longer
        ones the heap merge (the same result in O(n log n): a 1 MB word in seconds, not hours)."""
        ranks_get = self.ranks.get
        if len(parts) > LONG_WORD:
            return merge_heap(parts, lambda a, b: ranks_get((a, b)))
        while len(parts) > 1:
            pairs = list(zip(parts, parts[1:]))
            scores = [ranks_get(p, _INF) for p in pairs]
            best = min(scores)
            if best == _INF:
                break
            first, second = pairs[scores.index(best)]
            merged, out, i, n = first + second, [], 0, len(parts)
            while i < n:  # merge every occurrence of the best pair, left to right
                if i < n - 1 and parts[i] == first and parts[i + 1] == second:
                    out.append(merged)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            parts = out
        return parts

    def clear_cache(self) -> None:
        self._cache.clear()


def replace_surrogates(text: str) -> str:
    """`text` as tiktoken encodes a str that UTF-8 cannot hold: a surrogate pair becomes the
    character it spells, a lone surrogate U+FFFD (tiktoken's core.py does exactly this re-coding)."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def surrogate_spans(text: str, fixed: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Character spans over `fixed` (replace_surrogates(text)) -> the same spans over `text`, where
    each surrogate pair is two characters."""
    if len(fixed) == len(text):
        return spans
    starts, i, n = [], 0, len(text)
    while i < n:  # the start in `text` of each character of `fixed`
        starts.append(i)
        i += 2 if "\ud800" <= text[i] <= "\udbff" and i + 1 < n and "\udc00" <= text[i + 1] <= "\udfff" else 1
    starts.append(n)
    return [(starts[a], starts[b]) for a, b in spans]


def tiktoken_available() -> bool:
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        return False
    return True


class TiktokenBPE(PythonBPE):
    """The same BPE with tiktoken's Rust core merging the cache misses, built offline from the vocabulary.

    Measured on this machine, tiktoken's own pre-tokenizer (a backtracking regex) is slower than
    `split_words` plus the word cache, so only the per-word merge is delegated; `encode_ordinary`
    and the cache are PythonBPE's. tiktoken merges by the rank of the merged bytes; GPT-2's ids are
    exactly those ranks (id = 256 + merge line), so this equals the ranked-merge algorithm; the tests
    hold both against tiktoken's full encoder on several MB of text.
    """

    def __init__(self, bytes_to_id: dict[bytes, int], name: str = "gpt2kit-gpt2"):
        import tiktoken

        super().__init__(bytes_to_id, [])
        self.encoding = tiktoken.Encoding(name, pat_str=PATTERN, mergeable_ranks=bytes_to_id, special_tokens={})
        self._merge_piece = self.encoding._core_bpe.encode_single_piece

    def _encode_word(self, word: str) -> tuple[int, ...]:
        data = word.encode("utf-8")
        whole = self.bytes_to_id.get(data)
        return self._store(word, (whole,) if whole is not None else tuple(self._merge_piece(data)))


def read_merges(lines) -> list[tuple[bytes, bytes]]:
    """merges.txt lines (a "#version" header, then "a b" per line) -> byte pairs in rank order."""
    merges = []
    for line in lines:
        line = line.rstrip("\r\n")
        if not line or line.startswith("#version"):
            continue
        a, sep, b = line.partition(" ")
        if not sep or " " in b:
            raise InvalidInputError(f"Malformed merges line {line!r}: expected two symbols separated by one space.")
        merges.append((token_to_bytes(a), token_to_bytes(b)))
    return merges
