"""Sequence classification of padded batches (acceptance 4 of issue 4).

A left-padded and a right-padded batch of rows of different lengths give each row the logits it gets
alone, with no pad_token_id in the config (the reference refuses such a batch) and with one.
"""
import pytest
import torch
import transformers

from gpt2kit import GPT2ForSequenceClassification
from model_helpers import TINY, twin

ROWS = [[5, 17, 3, 99, 42, 8, 61], [12, 7], [33, 2, 90, 14]]  # lengths 7, 2, 4
PAD = 0


def batch(rows, side):
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), PAD)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    return ids, mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("pad_token_id", [None, PAD])
def test_padded_rows_match_rows_alone(attn, pad_token_id):
    hf, ours = twin(GPT2ForSequenceClassification, transformers.GPT2ForSequenceClassification, attn=attn,
                    num_labels=3, pad_token_id=pad_token_id)
    alone = torch.cat([ours(torch.tensor([r])).logits for r in ROWS])  # (3, 3)
    ref_alone = torch.cat([hf(torch.tensor([r])).logits for r in ROWS])
    assert torch.allclose(alone, ref_alone, atol=1e-5, rtol=0)  # unpadded: exactly the reference
    worst = {}
    for side in ("left", "right"):
        ids, mask = batch(ROWS, side)
        got = ours(ids, attention_mask=mask).logits
        worst[side] = (got - alone).abs().max().item()
        assert torch.allclose(got, alone, atol=1e-5, rtol=0), (side, worst[side])
    print(f"attn={attn} pad_token_id={pad_token_id} max |batch - alone|: {worst}")


def test_mask_beats_pad_token_inside_text():
    """With pad = eos (GPT-2's usual choice) a real trailing eos is classified, not skipped as padding."""
    _, ours = twin(GPT2ForSequenceClassification, transformers.GPT2ForSequenceClassification, num_labels=2,
                   pad_token_id=TINY["vocab_size"] - 1)
    eos = TINY["vocab_size"] - 1
    rows = [[4, 9, 11, eos], [6, eos]]
    ids, mask = batch(rows, "right")
    ids[mask == 0] = eos
    got = ours(ids, attention_mask=mask).logits
    alone = torch.cat([ours(torch.tensor([r]), attention_mask=torch.ones(1, len(r), dtype=torch.long)).logits
                       for r in rows])
    assert torch.allclose(got, alone, atol=1e-5, rtol=0)
