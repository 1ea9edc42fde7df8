"""Text in and out of `gpt2kit generate`: the prompt (argument or standard input, checked to be UTF-8)
and the results (text, or one JSON object with each sequence's new-token count and finish reason).
"""
from __future__ import annotations

import json
import sys

from .errors import InvalidInputError
from .generation import TextStreamer

SEPARATOR = "-" * 40


def read_prompt(argument: str | None) -> str:
    """The prompt: `argument`, or standard input when it is None or "-" (less one trailing newline,
    the one `echo` adds). Text that is not valid UTF-8 is refused with where it goes wrong."""
    if argument is not None and argument != "-":
        check_utf8(argument, "The prompt")
        return argument
    if sys.stdin is None or sys.stdin.isatty():
        raise InvalidInputError("No prompt: give it as an argument (gpt2kit generate \"Once upon a time\") "
                                "or on standard input.")
    raw = getattr(sys.stdin, "buffer", None)
    if raw is not None:  # decode the bytes ourselves: the locale may be ASCII or surrogateescape
        data = raw.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _not_utf8("The prompt on standard input", data, e) from None
    else:  # a text stream someone put in place of stdin
        text = sys.stdin.read()
        check_utf8(text, "The prompt on standard input")
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def check_utf8(text: str, what: str) -> None:
    """Refuse a str holding surrogates: on a command line they stand for bytes that are not UTF-8
    (Python decodes argv with surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            data = text.encode("utf-8", "surrogateescape")  # the bytes as they were given
            data.decode("utf-8")
        except UnicodeEncodeError as e:  # a surrogate that stands for no byte (only a Python caller makes one)
            raise InvalidInputError(f"{what} is not valid Unicode text: a lone surrogate {text[e.start]!r} at "
                                    f"character {e.start}{_after(text[:e.start])}. Give UTF-8 text.") from None
        except UnicodeDecodeError as e:
            raise _not_utf8(what, data, e) from None


def _not_utf8(what: str, data: bytes, e: UnicodeDecodeError) -> InvalidInputError:
    before = data[:e.start].decode("utf-8")  # valid up to the first error
    bad = data[e.start:e.end].hex(" ")
    return InvalidInputError(
        f"{what} is not valid UTF-8: byte {bad} at byte offset {e.start} (character {len(before)}"
        f"{_after(before)}). Give UTF-8 text, e.g. convert it with `iconv -f latin1 -t utf-8`.")


def _after(before: str) -> str:
    if not before:
        return ", at the start"
    tail = before[-20:]
    return f", after {'...' if len(before) > 20 else ''}{tail!r}"


def sequence_results(rows, prompt_length: int, eos_ids, decode) -> list[dict]:
    """Per generated row (prompt + new ids, padded after an end token): the new text, the number of
    new tokens (the end token counted: the model produced it) and why it stopped, as the OpenAI API
    names it: "stop" (an end token) or "length" (max_new_tokens reached)."""
    eos = set() if eos_ids is None else {eos_ids} if isinstance(eos_ids, int) else set(eos_ids)
    results = []
    for row in rows:
        new = row[prompt_length:].tolist()
        end = next((k for k, t in enumerate(new) if t in eos), None)
        kept = new if end is None else new[:end + 1]
        results.append({"text": decode(kept), "new_tokens": len(kept),
                        "finish_reason": "length" if end is None else "stop"})
    return results


def print_json(name: str, prompt: str, prompt_tokens: int, results: list[dict]) -> None:
    print(json.dumps({"model": name, "prompt": prompt, "prompt_tokens": prompt_tokens, "generated": [
        {"generated_text": prompt + r["text"], "continuation": r["text"], "new_tokens": r["new_tokens"],
         "finish_reason": r["finish_reason"]} for r in results]}))


def print_text(prompt: str, results: list[dict]) -> None:
    """Each sequence (prompt + continuation) ends with a newline; a dashed line separates sequences."""
    for i, r in enumerate(results):
        if i:
            print(SEPARATOR)
        text = prompt + r["text"]
        print(text, end="" if text.endswith("\n") else "\n")


class CommandStreamer(TextStreamer):
    """Prints the prompt, then the continuation as it comes (end tokens left out), and by `finish()`
    ends the text with one newline, also when generation stopped on an error or Ctrl-C."""

    def __init__(self, tokenizer, prompt: str):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        print(prompt, end="", flush=True)
        self.printed_newline = prompt.endswith("\n")

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if text:
            print(text, end="", flush=True)
            self.printed_newline = text.endswith("\n")
        if stream_end:
            self.finish()

    def finish(self):
        if not self.printed_newline:
            print(flush=True)
            self.printed_newline = True
