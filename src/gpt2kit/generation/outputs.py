"""What generate(return_dict_in_generate=True) returns (the reference's field names; `.cache` aliases
`past_key_values`, as in transformers 5)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..model.outputs import ModelOutput


@dataclass
class GenerateDecoderOnlyOutput(ModelOutput):
    """sequences: (B * num_return_sequences, prompt + new); scores / logits: one (B, V) float32 tensor per
    new token (processed scores / raw logits); past_key_values: the cache after generation."""

    sequences: torch.LongTensor = None
    scores: Optional[tuple] = None
    logits: Optional[tuple] = None
    attentions: Optional[tuple] = None
    hidden_states: Optional[tuple] = None
    past_key_values: Optional[Any] = None


@dataclass
class GenerateBeamDecoderOnlyOutput(ModelOutput):
    """Beam search: also each returned sequence's final score and, per step, the beam each token came from."""

    sequences: torch.LongTensor = None
    sequences_scores: Optional[torch.FloatTensor] = None
    scores: Optional[tuple] = None
    logits: Optional[tuple] = None
    beam_indices: Optional[torch.LongTensor] = None
    attentions: Optional[tuple] = None
    hidden_states: Optional[tuple] = None
    past_key_values: Optional[Any] = None
