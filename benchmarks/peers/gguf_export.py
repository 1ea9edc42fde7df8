"""Write a GPT-2 checkpoint directory (gpt2kit or Hugging Face layout) as a GGUF file that llama.cpp loads as
its `gpt2` architecture, and quantize that file with llama.cpp's own quantizer.

    python benchmarks/peers/gguf_export.py MODEL_DIR OUT.gguf --outtype f32     # or f16, q8_0, q4_0, q4_K_M

The directory holds config.json, model.safetensors (or a sharded index) and vocab.json + merges.txt. Needs
the optional extra `peers` (`pip install -e .[peers]`: the `gguf` writer and `llama-cpp-python`, which
compiles llama.cpp). Facts about the GGUF side (tensor names, metadata keys, llama.cpp's [out, in] layout,
the tokenizer as "gpt2" BPE with pre-tokenizer "gpt-2") follow llama.cpp's convert_hf_to_gguf.py and the
`gguf` package's own name tables.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile

import numpy as np
import torch

from gpt2kit import GPT2Config
from gpt2kit.errors import InvalidInputError, MissingFileError, NotSupportedError
from gpt2kit.tokenizer.vocab import read_vocab_merges
from gpt2kit.weights.formats import read_index, read_safetensors, read_sharded

FLOAT_TYPES = ("f32", "f16")
QUANT_TYPES = ("q8_0", "q4_0", "q4_K_M")  # through llama_model_quantize, from an f32 GGUF
# activations that ggml's GELU (the tanh approximation) computes; llama.cpp's gpt2 graph has no other
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise MissingFileError("The `gguf` package is needed to write GGUF files: pip install -e '.[peers]'") from None
    return gguf


@contextlib.contextmanager
def _atomic(path: str):
    """Yield a temporary path beside `path`; on success it becomes `path`, on failure it is removed."""
    fd, tmp = tempfile.mkstemp(prefix=".gguf-", dir=os.path.dirname(path))
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_supported(config: GPT2Config) -> None:
    """llama.cpp's gpt2 graph is plain GPT-2: refuse a config it would compute differently, rather than
    write a file that loads and then disagrees."""
    problems = []
    if config.activation_function not in TANH_GELUS:
        problems.append(f"activation_function={config.activation_function!r} (llama.cpp's gpt2 runs only the "
                        f"tanh GELU: {', '.join(TANH_GELUS)})")
    if not config.scale_attn_weights:
        problems.append("scale_attn_weights=False (llama.cpp always divides scores by sqrt(head_dim))")
    if config.scale_attn_by_inverse_layer_idx:
        problems.append("scale_attn_by_inverse_layer_idx=True")
    if config.add_cross_attention:
        problems.append("add_cross_attention=True")
    if problems:
        raise NotSupportedError("This checkpoint cannot be written as llama.cpp's gpt2 architecture: "
                                + "; ".join(problems) + ". Export a plain GPT-2 config instead.")


def read_checkpoint(model_dir: str) -> tuple[GPT2Config, dict[str, torch.Tensor]]:
    """The config and the file's tensors, names without the `transformer.` prefix, Conv1D still [in, out]."""
    config = GPT2Config.from_pretrained(model_dir)
    single, index = os.path.join(model_dir, "model.safetensors"), os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(single):
        raw = read_safetensors(single)
    elif os.path.isfile(index):
        shards = {f: os.path.join(model_dir, f) for f in set(read_index(index).values())}
        raw = read_sharded(index, shards)
    else:
        raise MissingFileError(f"No model.safetensors (or model.safetensors.index.json) in {model_dir!r}; save "
                               "the model there with save_pretrained(..., safe_serialization=True) first.")
    state = {}
    for name, t in raw.items():
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # the causal-mask buffers of old checkpoints
            continue
        state[name] = t
    return config, state


def _vocabulary(model_dir: str, config: GPT2Config) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, token types, merges) for llama.cpp's BPE vocabulary."""
    gguf = _gguf()
    vocab_file, merges_file = os.path.join(model_dir, "vocab.json"), os.path.join(model_dir, "merges.txt")
    for f in (vocab_file, merges_file):
        if not os.path.isfile(f):
            raise MissingFileError(f"{f!r} is missing: llama.cpp needs the tokenizer inside the GGUF file. Save the "
                                   "tokenizer into the model directory (tokenizer.save_pretrained(dir)).")
    vocab, merges = read_vocab_merges(vocab_file, merges_file)
    if len(vocab) > config.vocab_size or sorted(vocab.values()) != list(range(len(vocab))):
        raise InvalidInputError(f"vocab.json has {len(vocab)} tokens with ids that are not 0..{len(vocab) - 1} "
                                f"within the model's vocab_size {config.vocab_size}; the files do not match.")
    special = {i for i in (config.bos_token_id, config.eos_token_id) if i is not None}
    tok_cfg = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.isfile(tok_cfg):
        with open(tok_cfg, encoding="utf-8") as f:
            decoder = json.load(f).get("added_tokens_decoder", {})
        special |= {int(i) for i, t in decoder.items() if t.get("special")}
    tokens = [None] * config.vocab_size
    for tok, i in vocab.items():
        tokens[i] = tok
    types = []
    for i, tok in enumerate(tokens):
        if tok is None:  # rows of a padded embedding that no text maps to
            tokens[i] = f"[PAD{i}]"
            types.append(gguf.TokenType.UNUSED)
        else:
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types], merges


def _gguf_tensors(config: GPT2Config, state: dict[str, torch.Tensor]):
    """(GGUF name, float32 array in llama.cpp's layout) for every tensor llama.cpp's gpt2 reads."""
    gguf = _gguf()
    T, names = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    plan = [("wte.weight", names[T.TOKEN_EMBD] + ".weight"), ("wpe.weight", names[T.POS_EMBD] + ".weight"),
            ("ln_f.weight", names[T.OUTPUT_NORM] + ".weight"), ("ln_f.bias", names[T.OUTPUT_NORM] + ".bias")]
    per_block = {"ln_1": T.ATTN_NORM, "attn.c_attn": T.ATTN_QKV, "attn.c_proj": T.ATTN_OUT, "ln_2": T.FFN_NORM,
                 "mlp.c_fc": T.FFN_UP, "mlp.c_proj": T.FFN_DOWN}
    for i in range(config.n_layer):
        for ours, theirs in per_block.items():
            for part in ("weight", "bias"):
                plan.append((f"h.{i}.{ours}.{part}", names[theirs].format(bid=i) + "." + part))
    if not config.tie_word_embeddings:
        plan.append(("lm_head.weight", names[T.OUTPUT] + ".weight"))  # nn.Linear: already [out, in]
    missing = [src for src, _ in plan if src not in state]
    if missing:
        raise InvalidInputError(f"The checkpoint lacks {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}: "
                                "not a complete GPT2LMHeadModel checkpoint.")
    for src, dst in plan:
        t = state[src].float()
        if src.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            t = t.t()  # Conv1D [in, out] -> llama.cpp's [out, in] (GGUF's ne0 is the input width)
        yield dst, t.contiguous().numpy()


def export_gguf(model_dir: str, out_path: str, outtype: str = "f32") -> str:
    """Write `model_dir` as a GGUF file at `out_path` (atomically); outtype "f32" or "f16" (1-D tensors stay
    f32 either way, as llama.cpp's converter does). Returns out_path."""
    if outtype not in FLOAT_TYPES:
        raise InvalidInputError(f"outtype must be one of {', '.join(FLOAT_TYPES)}, got {outtype!r}; quantized types "
                                "go through quantize_gguf() from an f32 file.")
    gguf = _gguf()
    config, state = read_checkpoint(model_dir)
    check_supported(config)
    tokens, types, merges = _vocabulary(model_dir, config)
    ftype = gguf.LlamaFileType.ALL_F32 if outtype == "f32" else gguf.LlamaFileType.MOSTLY_F16
    out_path = os.path.abspath(out_path)
    with _atomic(out_path) as tmp:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
        w.add_name(os.path.basename(os.path.normpath(model_dir)))
        w.add_context_length(config.n_positions)
        w.add_embedding_length(config.n_embd)
        w.add_feed_forward_length(config.inner_dim)
        w.add_block_count(config.n_layer)
        w.add_head_count(config.n_head)
        w.add_layer_norm_eps(config.layer_norm_epsilon)
        w.add_file_type(ftype)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        if config.bos_token_id is not None:
            w.add_bos_token_id(config.bos_token_id)
        if config.eos_token_id is not None:
            w.add_eos_token_id(config.eos_token_id)
        w.add_add_bos_token(False)  # GPT-2 prompts start with no BOS, as gpt2kit's tokenizer encodes them
        for name, arr in _gguf_tensors(config, state):
            if outtype == "f16" and arr.ndim == 2:
                arr = arr.astype(np.float16)
            w.add_tensor(name, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out_path


def quantize_gguf(src: str, dst: str, qtype: str, n_threads: int = 2) -> str:
    """Quantize the GGUF file `src` (f32 or f16) to `qtype` ("q8_0", "q4_0", "q4_K_M") with llama.cpp's own
    llama_model_quantize, into `dst` (atomically). Returns dst."""
    if qtype not in QUANT_TYPES:
        raise InvalidInputError(f"qtype must be one of {', '.join(QUANT_TYPES)}, got {qtype!r}.")
    try:
        import llama_cpp
    except ImportError:
        raise MissingFileError("llama-cpp-python is needed to quantize: pip install -e '.[peers]'") from None
    gguf = _gguf()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(getattr(gguf.LlamaFileType, "MOSTLY_" + qtype.upper()))
    params.nthread = n_threads
    dst = os.path.abspath(dst)
    with _atomic(dst) as tmp:
        rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(tmp), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({src!r} -> {qtype}) returned {rc}; llama.cpp's log above says why.")
    return dst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument("--outtype", default="f32", choices=FLOAT_TYPES + QUANT_TYPES)
    ap.add_argument("--threads", type=int, default=2, help="quantizer threads")
    args = ap.parse_args(argv)
    if args.outtype in FLOAT_TYPES:
        export_gguf(args.model_dir, args.out, args.outtype)
    else:
        with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.out))) as d:
            quantize_gguf(export_gguf(args.model_dir, os.path.join(d, "f32.gguf")), args.out, args.outtype, args.threads)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB, {args.outtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
