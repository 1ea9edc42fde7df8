"""A decode step's attention in gpt2kit's kernel (native/attention.c, StaticCache.decode_attention): the new
keys and values written into each row's slot and its one query attended over them, against SDPA over each
row's own keys, and the model's decode steps through it against the plain forward."""
import pytest
import torch
import torch.nn.functional as F

from gpt2kit import GPT2Config, GPT2LMHeadModel, StaticCache, native
from gpt2kit.model.layers import decode_attention_runs

needs_kernel = pytest.mark.skipif(native.library() is None,
                                  reason="neither AVX2 nor AVX-512, or no C compiler: the kernel is not built")
pytestmark = pytest.mark.usefixtures("native_build")  # each build this CPU runs (conftest.py)


def reference(q, k, v, scaling):  # SDPA in float64 for one row: q (H, 1, D), k/v (H, n, D)
    return F.scaled_dot_product_attention(q[None].double(), k[None].double(), v[None].double(), scale=scaling)[0]


def filled_cache(dtype, slots, H, D, L, lengths, g):
    cache = StaticCache(num_layers=1, num_heads=H, head_dim=D, max_batch_size=slots, max_cache_len=L, dtype=dtype)
    for buf in (cache.key_cache[0], cache.value_cache[0]):
        buf.copy_(torch.randn(buf.shape, generator=g).to(dtype))
    cache.set_lengths(lengths)
    return cache


@needs_kernel
@pytest.mark.parametrize("D", [16, 64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_writes_the_new_keys_and_attends_over_each_rows_own(D, dtype):
    g = torch.Generator().manual_seed(D)
    H, L = 3, 80
    lengths = [0, 69, 16, 15, 40, 32, 7]  # empty (its first key), the longest but one, off the 16-wide vectors
    cache = filled_cache(dtype, 7, H, D, L, lengths, g)
    before_k, before_v = cache.key_cache[0].clone(), cache.value_cache[0].clone()
    rows = torch.tensor([1, 4, 0, 3, 6])  # scattered slots; 2 and 5 are not in the step
    plan = cache.plan(1, rows)
    qkv = torch.randn(5, 3 * H * D, generator=g).to(dtype)
    assert decode_attention_runs(qkv, cache, plan, 0.0, False)
    got = cache.decode_attention(0, qkv, plan, 0.3)  # (B, C)
    assert got.shape == (5, H * D) and got.dtype == dtype
    q, k_new, v_new = qkv.view(5, 3, H, D).unbind(1)  # (B, H, D) each
    kb, vb = cache.key_cache[0], cache.value_cache[0]
    for b, slot in enumerate(rows.tolist()):
        n = lengths[slot]
        assert torch.equal(kb[slot, :, n], k_new[b]) and torch.equal(vb[slot, :, n], v_new[b])  # written
        want = reference(q[b][:, None], kb[slot, :, :n + 1], vb[slot, :, :n + 1], 0.3)  # (H, 1, D)
        tol = 2e-6 if dtype == torch.float32 else 2 ** -8 * want.abs().max().item()  # float32; one bf16 rounding
        assert (got[b].view(H, D).double() - want[:, 0]).abs().max().item() <= tol, b
    written = torch.zeros(7, L, dtype=torch.bool)
    for b, slot in enumerate(rows.tolist()):
        written[slot, lengths[slot]] = True
    for buf, old in ((kb, before_k), (vb, before_v)):  # nothing else moved
        assert torch.equal(buf.permute(0, 2, 1, 3)[~written], old.permute(0, 2, 1, 3)[~written])


@needs_kernel
def test_a_nan_score_stays_nan_as_under_sdpa():
    g = torch.Generator().manual_seed(0)
    cache = filled_cache(torch.float32, 2, 2, 64, 16, [8, 8], g)
    cache.key_cache[0][1, 0, 3, 5] = float("nan")  # one key of row 1, head 0
    plan = cache.plan(1)
    qkv = torch.randn(2, 3 * 128, generator=g)
    got = cache.decode_attention(0, qkv, plan, 0.125).view(2, 2, 64)
    assert got[1, 0].isnan().all() and not got[0].isnan().any() and not got[1, 1].isnan().any()


def test_the_kernel_is_not_asked_for_what_it_does_not_take():
    g = torch.Generator().manual_seed(1)
    cache = filled_cache(torch.float32, 2, 4, 64, 16, [3, 5], g)
    qkv = torch.randn(2, 3 * 256)
    assert decode_attention_runs(qkv, cache, cache.plan(1), 0.0, False) == (native.library() is not None)
    assert not decode_attention_runs(qkv, cache, cache.plan(2), 0.0, False)  # two tokens a row
    assert not decode_attention_runs(qkv, cache, cache.plan(1, key_mask=torch.ones(2, 6)), 0.0, False)
    assert not decode_attention_runs(qkv, cache, cache.plan(1), 0.1, False)  # dropout
    assert not decode_attention_runs(qkv, cache, cache.plan(1), 0.0, True)  # eager
    assert not decode_attention_runs(qkv.bfloat16(), cache, cache.plan(1), 0.0, False)  # the cache in another dtype
    half = filled_cache(torch.half, 2, 4, 64, 16, [3, 5], g)  # a dtype the kernel does not take: its own plan says so
    assert not half.plan(1).decode_kernel and not decode_attention_runs(qkv.half(), half, half.plan(1), 0.0, False)
    narrow = filled_cache(torch.float32, 2, 4, 8, 16, [3, 5], g)  # head_dim 8
    assert not decode_attention_runs(torch.randn(2, 96), narrow, narrow.plan(1), 0.0, False)
    with torch.enable_grad():
        assert not decode_attention_runs(qkv.requires_grad_(), cache, cache.plan(1), 0.0, False)


def build(attn, dtype=torch.float32):
    torch.manual_seed(0)  # head_dim 16: the kernel's smallest
    m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=64,
                                   attn_implementation=attn)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m.to(dtype)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decode_steps_of_rows_at_different_lengths(attn):
    """Steps over slots holding 5, 9, 2 and 4 positions (all of them, then two scattered ones) equal each
    row's own forward; under sdpa every layer ran the fused kernel (where it is built), under eager the
    explicit softmax."""
    m = build(attn)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (5, 9, 2, 4)]
    cache = StaticCache(m.config, max_batch_size=4, max_cache_len=32)
    for slot, p in enumerate(prompts):
        m.decode(torch.tensor([p]), cache, rows=torch.tensor([slot]))
    expected = "fused" if attn == "sdpa" and native.library() is not None else attn
    with torch.no_grad():
        for rows in ([0, 1, 2, 3], [0, 1, 2, 3], [3, 1]):
            nxt = torch.randint(0, 97, (len(rows),), generator=g).tolist()
            logits = m.decode(torch.tensor(nxt)[:, None], cache, rows=torch.tensor(rows))[:, -1]
            assert [blk.attn.last_attention for blk in m.transformer.h] == [expected] * 2
            for i, slot in enumerate(rows):
                prompts[slot].append(nxt[i])
                want = m(torch.tensor([prompts[slot]])).logits[0, -1]
                assert (logits[i] - want).abs().max().item() <= 1e-5, (rows, i)
    assert cache.lengths == [len(p) for p in prompts]


@needs_kernel
def test_decode_parts_runs_the_decoding_rows_fused_beside_a_prompt_chunk():
    m = build("sdpa")
    g = torch.Generator().manual_seed(2)
    history = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (6, 3)]
    cache = StaticCache(m.config, max_batch_size=3, max_cache_len=32)
    for slot, h in enumerate(history):
        m.decode(torch.tensor([h]), cache, rows=torch.tensor([slot]))
    nxt, chunk = [11, 12], [1, 2, 3, 4, 5]
    out = m.decode_parts([(torch.tensor(nxt)[:, None], torch.arange(2), 1),
                          (torch.tensor([chunk]), torch.tensor([2]), 1)], cache)
    with torch.no_grad():
        for i in range(2):
            assert (out[0][i, -1] - m(torch.tensor([history[i] + [nxt[i]]])).logits[0, -1]).abs().max() <= 1e-5
        assert (out[1][0, -1] - m(torch.tensor([chunk])).logits[0, -1]).abs().max() <= 1e-5
    assert m.transformer.h[0].attn.last_attention == "sdpa"  # the chunk, last: SDPA after the fused rows


@needs_kernel
def test_generate_bfloat16_through_the_kernel_keeps_the_sdpa_logits(monkeypatch):
    """bf16 greedy generation with the kernel against the same with SDPA: per-step logits within a few bf16
    roundings (the attention output rounded once more, carried through two layers)."""
    from gpt2kit.model import layers

    m = build("sdpa", torch.bfloat16)
    ids = torch.tensor([[5, 17, 33, 2, 60, 11]])
    kw = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with_kernel = m.generate(ids, **kw)
    assert m.transformer.h[0].attn.last_attention == "fused"
    monkeypatch.setattr(layers, "decode_attention_runs", lambda *a, **k: False)
    plain = m.generate(ids, **kw)
    assert m.transformer.h[0].attn.last_attention == "sdpa"
    for t in range(min(len(with_kernel.logits), len(plain.logits))):
        if t and not torch.equal(with_kernel.sequences[:, :ids.shape[1] + t], plain.sequences[:, :ids.shape[1] + t]):
            break  # a near-tie flipped a greedy choice: later steps continue different texts
        a, b = with_kernel.logits[t].float(), plain.logits[t].float()
        assert (a - b).abs().max().item() <= 4 * b.abs().max().item() / 128, t
