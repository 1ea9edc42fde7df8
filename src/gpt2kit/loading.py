"""Loading a model for a command (generate, eval, serve): --model, --device, --dtype and --quantize, in one place."""
from __future__ import annotations

import os
import sys

from .errors import GPT2KitError

QUANTIZE_CHOICES = ("nf4", "fp4", "int8", "int4")  # gpt2kit.quantization.config.SHORT_NAMES
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")


def add_quantize_flag(p) -> None:
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, help="quantize the projections while loading: nf4 / fp4 "
                   "(bitsandbytes 4-bit, double quant), int8 (LLM.int8's format), int4 (affine, groups of 32); "
                   "default: none, the weights stay float")
    p.add_argument("--quantize-embeddings", action="store_true",
                   help="with --quantize int8 or int4: quantize the token embedding and the tied LM head too, as "
                   "llama.cpp's q8_0/q4_0 files do (TorchAoConfig(include_input_output_embeddings=True)); faster "
                   "decode, smaller model")


def load_model_and_tokenizer(name, device_name: str, dtype_name: str, quantize: str | None = None,
                             quantize_embeddings: bool = False):
    """(model, tokenizer, name) for --model (None: the embedded default), on --device in --dtype, its
    projections (and with quantize_embeddings its embedding and head) quantized while loading when
    --quantize names a format."""
    import torch

    from .auto import AutoModelForCausalLM
    from .tokenizer import AutoTokenizer
    from .default_model import default_model_dir
    from .devices import resolve_device

    device = resolve_device(device_name, "--device")
    if dtype_name == "auto":  # float32 where half precision is slow or inexact (CPU), bfloat16/float16 on GPUs
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
    else:
        dtype = getattr(torch, dtype_name)
    source = default_model_dir() if name is None else name
    if name is not None and os.path.exists(name) and not os.path.isdir(name):
        raise GPT2KitError(f"--model {name!r} is a file; pass the directory that holds config.json and the weights.")
    qconfig = None
    if quantize_embeddings and quantize is None:
        raise GPT2KitError("--quantize-embeddings needs --quantize int8 or --quantize int4.")
    if quantize is not None:
        from .quantization.config import config_for

        qconfig = config_for(quantize, embeddings=quantize_embeddings)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, quantization_config=qconfig).to(device)
    if os.path.isdir(source) and not any(os.path.exists(os.path.join(source, f)) for f in TOKENIZER_FILES):
        print(f"note: {source} has no tokenizer files; using GPT-2's own vocabulary", file=sys.stderr)
        tok = AutoTokenizer.from_pretrained("gpt2")
    else:  # unreadable tokenizer files are an error, not a silent swap for another vocabulary
        tok = AutoTokenizer.from_pretrained(source)
    return model.eval(), tok, name or "embedded default (tinyshakespeare)"
