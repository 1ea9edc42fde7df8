"""generate() against transformers' on the same random weights: greedy and beam search token for token
(single prompts and left-padded batches, dynamic and static caches), scores and logits, each padded row
as it gives alone, finished rows leaving the batch, reproducible sampling, and the length checks."""
import pytest
import torch
import transformers

from gpt2kit import GPT2LMHeadModel
from gpt2kit.generation import runner as runner_mod
from model_helpers import twin

CONFIGS = {
    "tiny-sdpa": dict(attn="sdpa"),
    "tiny-eager": dict(attn="eager"),
    "mistral-flags": dict(attn="eager", scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
    "one-layer-gelu": dict(attn="sdpa", n_layer=1, n_head=2, activation_function="gelu"),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    cfg = dict(CONFIGS[request.param])
    return twin(GPT2LMHeadModel, transformers.GPT2LMHeadModel, attn=cfg.pop("attn"), **cfg)


@pytest.fixture(scope="module", params=["tiny-sdpa", "mistral-flags"])
def beam_pair(request):
    cfg = dict(CONFIGS[request.param])
    return twin(GPT2LMHeadModel, transformers.GPT2LMHeadModel, attn=cfg.pop("attn"), **cfg)


@pytest.fixture(scope="module")
def sdpa_pair():
    return twin(GPT2LMHeadModel, transformers.GPT2LMHeadModel, attn="sdpa", seed=3)


def prompts(batch=3, length=8, seed=2):
    """A left-padded batch: row 0 has 3 pads, row 1 one, the rest none (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 101, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    if batch > 1:
        mask[1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def eos_that_fires(model, ids, mask, step=3, row=0):
    """A token greedy decoding emits at `step` in `row`, so that using it as eos really ends that row."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=step + 1, pad_token_id=0)
    return int(out[row, ids.shape[1] + step])


def both(hf, ours, ids, **kw):
    torch.manual_seed(0)
    a = hf.generate(ids, **kw)
    b = ours.generate(ids, **kw)
    return a, b


def test_greedy_matches_transformers(pair):
    hf, ours = pair
    ids, mask = prompts()
    eos = eos_that_fires(hf, ids, mask)
    for kw in (dict(max_new_tokens=12), dict(max_new_tokens=14, eos_token_id=eos),
               dict(max_new_tokens=14, eos_token_id=[eos, 7], min_new_tokens=5),
               dict(max_new_tokens=10, repetition_penalty=1.4, no_repeat_ngram_size=2, bad_words_ids=[[5], [9, 11]])):
        kw = dict(kw, pad_token_id=0)
        single, batch = hf.generate(ids[2:], **kw), hf.generate(ids, attention_mask=mask, **kw)
        for cache in ("static", "dynamic"):  # our fast runner and the model-forward path
            assert torch.equal(ours.generate(ids[2:], cache_implementation=cache, **kw), single), (kw, cache)
            assert torch.equal(ours.generate(ids, attention_mask=mask, cache_implementation=cache, **kw), batch), \
                (kw, cache)


@pytest.mark.parametrize("beams,length_penalty,early_stopping,nrs,cache", [
    (2, 1.0, False, 1, "static"), (3, 0.5, True, 2, "dynamic"), (4, 2.0, "never", 4, "static"),
    (3, -1.0, False, 3, None),
])
def test_beam_search_matches_transformers(beam_pair, beams, length_penalty, early_stopping, nrs, cache):
    hf, ours = beam_pair
    ids, mask = prompts()
    eos = eos_that_fires(hf, ids, mask, step=2, row=1)
    kw = dict(max_new_tokens=9, num_beams=beams, length_penalty=length_penalty, early_stopping=early_stopping,
              num_return_sequences=nrs, eos_token_id=eos, pad_token_id=0, cache_implementation=cache,
              return_dict_in_generate=True, output_scores=True)
    a, b = both(hf, ours, ids, attention_mask=mask, **kw)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(b.sequences_scores, a.sequences_scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(b.beam_indices, a.beam_indices.long())
    a1, b1 = both(hf, ours, ids[2:], **kw)
    assert torch.equal(a1.sequences, b1.sequences)


def test_scores_and_logits_match(sdpa_pair):
    hf, ours = sdpa_pair
    ids, mask = prompts()
    kw = dict(max_new_tokens=6, pad_token_id=0, return_dict_in_generate=True, output_scores=True, output_logits=True,
              repetition_penalty=1.2)
    a, b = both(hf, ours, ids, attention_mask=mask, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert len(b.scores) == len(b.logits) == 6
    for x, y in zip(a.scores + a.logits, b.scores + b.logits):
        assert y.dtype == torch.float32 and y.shape == x.shape
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    # the cache comes back and holds every fed position
    assert b.past_key_values is b.cache and b.past_key_values.get_seq_length() == ids.shape[1] + 5


def test_each_padded_row_gives_what_it_gives_alone(sdpa_pair):
    _, ours = sdpa_pair
    ids, mask = prompts(batch=4, length=9)
    for kw in (dict(max_new_tokens=8), dict(max_new_tokens=8, num_beams=3)):
        batch = ours.generate(ids, attention_mask=mask, pad_token_id=0, **kw)
        for r in range(ids.shape[0]):
            pads = int((mask[r] == 0).sum())
            alone = ours.generate(ids[r:r + 1, pads:], pad_token_id=0, **kw)
            assert torch.equal(batch[r, pads:], alone[0]), (kw, r)


def test_finished_rows_leave_the_batch(sdpa_pair, monkeypatch):
    hf, ours = sdpa_pair
    ids, mask = prompts(batch=4)
    eos = eos_that_fires(hf, ids, mask, step=1, row=0)
    sizes = []
    for name in ("step", "step_greedy"):  # logits, or (greedy, eos not banned) the head's argmax
        def counting(self, tokens, *args, _real=getattr(runner_mod.DecodeRunner, name)):
            sizes.append(tokens.shape[0])
            return _real(self, tokens, *args)

        monkeypatch.setattr(runner_mod.DecodeRunner, name, counting)
    a, b = both(hf, ours, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(a, b)
    assert sizes[0] == 4 and min(sizes) < 4, sizes  # the finished row stopped costing compute


def test_sampling_is_reproducible(sdpa_pair):
    _, ours = sdpa_pair
    ids, mask = prompts()
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9, temperature=0.8,
              pad_token_id=0)
    a = ours.generate(ids, seed=1234, **kw)
    b = ours.generate(ids, seed=1234, **kw)
    c = ours.generate(ids, seed=99, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(ours.generate(ids, generator=g1, **kw), ours.generate(ids, generator=g2, **kw))
    torch.manual_seed(5)
    d = ours.generate(ids, **kw)
    torch.manual_seed(5)
    assert torch.equal(d, ours.generate(ids, **kw))  # the global seed (set_seed) works too
    many = ours.generate(ids, seed=3, num_return_sequences=3, **kw)
    assert many.shape == (9, ids.shape[1] + 10)
    assert torch.equal(many[0, :ids.shape[1]], ids[0]) and torch.equal(many[2, :ids.shape[1]], ids[0])
    beams = ours.generate(ids, seed=3, num_beams=2, **kw)  # beam sampling
    assert beams.shape == (3, ids.shape[1] + 10)


def test_sampling_follows_the_processed_distribution():
    """With top_k=1 sampling must pick the argmax; with no_repeat_ngram_size=1 no token comes twice."""
    _, ours = twin(GPT2LMHeadModel, transformers.GPT2LMHeadModel, attn="sdpa", seed=1)
    ids, mask = prompts()
    greedy = ours.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0)
    sampled = ours.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0, do_sample=True, top_k=1, seed=0)
    assert torch.equal(greedy, sampled)
    out = ours.generate(ids[2:], max_new_tokens=20, do_sample=True, seed=0, no_repeat_ngram_size=1, pad_token_id=0)
    new = out[0, ids.shape[1]:].tolist()
    assert len(set(new)) == len(new) and not set(new) & set(ids[2].tolist())


def test_length_limit_raises_before_any_work(sdpa_pair, monkeypatch):
    _, ours = sdpa_pair
    n = ours.config.n_positions

    def no_forward(*a, **k):
        raise AssertionError("the model ran before the length check")

    monkeypatch.setattr(ours.transformer, "forward", no_forward)
    ids = torch.ones(1, n - 4, dtype=torch.long)
    with pytest.raises(ValueError, match=f"n_positions={n}"):
        ours.generate(ids, max_new_tokens=5)
    with pytest.raises(ValueError, match="max_length"):
        ours.generate(ids, max_length=10)


def test_default_length_and_argument_errors(sdpa_pair):
    hf, ours = sdpa_pair
    ids, _ = prompts(batch=1)
    a, b = both(hf, ours, ids, pad_token_id=0)  # defaults: max_length 20 new tokens
    assert torch.equal(a, b) and b.shape[1] == ids.shape[1] + 20
    with pytest.raises(ValueError, match="num_return_sequences"):
        ours.generate(ids, num_return_sequences=2)
    with pytest.raises(ValueError, match="do not know|does not know|not know"):
        ours.generate(ids, max_new_token=3)
    with pytest.raises(ValueError, match="cache_implementation"):
        ours.generate(ids, cache_implementation="paged")
    with pytest.raises(ValueError, match="stop_strings needs the tokenizer"):
        ours.generate(ids, stop_strings=["x"], max_new_tokens=2)


@pytest.mark.usefixtures("native_build")
@pytest.mark.parametrize("batch", [3, 6])
def test_bfloat16_fast_path_matches_the_model_forward(sdpa_pair, batch):
    """bf16 weights: the decode entry (gpt2kit's widening kernel up to 4 rows where it is built; else oneDNN-packed
    weights, or a float32 copy on a CPU without native bf16) gives the tokens of the plain model forward, and the
    packed copies follow in-place weight edits."""
    from gpt2kit import native
    from gpt2kit.model import linear, onednn

    _, ours = sdpa_pair
    ids, mask = prompts(batch=batch)
    m16 = GPT2LMHeadModel(ours.config).eval()
    m16.load_state_dict(ours.state_dict())
    m16.to(torch.bfloat16)
    fast = m16.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0)
    proj = m16.transformer.h[0].attn.c_attn
    kernel = native.library() is not None and batch <= linear.NATIVE_MAX_ROWS[torch.bfloat16]
    if kernel:
        assert proj.last_path == linear.NATIVE and m16.lm_head.last_path == linear.NATIVE
    elif onednn.linear_available():
        assert proj.last_path == (linear.PACKED if onednn.bf16_available() else linear.WIDENED)
        assert m16.lm_head.last_path == proj.last_path
    plain = m16.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0, cache_implementation="dynamic")
    assert torch.equal(fast, plain)
    if onednn.linear_available() and not kernel:
        packed = m16.lm_head.packed_weight[0]
        with torch.no_grad():
            m16.lm_head.weight.mul_(1.5)  # bumps the version: the next decode repacks
        m16.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)
        assert m16.lm_head.packed_weight[0] is not packed


@pytest.mark.parametrize("mkl_wins", [False, True])
def test_packed_weights_follow_the_row_hint(sdpa_pair, monkeypatch, mkl_wins):
    """Each projection owns one packed layout: a batch of 5 lays float32 weights out for 32 rows; batch 1 runs
    gpt2kit's own kernel where it is built, else packs for one row, or, where MKL's one-row product is the faster
    (Intel CPUs), runs addmm on the plain weight. All give the same tokens."""
    from gpt2kit import cpu, native
    from gpt2kit.model import linear, onednn

    _, ours = sdpa_pair
    if not onednn.linear_available():
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setattr(cpu, "mkl_gemv_wins", lambda: mkl_wins)
    ids, mask = prompts(batch=5, length=9, seed=3)
    kw = dict(attention_mask=mask, max_new_tokens=10, pad_token_id=0)
    wide = ours.generate(ids, **kw)  # batch 5: the 32-row layout
    fc = ours.transformer.h[0].mlp.c_fc
    assert fc.last_path == linear.PACKED and fc.packed_weight[1] == 32
    rows = [ours.generate(ids[i:i + 1, int((mask[i] == 0).sum()):], max_new_tokens=10, pad_token_id=0)
            for i in range(ids.shape[0])]  # batch 1, unpadded
    if native.library() is not None:  # one row: gpt2kit's own float32 kernel, for the blocks and the head
        assert fc.last_path == linear.NATIVE  # the prefill (9 rows, laid out for one) packed or ran addmm:
        assert fc.packed_weight[1] == (32 if mkl_wins else 1)
        assert ours.lm_head.last_path == linear.ARGMAX_SCREEN  # greedy: the native head's argmax, screened
    elif mkl_wins:
        assert fc.last_path == linear.ADDMM and fc.packed_weight[1] == 32  # not repacked
        assert ours.lm_head.last_path == linear.PACKED and ours.lm_head.packed_weight[1] == 1  # the head packs
    else:
        assert fc.last_path == linear.PACKED and fc.packed_weight[1] == 1  # the 1-row layout
    for i, r in enumerate(rows):
        assert torch.equal(wide[i, -10:], r[0, -10:])


def test_batched_decode_through_onednn_matches_transformers(sdpa_pair):
    """Batches of 4+ rows decode through oneDNN's GEMM; tokens still agree with transformers."""
    hf, ours = sdpa_pair
    ids, mask = prompts(batch=6, length=10, seed=5)
    for kw in (dict(max_new_tokens=12), dict(max_new_tokens=8, num_beams=2, num_return_sequences=2)):
        a, b = both(hf, ours, ids, attention_mask=mask, pad_token_id=0, **kw)
        assert torch.equal(a, b), kw


def test_fixed_shape_graph_step_matches_transformers(sdpa_pair, monkeypatch):
    """The CUDA-graph runner's fixed-shape step (full-length cache, key mask, write position on the device),
    run here without capture, gives transformers' tokens, for greedy (padded, eos) and beams."""
    from gpt2kit.generation.graphs import GraphRunner

    made = []
    monkeypatch.setattr(runner_mod, "make_runner",
                        lambda model, plan: made.append(GraphRunner(model, plan.input_ids.shape[0], plan.max_length,
                                                                    plan.attention_mask, capture=False)) or made[-1])
    hf, ours = sdpa_pair
    ids, mask = prompts()
    eos = eos_that_fires(hf, ids, mask, step=2)
    for kw in (dict(max_new_tokens=10, eos_token_id=eos), dict(max_new_tokens=7, num_beams=3, eos_token_id=eos)):
        a, b = both(hf, ours, ids, attention_mask=mask, pad_token_id=0, **kw)
        assert torch.equal(a, b), kw
    assert len(made) == 2  # both searches ran on the fixed-shape runner


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_generate_continues_from_a_cache_holding_a_prefix(sdpa_pair, kind):
    """past_key_values holding the first tokens of input_ids (a shared prefix, a multi-turn chat): only the
    rest is read, and the tokens equal transformers' given the same cache."""
    from gpt2kit import DynamicCache, StaticCache

    hf, ours = sdpa_pair
    ids = torch.randint(1, 101, (2, 9), generator=torch.Generator().manual_seed(7))
    caches = {}
    for name, model, mod in (("hf", hf, transformers), ("ours", ours, None)):
        if kind == "dynamic":
            cache = (transformers.DynamicCache(config=hf.config) if mod else DynamicCache(ours.config))
        else:
            cache = (transformers.StaticCache(config=hf.config, max_cache_len=32) if mod
                     else StaticCache(ours.config, max_batch_size=2, max_cache_len=32))
        with torch.no_grad():
            model(ids[:, :5], past_key_values=cache, use_cache=True)
        caches[name] = cache
    a = hf.generate(ids, past_key_values=caches["hf"], max_new_tokens=6, do_sample=False, pad_token_id=0)
    reads = []
    real = type(ours).forward
    def counting(self, input_ids=None, **kw):  # noqa: E306
        reads.append(input_ids.shape[1])
        return real(self, input_ids, **kw)
    type(ours).forward = counting
    try:
        out = ours.generate(ids, past_key_values=caches["ours"], max_new_tokens=6, do_sample=False, pad_token_id=0,
                            return_dict_in_generate=True)
    finally:
        type(ours).forward = real
    assert torch.equal(a, out.sequences)
    assert reads[0] == 4  # the prefill read only the 4 tokens after the cached 5
    assert out.past_key_values is caches["ours"] and caches["ours"].get_seq_length() == 9 + 5
    with pytest.raises(ValueError, match="already holds"):
        ours.generate(ids[:, :3], past_key_values=caches["ours"], max_new_tokens=2)


def test_flash_attention_2_names_what_exists_here():
    from gpt2kit import GPT2Config

    with pytest.raises(ValueError, match="'sdpa'.*'eager'") as e:
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10, attn_implementation="flash_attention_2"))
    assert "GPU kernels" in str(e.value)


@pytest.mark.usefixtures("native_build")
def test_one_row_float32_decode_takes_the_path_this_cpu_runs_fastest(sdpa_pair):
    """On this machine's CPU, a batch-1 float32 decode runs gpt2kit's own float32 kernel (native/dense.c) for
    the blocks and the head where it is built (AVX2 or AVX-512, a compiler); else the path cpu.mkl_gemv_wins names for
    the blocks: MKL's addmm on an Intel CPU, oneDNN on packed weights elsewhere (measured in cpu.py), and the head
    packs."""
    from gpt2kit import cpu, native
    from gpt2kit.model import linear, onednn

    _, ours = sdpa_pair
    if not onednn.linear_available():
        pytest.skip("this torch build has no oneDNN linear")
    out = ours.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=5, min_new_tokens=5, do_sample=False,
                        pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    if native.library() is not None:
        want = head = linear.NATIVE
    else:
        want = linear.ADDMM if cpu.vendor() == "GenuineIntel" and torch.backends.mkl.is_available() else linear.PACKED
        head = linear.PACKED
    assert ours.transformer.h[0].attn.c_attn.last_path == want and ours.lm_head.last_path == head
    with torch.no_grad():  # every step's logits against the plain forward (the decode's GELU is one kernel)
        ref = ours(out.sequences).logits[0, 2:-1]  # (5, V)
    torch.testing.assert_close(torch.cat(out.logits), ref, rtol=0, atol=1e-4)
    # a server's steps (weights laid out for 32 rows): one running request takes the one-row path too, and the
    # packed copies stay for the steps of several
    from gpt2kit.model.cache import StaticCache

    cache = StaticCache(ours.config, max_batch_size=4, max_cache_len=16)
    ours.decode(torch.tensor([[5, 6], [7, 8]]), cache, rows=torch.tensor([0, 1]), rows_hint=32)
    fc = ours.transformer.h[0].mlp.c_fc
    assert fc.last_path == linear.PACKED and fc.packed_weight[1] == 32
    ours.decode(torch.tensor([[9]]), cache, rows=torch.tensor([0]), rows_hint=32)
    assert fc.last_path == want and fc.packed_weight[1] == 32
