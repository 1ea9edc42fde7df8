"""The token embedding held quantized: TorchAoConfig(..., include_input_output_embeddings=True).

transformers leaves GPT-2's embedding and tied head in float unless this flag is set; with it, the
[vocab, n_embd] table is quantized in the config's weight-only format (int8 per row, or int4 per group),
which is already the Linear layout [out, in] of the head. One quantized table serves both: the lookup
dequantizes the rows it is asked for, and the tied head multiplies with the projection's own kernels (a
GPT-2 small decode step then reads 39 MB (int8) or 29 MB (int4) for the head instead of 154 MB, as
llama.cpp's q8_0 / q4_0 files, which quantize token_embd too). untie_embedding_weights=True quantizes the
head from its own copy.
"""
from __future__ import annotations

import torch
from torch import nn

from .modules import QuantizedProjection


class QuantizedEmbedding(nn.Module):
    """nn.Embedding's forward over a quantized table (a Linear8bit or LinearInt4 of shape [V, C])."""

    def __init__(self, table: QuantizedProjection, dtype: torch.dtype):
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.dtype = dtype  # what the lookup returns: the float model's dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...) -> (..., C)
        return self.table.rows(ids.reshape(-1)).to(self.dtype).view(*ids.shape, self.embedding_dim)

    def _apply(self, fn, recurse=True):  # model.to(dtype) / .half(): the lookup follows the model's dtype
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, mode={self.table.mode}"


class QuantizedHead(nn.Module):
    """The LM head over a quantized table: logits (..., V) = x (..., C) @ table^T."""

    def __init__(self, table: QuantizedProjection):
        super().__init__()
        self.table = table
        self.in_features, self.out_features = table.in_features, table.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table(x)


def quantize_embeddings(model, qconfig) -> None:
    """With include_input_output_embeddings (TorchAoConfig), swap the token embedding (and the head: the same
    table when tied) for quantized ones, in place; else nothing."""
    if not getattr(qconfig, "include_input_output_embeddings", False):
        return
    from .replace import from_float_linear

    wte = model.get_input_embeddings()
    dtype = wte.weight.dtype
    table = from_float_linear(wte.weight, None, qconfig)
    model.base_model.wte = QuantizedEmbedding(table, dtype)  # no re-tie: the head is set below
    head = model.get_output_embeddings()
    if head is None:
        return
    if model.config.tie_word_embeddings and not qconfig.untie_embedding_weights:
        model.lm_head = QuantizedHead(table)
    else:  # a head of its own (untied config), or untie_embedding_weights: a second table from the same values
        src = wte.weight if model.config.tie_word_embeddings else head.weight
        model.lm_head = QuantizedHead(from_float_linear(src, head.bias, qconfig))
