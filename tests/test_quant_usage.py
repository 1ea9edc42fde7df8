"""Quantization as a user meets it: the reference page's example, every forward path, the command line."""
import json

import pytest
import torch

from gpt2kit import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, StaticCache
from gpt2kit.quantization import BitsAndBytesConfig, TorchAoConfig
from gpt2kit.quantization.modules import Linear4bit
from gpt2kit.quantization.replace import quantized_modules
from test_cli import run  # `gpt2kit ARGV` in this process: (exit status, stdout, stderr)


@pytest.fixture(scope="module")
def gpt2_small_shaped(tmp_path_factory):
    """GPT-2 small's shapes (768 wide, 12 heads, its vocabulary) with 2 blocks, random weights."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("gpt2-2layer")
    GPT2LMHeadModel(GPT2Config(n_layer=2)).save_pretrained(d)
    return d


def float_twin(model, path):
    """A float model holding exactly the quantized model's dequantized weights."""
    ref = GPT2LMHeadModel.from_pretrained(path)
    for name, m in quantized_modules(model).items():
        ref.get_submodule(name).weight.data = m.dequantize().t().contiguous()
    return ref


def test_reference_page_example(gpt2_small_shaped):
    from gpt2kit import BitsAndBytesConfig  # the page's import, from gpt2kit

    quantization_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype="float16",
        bnb_4bit_use_double_quant=True
    )
    model = AutoModelForCausalLM.from_pretrained(
        gpt2_small_shaped,
        quantization_config=quantization_config,
        device_map="auto"
    )
    tokenizer = AutoTokenizer.from_pretrained("openai-community/gpt2-xl")
    inputs = tokenizer("Once upon a time, there was a magical forest", return_tensors="pt").to(model.device)
    outputs = model.generate(**inputs, max_new_tokens=100)
    text = tokenizer.decode(outputs[0], skip_special_tokens=True)
    assert text.startswith("Once upon a time, there was a magical forest")
    assert outputs.shape[1] == inputs["input_ids"].shape[1] + 100
    mods = quantized_modules(model)
    assert len(mods) == 8 and all(isinstance(m, Linear4bit) and m.double_quant and m.mode == "nf4" for m in mods.values())
    assert model.is_loaded_in_4bit and model.config.quantization_config["bnb_4bit_quant_type"] == "nf4"
    for m in mods.values():  # 4-bit codes, absmax and double-quant state: under 0.15x the float32 matrix
        assert m.memory_bytes() < 0.15 * 4 * m.in_features * m.out_features
    saved = float_twin(model, gpt2_small_shaped).get_memory_footprint() - model.get_memory_footprint()
    assert saved > 0.85 * sum(4 * m.in_features * m.out_features for m in mods.values())


@pytest.mark.parametrize("qconfig", [BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
                                     BitsAndBytesConfig(load_in_8bit=True), TorchAoConfig("int4_weight_only", group_size=32)],
                         ids=["fp4", "int8", "int4"])
def test_every_path_runs_the_quantized_modules(gpt2_small_shaped, qconfig):
    model = AutoModelForCausalLM.from_pretrained(gpt2_small_shaped, quantization_config=qconfig)
    ref = float_twin(model, gpt2_small_shaped)
    ids = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931]])
    from gpt2kit.quantization import native

    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits  # model.forward
        kernels = {m.last_kernel for m in quantized_modules(model).values()}
        # PyTorch's packed int8/int4 kernels (where the fused ones cannot run) take bf16 activations
        bf16_acts = bool(kernels & {"aten-int8pack", "aten-int4pack"})
        tol = 4 * want.abs().max().item() / 128 if bf16_acts else 1e-4
        assert (got - want).abs().max().item() < tol
        for m in (model, ref):  # model.decode: a prompt, then one step
            m.cache = StaticCache(m.config, max_batch_size=1, max_cache_len=16)
        a = [model.decode(ids, model.cache), model.decode(ids[:, :1], model.cache)]
        b = [ref.decode(ids, ref.cache), ref.decode(ids[:, :1], ref.cache)]
        for x, y in zip(a, b):
            assert (x - y).abs().max().item() < tol
    kernels |= {m.last_kernel for m in quantized_modules(model).values()}
    if native.library() is not None:  # AVX-512 and a C compiler: the fused kernels (and BLAS past 16 rows)
        assert kernels <= {"fused-lut4", "fused-int8", "dequantize+mm"} and kernels & {"fused-lut4", "fused-int8"}
    else:  # else PyTorch's packed int8/int4 kernels, and NF4/FP4 dequantized per product (see modules.py)
        assert kernels <= {"aten-int8pack", "aten-int4pack", "dequantize+mm"} and kernels
    if bf16_acts:
        return  # bf16 activations may flip a near-tie greedy choice: the logits above are the check
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False),
                       ref.generate(ids, max_new_tokens=8, do_sample=False))


def test_cli_quantize_flag(gpt2_small_shaped, tmp_path, capsys):
    from gpt2kit.tokenizer import AutoTokenizer as Tok

    Tok.from_pretrained("gpt2").save_pretrained(gpt2_small_shaped)
    code, out, err = run(["generate", "Hello", "--model", str(gpt2_small_shaped), "--quantize", "nf4",
                          "--max-new-tokens", "5", "--greedy", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 8)
    scores = {}
    for q in (None, "int8"):
        argv = ["eval", str(text), "--model", str(gpt2_small_shaped), "--json"] + (["--quantize", q] if q else [])
        code, out, err = run(argv, capsys)
        assert code == 0, err
        scores[q] = json.loads(out)["perplexity"]
    assert abs(scores["int8"] / scores[None] - 1) < 0.01
    code, out, err = run(["generate", "Hello", "--quantize", "int3"], capsys)
    assert code == 2 and "--quantize" in err
