"""Streamers hand out whole UTF-8 characters only: characters split across tokens (an emoji, CJK, accents)
never show as a replacement character mid-stream, and the pieces join to the decoded sequence."""
import threading

import pytest
import torch
import transformers

from gpt2kit import GPT2LMHeadModel, GPT2Tokenizer, TextIteratorStreamer, TextStreamer
from gpt2kit.generation.logits import LogitsProcessor
from gpt2kit.generation.streamers import complete_prefix
from model_helpers import twin

ASSETS = __import__("pathlib").Path(__file__).resolve().parents[1] / "src" / "gpt2kit" / "tokenizer" / "assets"
TEXT = " I 😀 like 日本語, héllo wörld ✓"


@pytest.fixture(scope="module")
def tok():
    return GPT2Tokenizer.from_pretrained(ASSETS)


class Collect(TextStreamer):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.pieces, self.ended = [], False

    def on_finalized_text(self, text, stream_end=False):
        self.pieces.append(text)
        self.ended = self.ended or stream_end


def test_the_text_really_splits_characters_across_tokens(tok):
    ids = tok.encode(TEXT)
    broken = [i for i in ids if complete_prefix(tok.decode_bytes([i])) != len(tok.decode_bytes([i]))]
    assert broken, "the test text must contain a token that ends inside a character"


@pytest.mark.parametrize("skip_prompt", [False, True])
def test_pieces_are_whole_characters_and_join_to_the_text(tok, skip_prompt):
    prompt = tok.encode("Start:")
    ids = tok.encode(TEXT)
    s = Collect(tok, skip_prompt=skip_prompt)
    s.put(torch.tensor([prompt]))
    for i in ids:  # one token at a time, as generate() sends them
        s.put(torch.tensor([i]))
    s.end()
    assert s.ended
    assert all("\ufffd" not in p for p in s.pieces), s.pieces
    expected = tok.decode(ids) if skip_prompt else tok.decode(prompt + ids)
    assert "".join(s.pieces) == expected
    # bytes wait only while a character is incomplete: the emoji arrives in one piece
    assert "😀" in s.pieces or any("😀" in p and len(p) <= 3 for p in s.pieces)


def test_skip_special_tokens_and_batch_check(tok):
    s = Collect(tok, skip_special_tokens=True)
    s.put(torch.tensor([tok.encode("a")]))
    s.put(torch.tensor([tok.eos_token_id]))
    s.end()
    assert "".join(s.pieces) == "a"
    with pytest.raises(ValueError, match="batch size 1"):
        Collect(tok).put(torch.ones(2, 3, dtype=torch.long))


class Script(LogitsProcessor):
    """Forces generate() to emit a given sequence of ids (the model is random; the stream is what we test)."""

    def __init__(self, ids, prompt_len):
        self.ids, self.prompt_len = ids, prompt_len

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_len
        out = torch.full_like(scores, -float("inf"))
        out[:, self.ids[step]] = 0.0
        return out


@pytest.fixture(scope="module")
def model():
    return twin(GPT2LMHeadModel, transformers.GPT2LMHeadModel, attn="sdpa", vocab_size=50257, n_positions=64)[1]


def test_text_streamer_prints_during_generate(tok, model, capsys):
    prompt = torch.tensor([tok.encode("Emoji:")])
    ids = tok.encode(TEXT)
    out = model.generate(prompt, max_new_tokens=len(ids), streamer=TextStreamer(tok, skip_prompt=True),
                         logits_processor=[Script(ids, prompt.shape[1])], pad_token_id=0)
    assert out[0, prompt.shape[1]:].tolist() == ids
    printed = capsys.readouterr().out
    assert printed == TEXT + "\n"


def test_iterator_streamer_in_another_thread(tok, model):
    prompt = torch.tensor([tok.encode("Emoji:")])
    ids = tok.encode(TEXT)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=60)
    kwargs = dict(input_ids=prompt, max_new_tokens=len(ids), streamer=streamer, pad_token_id=0,
                  logits_processor=[Script(ids, prompt.shape[1])])
    thread = threading.Thread(target=model.generate, kwargs=kwargs)
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert len(pieces) > 3 and all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == TEXT
