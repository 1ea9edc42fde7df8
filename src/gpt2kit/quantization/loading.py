"""The quantization side of from_pretrained / save_pretrained (weights/checkpoint.py calls these).

Loading a float checkpoint with a quantization_config quantizes each projection as it is read, one tensor
at a time, from the memory-mapped file: the float matrix is copied once (to transpose it to Linear layout),
quantized and dropped, so anonymous memory grows by the quantized size plus one matrix's transient copies.
A checkpoint whose config.json has a `quantization_config` block (written by transformers + bitsandbytes,
or by gpt2kit) is read as stored.
"""
from __future__ import annotations

import logging

from .config import BitsAndBytesConfig, TorchAoConfig, from_config_dict
from ..allocator import release_freed_memory
from .replace import (conv1d_shape, from_checkpoint, from_float, prequantized_modules, quantized_modules,
                      targets)
from ..errors import InvalidArgumentError, NotSupportedError

logger = logging.getLogger("gpt2kit.quantization")


def resolve(quantization_config, config):
    """(qconfig or None, prequantized) for from_pretrained's argument and the checkpoint's config."""
    stored = getattr(config, "quantization_config", None)
    if quantization_config is not None and not isinstance(quantization_config, (BitsAndBytesConfig, TorchAoConfig, dict)):
        raise InvalidArgumentError("quantization_config must be a BitsAndBytesConfig, a TorchAoConfig or its dict; got "
                                   f"{type(quantization_config).__name__}.")
    if isinstance(quantization_config, dict):  # a dict of BitsAndBytesConfig fields may leave out quant_method
        block = quantization_config
        if "quant_method" not in block and ("load_in_4bit" in block or "load_in_8bit" in block):
            block = {**block, "quant_method": BitsAndBytesConfig.quant_method}
        quantization_config = from_config_dict(block)
    if stored is not None:
        stored = from_config_dict(stored) if isinstance(stored, dict) else stored
        if quantization_config is not None and quantization_config != stored:
            logger.warning("This checkpoint is already quantized (%s); the quantization_config passed to "
                           "from_pretrained is ignored, as transformers does.", stored.mode)
        return stored, True
    if quantization_config is not None and not quantization_config.mode:
        return None, False
    return quantization_config, False


class QuantizedLoad:
    """Bookkeeping for one from_pretrained: which checkpoint names become quantized modules."""

    def __init__(self, qconfig, prequantized: bool, state: dict, model_module_names):
        self.qconfig, self.prequantized = qconfig, prequantized
        self.groups = prequantized_modules(state, qconfig) if prequantized else {}
        self.targets = set(targets(model_module_names, qconfig))
        self.modules = {}  # model module name -> quantized module

    def checkpoint_shapes(self, state: dict) -> dict:
        """The checkpoint's {name: shape} with each pre-quantized module reported as its float weight/bias."""
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        for owner, entries in self.groups.items():
            shapes[owner + ".weight"] = conv1d_shape(entries, self.qconfig)
            if "bias" in entries:
                shapes[owner + ".bias"] = tuple(entries["bias"].shape)
        return shapes

    def take(self, ckpt_name: str, model_name: str, tensor_of, target_dtype) -> bool:
        """Handle one planned tensor if it belongs to a quantized module (True), else leave it to the caller."""
        owner, _, leaf = model_name.rpartition(".")
        if owner not in self.targets or leaf not in ("weight", "bias"):
            if self.groups and ckpt_name.rpartition(".")[0] in self.groups:
                raise NotSupportedError(f"{ckpt_name} is stored quantized but gpt2kit quantizes only the blocks' "
                                        "projections; load this checkpoint with transformers.")
            return False
        if owner in self.modules or leaf == "bias":
            return True  # built with its weight
        ckpt_owner = ckpt_name.rpartition(".")[0]
        if ckpt_owner in self.groups:
            entries = self.groups[ckpt_owner]
            if "bias" in entries:
                entries["bias"] = entries["bias"].to(target_dtype)
            self.modules[owner] = from_checkpoint(entries, self.qconfig, ckpt_owner)
        else:
            bias = tensor_of(ckpt_owner + ".bias")
            # cast first, as transformers does: the quantized state records the dtype it was made from
            self.modules[owner] = from_float(tensor_of(ckpt_name).to(target_dtype),
                                             None if bias is None else bias.to(target_dtype), self.qconfig)
            release_freed_memory()  # the float temporaries of this tensor, before the next one's
        return True

    def install(self, model, device) -> None:
        missing = self.targets - set(self.modules)
        if missing:
            raise NotSupportedError(f"No weights for the quantized modules {sorted(missing)[:5]}.")
        for name, module in self.modules.items():
            model.set_submodule(name, module.to(device))
        from .embedding import quantize_embeddings

        quantize_embeddings(model, self.qconfig)  # from the memory-mapped float table, a chunk of rows at a time
        release_freed_memory()
        model.quantization_config = self.qconfig
        model.is_loaded_in_4bit = self.qconfig.mode in ("nf4", "fp4", "int4")
        model.is_loaded_in_8bit = self.qconfig.mode == "int8"
        model.config.quantization_config = self.qconfig.to_dict()
        logger.info("Quantized %d projections to %s%s.", len(self.modules), self.qconfig.mode,
                    " (as stored)" if self.prequantized else " while loading")


def checkpoint_state(model, state_dict: dict) -> dict:
    """model.state_dict() with each quantized module's buffers replaced by the keys transformers + bitsandbytes
    write for it; raises for formats with no such checkpoint (torchao's int4)."""
    qmods = quantized_modules(model)
    if not qmods:
        return state_dict
    if isinstance(getattr(model, "quantization_config", None), TorchAoConfig):
        raise NotSupportedError("Saving a TorchAo-quantized model is not supported (transformers stores torchao "
                                "tensor subclasses); save the float model and quantize it when loading.")
    out = {}
    for key, value in state_dict.items():
        owner = key.rpartition(".")[0]
        if owner not in qmods:
            out[key] = value
    for name, module in qmods.items():
        out.update(module.checkpoint_entries(name + "."))
    return out
