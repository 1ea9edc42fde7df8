"""Acceptance point 2: incremental decoding through DynamicCache and StaticCache matches one full forward,
and a left-padded batch matches each row run alone (prefill and the decode steps after it)."""
import pytest
import torch
import transformers
from model_helpers import TINY, twin

from gpt2kit import DynamicCache, GPT2LMHeadModel, StaticCache

TOL = 1e-5


def model(attn, **cfg):
    return twin(GPT2LMHeadModel, transformers.GPT2LMHeadModel, attn=attn, **cfg)[1]


def ids(B=2, T=10, seed=0):
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def make_cache(kind, m, B):
    if kind == "dynamic":
        return DynamicCache(m.config)
    return StaticCache(m.config, max_batch_size=B, max_cache_len=32, fixed_shape=(kind == "static-fixed"))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["dynamic", "static", "static-fixed"])
def test_token_by_token_equals_full_forward(kind, attn):
    m = model(attn, scale_attn_by_inverse_layer_idx=True)
    x = ids()
    with torch.no_grad():
        full = m(x, use_cache=False).logits
        cache = make_cache(kind, m, x.shape[0])
        prefill = m(x[:, :3], past_key_values=cache)  # a few tokens at once, then one at a time
        assert prefill.past_key_values is cache and cache.get_seq_length() == 3
        steps = [prefill.logits]
        for t in range(3, x.shape[1]):
            out = m(x[:, t:t + 1], past_key_values=cache)
            steps.append(out.logits)
        assert cache.get_seq_length() == x.shape[1]
    diff = (torch.cat(steps, dim=1) - full).abs().max().item()
    print(f"{kind}/{attn}: incremental vs full max |diff| {diff:.2e}")
    assert diff <= TOL


def test_legacy_tuple_cache_and_cache_kwarg():
    m = model("sdpa")
    x = ids()
    with torch.no_grad():
        full = m(x).logits
        first = m(x[:, :6])
        legacy = first.past_key_values.to_legacy_cache()
        assert len(legacy) == m.config.n_layer and legacy[0][0].shape == (2, TINY["n_head"], 6, TINY["n_embd"] // TINY["n_head"])
        rest = m(x[:, 6:], past_key_values=legacy).logits
        rest2 = m(x[:, 6:], cache=DynamicCache.from_legacy_cache(legacy)).logits
    assert (torch.cat([first.logits, rest], 1) - full).abs().max() <= TOL
    assert torch.equal(rest, rest2)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padded_batch_matches_rows_alone(attn):
    m = model(attn)
    rows = [ids(1, 9, seed=1)[0], ids(1, 5, seed=2)[0], ids(1, 7, seed=3)[0]]
    T, pad = max(len(r) for r in rows), 0
    batch = torch.full((len(rows), T), pad)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, T - len(r):], mask[i, T - len(r):] = r, 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    nxt = ids(len(rows), 3, seed=4)  # three decode steps after the padded prefill
    with torch.no_grad():
        out = m(batch, attention_mask=mask, position_ids=position_ids)
        cache, am, pos, steps = out.past_key_values, mask, position_ids[:, -1:], []
        for t in range(nxt.shape[1]):
            am, pos = torch.cat([am, torch.ones(len(rows), 1, dtype=am.dtype)], 1), pos + 1
            step = m(nxt[:, t:t + 1], past_key_values=cache, attention_mask=am, position_ids=pos)
            cache = step.past_key_values
            steps.append(step.logits)
        for i, r in enumerate(rows):
            alone = m(torch.cat([r, nxt[i]])[None]).logits[0]
            got = torch.cat([out.logits[i, T - len(r):]] + [s[i] for s in steps])
            diff = (got - alone).abs().max().item()
            assert diff <= TOL, f"row {i}: max |diff| {diff:.3g}"


def test_positions_past_n_positions_raise_before_indexing():
    m = model("sdpa")
    n = TINY["n_positions"]
    with torch.no_grad():
        with pytest.raises(ValueError, match="n_positions"):
            m(ids(1, n + 1))
        cache = DynamicCache(m.config)
        m(ids(1, n - 1), past_key_values=cache)
        with pytest.raises(ValueError, match=f"{n + 1} tokens long"):
            m(ids(1, 2), past_key_values=cache)
        assert cache.get_seq_length() == n - 1  # nothing was written by the refused call
        with pytest.raises(ValueError, match="position_ids"):
            m(ids(1, 2), position_ids=torch.tensor([[0, n]]))


def test_static_cache_overflow_and_batch_errors():
    m = model("sdpa")
    cache = StaticCache(m.config, max_batch_size=2, max_cache_len=8)
    with torch.no_grad():
        with pytest.raises(ValueError, match="batch size 2"):
            m(ids(1, 3), past_key_values=StaticCache(m.config, max_batch_size=2, max_cache_len=8))
        m(ids(2, 6), past_key_values=cache)
        with pytest.raises(ValueError, match="StaticCache is full"):
            m(ids(2, 3), past_key_values=cache)


def test_dynamic_cache_reorder_crop_and_dtype_follow_the_model():
    m = model("sdpa")
    x = ids(3, 6)
    with torch.no_grad():
        cache = m(x).past_key_values
        cache.reorder_cache(torch.tensor([2, 0, 1]))
        nxt = m(x[[2, 0, 1], -1:] * 0 + 5, past_key_values=cache).logits
        ref = m(torch.cat([x[[2, 0, 1]], torch.full((3, 1), 5)], 1)).logits[:, -1:]
        assert (nxt - ref).abs().max() <= TOL
        cache.crop(4)
        assert cache.get_seq_length() == 4
        xr = x[[2, 0, 1]]
        again = m(xr[:, 4:5], past_key_values=cache).logits  # the cropped, reordered cache continues cleanly
        assert (again - m(xr[:, :5]).logits[:, -1:]).abs().max() <= TOL
