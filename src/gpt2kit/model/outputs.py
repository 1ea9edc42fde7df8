"""Typed model outputs, readable by attribute, by key and by tuple index, like the reference's.

As in the reference, fields that are None are left out of the key and index views, so
`model(ids)[0]` is the logits when no loss was asked for and the loss when it was.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

import torch


class ModelOutput:
    def _present(self) -> list[tuple[str, Any]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None]

    def keys(self):
        return [k for k, _ in self._present()]

    def values(self):
        return [v for _, v in self._present()]

    def items(self):
        return self._present()

    def to_tuple(self) -> tuple:
        return tuple(v for _, v in self._present())

    def __getitem__(self, key):
        if isinstance(key, str):
            value = getattr(self, key, None) if key in {f.name for f in fields(self)} else None
            if value is None:
                raise KeyError(f"{key!r} is not in this output; present: {self.keys()}")
            return value
        return self.to_tuple()[key]

    def __contains__(self, key):
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return len(self._present())

    def get(self, key, default=None):
        return getattr(self, key, default) if key in self.keys() else default

    @property
    def cache(self):  # transformers 5 also calls past_key_values `cache`
        return getattr(self, "past_key_values", None)


@dataclass
class BaseModelOutputWithPastAndCrossAttentions(ModelOutput):
    last_hidden_state: torch.Tensor = None
    past_key_values: Optional[Any] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None
    cross_attentions: Optional[tuple] = None


@dataclass
class CausalLMOutputWithCrossAttentions(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None
    past_key_values: Optional[Any] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None
    cross_attentions: Optional[tuple] = None


@dataclass
class GPT2DoubleHeadsModelOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    mc_loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None
    mc_logits: torch.Tensor = None
    past_key_values: Optional[Any] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


@dataclass
class QuestionAnsweringModelOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    start_logits: torch.Tensor = None
    end_logits: torch.Tensor = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


@dataclass
class SequenceClassifierOutputWithPast(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None
    past_key_values: Optional[Any] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


@dataclass
class TokenClassifierOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None
