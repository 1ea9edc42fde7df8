"""Token ids -> text as they arrive, and stop strings matched on that text.

A GPT-2 token is a run of bytes that may end inside a multi-byte UTF-8 character, so text is decoded
incrementally from the tokenizer's raw bytes (`decode_bytes`): an incomplete character waits for the
token that completes it. Stop strings are matched on the decoded text, across token boundaries; text
that could still be the start of a stop string is held back, and nothing past a stop is ever released.
"""
from __future__ import annotations

import codecs


class IncrementalDetokenizer:
    """Feeds token ids, returns the text they complete (never half a character)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self._decoder.decode(self.tokenizer.decode_bytes([token_id], skip_special_tokens=self.skip))

    def flush(self) -> str:
        """What an unfinished character at the very end decodes to (U+FFFD), as decode() gives it."""
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """The text of one completion: `feed` new text, `release` what may be sent now.

    `text` only grows until a stop string is found; then it is cut just before the stop (or just after,
    with include_stop_str_in_output) and `stopped` names the stop string.
    """

    def __init__(self, stops: list[str], include_stop: bool = False):
        self.stops = stops
        self.include_stop = include_stop
        self.longest = max((len(s) for s in stops), default=0)
        self.text = ""
        self.sent = 0  # characters of `text` already released
        self.stopped: str | None = None

    def feed(self, new_text: str) -> None:
        if self.stopped is not None or not new_text:
            return
        start = max(0, len(self.text) - self.longest + 1)  # a stop may begin in the held-back tail
        self.text += new_text
        hit = None
        for s in self.stops:
            i = self.text.find(s, start)
            if i >= 0 and (hit is None or i < hit[0]):
                hit = (i, s)
        if hit is not None:
            i, s = hit
            self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
            self.stopped = s

    def _held(self) -> int:
        """How many trailing characters could be the start of a stop string."""
        if self.stopped is not None or not self.stops:
            return 0
        for k in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def release(self, final: bool = False) -> str:
        """The text that may be sent now (all of it when `final`)."""
        end = len(self.text) if final else len(self.text) - self._held()
        if end <= self.sent:
            return ""
        out = self.text[self.sent:end]
        self.sent = end
        return out
