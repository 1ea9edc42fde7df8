"""Streamers: receive token ids from generate() as they are chosen and turn them into text.

They work on raw bytes (token_bytes) and hand out only whole UTF-8 characters: bytes of a character split
across tokens wait until the character is complete, so no replacement character ever shows mid-stream,
and the pieces join to exactly the text of the whole sequence.
"""
from __future__ import annotations

from queue import Queue

from .stopping import token_bytes
from ..errors import InvalidInputError


def complete_prefix(data: bytes) -> int:
    """Length of the longest prefix of `data` that does not end inside a UTF-8 character."""
    n = len(data)
    for back in range(1, min(4, n) + 1):  # find the last lead byte among the final 4
        b = data[n - back]
        if b & 0xC0 == 0x80:  # a continuation byte: keep looking
            continue
        need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
        return n if back >= need else n - back
    return n  # only continuation bytes: invalid anyway, let the decoder replace them


class BaseStreamer:
    def put(self, value):  # pragma: no cover - interface
        raise NotImplementedError

    def end(self):  # pragma: no cover - interface
        raise NotImplementedError


class TextStreamer(BaseStreamer):
    """Prints text to stdout as tokens arrive (batch size 1). skip_prompt leaves out the prompt;
    decode_kwargs accepts skip_special_tokens."""

    def __init__(self, tokenizer, skip_prompt: bool = False, **decode_kwargs):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.skip_special = bool(decode_kwargs.pop("skip_special_tokens", False))
        self.decode_kwargs = decode_kwargs
        self.special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        self.pending = b""
        self.next_tokens_are_prompt = True

    def put(self, value):
        if value.dim() > 1 and value.shape[0] > 1:
            raise InvalidInputError(f"{type(self).__name__} streams one sequence: generate with batch size 1 "
                             f"(got {value.shape[0]} rows).")
        ids = value.reshape(-1).tolist()
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.next_tokens_are_prompt = False
        if self.skip_special:
            ids = [i for i in ids if i not in self.special]
        self.pending += token_bytes(self.tokenizer, ids) if ids else b""
        cut = complete_prefix(self.pending)
        if cut:
            text, self.pending = self.pending[:cut].decode("utf-8", errors="replace"), self.pending[cut:]
            self.on_finalized_text(text)

    def end(self):
        text = self.pending.decode("utf-8", errors="replace")  # an unfinished character can only be replaced now
        self.pending = b""
        self.next_tokens_are_prompt = True
        self.on_finalized_text(text, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        print(text, flush=True, end="" if not stream_end else None)


class TextIteratorStreamer(TextStreamer):
    """Queues the text so another thread can iterate over it while generate() runs:

        thread = Thread(target=model.generate, kwargs=dict(inputs, streamer=streamer)); thread.start()
        for piece in streamer: ...

    `timeout` (seconds) bounds each wait, raising queue.Empty, so a failed generate cannot hang the reader.
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: Queue = Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if text:
            self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self):
        return self

    def __next__(self):
        value = self.text_queue.get(timeout=self.timeout)
        if value is self.stop_signal:
            raise StopIteration()
        return value
