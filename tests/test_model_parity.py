"""Acceptance point 1 (and the reference half of point 2): our model against transformers on the same
perturbed random weights, over configs that together switch on every GPT2Config flag, for both attention
backends. transformers' SDPA path returns no attention maps, so every comparison is against its eager path.
"""
import pytest
import torch
import transformers
from model_helpers import TINY, perturb_

from gpt2kit import GPT2Config, GPT2LMHeadModel, GPT2Model

TOL = 1e-5

CONFIGS = {
    "defaults": dict(),
    "relu-ninner-unscaled-untied": dict(activation_function="relu", n_inner=48, scale_attn_weights=False,
                                        layer_norm_epsilon=1e-3, tie_word_embeddings=False),
    "inverse-layer-idx-upcast": dict(n_layer=3, activation_function="gelu", scale_attn_by_inverse_layer_idx=True,
                                     reorder_and_upcast_attn=True),
    "cross-attention": dict(add_cross_attention=True, activation_function="gelu_pytorch_tanh",
                            scale_attn_by_inverse_layer_idx=True, layer_norm_epsilon=1e-6),
    "quick-gelu-two-heads": dict(activation_function="quick_gelu", n_inner=20, n_head=2, scale_attn_weights=False,
                                scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
}
# every flag the issue names is switched away from its default by at least one config
for flag in ("n_inner", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention",
             "layer_norm_epsilon", "activation_function"):
    assert any(flag in c for c in CONFIGS.values()), flag
assert any(c.get("scale_attn_weights") is False for c in CONFIGS.values())
assert any(c.get("tie_word_embeddings") is False for c in CONFIGS.values())


def build(cfg: dict, attn: str, cls=GPT2LMHeadModel, hf_cls=transformers.GPT2LMHeadModel, seed=0):
    """(transformers eager reference, ours with backend `attn`) sharing one set of perturbed weights."""
    kw = {**TINY, **cfg}
    torch.manual_seed(seed)
    hf = perturb_(hf_cls(transformers.GPT2Config(**kw, attn_implementation="eager")), seed=seed).eval()
    ours = cls(GPT2Config(**kw, attn_implementation=attn)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def close(a, b, what):
    diff = (a.float() - b.float()).abs().max().item()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    assert diff <= TOL, f"{what}: max |diff| {diff:.3g} > {TOL}"
    return diff


def inputs(cfg, B=2, T=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (B, T), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, -2:] = -100
    extra = {}
    if cfg.get("add_cross_attention"):
        extra["encoder_hidden_states"] = torch.randn(B, 7, TINY["n_embd"], generator=g)
        mask = torch.ones(B, 7, dtype=torch.long)
        mask[1, 5:] = 0
        extra["encoder_attention_mask"] = mask
    return ids, labels, extra


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_hidden_states_attentions_loss(name, attn):
    cfg = CONFIGS[name]
    hf, ours = build(cfg, attn)
    ids, labels, extra = inputs(cfg)
    with torch.no_grad():
        ref = hf(ids, labels=labels, output_attentions=True, output_hidden_states=True, **extra)
        out = ours(ids, labels=labels, output_attentions=True, output_hidden_states=True, **extra)
    diffs = [close(out.logits, ref.logits, "logits"), close(out.loss, ref.loss, "loss")]
    assert len(out.hidden_states) == len(ref.hidden_states) == ours.config.n_layer + 1
    diffs += [close(a, b, f"hidden_states[{i}]") for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states))]
    assert len(out.attentions) == len(ref.attentions) == ours.config.n_layer
    diffs += [close(a, b, f"attentions[{i}]") for i, (a, b) in enumerate(zip(out.attentions, ref.attentions))]
    if cfg.get("add_cross_attention"):
        assert len(out.cross_attentions) == ours.config.n_layer
        diffs += [close(a, b, f"cross_attentions[{i}]") for i, (a, b) in enumerate(zip(out.cross_attentions, ref.cross_attentions))]
    else:
        assert out.cross_attentions is None
    # asking for attention maps runs the explicit path; without them the "sdpa" config runs the SDPA kernel
    with torch.no_grad():
        fast = ours(ids, labels=labels, output_hidden_states=True, **extra)
    diffs += [close(fast.logits, ref.logits, "logits (no maps)"), close(fast.loss, ref.loss, "loss (no maps)")]
    diffs += [close(a, b, f"hidden_states[{i}] (no maps)") for i, (a, b) in enumerate(zip(fast.hidden_states, ref.hidden_states))]
    print(f"{name}/{attn}: max |diff| over logits, loss, hidden states, attentions = {max(diffs):.2e}")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["defaults", "cross-attention"])
def test_base_model_last_hidden_state(name, attn):
    cfg = CONFIGS[name]
    hf, ours = build(cfg, attn, cls=GPT2Model, hf_cls=transformers.GPT2Model)
    ids, _, extra = inputs(cfg)
    with torch.no_grad():
        close(ours(ids, **extra).last_hidden_state, hf(ids, **extra).last_hidden_state, "last_hidden_state")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_token_type_ids_inputs_embeds_position_ids(attn):
    hf, ours = build(CONFIGS["defaults"], attn)
    ids, _, _ = inputs({})
    tt = torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(5, 5 + ids.shape[1])[None].expand(ids.shape[0], -1)
    emb = hf.transformer.wte(ids) * 1.5
    with torch.no_grad():
        close(ours(ids, token_type_ids=tt).logits, hf(ids, token_type_ids=tt).logits, "token_type_ids")
        close(ours(ids, position_ids=pos).logits, hf(ids, position_ids=pos).logits, "position_ids")
        close(ours(inputs_embeds=emb).logits, hf(inputs_embeds=emb).logits, "inputs_embeds")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_to_keep(attn):
    hf, ours = build(CONFIGS["defaults"], attn)
    ids, _, _ = inputs({})
    with torch.no_grad():
        for keep in (1, 3, torch.tensor([0, 4, 10])):
            got, want = ours(ids, logits_to_keep=keep).logits, hf(ids, logits_to_keep=keep).logits
            assert got.shape[1] == (keep if isinstance(keep, int) else len(keep))
            close(got, want, f"logits_to_keep={keep}")


def test_outputs_by_attribute_key_and_index():
    _, ours = build(CONFIGS["defaults"], "sdpa")
    ids, labels, _ = inputs({})
    out = ours(ids, labels=labels)
    assert out["loss"] is out.loss is out[0] and out["logits"] is out.logits is out[1]
    assert out.past_key_values is out.cache is out[2]
    no_loss = ours(ids, use_cache=False)
    assert no_loss[0] is no_loss.logits and "loss" not in no_loss.keys() and no_loss.past_key_values is None
    as_tuple = ours(ids, return_dict=False, use_cache=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], no_loss.logits)


@pytest.mark.parametrize("name", ["defaults", "relu-ninner-unscaled-untied", "inverse-layer-idx-upcast", "cross-attention"])
def test_long_prefill_float32_fused_path(name):
    """From linear.FUSED_F32_MIN_ROWS rows on, float32 inference runs projections through oneDNN's fused
    linear (+ GELU/ReLU in the GEMM); it must still agree with the reference within 1e-5."""
    from gpt2kit.model import linear, onednn

    if not onednn.linear_available():
        pytest.skip("this torch build has no oneDNN linear: every product is addmm")
    cfg = {**CONFIGS[name], "n_positions": 256}
    hf, ours = build(cfg, "sdpa")
    ids, labels, extra = inputs(cfg, B=2, T=160)
    assert ids.numel() >= linear.FUSED_F32_MIN_ROWS
    with torch.no_grad():
        ref = hf(ids, labels=labels, output_hidden_states=True, **extra)
        out = ours(ids, labels=labels, output_hidden_states=True, **extra)
        block_paths = {p.last_path for blk in ours.transformer.h for p in (blk.attn.c_attn, blk.mlp.c_fc, blk.mlp.c_proj)}
        assert block_paths == {linear.ONEDNN}, block_paths  # the fused path really ran
        ours(ids[:, :9])  # 18 rows: below the threshold, the reference's own addmm
        assert ours.transformer.h[0].mlp.c_fc.last_path == linear.ADDMM
    diffs = [close(out.logits, ref.logits, "logits"), close(out.loss, ref.loss, "loss")]
    diffs += [close(a, b, f"hidden_states[{i}]") for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states))]
    print(f"{name}, 2 x 160 tokens (fused path): max |diff| {max(diffs):.2e}")
