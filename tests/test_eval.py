"""`gpt2kit eval` against transformers' GPT2LMHeadModel scored by the same sliding-window method."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from gpt2kit.training.eval import windows

from model_helpers import perturb_

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be "
        "on his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families. ") * 6


def reference_sliding_window(model, ids, max_length, stride):
    """The Hugging Face perplexity guide's loop, scoring with per-token sums (exact token counts)."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        input_ids = ids[begin:end][None]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(input_ids).logits.float()
        losses = F.cross_entropy(logits[0, :-1], target[0, 1:], ignore_index=-100, reduction="sum")
        nll += float(losses)
        count += int((target[0, 1:] != -100).sum())
        prev_end = end
        if end == len(ids):
            break
    return nll, count


def make_checkpoint(path, **sizes):
    """A random GPT-2 (perturbed, so no weight is trivial) with the GPT-2 vocabulary, saved with its tokenizer."""
    from gpt2kit import GPT2Config, GPT2LMHeadModel
    from gpt2kit.training.data import load_tokenizer

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**sizes))
    perturb_(model, scale=0.05)
    model.save_pretrained(path)
    load_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), n_layer=2, n_embd=32, n_head=4, n_positions=48)


@pytest.mark.parametrize("stride", [16, 48])
def test_eval_matches_transformers_sliding_window(tmp_path, checkpoint, stride, capsys):
    import transformers

    from gpt2kit.cli import main
    from gpt2kit.training.data import load_tokenizer

    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    assert main(["eval", str(text_file), "--model", checkpoint, "--stride", str(stride), "--batch-size", "3", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)

    hf = transformers.GPT2LMHeadModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor(load_tokenizer().encode(TEXT))
    assert len(ids) > 3 * 48  # several windows
    nll, count = reference_sliding_window(hf, ids, 48, stride)
    assert ours["tokens_scored"] == count
    ref_ppl = math.exp(nll / count)
    assert abs(ours["perplexity"] - ref_ppl) / ref_ppl < 1e-4
    ref_bpb = nll / math.log(2) / len(TEXT.encode())
    assert abs(ours["bits_per_byte"] - ref_bpb) / ref_bpb < 1e-4


def test_windows_score_every_token_once():
    for n, length, stride in [(100, 16, 5), (100, 16, 16), (17, 16, 8), (5, 16, 8)]:
        scored = [p for _, end, first in windows(n, length, stride) for p in range(first, end)]
        if stride < length:
            assert scored == list(range(1, n))
        else:  # windows that share no context: each window's first token has nothing to predict it from
            assert len(scored) == len(set(scored)) and all(0 < p < n for p in scored)
    with pytest.raises(ValueError, match="stride"):
        windows(100, 16, 17)


def test_eval_of_the_held_out_tail(tmp_path, checkpoint, capsys):
    from gpt2kit.cli import main

    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    assert main(["eval", str(text_file), "--model", checkpoint, "--val-fraction", "0.25", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    n = len(TEXT.encode())
    start = int(n * 0.75)  # the split `train --val-fraction 0.25` makes (ASCII text: no character to step over)
    assert result["byte_range"] == [start, n] and result["bytes"] == n - start
