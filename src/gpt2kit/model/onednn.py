"""What this torch build's oneDNN offers, probed once per process: its fused linear op (a private op that
some builds lack) and native bfloat16 products (AVX512-BF16 / AMX). Inference, training and generation
all ask here."""
from __future__ import annotations

import functools

import os

import torch

from .. import cpu


@functools.cache
def linear_available() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    except (AttributeError, RuntimeError):  # a torch build without the private op
        return False


@functools.cache
def bf16_available() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN's query
        return False


@functools.cache
def bf16_native() -> bool:
    """Whether oneDNN's bf16 products run on bf16 hardware here (AVX512-BF16 or AMX, not held below it by
    ONEDNN_MAX_CPU_ISA), so that they are faster than float32's: bf16_available() alone also holds on an AVX-512
    CPU without them, where oneDNN converts (and on AVX2 alone bf16 is slower still)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return (bf16_available() and bool({"avx512_bf16", "amx_bf16"} & cpu.cpu_flags())
            and (cap == "ALL" or "BF16" in cap or "AMX" in cap))
