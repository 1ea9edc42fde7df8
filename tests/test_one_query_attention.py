"""gpt2kit's one-query attention kernel (native/attention.c), which decode steps run instead of SDPA: the kernel
against SDPA over each row's own keys, and the model's decode steps through it against the plain forward."""
import pytest
import torch
import torch.nn.functional as F

from gpt2kit import GPT2Config, GPT2LMHeadModel, StaticCache, native
from gpt2kit.model.layers import _one_query, one_query_runs

needs_kernel = pytest.mark.skipif(native.library() is None, reason="no AVX-512 or no C compiler: the kernel is not built")


def reference(q, k, v, counts, scaling):  # SDPA in float64, row by row over its first counts[b] keys
    return torch.cat([F.scaled_dot_product_attention(q[b:b + 1].double(), k[b:b + 1, :, :n].double(),
                                                     v[b:b + 1, :, :n].double(), scale=scaling)
                      for b, n in enumerate(counts.tolist())])


@needs_kernel
@pytest.mark.parametrize("D", [16, 64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_attention_over_each_rows_keys(D, dtype):
    g = torch.Generator().manual_seed(D)
    B, H, S = 5, 3, 70
    qkv = torch.randn(B, 1, 3, H, D, generator=g).to(dtype)  # q as a strided view, as the model makes it
    q = qkv.permute(2, 0, 3, 1, 4)[0]  # (B, H, 1, D)
    kbuf, vbuf = (torch.randn(B + 2, H, S + 9, D, generator=g).to(dtype) for _ in range(2))
    k, v = kbuf[1:B + 1, :, :S], vbuf[1:B + 1, :, :S]  # views into larger cache buffers
    counts = torch.tensor([1, 70, 17, 16, 33])  # one key; every key; lengths off the 16-wide vectors
    assert one_query_runs(q, k, v)
    got = _one_query(q, k, v, counts, 0.3)
    assert got.shape == (B, H, 1, D) and got.dtype == dtype
    want = reference(q, k, v, counts, 0.3)
    tol = 2e-6 if dtype == torch.float32 else 2 ** -8 * want.abs().max().item()  # float32; one bf16 rounding
    assert (got.double() - want).abs().max().item() <= tol


@needs_kernel
def test_a_nan_score_stays_nan_as_under_sdpa():
    q, k, v = torch.randn(2, 2, 1, 64), torch.randn(2, 2, 9, 64), torch.randn(2, 2, 9, 64)
    k[1, 0, 3, 5] = float("nan")  # one key of row 1, head 0
    got = _one_query(q, k, v, torch.tensor([9, 9]), 0.125)
    want = F.scaled_dot_product_attention(q, k, v, scale=0.125)
    assert torch.equal(got.isnan(), want.isnan()) and got[1, 0].isnan().all()
    assert (got[~got.isnan()] - want[~want.isnan()]).abs().max().item() < 1e-6


def test_the_kernel_is_not_asked_for_what_it_does_not_take():
    q, k = torch.randn(2, 4, 1, 64), torch.randn(2, 4, 9, 64)
    assert not one_query_runs(q.repeat(1, 1, 2, 1), k, k)  # two queries a row
    assert not one_query_runs(q, k, k, dropout=0.1)
    assert not one_query_runs(q.half(), k.half(), k.half())
    assert not one_query_runs(q, k.bfloat16(), k.bfloat16())  # the cache in another dtype
    assert not one_query_runs(torch.randn(2, 4, 1, 8), torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8))
    with torch.enable_grad():
        assert not one_query_runs(q.requires_grad_(), k, k)


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
    """One step over slots holding 5, 9, 2 and 4 positions equals each row's own forward; under sdpa every
    layer ran the one-query kernel (where it is built), under eager the explicit softmax."""
    m = build(attn)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (5, 9, 2, 4)]
    cache = StaticCache(m.config, max_batch_size=4, max_cache_len=32)
    for slot, p in enumerate(prompts):
        m.decode(torch.tensor([p]), cache, rows=torch.tensor([slot]))
    expected = "one-query" if attn == "sdpa" and native.library() is not None else attn
    with torch.no_grad():
        for step in range(3):
            nxt = torch.randint(0, 97, (4,), generator=g).tolist()
            logits = m.decode(torch.tensor(nxt)[:, None], cache)[:, -1]
            assert [blk.attn.last_attention for blk in m.transformer.h] == [expected] * 2
            for i in range(4):
                prompts[i].append(nxt[i])
                want = m(torch.tensor([prompts[i]])).logits[0, -1]
                assert (logits[i] - want).abs().max().item() <= 1e-5, (step, i)


@needs_kernel
def test_generate_bfloat16_through_the_kernel_keeps_the_sdpa_logits(monkeypatch):
    """bf16 greedy generation with the kernel against the same with SDPA: per-step logits within a bf16
    rounding of the attention output carried through two layers."""
    from gpt2kit.model import layers

    m = build("sdpa", torch.bfloat16)
    ids = torch.tensor([[5, 17, 33, 2, 60, 11]])
    kw = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with_kernel = m.generate(ids, **kw)
    assert m.transformer.h[0].attn.last_attention == "one-query"
    monkeypatch.setattr(layers, "one_query_runs", lambda *a, **k: False)
    plain = m.generate(ids, **kw)
    assert m.transformer.h[0].attn.last_attention == "sdpa"
    steps = min(len(with_kernel.logits), len(plain.logits))
    for t in range(steps):
        a, b = with_kernel.logits[t].float(), plain.logits[t].float()
        if t and not torch.equal(with_kernel.sequences[:, :ids.shape[1] + t], plain.sequences[:, :ids.shape[1] + t]):
            break  # a near-tie flipped a greedy choice: later steps continue different texts
        assert (a - b).abs().max().item() <= 4 * b.abs().max().item() / 128, t
