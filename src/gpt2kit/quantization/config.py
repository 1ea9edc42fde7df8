"""Quantization configs with transformers' names, fields and defaults, to and from config.json's
`quantization_config` block.

- BitsAndBytesConfig: bitsandbytes' formats (4-bit NF4/FP4 with optional double quant; LLM.int8).
- TorchAoConfig: torchao's weight-only modes as transformers names them ("int8_weight_only",
  "int4_weight_only" with group_size), built natively here.
"""
from __future__ import annotations

import copy

import torch

from ..errors import InvalidArgumentError, InvalidInputError

_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float": torch.float32, "half": torch.float16, "uint8": torch.uint8, "int8": torch.int8}


def _to_dtype(value, what: str, allowed) -> torch.dtype:
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        if name not in _DTYPE_NAMES:
            raise InvalidInputError(f"{what} must be one of {', '.join(str(a).removeprefix('torch.') for a in allowed)}; "
                                    f"got {value!r}.")
        value = _DTYPE_NAMES[name]
    if not isinstance(value, torch.dtype) or value not in allowed:
        raise InvalidInputError(f"{what} must be one of {', '.join(str(a).removeprefix('torch.') for a in allowed)}; "
                                f"got {value!r}.")
    return value


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class BitsAndBytesConfig:
    """transformers.BitsAndBytesConfig: the same arguments, defaults and serialized form.

    gpt2kit runs these formats natively (bitsandbytes is not needed): the four projections of every
    block are stored exactly as bitsandbytes stores them, and computed by the kernels in modules.py.
    """

    quant_method = "bitsandbytes"

    def __init__(self, load_in_8bit=False, load_in_4bit=False, llm_int8_threshold=6.0, llm_int8_skip_modules=None,
                 llm_int8_enable_fp32_cpu_offload=False, llm_int8_has_fp16_weight=False, bnb_4bit_compute_dtype=None,
                 bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False, bnb_4bit_quant_storage=None, **kwargs):
        kwargs.pop("quant_method", None)
        # the serialized form repeats the load flags with a leading underscore
        load_in_4bit = kwargs.pop("_load_in_4bit", load_in_4bit)
        load_in_8bit = kwargs.pop("_load_in_8bit", load_in_8bit)
        if kwargs:
            raise InvalidArgumentError(f"BitsAndBytesConfig got unexpected argument(s) {', '.join(sorted(kwargs))}.")
        for name, value in (("load_in_4bit", load_in_4bit), ("load_in_8bit", load_in_8bit),
                            ("llm_int8_enable_fp32_cpu_offload", llm_int8_enable_fp32_cpu_offload),
                            ("llm_int8_has_fp16_weight", llm_int8_has_fp16_weight),
                            ("bnb_4bit_use_double_quant", bnb_4bit_use_double_quant)):
            if not isinstance(value, bool):
                raise InvalidArgumentError(f"{name} must be True or False, got {value!r}.")
        if load_in_4bit and load_in_8bit:
            raise InvalidInputError("load_in_4bit and load_in_8bit are both True; choose one.")
        if isinstance(llm_int8_threshold, bool) or not isinstance(llm_int8_threshold, (int, float)):
            raise InvalidArgumentError(f"llm_int8_threshold must be a number, got {llm_int8_threshold!r}.")
        if llm_int8_skip_modules is not None and (not isinstance(llm_int8_skip_modules, (list, tuple))
                                                  or not all(isinstance(m, str) for m in llm_int8_skip_modules)):
            raise InvalidArgumentError(f"llm_int8_skip_modules must be a list of module names, got {llm_int8_skip_modules!r}.")
        if bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise InvalidInputError(f"bnb_4bit_quant_type must be 'nf4' or 'fp4', got {bnb_4bit_quant_type!r}.")
        if llm_int8_has_fp16_weight:
            raise InvalidInputError("llm_int8_has_fp16_weight=True keeps float16 master weights for int8 training, which "
                                    "gpt2kit does not do; leave it False (inference).")
        self._load_in_4bit = load_in_4bit
        self._load_in_8bit = load_in_8bit
        self.llm_int8_threshold = float(llm_int8_threshold)
        self.llm_int8_skip_modules = list(llm_int8_skip_modules) if llm_int8_skip_modules is not None else None
        self.llm_int8_enable_fp32_cpu_offload = llm_int8_enable_fp32_cpu_offload
        self.llm_int8_has_fp16_weight = llm_int8_has_fp16_weight
        self.bnb_4bit_quant_type = bnb_4bit_quant_type
        self.bnb_4bit_use_double_quant = bnb_4bit_use_double_quant
        floats = (torch.float32, torch.float16, torch.bfloat16)
        self.bnb_4bit_compute_dtype = (torch.float32 if bnb_4bit_compute_dtype is None
                                       else _to_dtype(bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype", floats))
        storage = torch.uint8 if bnb_4bit_quant_storage is None else _to_dtype(
            bnb_4bit_quant_storage, "bnb_4bit_quant_storage", (torch.uint8,))
        self.bnb_4bit_quant_storage = storage

    @property
    def load_in_4bit(self) -> bool:
        return self._load_in_4bit

    @property
    def load_in_8bit(self) -> bool:
        return self._load_in_8bit

    def is_quantizable(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit

    def quantization_method(self) -> str | None:
        """'llm_int8', 'nf4', 'fp4' or None, as transformers reports it."""
        if self.load_in_8bit:
            return "llm_int8"
        if self.load_in_4bit:
            return self.bnb_4bit_quant_type
        return None

    @property
    def mode(self) -> str:
        """gpt2kit's short name for the format: 'nf4', 'fp4' or 'int8'."""
        method = self.quantization_method()
        if method is None:
            raise InvalidInputError("This BitsAndBytesConfig quantizes nothing: set load_in_4bit=True or load_in_8bit=True.")
        return "int8" if method == "llm_int8" else method

    @property
    def skip_modules(self) -> list[str]:
        return list(self.llm_int8_skip_modules or [])

    def to_dict(self) -> dict:
        """The config.json block, as transformers 5 writes it."""
        out = {k: copy.deepcopy(v) for k, v in self.__dict__.items()}
        out["bnb_4bit_compute_dtype"] = _dtype_name(self.bnb_4bit_compute_dtype)
        out["bnb_4bit_quant_storage"] = _dtype_name(self.bnb_4bit_quant_storage)
        out["load_in_4bit"] = self.load_in_4bit
        out["load_in_8bit"] = self.load_in_8bit
        out["quant_method"] = self.quant_method
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, config_dict: dict) -> "BitsAndBytesConfig":
        d = dict(config_dict)
        method = d.pop("quant_method", cls.quant_method)
        if method != cls.quant_method:
            raise InvalidInputError(f"quant_method {method!r} is not {cls.quant_method!r}.")
        return cls(**d)

    def __eq__(self, other):
        return isinstance(other, BitsAndBytesConfig) and self.to_dict() == other.to_dict()

    def __repr__(self):
        import json

        return f"BitsAndBytesConfig {json.dumps(self.to_dict(), indent=2, sort_keys=True)}\n"


TORCHAO_TYPES = ("int8_weight_only", "int4_weight_only")
INT4_GROUP_SIZES = (32, 64, 128, 256)


class TorchAoConfig:
    """transformers.TorchAoConfig for the weight-only modes: `TorchAoConfig("int8_weight_only")` (per output
    channel, symmetric) and `TorchAoConfig("int4_weight_only", group_size=128)` (affine per group of
    `group_size` inputs, gpt-fast's layout: w = (q - 8) * scale + zero). Built natively (torchao is not used)."""

    quant_method = "torchao"

    def __init__(self, quant_type: str, modules_to_not_convert=None, include_input_output_embeddings: bool = False,
                 untie_embedding_weights: bool = False, **kwargs):
        if quant_type not in TORCHAO_TYPES:
            raise InvalidInputError(f"TorchAoConfig quant_type must be one of {', '.join(TORCHAO_TYPES)}; got {quant_type!r}.")
        quant_type_kwargs = dict(kwargs.pop("quant_type_kwargs", None) or {})
        quant_type_kwargs.update(kwargs)
        if quant_type == "int4_weight_only":
            group = quant_type_kwargs.setdefault("group_size", 128)
            if group not in INT4_GROUP_SIZES:
                raise InvalidInputError(f"group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}; got {group!r}.")
        unknown = set(quant_type_kwargs) - {"group_size"}
        if unknown:
            raise InvalidArgumentError(f"TorchAoConfig({quant_type!r}) got unexpected argument(s) {', '.join(sorted(unknown))}.")
        if quant_type == "int8_weight_only" and quant_type_kwargs:
            raise InvalidArgumentError("int8_weight_only is per output channel and takes no group_size.")
        self.quant_type = quant_type
        self.quant_type_kwargs = quant_type_kwargs
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert else None
        # transformers' flags: quantize the token embedding and the head too (embedding.py), the head from its
        # own copy when untie_embedding_weights
        for name, value in (("include_input_output_embeddings", include_input_output_embeddings),
                            ("untie_embedding_weights", untie_embedding_weights)):
            if not isinstance(value, bool):
                raise InvalidArgumentError(f"TorchAoConfig {name} must be True or False, got {value!r}.")
        self.include_input_output_embeddings = include_input_output_embeddings
        self.untie_embedding_weights = untie_embedding_weights

    @property
    def group_size(self) -> int | None:
        return self.quant_type_kwargs.get("group_size")

    @property
    def mode(self) -> str:
        return "int4" if self.quant_type == "int4_weight_only" else "int8"

    @property
    def skip_modules(self) -> list[str]:
        return list(self.modules_to_not_convert or [])

    def to_dict(self) -> dict:
        return {"quant_method": self.quant_method, "quant_type": self.quant_type,
                "quant_type_kwargs": dict(self.quant_type_kwargs), "modules_to_not_convert": self.modules_to_not_convert,
                "include_input_output_embeddings": self.include_input_output_embeddings,
                "untie_embedding_weights": self.untie_embedding_weights}

    @classmethod
    def from_dict(cls, config_dict: dict) -> "TorchAoConfig":
        d = dict(config_dict)
        d.pop("quant_method", None)
        return cls(d.pop("quant_type"), **d)

    def __eq__(self, other):
        return isinstance(other, TorchAoConfig) and self.to_dict() == other.to_dict()

    def __repr__(self):
        emb = ", include_input_output_embeddings=True" if self.include_input_output_embeddings else ""
        return f"TorchAoConfig({self.quant_type!r}, {self.quant_type_kwargs}{emb})"


# --quantize names of the command line -> configs
SHORT_NAMES = ("nf4", "fp4", "int8", "int4")


def config_for(name: str, group_size: int = 32, embeddings: bool = False):
    """The config a short name stands for: nf4/fp4 (bitsandbytes 4-bit, double quant), int8 (LLM.int8's
    format), int4 (affine per-group, TorchAo). embeddings: the token embedding and tied head quantized too
    (int8 and int4 only, as TorchAoConfig(include_input_output_embeddings=True))."""
    if embeddings and name not in ("int8", "int4"):
        raise InvalidInputError(f"Quantized embeddings are offered for int8 and int4, not {name!r}: bitsandbytes' "
                                "formats keep the embedding and the head in float.")
    if name == "nf4" or name == "fp4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=name, bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype="bfloat16")
    if name == "int8":  # with the embeddings: torchao's int8, the same per-row storage as LLM.int8's
        return (TorchAoConfig("int8_weight_only", include_input_output_embeddings=True) if embeddings
                else BitsAndBytesConfig(load_in_8bit=True))
    if name == "int4":
        return TorchAoConfig("int4_weight_only", group_size=group_size, include_input_output_embeddings=embeddings)
    raise InvalidInputError(f"Unknown quantization {name!r}; choose one of {', '.join(SHORT_NAMES)}.")


def from_config_dict(block: dict):
    """The config object for a config.json `quantization_config` block."""
    if not isinstance(block, dict):
        raise InvalidInputError(f"config.json's quantization_config must be an object, got {type(block).__name__}.")
    method = block.get("quant_method")
    if method == BitsAndBytesConfig.quant_method:
        return BitsAndBytesConfig.from_dict(block)
    if method == TorchAoConfig.quant_method:
        return TorchAoConfig.from_dict(block)
    raise InvalidInputError(f"quantization_config with quant_method {method!r} is not supported; gpt2kit reads "
                            "'bitsandbytes' and 'torchao'.")
