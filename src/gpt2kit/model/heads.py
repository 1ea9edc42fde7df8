"""Heads on the shared GPT-2 body: each turns hidden states into logits (and a loss when labels are given)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .gpt2 import GPT2Model, GPT2PreTrainedModel
from .outputs import CausalLMOutputWithCrossAttentions


def keep_positions(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """Only the positions that need logits: the last `n` (0 = all), or the given indices."""
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
    return hidden[:, logits_to_keep]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; labels are shifted here, -100 is ignored. Computed in float32."""
    shift_logits = logits[..., :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[..., 1:].to(logits.device)  # (B, T-1)
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100)


class GPT2LMHeadModel(GPT2PreTrainedModel):
    """GPT-2 with the language-modelling head (tied to the token embedding unless the config says otherwise)."""

    _tied_weights_keys = ("lm_head.weight",)

    def __init__(self, config):
        super().__init__(config)
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None, labels=None, use_cache=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, logits_to_keep=0,
                cache_position=None, cache=None):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        body = self.transformer(input_ids, past_key_values=past_key_values if cache is None else cache,
                                attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids,
                                inputs_embeds=inputs_embeds, encoder_hidden_states=encoder_hidden_states,
                                encoder_attention_mask=encoder_attention_mask, use_cache=use_cache,
                                output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                return_dict=True, cache_position=cache_position)
        logits = self.lm_head(keep_positions(body.last_hidden_state, logits_to_keep))  # (B, T_kept, V)
        loss = None
        if labels is not None:
            if logits.shape[-2] != labels.shape[-1]:
                raise ValueError("labels need logits for every position: leave logits_to_keep at 0 when passing labels.")
            loss = causal_lm_loss(logits, labels)
        out = CausalLMOutputWithCrossAttentions(loss=loss, logits=logits, past_key_values=body.past_key_values,
                                                hidden_states=body.hidden_states, attentions=body.attentions,
                                                cross_attentions=body.cross_attentions)
        return out if return_dict else out.to_tuple()
