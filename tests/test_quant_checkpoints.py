"""Quantized checkpoints both ways with transformers + bitsandbytes (test-only dependencies), and
quantize-on-load giving exactly the modules transformers + bitsandbytes build."""
import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")
import bitsandbytes as bnb  # noqa: E402

from gpt2kit import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel  # noqa: E402
from gpt2kit.quantization.config import BitsAndBytesConfig, TorchAoConfig  # noqa: E402
from gpt2kit.quantization.modules import Linear4bit, Linear8bit, QuantizedProjection  # noqa: E402
from gpt2kit.quantization.replace import quantized_modules  # noqa: E402

MODES = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}
IDS = torch.tensor([[5, 17, 256, 3, 999, 42, 7, 8, 100, 64, 1, 2]])


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1000, n_positions=64, bos_token_id=0, eos_token_id=0)
    d = tmp_path_factory.mktemp("float")
    GPT2LMHeadModel(cfg).save_pretrained(d)
    return d


def hf_load(path, **kwargs):
    """transformers + bitsandbytes, computing exactly: its AVX512-BF16 CPU kernel (bf16 activations) is off,
    so 4-bit products run as float32 on bitsandbytes' own dequantized weights."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            m.compute_dtype = torch.float32
    return model


def hf_reference_logits(hf_model):
    """Logits of transformers' float GPT-2 on the weights bitsandbytes holds, dequantized by bitsandbytes
    (for int8 this is the stored format's meaning; LLM.int8 also quantizes activations, see below)."""
    import copy

    ref = copy.deepcopy(hf_model)
    for name, m in list(ref.named_modules()):
        if isinstance(m, bnb.nn.Linear8bitLt):
            cb, scb = m.weight.data, m.state.SCB if m.state.SCB is not None else m.weight.SCB
            w = bnb.functional.int8_vectorwise_dequant(cb, scb).float()
            lin = torch.nn.Linear(m.in_features, m.out_features)
            lin.weight.data, lin.bias.data = w, m.bias.data.float()
            ref.set_submodule(name, lin)
    with torch.no_grad():
        return ref(IDS).logits.float()


@pytest.mark.parametrize("mode", list(MODES))
def test_transformers_checkpoint_loads_in_gpt2kit(float_dir, tmp_path, mode):
    theirs = hf_load(float_dir, quantization_config=transformers.BitsAndBytesConfig(**MODES[mode]), device_map="cpu")
    theirs.save_pretrained(tmp_path)  # before any forward: see test_bf16_repacked_checkpoint
    ours = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert len(quantized_modules(ours)) == 8
    expect = Linear8bit if mode == "int8" else Linear4bit
    assert all(type(m) is expect for m in quantized_modules(ours).values())
    with torch.no_grad():
        got = ours(IDS).logits
    ref = hf_reference_logits(theirs)
    assert (got - ref).abs().max().item() < 1e-3
    if mode != "int8":  # transformers' own forward computes the same products
        with torch.no_grad():
            assert (got - theirs(IDS).logits.float()).abs().max().item() < 1e-3


@pytest.mark.parametrize("mode", list(MODES))
def test_quantize_on_load_is_transformers_and_saves_for_it(float_dir, tmp_path, mode):
    ours = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=BitsAndBytesConfig(**MODES[mode]))
    theirs = hf_load(float_dir, quantization_config=transformers.BitsAndBytesConfig(**MODES[mode]), device_map="cpu")
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "ours" / "model.safetensors"), load_file(tmp_path / "theirs" / "model.safetensors")
    assert set(a) == set(b)
    for key in b:  # the 8-bit absmax codes of double quant: bitsandbytes' CPU kernel rounds near-ties its own way
        if key.endswith(".weight.absmax") and "dq" in mode:
            assert (a[key].long() - b[key].long()).abs().float().mean() < 0.05, key
        else:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    reloaded = hf_load(tmp_path / "ours")
    with torch.no_grad():
        got = ours(IDS).logits
    assert (got - hf_reference_logits(reloaded)).abs().max().item() < 1e-3
    assert ours.get_memory_footprint() < GPT2LMHeadModel.from_pretrained(float_dir).get_memory_footprint()


def test_bf16_repacked_checkpoint_loads(float_dir, tmp_path):
    """bitsandbytes on an AVX512-BF16 CPU repacks a non-nested 4-bit weight at its first forward; a save after
    that stores absmax as bf16 [K/64, N]. gpt2kit reads that layout back (within bf16 rounding of absmax)."""
    cfg = transformers.BitsAndBytesConfig(**MODES["fp4"])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=cfg, device_map="cpu")
    theirs.save_pretrained(tmp_path / "clean")
    with torch.no_grad():
        theirs(IDS)
    theirs.save_pretrained(tmp_path / "repacked")
    from safetensors.torch import load_file

    absmax = load_file(tmp_path / "repacked" / "model.safetensors")["transformer.h.0.attn.c_attn.weight.absmax"]
    if absmax.dim() != 2:
        pytest.skip("bitsandbytes did not repack on this CPU (no AVX512-BF16)")
    clean = AutoModelForCausalLM.from_pretrained(tmp_path / "clean")
    repacked = AutoModelForCausalLM.from_pretrained(tmp_path / "repacked")
    with torch.no_grad():
        a, b = clean(IDS).logits, repacked(IDS).logits
    assert (a - b).abs().max().item() < 0.05 * a.abs().max().item()


def test_skip_modules_and_fast_path(float_dir):
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["c_proj"])
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=cfg)
    names = sorted(quantized_modules(model))
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc",
                     "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    assert not isinstance(model.transformer.h[0].attn.c_proj, QuantizedProjection)
    out = model.generate(IDS[:, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    from gpt2kit import native

    lib = native.library()
    expected = lib.lut4_one_row if lib is not None else "dequantize+mm"  # the one-row kernel for this CPU
    assert model.transformer.h[0].mlp.c_fc.last_kernel == expected


@pytest.mark.usefixtures("native_build")
@pytest.mark.parametrize("group_size", [32, 64])
def test_torchao_int4_matches_its_dequantized_weights(float_dir, tmp_path, group_size):
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=TorchAoConfig("int4_weight_only",
                                                                                            group_size=group_size))
    ref = GPT2LMHeadModel.from_pretrained(float_dir)
    for name, m in quantized_modules(model).items():
        ref.get_submodule(name).weight.data = m.dequantize().t().contiguous()
    from gpt2kit import native

    lib = native.library()
    one_row = (lib.int4_integer if lib is not None else None) or "fused-lut4"  # the kernel this build has
    expected = [one_row, "fused-lut4", "dequantize+mm"] if native.library() is not None else None
    with torch.no_grad():
        for i, ids in enumerate((IDS[:, :1], IDS[:, :3], IDS.repeat(2, 5))):  # 1 row; 3 rows; a prefill (120 rows,
            # past every build's fused row limit, LUT4_MAX_ROWS)
            assert (model(ids).logits - ref(ids).logits).abs().max().item() < 1e-4
            if expected:
                assert {m.last_kernel for m in quantized_modules(model).values()} == {expected[i]}
    with pytest.raises(Exception, match="TorchAo"):
        model.save_pretrained(tmp_path / "int4")
    assert not (tmp_path / "int4").exists()  # refused before anything was written


@pytest.mark.usefixtures("native_build")
# whole tiles of output rows, a part of one left over; 32: AMX's whole 16-row tiles (where the CPU has AMX)
@pytest.mark.parametrize("out_features", [12, 10, 32])
# decode's one-input-row kernel, the general one, the tiled one, and AMX's (16 rows and more, where it runs)
# and past the tiled kernels' 256 rows (AMX's, 256 rows a call; the tiled kernel where AMX refuses the shape)
@pytest.mark.parametrize("rows", [1, 3, 8, 11, 40, 300])
def test_int8_kernel_matches_its_dequantized_weights(out_features, rows):
    from gpt2kit import native

    g = torch.Generator().manual_seed(out_features + rows)
    # the tiled kernel's chunks of 512 inputs and a partial last one; AMX's blocks of 64
    K = 64 if rows < 8 else 1088 if out_features == 32 else 1056
    cb = torch.randint(-127, 128, (out_features, K), generator=g, dtype=torch.int8)
    scb = torch.rand(out_features, generator=g) + 0.5
    bias = torch.randn(out_features, generator=g)
    m = Linear8bit(cb, scb, bias)
    lib = native.library()
    if lib is not None and rows > m._max_rows(lib):
        pytest.skip(f"{rows} rows are past this build's fused row limit (INT8_MAX_ROWS[{lib.isa!r}])")
    x = torch.randn(1, rows, K, generator=g)
    want = x.double() @ m.dequantize().double().t() + bias.double()
    assert (m(x).double() - want).abs().max().item() < 2e-6 * want.abs().max().item()
    if lib is not None:  # the fused kernel is built (AVX2 or AVX-512, a C compiler)
        amx = lib.amx and rows >= lib.amx["int8"] and out_features % 16 == 0 and K % 64 == 0
        assert m.last_kernel == ("fused-int8" if rows < 8 else "fused-int8-amx" if amx else "fused-int8-tiled")


@pytest.mark.usefixtures("native_build")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_one_row_kernel_matches_its_dequantized_weights(float_dir, quant_type):
    """Decode at batch 1 (one input row: the four-output-rows kernel) and a few rows, against the same model
    with the dequantized weights in float32."""
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type)
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=cfg)
    ref = GPT2LMHeadModel.from_pretrained(float_dir)
    for name, m in quantized_modules(model).items():
        ref.get_submodule(name).weight.data = m.dequantize().float().t().contiguous()
    from gpt2kit import native

    lib = native.library()
    with torch.no_grad():
        # one row (the packed kernel on AVX-512), three (the row-at-a-time one), eight (the tiled one)
        for ids, kernel in ((IDS[:, :1], lib and lib.lut4_one_row), (IDS[:, :3], "fused-lut4"),
                            (IDS[:, :8], "fused-lut4-tiled")):
            assert (model(ids).logits - ref(ids).logits).abs().max().item() < 1e-4
            if lib is not None:
                assert {m.last_kernel for m in quantized_modules(model).values()} == {kernel}
