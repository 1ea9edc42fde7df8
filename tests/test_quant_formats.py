"""The quantized formats against bitsandbytes itself (a test-only dependency), byte for byte, on random
weights of GPT-2's projection shapes in Linear layout [out, in]."""
import pytest
import torch

from gpt2kit.quantization import formats as Q
from gpt2kit.quantization.config import BitsAndBytesConfig, TorchAoConfig, from_config_dict

bnbf = pytest.importorskip("bitsandbytes.functional")

# GPT-2 small's c_attn, c_fc and c_proj (mlp), transposed to [out, in]; an odd shape exercises the tail block
SHAPES = [(2304, 768), (768, 3072), (37, 29)]


def gpt2_like(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[:: 97] *= 12  # outliers, so block absmax varies as in trained weights
    return w.to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_4bit_matches_bitsandbytes_byte_for_byte(shape, quant_type, dtype):
    w = gpt2_like(shape, dtype)
    data, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type=quant_type)
    ours = Q.quantize_4bit(w, quant_type, 64, double_quant=False)
    assert ours.data.dtype == torch.uint8 and ours.data.shape == data.shape
    assert torch.equal(ours.data, data)
    assert torch.equal(ours.absmax, state.absmax)
    reference = state.as_dict(packed=True)  # the checkpoint entries bitsandbytes writes
    mine = ours.state_dict("")
    assert set(mine) == {"weight"} | {"weight." + k for k in reference}
    for key, value in reference.items():
        assert torch.equal(mine["weight." + key], value), key
    # dequantized: exactly bitsandbytes' dequantize_4bit, in the weight's dtype
    expected = bnbf.dequantize_4bit(data, state)
    got = Q.dequantize_4bit(ours)
    assert got.dtype == expected.dtype == dtype
    assert torch.equal(got, expected)


@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quant_matches_bitsandbytes(shape, quant_type):
    w = gpt2_like(shape, torch.float32, seed=1)
    data, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=quant_type)
    ours = Q.quantize_4bit(w, quant_type, 64, double_quant=True)
    assert torch.equal(ours.data, data)  # the 4-bit codes
    assert ours.offset == state.offset.item()
    assert torch.equal(ours.nested_absmax, state.state2.absmax)
    assert torch.equal(ours.nested_code, state.state2.code)  # the dynamic map, as stored
    reference = state.as_dict(packed=True)
    mine = ours.state_dict("")
    assert set(mine) == {"weight"} | {"weight." + k for k in reference}
    for key in ("quant_map", "nested_absmax", "nested_quant_map", f"quant_state.bitsandbytes__{quant_type}"):
        assert torch.equal(mine["weight." + key], reference[key]), key
    # the 8-bit absmax codes: nearest dynamic-map value (bitsandbytes' torch kernel); its compiled CPU kernel
    # rounds values that lie within ~1.5e-5 of a midpoint to the other neighbour: allow exactly those
    ours_q, theirs_q = ours.absmax.long(), state.absmax.long()
    differ = (ours_q != theirs_q).nonzero().flatten()
    assert differ.numel() <= max(4, ours_q.numel() // 200)
    code = Q.dynamic_map()
    normed = (Q.quantize_4bit(w, quant_type, 64).absmax - ours.offset)
    normed = normed / ours.nested_absmax.repeat_interleave(256)[: normed.numel()]
    for i in differ.tolist():
        mine, other = (abs(code[q[i]].item() - normed[i].item()) for q in (ours_q, theirs_q))
        assert mine <= other <= mine + 3e-5  # ours is the nearest; theirs a near-tie neighbour


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_of_bitsandbytes_state_is_exact(quant_type):
    """Loading a bitsandbytes checkpoint: their codes (double quant included) -> exactly their weights."""
    w = gpt2_like((768, 3072), torch.float32, seed=2)
    data, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=quant_type)
    theirs = Q.Quantized4bit(data=data, shape=tuple(state.shape), dtype=state.dtype, quant_type=quant_type,
                             blocksize=64, absmax=state.absmax, offset=state.offset.item(),
                             nested_absmax=state.state2.absmax, nested_code=state.state2.code)
    assert torch.equal(Q.dequantize_4bit(theirs), bnbf.dequantize_4bit(data, state))


def test_dynamic_map_is_bitsandbytes():
    assert torch.equal(Q.dynamic_map(), bnbf.create_dynamic_map())


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_rowwise_matches_bitsandbytes(shape):
    w = gpt2_like(shape, torch.float32, seed=3)
    cb, scb, _ = bnbf.int8_vectorwise_quant(w.half())  # what Int8Params does with a weight
    ours_cb, ours_scb = Q.quantize_int8_rowwise(w)
    assert ours_cb.dtype == torch.int8 and torch.equal(ours_cb, cb)
    assert torch.equal(ours_scb, scb)
    assert torch.equal(Q.dequantize_int8_rowwise(cb, scb), bnbf.int8_vectorwise_dequant(cb, scb).float())


def test_int4_affine_round_trip_bound():
    w = gpt2_like((768, 3072), torch.float32, seed=4)
    for g in (32, 64, 128):
        q, scales, zeros = Q.quantize_int4_affine(w, g)
        assert int(q.min()) >= 0 and int(q.max()) <= 15
        err = (Q.dequantize_int4_affine(q, scales, zeros) - w).abs().view(768, -1, g)
        assert bool((err <= scales[..., None] / 2 + 1e-6).all())  # within half a step of its group


def test_bitsandbytes_config_round_trip_matches_transformers():
    from transformers import BitsAndBytesConfig as HF

    kwargs = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="float16",
                  bnb_4bit_use_double_quant=True)
    ours, theirs = BitsAndBytesConfig(**kwargs), HF(**kwargs)
    assert ours.to_dict() == theirs.to_dict()
    assert BitsAndBytesConfig().to_dict() == HF().to_dict()  # every default
    assert BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["c_proj"]).to_dict() == \
        HF(load_in_8bit=True, llm_int8_skip_modules=["c_proj"]).to_dict()
    assert from_config_dict(theirs.to_dict()) == ours
    assert ours.quantization_method() == theirs.quantization_method() == "nf4"


def test_config_errors_are_specific():
    with pytest.raises(ValueError, match="both True"):
        BitsAndBytesConfig(load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ValueError, match="'nf4' or 'fp4'"):
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="int4")
    with pytest.raises(ValueError, match="group_size"):
        TorchAoConfig("int4_weight_only", group_size=48)
    with pytest.raises(ValueError, match="quant_method 'gptq'"):
        from_config_dict({"quant_method": "gptq"})
    assert TorchAoConfig("int4_weight_only", group_size=32).to_dict()["quant_type_kwargs"] == {"group_size": 32}
