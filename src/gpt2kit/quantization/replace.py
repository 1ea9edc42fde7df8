"""Which modules are quantized, and building their quantized replacements: from a float weight (quantize
on load, or an in-memory model) or from a checkpoint that transformers + bitsandbytes wrote.

As transformers does for GPT-2, the projections of every block are quantized (attn.c_attn, attn.c_proj,
mlp.c_fc, mlp.c_proj, and a cross-attention's c_attn / q_attn / c_proj); embeddings, layer norms, biases
and the (tied) head stay as they are. `llm_int8_skip_modules` (BitsAndBytesConfig) or
`modules_to_not_convert` (TorchAoConfig) names modules to leave in float, matched as transformers does.
"""
from __future__ import annotations

import logging
import re

import torch

from . import formats as Q
from .config import BitsAndBytesConfig, TorchAoConfig
from .modules import AMX_PARTS, Linear4bit, Linear8bit, LinearInt4, QuantizedProjection
from .. import native
from ..errors import InvalidInputError

logger = logging.getLogger("gpt2kit.quantization")

_PROJECTION = re.compile(r"(^|\.)h\.\d+\.(attn|crossattention)\.(c_attn|q_attn|c_proj)$|(^|\.)h\.\d+\.mlp\.(c_fc|c_proj)$")
_CPU_NOTE_SHOWN = set()


def is_projection(module_name: str) -> bool:
    return bool(_PROJECTION.search(module_name))


def skipped(module_name: str, patterns) -> bool:
    """transformers' rule: a pattern matches from the start up to a module boundary, as a regex with the same
    boundary, or as a suffix ('c_proj' skips every h.N.attn.c_proj and h.N.mlp.c_proj)."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{p}){boundary}", module_name) or module_name.endswith(p) for p in patterns or ())


def targets(module_names, qconfig) -> list[str]:
    """The module names (of a model or a checkpoint) that `qconfig` quantizes."""
    return [n for n in module_names if is_projection(n) and not skipped(n, qconfig.skip_modules)]


def batch_invariant(model) -> int:
    """Make the model's 4-bit products float32-exact at every row count (Linear4bit.batch_invariant), so that a row's
    results do not depend on the rows computed beside it (on AMX a lower compute dtype runs only from a few rows on);
    returns how many modules it set."""
    mods = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for m in mods:
        m.batch_invariant = True  # __setattr__ drops the cached kernel arguments, which hold the part count
    return len(mods)


def compute_dtype(qconfig):
    dtype = getattr(qconfig, "bnb_4bit_compute_dtype", None)
    if dtype in (torch.float16, torch.bfloat16) and qconfig.mode not in _CPU_NOTE_SHOWN:
        _CPU_NOTE_SHOWN.add(qconfig.mode)
        name = str(dtype).removeprefix("torch.")
        lib = native.library()
        if lib is not None and lib.amx:
            how = ("as one bf16 product, as asked" if dtype is torch.bfloat16 else
                   "as three bf16 products (bf16x2: ~2^-16 relative, more than float16's precision)")
            where = (f"this CPU's AMX unit computes 4-bit products of {lib.amx['lut4'][AMX_PARTS[dtype]]} rows and "
                     f"more {how}; fewer rows (a decode step) in float32; a server keeps them float32 at every row count")
        else:
            where = ("on this CPU gpt2kit computes the quantized products in float32 (its kernels decode the weights "
                     "to float32; half-precision CPU products are slower without AMX)")
        logger.info("bnb_4bit_compute_dtype=%s: %s; on a GPU it computes in %s.", name, where, name)
    return dtype


def from_float(weight_in_out: torch.Tensor, bias: torch.Tensor | None, qconfig) -> QuantizedProjection:
    """A quantized module from a Conv1D weight [in, out] (GPT-2's layout) and its bias."""
    return from_float_linear(weight_in_out.detach().t(), bias, qconfig)  # Linear layout, as bitsandbytes quantizes


def from_float_linear(w: torch.Tensor, bias: torch.Tensor | None, qconfig) -> QuantizedProjection:
    """A quantized module from a weight in Linear layout [out, in] and its bias."""
    w = w.detach()
    if isinstance(qconfig, BitsAndBytesConfig):
        if qconfig.load_in_8bit:
            cb, scb = Q.quantize_int8_rowwise(w)
            return Linear8bit(cb, scb, bias, qconfig.llm_int8_threshold)
        q = Q.quantize_4bit(w.contiguous(), qconfig.bnb_4bit_quant_type, 64, qconfig.bnb_4bit_use_double_quant)
        return Linear4bit(q, bias, compute_dtype(qconfig))
    if isinstance(qconfig, TorchAoConfig):
        if qconfig.mode == "int8":  # symmetric per output channel: the same storage as LLM.int8's
            cb, scb = Q.by_row_chunks(lambda rows: Q.quantize_int8_rowwise(rows.float()), w)
            return Linear8bit(cb, scb, bias)
        return LinearInt4(w, bias, qconfig.group_size)
    raise InvalidInputError(f"quantization_config must be a BitsAndBytesConfig or TorchAoConfig, got {type(qconfig).__name__}.")


def quantize_model(model, qconfig) -> list[str]:
    """Swap the projections of an in-memory float model for quantized ones, in place (and the embeddings, with
    TorchAoConfig(include_input_output_embeddings=True)). Returns the projections' names."""
    names = targets([n for n, _ in model.named_modules()], qconfig)
    for name in names:
        old = model.get_submodule(name)
        model.set_submodule(name, from_float(old.weight, old.bias, qconfig))
    from .embedding import quantize_embeddings

    quantize_embeddings(model, qconfig)
    model.quantization_config = qconfig
    return names


# -- pre-quantized checkpoints (transformers + bitsandbytes) ---------------------------------------------

_4BIT_SUFFIXES = ("weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
                  "weight.quant_state.bitsandbytes__nf4", "weight.quant_state.bitsandbytes__fp4")


def prequantized_modules(state: dict, qconfig: BitsAndBytesConfig) -> dict[str, dict]:
    """{checkpoint module name: its quantized entries (suffix -> tensor)}, popped from `state`. The module's
    weight and (if any) bias are popped too, so what is left loads as a float checkpoint."""
    if not isinstance(qconfig, BitsAndBytesConfig):
        raise InvalidInputError("Only bitsandbytes pre-quantized checkpoints can be loaded; for torchao's, load the "
                                "float checkpoint with quantization_config=TorchAoConfig(...).")
    marker = "SCB" if qconfig.load_in_8bit else "weight.quant_map"
    owners = sorted({k[: -len(marker) - 1] for k in state if k.endswith("." + marker)})
    groups = {}
    for owner in owners:
        suffixes = ("weight", "bias", "SCB", "weight_format") if qconfig.load_in_8bit else ("weight", "bias") + _4BIT_SUFFIXES
        groups[owner] = {s: state.pop(f"{owner}.{s}") for s in suffixes if f"{owner}.{s}" in state}
    if not groups:
        raise InvalidInputError(f"config.json declares a bitsandbytes {qconfig.mode} checkpoint, but the weights hold no "
                                f"'.{marker}' entries: the file is not a quantized checkpoint of that kind.")
    return groups


def from_checkpoint(entries: dict, qconfig: BitsAndBytesConfig, where: str) -> QuantizedProjection:
    bias = entries.get("bias")
    if qconfig.load_in_8bit:
        fmt = entries.get("weight_format")
        if fmt is not None and int(fmt) != 0:
            raise InvalidInputError(f"{where}: int8 weight_format {int(fmt)} is not 'row' (0), the only layout "
                                    "bitsandbytes loads.")
        return Linear8bit(entries["weight"], entries["SCB"], bias, qconfig.llm_int8_threshold)
    state_key = next((k for k in entries if k.startswith("weight.quant_state.")), None)
    if state_key is None:
        raise InvalidInputError(f"{where}: a 4-bit weight without its quant_state entry; the checkpoint is incomplete.")
    meta = Q.unpack_json(entries[state_key])
    absmax = entries["weight.absmax"]
    if absmax.dim() == 2 and "nested_absmax" not in meta:
        # bitsandbytes on an AVX512-BF16 CPU repacks a non-nested weight for its kernel at the first forward,
        # and a save after that writes the bf16 absmax transposed to [K / blocksize, N]: undo that layout
        absmax = absmax.float().t().reshape(-1)
    shape = tuple(meta["shape"])
    q = Q.Quantized4bit(data=entries["weight"], shape=shape, dtype=getattr(torch, meta["dtype"]),
                        quant_type=meta["quant_type"], blocksize=int(meta["blocksize"]), absmax=absmax.float()
                        if "nested_absmax" not in meta else absmax, offset=meta.get("nested_offset"),
                        nested_absmax=entries.get("weight.nested_absmax"),
                        nested_code=entries.get("weight.nested_quant_map"))
    if q.double_quant and int(meta.get("nested_blocksize", Q.NESTED_BLOCKSIZE)) != Q.NESTED_BLOCKSIZE:
        raise InvalidInputError(f"{where}: nested_blocksize {meta['nested_blocksize']} is not bitsandbytes' 256.")
    if q.quant_type != qconfig.bnb_4bit_quant_type:
        logger.warning("%s: stored as %s although config.json says %s; loading it as stored.", where, q.quant_type,
                       qconfig.bnb_4bit_quant_type)
    return Linear4bit(q, bias, compute_dtype(qconfig))


def conv1d_shape(entries: dict, qconfig) -> tuple[int, int]:
    """The [in, out] shape of the float weight a quantized module stands for (for matching checkpoint names)."""
    if qconfig.load_in_8bit:
        n, k = entries["weight"].shape
        return (k, n)
    key = next(k for k in entries if k.startswith("weight.quant_state."))
    n, k = Q.unpack_json(entries[key])["shape"]
    return (k, n)


def quantized_modules(model) -> dict[str, QuantizedProjection]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedProjection)}
