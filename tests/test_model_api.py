"""Construction and housekeeping: GPT-2's initialisation, tying, resize_token_embeddings, num_parameters,
dtype/.to(), train/eval with dropout, Auto classes. Reference figures come from transformers."""
import math

import pytest
import torch
import transformers
from model_helpers import TINY, twin

from gpt2kit import AutoModel, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, GPT2Model

MID = dict(n_layer=4, n_embd=128, n_head=4, vocab_size=2000, n_positions=128)


def test_from_config_initialisation_statistics():
    torch.manual_seed(0)
    m = GPT2LMHeadModel.from_config(GPT2Config(**MID, initializer_range=0.03))
    std, resid = 0.03, 0.03 / math.sqrt(2 * MID["n_layer"])
    for name, p in m.named_parameters():
        if name.endswith("c_proj.weight"):
            assert abs(p.std().item() / resid - 1) < 0.05, name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert abs(p.std().item() / std - 1) < 0.05, name
            assert abs(p.mean().item()) < 0.05 * std, name
        elif "ln_" in name and name.endswith("weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
    assert m.lm_head.weight is m.transformer.wte.weight  # tied
    bf = GPT2LMHeadModel.from_config(GPT2Config(**TINY), dtype="bfloat16", attn_implementation="eager")
    assert bf.dtype == torch.bfloat16 and bf.config._attn_implementation == "eager"


@pytest.mark.parametrize("tie", [True, False])
def test_num_parameters_matches_transformers(tie):
    hf, ours = twin(GPT2LMHeadModel, transformers.GPT2LMHeadModel, tie_word_embeddings=tie)
    for kw in ({}, {"exclude_embeddings": True}, {"only_trainable": True}):
        assert ours.num_parameters(**kw) == hf.num_parameters(**kw), kw
    body = GPT2Model(GPT2Config(**TINY))
    assert body.num_parameters() == transformers.GPT2Model(transformers.GPT2Config(**TINY)).num_parameters()


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("new", [131, 80])
def test_resize_token_embeddings_keeps_old_rows(tie, new):
    _, m = twin(GPT2LMHeadModel, transformers.GPT2LMHeadModel, tie_word_embeddings=tie)
    ids = torch.randint(0, 80, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = m(ids).logits
        emb = m.resize_token_embeddings(new)
        after = m(ids).logits
    assert emb.num_embeddings == new == m.config.vocab_size and after.shape[-1] == new
    assert (m.lm_head.weight is m.transformer.wte.weight) == tie
    keep = min(new, before.shape[-1])
    assert torch.allclose(after[..., :keep], before[..., :keep], atol=1e-6)
    if new > before.shape[-1]:  # as in transformers 5: new rows start at the mean of the old ones
        old_mean = m.transformer.wte.weight[:keep].mean(0)
        assert (m.transformer.wte.weight[keep:] - old_mean).abs().max() < 1e-3
        plain = m.resize_token_embeddings(new + 500, mean_resizing=False).weight[new:]  # or GPT-2's N(0, 0.02)
        assert 0.015 < plain.std().item() < 0.025
    n = m.config.vocab_size
    assert m.resize_token_embeddings(None, pad_to_multiple_of=64).num_embeddings == 64 * math.ceil(n / 64)


def test_dropout_active_in_train_mode_deterministic_in_eval():
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(**TINY, resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2))
    ids = torch.randint(0, 100, (2, 9))
    m.train()
    a, b = m(ids).logits, m(ids).logits
    assert not torch.allclose(a, b)
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(ids).logits, m(ids).logits)
    for attn in ("eager", "sdpa"):  # dropout 0 in train mode is exactly eval mode
        torch.manual_seed(0)
        z = GPT2LMHeadModel(GPT2Config(**TINY, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=attn))
        with torch.no_grad():
            train_out = z.train()(ids).logits
            assert torch.allclose(train_out, z.eval()(ids).logits, atol=1e-6)


def test_training_step_backpropagates_into_tied_embedding():
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(**TINY)).train()
    ids = torch.randint(0, 100, (2, 9))
    m(ids, labels=ids).loss.backward()
    assert m.transformer.wte.weight.grad is not None and m.transformer.h[0].attn.c_attn.weight.grad is not None


def test_to_dtype_and_auto_classes():
    cfg = GPT2Config(**TINY)
    m = AutoModelForCausalLM.from_config(cfg)
    assert type(m) is GPT2LMHeadModel and type(AutoModel.from_config(cfg)) is GPT2Model
    m = m.to(torch.bfloat16)
    assert m.dtype == torch.bfloat16 and m.device.type == "cpu"
    with torch.no_grad():
        assert m(torch.tensor([[1, 2, 3]])).logits.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="needs a GPT2Config"):
        GPT2LMHeadModel({"n_layer": 2})
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        GPT2Model(cfg)()
    with pytest.raises(ValueError, match="vocab_size"):
        GPT2Model(cfg)(torch.tensor([[cfg.vocab_size]]))
    with pytest.raises(ValueError, match="no cross-attention"):
        GPT2Model(cfg)(torch.tensor([[1]]), encoder_hidden_states=torch.zeros(1, 2, cfg.n_embd))


def test_bfloat16_inference_fast_path_agrees_with_plain_path():
    """bf16 inference runs projections through oneDNN's fused linear (bias + GELU in the GEMM) where the CPU
    supports it; with autograd on it takes the plain addmm path. Both must agree with float32 within bf16's
    precision, and float32 never takes the fused path (it stays exact)."""
    from gpt2kit.model import linear, onednn

    hf, m = twin(GPT2LMHeadModel, transformers.GPT2LMHeadModel, attn="sdpa")
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    fc = m.transformer.h[0].mlp.c_fc
    with torch.no_grad():
        f32 = m(ids).logits
        assert fc.last_path == linear.ADDMM  # 18 float32 rows: the reference's own products
    m = m.to(torch.bfloat16)
    with torch.no_grad():
        fused = m(ids).logits.float()
        if onednn.linear_available():  # native bf16: oneDNN with the GELU fused; without: the float32 copy
            assert fc.last_path == (linear.ONEDNN if onednn.bf16_available() else linear.WIDENED)
    plain = m(ids).logits.float()  # grad enabled: addmm and the explicit GELU formula
    assert fc.last_path == linear.ADDMM
    scale = f32.abs().max().item()
    for got in (fused, plain):
        assert (got - f32).abs().max().item() < 0.03 * scale
    print(f"bf16 vs f32 max |diff|: fused {(fused - f32).abs().max().item():.3g}, plain "
          f"{(plain - f32).abs().max().item():.3g} (logits up to {scale:.3g})")
