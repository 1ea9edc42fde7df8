"""benchmarks/peers/gguf_export.py: a gpt2kit checkpoint written as GGUF runs in llama.cpp as the same model.

llama.cpp (through llama-cpp-python) is the reference here: its greedy continuation and its logits on the
exported file must equal gpt2kit's on the checkpoint it came from. Needs the optional extra `peers`
(llama-cpp-python compiles llama.cpp, so CI's `test` extra leaves it out); the tests skip without it.
"""
import importlib.util
import pathlib

import numpy as np
import pytest
import torch

from model_helpers import perturb_

REPO = pathlib.Path(__file__).resolve().parents[1]


def _exporter():
    spec = importlib.util.spec_from_file_location("gguf_export", REPO / "benchmarks" / "peers" / "gguf_export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _need_peers():
    pytest.importorskip("gguf", reason="the `gguf` package (extra `peers`) is not installed")
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python (extra `peers`) is not installed")


def _llama(llama_cpp, path, n_ctx):
    return llama_cpp.Llama(model_path=str(path), n_threads=2, n_threads_batch=2, n_ctx=n_ctx, n_batch=n_ctx,
                           logits_all=True, verbose=False, seed=0)


def _llama_greedy(llm, prompt, n):
    llm.reset()  # no prefix reuse from an earlier call
    out = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if len(out) == n:
            return out


def _llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))  # [T, vocab]


def _check_same_model(llama_cpp, model_dir, gguf_path, prompt_ids, n_new, atol):
    from gpt2kit import GPT2LMHeadModel

    ours = GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        want = ours.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                             pad_token_id=50256)[0, len(prompt_ids):].tolist()
        full = prompt_ids + want
        ref = ours(torch.tensor([full])).logits[0]  # [T, vocab]
    llm = _llama(llama_cpp, gguf_path, n_ctx=len(full) + 8)
    got = _llama_greedy(llm, prompt_ids, n_new)
    assert got == want, f"llama.cpp's greedy continuation differs from gpt2kit's:\n{got}\n{want}"
    logits = _llama_logits(llm, full)
    err = (logits - ref).abs().max().item()
    assert err < atol, f"max |logit difference| {err:.2e} >= {atol}"
    return llm


def test_default_model_runs_in_llama_cpp_as_in_gpt2kit(tmp_path):
    llama_cpp = _need_peers()
    from gpt2kit import GPT2Tokenizer
    from gpt2kit.default_model import default_model_dir

    path = _exporter().export_gguf(default_model_dir(), tmp_path / "default.gguf", "f32")
    text = "ROMEO:\nBut, soft! what light through yonder window breaks?"
    prompt = GPT2Tokenizer.from_pretrained(default_model_dir())(text)["input_ids"]
    # ggml sums in another order and approximates GELU its own way: max |logit diff| measured 1.7e-3 here
    llm = _check_same_model(llama_cpp, default_model_dir(), path, prompt, n_new=24, atol=1e-2)
    # the tokenizer travelled too: llama.cpp's own BPE gives gpt2kit's ids and decodes them back
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == prompt
    assert llm.detokenize(prompt).decode() == text
    assert llm.token_eos() == 50256 and llm.token_bos() == 50256


def test_gpt2_small_width_random_weights(tmp_path):
    llama_cpp = _need_peers()
    from gpt2kit import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    torch.manual_seed(0)
    # GPT-2 small's tensors (768 wide, 50257 tokens, 1024 positions) in 2 of its 12 blocks: the other ten are the
    # same tensors again, and took 3/4 of the suite's longest test
    model = perturb_(GPT2LMHeadModel(GPT2Config(n_layer=2)), scale=0.02)
    model.save_pretrained(tmp_path / "ckpt")
    GPT2Tokenizer.from_pretrained("gpt2").save_pretrained(tmp_path / "ckpt")
    exporter = _exporter()
    f32 = exporter.export_gguf(tmp_path / "ckpt", tmp_path / "f32.gguf", "f32")
    prompt = torch.randint(0, 50257, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    llm = _check_same_model(llama_cpp, tmp_path / "ckpt", f32, prompt, n_new=8, atol=1e-2)
    del llm

    # quantized through llama.cpp's own quantizer: the file holds the asked-for block type and still runs
    import gguf

    q8 = exporter.quantize_gguf(f32, tmp_path / "q8_0.gguf", "q8_0")
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(q8).tensors}
    assert kinds["blk.0.attn_qkv.weight"] == "Q8_0" and kinds["blk.1.ffn_down.weight"] == "Q8_0"
    assert kinds["blk.0.attn_norm.weight"] == "F32"
    ids = prompt + [0, 1]
    ref = _llama_logits(_llama(llama_cpp, f32, 32), ids)
    got = _llama_logits(_llama(llama_cpp, q8, 32), ids)
    err = (got - ref).abs().max().item()  # q8_0 also rounds the activations to 8 bits: 0.09 measured, std 0.78
    assert 1e-3 < err < 0.25 * ref.std().item(), f"q8_0 logits off f32's by {err:.3g}"  # near f32, not f32 itself


def test_refuses_configs_llama_cpp_computes_differently():
    from gpt2kit import GPT2Config
    from gpt2kit.errors import NotSupportedError

    check = _exporter().check_supported
    check(GPT2Config())
    for bad in (dict(activation_function="relu"), dict(scale_attn_weights=False),
                dict(scale_attn_by_inverse_layer_idx=True)):
        with pytest.raises(NotSupportedError, match=next(iter(bad))):
            check(GPT2Config(**bad))
