"""SequenceSummary: one vector per sequence from the body's hidden states (the multiple-choice head).

The config's summary_* fields choose how: which token (summary_type), an optional projection
(summary_use_proj, summary_proj_to_labels), an activation, and dropout before and after.
Submodule names (`summary`, `activation`, `first_dropout`, `last_dropout`) match the checkpoints'
(`multiple_choice_head.summary.weight` / `.bias`).
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import ACTIVATIONS
from ..errors import InvalidInputError, NotSupportedError


class _Activation(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        if name not in ACTIVATIONS:
            raise InvalidInputError(f"Unknown summary_activation {name!r}; choose one of {', '.join(ACTIVATIONS)} or None.")
        self.name, self.fn = name, ACTIVATIONS[name]

    def forward(self, x):
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


class SequenceSummary(nn.Module):
    """hidden (B, [C,] T, H) -> summary (B, [C,] out), out = num_labels, H, or H without projection.

    summary_type, as the reference computes it (GPT-2/XLNet's SequenceSummary):
      "cls_index": the token at `cls_index` (B, [C]) in each sequence, else each sequence's last token;
      "last" / "first" / "mean": index 1 / 0 / the mean along dim 1. For a (B, T, H) input dim 1 is the
      sequence; for the double-heads input (B, C, T, H) it is the *choice* axis, which is what the
      reference does too, so these three are kept bit-compatible with it rather than "fixed".
    """

    def __init__(self, config):
        super().__init__()
        self.summary_type = getattr(config, "summary_type", "last")
        if self.summary_type == "attn":
            raise NotSupportedError("summary_type='attn' is not implemented (nor is it in the reference); "
                                      "use 'cls_index', 'last', 'first' or 'mean'.")
        if self.summary_type not in ("last", "first", "mean", "cls_index"):
            raise InvalidInputError(f"Unknown summary_type {self.summary_type!r}; choose 'cls_index', 'last', 'first' or 'mean'.")
        self.summary = nn.Identity()
        if getattr(config, "summary_use_proj", False):
            to_labels = getattr(config, "summary_proj_to_labels", False) and config.num_labels > 0
            self.summary = nn.Linear(config.n_embd, config.num_labels if to_labels else config.n_embd)
        name = getattr(config, "summary_activation", None)
        self.activation = _Activation(name) if name else nn.Identity()
        first = getattr(config, "summary_first_dropout", 0) or 0
        last = getattr(config, "summary_last_dropout", 0) or 0
        self.first_dropout = nn.Dropout(first) if first > 0 else nn.Identity()
        self.last_dropout = nn.Dropout(last) if last > 0 else nn.Identity()

    def pool(self, hidden: torch.Tensor, cls_index: torch.Tensor | None) -> torch.Tensor:
        if self.summary_type == "last":
            return hidden[:, -1]
        if self.summary_type == "first":
            return hidden[:, 0]
        if self.summary_type == "mean":
            return hidden.mean(dim=1)
        lead, T, H = hidden.shape[:-2], hidden.shape[-2], hidden.shape[-1]
        if cls_index is None:
            return hidden[..., -1, :]  # each sequence's last token: (B, [C,] H)
        if tuple(cls_index.shape) != tuple(lead):
            raise InvalidInputError(f"mc_token_ids must have shape (batch, num_choices) = {tuple(lead)}, one index per "
                             f"sequence; got {tuple(cls_index.shape)}.")
        if not torch.compiler.is_compiling() and cls_index.numel() and (
                bool((cls_index < 0).any()) or bool((cls_index >= T).any())):
            raise InvalidInputError(f"mc_token_ids must lie in [0, {T - 1}] (the sequence length is {T}); got values from "
                             f"{int(cls_index.min())} to {int(cls_index.max())}.")
        index = cls_index.to(hidden.device, torch.long)[..., None, None].expand(*lead, 1, H)  # (B, [C,] 1, H)
        return hidden.gather(-2, index).squeeze(-2)  # (B, [C,] H)

    def forward(self, hidden: torch.Tensor, cls_index: torch.Tensor | None = None) -> torch.Tensor:
        out = self.first_dropout(self.pool(hidden, cls_index))
        return self.last_dropout(self.activation(self.summary(out)))
