"""4-bit (NF4/FP4, double quant) and 8-bit (LLM.int8) weights in bitsandbytes' exact formats, and torchao's
weight-only int8/int4, run natively by gpt2kit's own kernels (see README-quantization.md)."""
from .config import BitsAndBytesConfig, TorchAoConfig
from .replace import quantize_model

__all__ = ["BitsAndBytesConfig", "TorchAoConfig", "quantize_model"]
