"""The model's lean decode entry (model.decode) against the model's own forward: generate()'s per-step logits
for every config flag and both attention backends, rows at different lengths in one step (what the server's
slots need), prefix copies, and the bf16 policy on a CPU without native bf16 products."""
import pytest
import torch

from gpt2kit import GPT2Config, GPT2LMHeadModel, StaticCache
from gpt2kit.model import linear, onednn
from model_helpers import TINY

FLAGS = {
    "defaults": {},
    "mistral-flags": dict(scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
    "upcast-only": dict(reorder_and_upcast_attn=True),
    "no-scaling": dict(scale_attn_weights=False),
    "relu-ninner": dict(activation_function="relu", n_inner=48),
    "gelu-erf": dict(activation_function="gelu"),
    "gelu-fast": dict(activation_function="gelu_fast"),
    "silu-untied": dict(activation_function="silu", tie_word_embeddings=False),
    "quick-gelu": dict(activation_function="quick_gelu"),
}


def build(flags, attn, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = GPT2LMHeadModel(GPT2Config(**{**TINY, **flags}, attn_implementation=attn)).eval()
    with torch.no_grad():
        for p in m.parameters():  # larger than GPT-2's init, so that every layer matters
            p.add_(torch.randn_like(p) * 0.2)
    return m.to(dtype)


def padded_prompts(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY["vocab_size"], (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(FLAGS))
def test_generate_step_logits_equal_the_forward_float32(name, attn):
    m = build(FLAGS[name], attn)
    ids, mask = padded_prompts()
    out = m.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                     output_logits=True, return_dict_in_generate=True)
    if onednn.linear_available():
        assert m.transformer.h[0].mlp.c_fc.last_path == linear.PACKED  # the decode entry's packed path ran
    seq = out.sequences
    full_mask = torch.cat([mask, torch.ones(3, seq.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = m(seq, attention_mask=full_mask, position_ids=pos).logits  # (B, L, V)
    P = ids.shape[1]
    worst = max((out.logits[i] - ref[:, P - 1 + i]).abs().max().item() for i in range(len(out.logits)))
    print(f"{name}/{attn}: max |generate step logits - forward| {worst:.2e}")
    assert worst <= 1e-4


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["defaults", "mistral-flags", "upcast-only", "relu-ninner"])
def test_generate_first_step_logits_equal_the_forward_bfloat16(name, attn):
    """bf16, including sdpa + reorder_and_upcast_attn (the upcast applies under eager only, on every path)."""
    m = build(FLAGS[name], attn, dtype=torch.bfloat16)
    ids, mask = padded_prompts()
    out = m.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0,
                     output_logits=True, return_dict_in_generate=True)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = m(ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
    scale = ref.abs().max().item()
    diff = (out.logits[0] - ref).abs().max().item()
    print(f"bf16 {name}/{attn}: max |diff| {diff:.3g} (logits up to {scale:.3g}; one bf16 ulp there {scale / 128:.3g})")
    assert diff <= 4 * scale / 128  # a few bf16 ulps of the largest logit


def alone(m, tokens):  # logits (V,) after `tokens` through the plain forward
    with torch.no_grad():
        return m(torch.tensor([tokens])).logits[0, -1]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_rows_at_different_lengths_decode_in_one_step(attn):
    m = build(FLAGS["mistral-flags"], attn)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, TINY["vocab_size"], (n,), generator=g).tolist() for n in (5, 9, 2, 4)]
    cache = StaticCache(m.config, max_batch_size=4, max_cache_len=24)
    for slot, p in enumerate(prompts):  # each prompt read alone into its own slot
        got = m.decode(torch.tensor([p]), cache, rows=torch.tensor([slot]))[0, -1]
        assert (got - alone(m, p)).abs().max() <= 1e-5
    assert cache.lengths == [5, 9, 2, 4]
    nxt = [7, 11, 3, 5]
    logits = m.decode(torch.tensor(nxt)[:, None], cache)[:, -1]  # all slots, four lengths, one step
    for i, p in enumerate(prompts):
        assert (logits[i] - alone(m, p + [nxt[i]])).abs().max() <= 1e-5, i
        prompts[i] = p + [nxt[i]]
    rows = torch.tensor([3, 1])  # scattered slots (gathered), two tokens each at different starts
    chunk = [[1, 2], [8, 9]]
    logits = m.decode(torch.tensor(chunk), cache, rows=rows, logits_to_keep=0)  # (2, 2, V)
    for j, slot in enumerate(rows.tolist()):
        for t in range(2):
            assert (logits[j, t] - alone(m, prompts[slot] + chunk[j][: t + 1])).abs().max() <= 1e-5
    assert cache.lengths == [6, 12, 3, 7]



@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_scattered_slots_at_the_same_length_write_their_own_rows(attn):
    """rows=[2, 0] (not consecutive, both at 4 positions) beside slot 1 at 6: each writes its own slot."""
    m = build(FLAGS["defaults"], attn)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, TINY["vocab_size"], (n,), generator=g).tolist() for n in (4, 6, 4)]
    cache = StaticCache(m.config, max_batch_size=3, max_cache_len=16)
    for slot, p in enumerate(prompts):
        m.decode(torch.tensor([p]), cache, rows=torch.tensor([slot]))
    chunk = [[5, 6], [7, 8]]
    logits = m.decode(torch.tensor(chunk), cache, rows=torch.tensor([2, 0]), logits_to_keep=0)  # (2, 2, V)
    for j, slot in enumerate((2, 0)):
        for t in range(2):
            assert (logits[j, t] - alone(m, prompts[slot] + chunk[j][: t + 1])).abs().max() <= 1e-5
    assert cache.lengths == [6, 6, 6]
    nxt = m.decode(torch.tensor([[9]]), cache, rows=torch.tensor([1]))[0, -1]  # slot 1 untouched by the write
    assert (nxt - alone(m, prompts[1] + [9])).abs().max() <= 1e-5


def test_attention_groups_are_the_cheapest_split_into_runs():
    """The dynamic programme against every split of rows 0..B-1 into runs of consecutive rows."""
    import itertools

    from gpt2kit.model.cache import attention_groups

    rng = torch.Generator().manual_seed(3)
    for trial in range(40):
        B = 1 + trial % 8
        lengths = torch.randint(1, 50, (B,), generator=rng).tolist()
        call = [0.0, 5.0, 30.0, 400.0][trial % 4]
        best = min(sum(call + (j - i) * max(lengths[i:j]) for i, j in zip((0,) + cuts, cuts + (B,)))
                   for k in range(B) for cuts in itertools.combinations(range(1, B), k))
        groups = attention_groups(lengths, call)
        assert [g[0] for g in groups][0] == 0 and groups[-1][1] == B
        assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))  # consecutive, covering every row once
        assert all(n == max(lengths[lo:hi]) and masked == (min(lengths[lo:hi]) != n) for lo, hi, n, masked in groups)
        assert sum(call + (hi - lo) * n for lo, hi, n, _ in groups) == pytest.approx(best)


def count_grouped_calls(monkeypatch):
    """Force one attention call per run of equal lengths (a GPT-2 small server step splits its rows so; the
    tiny test model's rows are too short to pay for it) and count the grouped calls."""
    from gpt2kit.model import cache as cache_module
    from gpt2kit.model.layers import Attention

    monkeypatch.setattr(cache_module, "GROUP_CALL_BYTES", 0)
    calls = []
    grouped = Attention._attend_groups

    def spy(self, *a, **k):
        calls.append(1)
        return grouped(self, *a, **k)

    monkeypatch.setattr(Attention, "_attend_groups", spy)
    return calls


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_rows_at_different_lengths_attend_in_groups_over_their_own_keys(attn, monkeypatch):
    calls = count_grouped_calls(monkeypatch)
    m = build(FLAGS["mistral-flags"], attn)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, TINY["vocab_size"], (n,), generator=g).tolist() for n in (5, 5, 12, 2, 9)]
    cache = StaticCache(m.config, max_batch_size=5, max_cache_len=24)
    for slot, p in enumerate(prompts):
        m.decode(torch.tensor([p]), cache, rows=torch.tensor([slot]))
    assert not calls  # one row at a time: one call
    nxt = [7, 11, 3, 5, 2]
    logits = m.decode(torch.tensor(nxt)[:, None], cache)[:, -1]
    assert len(calls) == TINY["n_layer"]  # every layer took the grouped path
    for i, p in enumerate(prompts):
        assert (logits[i] - alone(m, p + [nxt[i]])).abs().max() <= 1e-5, i


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("grouped", [False, True])
def test_decode_parts_equals_each_part_alone(attn, grouped, monkeypatch):
    """A server step: decoding rows (one token each, different lengths) beside two prompt chunks, one of
    them scored at every position, in one forward; each equals the model's forward on that row's tokens."""
    calls = count_grouped_calls(monkeypatch) if grouped else None
    m = build(FLAGS["mistral-flags"], attn)
    g = torch.Generator().manual_seed(5)
    tok = lambda n: torch.randint(0, TINY["vocab_size"], (n,), generator=g).tolist()  # noqa: E731
    history = [tok(n) for n in (4, 9, 6)] + [tok(3), []]  # slots 0-2 decode, 3 reads its prompt, 4 starts one
    cache = StaticCache(m.config, max_batch_size=5, max_cache_len=32)
    for slot, h in enumerate(history):
        if h:
            m.decode(torch.tensor([h]), cache, rows=torch.tensor([slot]))
    nxt, chunk3, chunk4 = tok(3), tok(5), tok(7)
    out = m.decode_parts([(torch.tensor(nxt)[:, None], torch.arange(3), 1),
                          (torch.tensor([chunk3]), torch.tensor([3]), 1),
                          (torch.tensor([chunk4]), torch.tensor([4]), 0)], cache)
    assert [tuple(o.shape) for o in out] == [(3, 1, TINY["vocab_size"]), (1, 1, TINY["vocab_size"]),
                                             (1, 7, TINY["vocab_size"])]
    for i in range(3):
        assert (out[0][i, -1] - alone(m, history[i] + [nxt[i]])).abs().max() <= 1e-5, i
    assert (out[1][0, -1] - alone(m, history[3] + chunk3)).abs().max() <= 1e-5
    for t in range(7):
        assert (out[2][0, t] - alone(m, chunk4[: t + 1])).abs().max() <= 1e-5, t
    assert cache.lengths == [5, 10, 7, 8, 7]
    for bad in ([(torch.tensor([[1]]), torch.tensor([0]), 1), (torch.tensor([[2, 3]]), torch.tensor([0]), 1)],
                [(torch.tensor([[1]]), None, 1), (torch.tensor([[2]]), torch.tensor([1]), 1)]):
        with pytest.raises(ValueError, match="decode_parts"):  # one slot twice; a part without its slots
            m.decode_parts(bad, cache)
    assert cache.lengths == [5, 10, 7, 8, 7]  # nothing was written
    if grouped:
        assert len(calls) == TINY["n_layer"]  # the decoding rows (three lengths) attended in groups

def test_copy_prefix_and_reset_rows():
    m = build(FLAGS["defaults"], "sdpa")
    shared, tail = [4, 8, 15, 16, 23, 42], [3, 1]
    cache = StaticCache(m.config, max_batch_size=2, max_cache_len=16)
    m.decode(torch.tensor([shared + [9]]), cache, rows=torch.tensor([0]))
    cache.copy_prefix(0, 1, len(shared))  # slot 1 starts from the shared prefix, not recomputed
    assert cache.lengths == [7, 6]
    got = m.decode(torch.tensor([tail]), cache, rows=torch.tensor([1]))[0, -1]
    assert (got - alone(m, shared + tail)).abs().max() <= 1e-5
    cache.reset_rows([0])
    got = m.decode(torch.tensor([tail]), cache, rows=torch.tensor([0]))[0, -1]
    assert cache.lengths[0] == 2 and (got - alone(m, tail)).abs().max() <= 1e-5


def test_decode_refuses_what_does_not_fit():
    m = build(FLAGS["defaults"], "sdpa")
    cache = StaticCache(m.config, max_batch_size=1, max_cache_len=8)
    with pytest.raises(ValueError, match="StaticCache is full"):
        m.decode(torch.zeros(1, 9, dtype=torch.long), cache)
    assert cache.lengths == [0]  # nothing was written
    big = StaticCache(m.config, max_batch_size=1, max_cache_len=TINY["n_positions"] + 4)
    with pytest.raises(ValueError, match="n_positions"):
        m.decode(torch.zeros(1, TINY["n_positions"] + 1, dtype=torch.long), big)


@pytest.mark.skipif(not onednn.linear_available(), reason="this torch build has no oneDNN linear")
def test_bfloat16_without_native_bf16_runs_from_a_float32_copy(monkeypatch):
    """On a CPU without native bf16 (AVX2 only) the policy never emulates bf16 GEMMs (5-7x slower than float32
    there): the products run from packed float32 copies. Simulated here by hiding the capability."""
    monkeypatch.setattr(onednn, "bf16_available", lambda: False)
    m32 = build(FLAGS["defaults"], "sdpa")
    m16 = build(FLAGS["defaults"], "sdpa", dtype=torch.bfloat16)
    ids, mask = padded_prompts()
    out = m16.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0,
                       output_logits=True, return_dict_in_generate=True)
    assert {p.last_path for blk in m16.transformer.h for p in (blk.attn.c_attn, blk.mlp.c_fc)} == {linear.WIDENED}
    assert m16.lm_head.last_path == linear.WIDENED
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = m32(ids, attention_mask=mask, position_ids=pos).logits[:, -1]
    scale = ref.abs().max().item()
    assert (out.logits[0] - ref).abs().max().item() <= 8 * scale / 128  # bf16 weights, float32 products
