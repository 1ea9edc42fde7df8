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
        if not name.endswith(".table"):  # a quantized embedding's table: set by the caller
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


@pytest.mark.usefixtures("native_build")
@pytest.mark.parametrize("qconfig", [BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
                                     BitsAndBytesConfig(load_in_8bit=True), TorchAoConfig("int4_weight_only", group_size=32)],
                         ids=["fp4", "int8", "int4"])
def test_every_path_runs_the_quantized_modules(gpt2_small_shaped, qconfig):
    model = AutoModelForCausalLM.from_pretrained(gpt2_small_shaped, quantization_config=qconfig)
    ref = float_twin(model, gpt2_small_shaped)
    ids = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931]])
    from gpt2kit import native

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
        if native.library() is not None:  # a decode step's layer norms ran in the kernels' prologue, its GELU
            blk = model.transformer.h[0]  # and residual adds in their epilogue
            assert (blk.mlp.c_fc.last_epilogue, blk.mlp.c_proj.last_epilogue, blk.attn.c_proj.last_epilogue) == \
                ("gelu", "+residual", "+residual")
            assert (blk.attn.c_attn.last_prologue, blk.mlp.c_fc.last_prologue, blk.mlp.c_proj.last_prologue) == \
                ("layer_norm", "layer_norm", "")
            assert {m.last_call for m in quantized_modules(model).values()} == {"lean"}  # one kernel call each
        b = [ref.decode(ids, ref.cache), ref.decode(ids[:, :1], ref.cache)]
        for x, y in zip(a, b):
            assert (x - y).abs().max().item() < tol
    kernels |= {m.last_kernel for m in quantized_modules(model).values()}
    if native.library() is not None:  # AVX2 or AVX-512 and a C compiler: the fused kernels (and BLAS past 16 rows)
        fused = {"fused-lut4", "fused-lut4-packed", "fused-lut4-tiled", "fused-lut4-amx", "fused-int4-vnni",
                 "fused-int4-avx2", "fused-int8", "fused-int8-tiled", "fused-int8-amx"}
        assert kernels <= fused | {"dequantize+mm"} and kernels & fused
    else:  # else PyTorch's packed int8/int4 kernels, and NF4/FP4 dequantized per product (see modules.py)
        assert kernels <= {"aten-int8pack", "aten-int4pack", "dequantize+mm"} and kernels
    if bf16_acts:
        return  # bf16 activations may flip a near-tie greedy choice: the logits above are the check
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False),
                       ref.generate(ids, max_new_tokens=8, do_sample=False))



@pytest.mark.usefixtures("native_build")
@pytest.mark.parametrize("untie", [False, True])
@pytest.mark.parametrize("quant_type,kwargs", [("int8_weight_only", {}), ("int4_weight_only", {"group_size": 32})],
                         ids=["int8", "int4"])
def test_quantized_embeddings_serve_the_lookup_and_the_head(gpt2_small_shaped, quant_type, kwargs, untie):
    """TorchAoConfig(include_input_output_embeddings=True): the tied [V, C] table is held quantized once (twice
    with untie_embedding_weights), looked up by rows and multiplied as the head by the fused kernels; the
    model equals a float model holding the dequantized weights."""
    from gpt2kit import native
    from gpt2kit.quantization.embedding import QuantizedEmbedding, QuantizedHead

    qconfig = TorchAoConfig(quant_type, include_input_output_embeddings=True, untie_embedding_weights=untie, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gpt2_small_shaped, quantization_config=qconfig)
    wte, head = model.transformer.wte, model.lm_head
    assert isinstance(wte, QuantizedEmbedding) and isinstance(head, QuantizedHead)
    assert (head.table is wte.table) is not untie
    plain = AutoModelForCausalLM.from_pretrained(gpt2_small_shaped, quantization_config=TorchAoConfig(quant_type, **kwargs))
    saved = plain.get_memory_footprint() - model.get_memory_footprint()
    assert saved > (0.7 if not untie else 0.4) * 4 * wte.num_embeddings * wte.embedding_dim
    ref = float_twin(model, gpt2_small_shaped)
    ref.transformer.wte.weight.data = wte.table.dequantize().contiguous()
    ref.lm_head.weight = ref.transformer.wte.weight
    ids = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931]])
    with torch.no_grad():
        assert torch.equal(wte(ids), ref.transformer.wte(ids))  # the lookup dequantizes exactly
        assert (model(ids).logits - ref(ids).logits).abs().max().item() < 1e-4
        for m in (model, ref):
            m.cache = StaticCache(m.config, max_batch_size=1, max_cache_len=16)
        for a, b in zip([model.decode(ids, model.cache), model.decode(ids[:, :1], model.cache)],
                        [ref.decode(ids, ref.cache), ref.decode(ids[:, :1], ref.cache)]):
            assert (a - b).abs().max().item() < 1e-4
    if native.library() is not None:
        assert head.table.last_kernel in ("fused-int8", "fused-lut4", "fused-int4-vnni", "fused-int4-avx2")  # the one-row step's
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False),
                       ref.generate(ids, max_new_tokens=8, do_sample=False))
    from gpt2kit.training.eval import report

    text = torch.randint(0, 50000, (300,), generator=torch.Generator().manual_seed(0))
    assert report(model, text, 1000)["perplexity"] == pytest.approx(report(ref, text, 1000)["perplexity"], rel=1e-3)
    assert TorchAoConfig.from_dict(model.config.quantization_config) == qconfig
    with pytest.raises(NotImplementedError, match="quantized"):
        model.resize_token_embeddings(50300)


@pytest.mark.parametrize("qconfig", [BitsAndBytesConfig(load_in_8bit=True),
                                     BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True),
                                     TorchAoConfig("int4_weight_only", group_size=32, include_input_output_embeddings=True)],
                         ids=["int8", "nf4-dq", "int4-emb"])
def test_a_quantized_model_cast_to_bfloat16_keeps_its_format(gpt2_small_shaped, qconfig):
    """model.to(torch.bfloat16) casts the float parts (embeddings, norms, biases); the quantized statistics
    keep their dtypes (float32), as the kernels read them (before, the
    cast made every logit NaN, and a bfloat16 bias was passed to the kernel as a freed float32 temporary)."""
    model = AutoModelForCausalLM.from_pretrained(gpt2_small_shaped, quantization_config=qconfig)
    ids = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931]])
    formats = {name: [t.dtype for t in m.buffers()] for name, m in quantized_modules(model).items()}
    with torch.no_grad():
        want = model(ids).logits
        model.to(torch.bfloat16)
        got = model(ids).logits
    for name, m in quantized_modules(model).items():
        assert [t.dtype for t in m.buffers()] == formats[name], name  # the format's own dtypes, untouched
        assert m.bias is None or m.bias.dtype is torch.bfloat16
    assert got.dtype is torch.bfloat16 and torch.isfinite(got).all()
    assert (got.float() - want).abs().max().item() < 0.05 * want.abs().max().item()  # a few bf16 roundings

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
    code, out, err = run(["eval", str(text), "--model", str(gpt2_small_shaped), "--json", "--quantize", "int4",
                          "--quantize-embeddings"], capsys)
    assert code == 0, err
    assert abs(json.loads(out)["perplexity"] / scores[None] - 1) < 0.05
    code, out, err = run(["generate", "Hello", "--quantize", "int3"], capsys)
    assert code == 2 and "--quantize" in err
    for argv, says in ((["--quantize", "nf4", "--quantize-embeddings"], "int8 and int4"),
                       (["--quantize-embeddings"], "needs --quantize")):
        code, out, err = run(["generate", "Hello", "--model", str(gpt2_small_shaped)] + argv, capsys)
        assert code != 0 and says in err and "Traceback" not in err


FALLBACK = r"""
import json, sys, torch
from gpt2kit import AutoModelForCausalLM, BitsAndBytesConfig, StaticCache, TorchAoConfig, native
assert native.library() is None  # GPT2KIT_NATIVE_KERNELS=0: what a CPU without AVX2 or a compiler runs
ids = torch.tensor([[464, 2068, 7586, 21831, 18045, 625]])
out = {}
for name, q in (("int8", TorchAoConfig("int8_weight_only")), ("int4", TorchAoConfig("int4_weight_only", group_size=32)),
                ("nf4", BitsAndBytesConfig(load_in_4bit=True))):
    m = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=q)
    with torch.no_grad():
        full = m(ids).logits
        cache = StaticCache(m.config, max_batch_size=1, max_cache_len=16)
        m.decode(ids[:, :5], cache)
        step = m.decode(ids[:, 5:], cache)[0, -1]
    kernels = sorted({x.last_kernel for x in m.modules() if getattr(x, "last_kernel", "")})
    out[name] = {"full": full[0, -1].tolist(), "step": step.tolist(), "kernels": kernels}
print(json.dumps(out))
"""


def test_without_the_native_kernels_every_mode_runs_on_pytorchs(gpt2_small_shaped):
    """A CPU without AVX2 or a C compiler (forced here by GPT2KIT_NATIVE_KERNELS=0, in a fresh process):
    int4 on PyTorch's packed int4 kernel, int8 on its packed int8 kernel where this CPU has native bf16 (else
    dequantized products), nf4 dequantized per product; the forward and a decode step agree with the native-kernel model in this
    process within the bf16 activations those packed kernels take."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "GPT2KIT_NATIVE_KERNELS": "0"}
    run = subprocess.run([sys.executable, "-c", FALLBACK, str(gpt2_small_shaped)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    from gpt2kit.model import onednn

    packed = onednn.bf16_available()
    ids = torch.tensor([[464, 2068, 7586, 21831, 18045, 625]])
    for name, q in (("int8", TorchAoConfig("int8_weight_only")), ("int4", TorchAoConfig("int4_weight_only", group_size=32)),
                    ("nf4", BitsAndBytesConfig(load_in_4bit=True))):
        # int4: PyTorch's packed int4 kernel on any CPU (its N % 16 == 0 holds for GPT-2); int8's only with native bf16
        expected = {"int8": "aten-int8pack" if packed else None, "int4": "aten-int4pack"}.get(name)
        assert got[name]["kernels"] == [expected or "dequantize+mm"], name
        model = AutoModelForCausalLM.from_pretrained(gpt2_small_shaped, quantization_config=q)
        with torch.no_grad():
            want = model(ids).logits[0, -1]
        tol = 4 * want.abs().max().item() / 128 if expected else 1e-4  # bf16 activations, or float32 throughout
        for key in ("full", "step"):
            assert (torch.tensor(got[name][key]) - want).abs().max().item() < tol, (name, key)
