"""What this torch build's oneDNN offers, probed once per process: its fused linear op (a private op that
some builds lack) and native bfloat16 products (AVX512-BF16 / AMX). Inference, training and generation
all ask here."""
from __future__ import annotations

import functools

import torch


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
