"""Heads on the shared GPT-2 body: each turns hidden states into logits (and a loss when labels are given)."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import linear
from .gpt2 import GPT2Model, GPT2PreTrainedModel
from .linear import LMHead
from .outputs import (CausalLMOutputWithCrossAttentions, GPT2DoubleHeadsModelOutput, QuestionAnsweringModelOutput,
                      SequenceClassifierOutputWithPast, TokenClassifierOutput)
from .summary import SequenceSummary
from ..errors import InvalidInputError


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
        self.lm_head = LMHead(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    @torch.no_grad()
    def decode(self, input_ids, cache, rows=None, position_ids=None, logits_to_keep: int = 1, *, key_mask=None,
               cache_position=None, rows_hint: int | None = None, replay=None):
        """The lean forward for generation and serving: no output objects, no flags, logits only where asked.

        input_ids: (B, T) token ids; cache: a StaticCache with at least B slots; rows: (B,) slot indices
        (None: slots 0..B-1 of a cache built for B). Row b appends its T tokens after the positions its slot
        holds and attends causally over that slot only, so rows at different lengths decode in one step.
        position_ids: (B, T), default each slot's length + 0..T-1. key_mask: (B, >= length after the write)
        0/1, the keys each row may see (a left-padded prompt's padding is 0). cache_position: (T,) device
        positions for a fixed-shape cache (CUDA graphs). rows_hint: the row count packed weights are laid out
        for (default: by B; a server passes a fixed one so that batch-size changes do not repack). replay: a
        model.replay.DecodeReplay the caller keeps from step to step: where a step's blocks are only gpt2kit's
        kernels (quantized CPU decode), they are recorded once and replayed as bare kernel calls.
        Returns float32 logits (B, logits_to_keep, V) (logits_to_keep=0: all T) and advances the slots."""
        B, T = input_ids.shape
        keep = None if logits_to_keep == 0 else min(logits_to_keep, T)
        with self._decoding(B, B * T, rows_hint):
            h = self.transformer.decode(input_ids, cache, rows, position_ids, key_mask, cache_position, last=keep,
                                        replay=replay)
            return self.lm_head(h).float()  # (B, keep or T, V)

    @torch.no_grad()
    def decode_greedy(self, input_ids, cache, rows=None, position_ids=None, *, key_mask=None,
                      rows_hint: int | None = None, replay=None, banned=None, any_rows: bool = False):
        """`decode` (same arguments) for a greedy step that needs only each row's best next token:
        -> (ids (B,), None) where the head proves the argmax without computing the logits (LMHead.argmax: the
        float32 head at up to 2 rows, through its int8 screen; with any_rows, at more rows through its bf16
        screen, as the native row kernel sums the logits; `banned` ids are never chosen), else
        (None, float32 logits (B, V)) as `decode` gives them for the last position."""
        B, T = input_ids.shape
        with self._decoding(B, B * T, rows_hint):
            h = self.transformer.decode(input_ids, cache, rows, position_ids, key_mask, None, last=1,
                                        replay=replay)  # (B, 1, C)
            ids = self._head_argmax(h[:, -1], banned, any_rows)
            if ids is not None:
                return ids.to(input_ids.device), None
            return None, self.lm_head(h).float()[:, -1]

    def _head_argmax(self, h, banned, any_rows: bool):
        """h (B, C) -> LMHead.argmax's ids (B,), or None (another head, or the screen does not apply)."""
        return self.lm_head.argmax(h, banned, any_rows=any_rows) if isinstance(self.lm_head, LMHead) else None

    def decode_parts(self, parts, cache, *, rows_hint: int | None = None, replay=None) -> list[torch.Tensor]:
        """`decode` for several groups of rows with different token counts in one forward (a server step:
        its decoding rows, T=1, beside a prompt chunk): the weights are read once for all of them.

        parts: [(input_ids (B_i, T_i), rows (B_i,), logits_to_keep_i)] on disjoint slots of `cache`; each
        row appends after what its slot holds, as in `decode`. Returns the float32 logits of each part,
        (B_i, logits_to_keep_i or T_i, V), equal to `decode` run on each part alone. replay: as in `decode`, for a
        step of one part."""
        if len(parts) == 1:
            ids, rows, keep = parts[0]
            return [self.decode(ids, cache, rows=rows, logits_to_keep=keep, rows_hint=rows_hint, replay=replay)]
        return self._decode_parts(parts, cache, rows_hint, argmax_first=False)[1]

    def decode_parts_greedy(self, parts, cache, *, rows_hint: int | None = None):
        """`decode_parts` (same arguments, two parts or more) where the first part's rows are greedy and need only
        their best next token (a server step's decoding rows, beside prompt chunks): -> (ids (B_0,), logits of
        the other parts) where the head proves the first part's argmax as decode_greedy(any_rows=True) does, else
        (None, every part's logits) as decode_parts gives them."""
        return self._decode_parts(parts, cache, rows_hint, argmax_first=True)

    def _decode_parts(self, parts, cache, rows_hint, argmax_first: bool):
        sizes = [(ids.shape[0], ids.shape[1] if keep == 0 else min(keep, ids.shape[1])) for ids, _, keep in parts]
        tokens = sum(ids.numel() for ids, _, _ in parts)
        with self._decoding(sum(b for b, _ in sizes), tokens, rows_hint):
            h = self.transformer.decode_parts([(ids, rows, None if keep == 0 else keep) for ids, rows, keep in parts],
                                              cache)  # (1, N', C)
            first = None
            if argmax_first:
                b0 = sizes[0][0] * sizes[0][1]
                first = self._head_argmax(h[0, :b0], None, any_rows=True)  # (B_0,) or None
            if first is not None:
                logits = self.lm_head(h[:, b0:]).float()[0]  # (N' - B_0, V)
                sizes = sizes[1:]
            else:
                logits = self.lm_head(h).float()[0]  # (N', V)
        out, off = [], 0
        for b, t in sizes:
            out.append(logits[off:off + b * t].view(b, t, -1))
            off += b * t
        return (None if first is None else first.to(parts[0][0].device)), out

    def _decoding(self, batch: int, tokens: int, rows_hint: int | None):
        """The matmul policy's context for a decode forward of `tokens` new tokens over `batch` rows."""
        w = self.transformer.wpe.weight  # the model's dtype and device (the head may be quantized)
        hint = rows_hint if rows_hint is not None else linear.pack_rows_hint(w.dtype, batch)
        key = (w.dtype, w.data_ptr(), id(self.lm_head), id(self.transformer.h))  # a walk over every module: ~0.5 ms
        cached = self.__dict__.get("_may_pack")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_may_pack"] = (key, linear.packable_bytes(self) <= linear.PACK_LIMIT_BYTES)
        return linear.decoding(hint, pack=cached[1], dtype=w.dtype, device_type=w.device.type, rows=tokens)

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
                raise InvalidInputError("labels need logits for every position: leave logits_to_keep at 0 when passing labels.")
            loss = causal_lm_loss(logits, labels)
        out = CausalLMOutputWithCrossAttentions(loss=loss, logits=logits, past_key_values=body.past_key_values,
                                                hidden_states=body.hidden_states, attentions=body.attentions,
                                                cross_attentions=body.cross_attentions)
        return out if return_dict else out.to_tuple()


# -- task heads ------------------------------------------------------------------------------------
# Each is the shared body plus one small module, with the reference's parameter names so checkpoints
# interchange. `_head_prefixes` names the weights a plain LM/body checkpoint lacks: weights/checkpoint.py
# initialises those freshly (with a notice) instead of calling the checkpoint incomplete.


def _run_body(model, input_ids, past_key_values, attention_mask, token_type_ids, position_ids, inputs_embeds,
              use_cache, output_attentions, output_hidden_states, cache_position=None):
    return model.transformer(input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
                             token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds,
                             use_cache=use_cache, output_attentions=output_attentions,
                             output_hidden_states=output_hidden_states, return_dict=True, cache_position=cache_position)


class GPT2DoubleHeadsModel(GPT2PreTrainedModel):
    """LM head plus a multiple-choice head (SequenceSummary) over each choice; input (batch, num_choices, seq).

    As in the reference, building it sets config.num_labels = 1: the summary projects to one score per choice.
    """

    _tied_weights_keys = ("lm_head.weight",)
    _head_prefixes = ("multiple_choice_head.",)

    def __init__(self, config):
        super().__init__(config)
        config.num_labels = 1
        self.transformer = GPT2Model(config)
        self.lm_head = LMHead(config.n_embd, config.vocab_size, bias=False)
        self.multiple_choice_head = SequenceSummary(config)
        self.post_init()

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, mc_token_ids=None, labels=None, mc_labels=None, use_cache=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, cache_position=None, cache=None,
                logits_to_keep=0):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if attention_mask is not None and 2 < attention_mask.dim() < 4:  # (B, C, T) -> (B*C, T), like input_ids
            attention_mask = attention_mask.reshape(-1, attention_mask.shape[-1])
        body = _run_body(self, input_ids, past_key_values if cache is None else cache, attention_mask, token_type_ids,
                         position_ids, inputs_embeds, use_cache, output_attentions, output_hidden_states, cache_position)
        hidden = body.last_hidden_state  # (B, C, T, H)
        if logits_to_keep != 0 and labels is not None:
            raise InvalidInputError("labels need logits for every position: leave logits_to_keep at 0 when passing labels.")
        kept = hidden if isinstance(logits_to_keep, int) and logits_to_keep == 0 else (
            hidden[..., -logits_to_keep:, :] if isinstance(logits_to_keep, int) else hidden[..., logits_to_keep, :])
        logits = self.lm_head(kept)  # (B, C, T_kept, V); logits_to_keep serves generate()
        mc_logits = self.multiple_choice_head(hidden, mc_token_ids).squeeze(-1)  # (B, C) for cls_index
        mc_loss = None
        if mc_labels is not None:
            mc_loss = F.cross_entropy(mc_logits.reshape(-1, mc_logits.shape[-1]).float(),
                                      mc_labels.to(mc_logits.device).reshape(-1))
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        out = GPT2DoubleHeadsModelOutput(loss=loss, mc_loss=mc_loss, logits=logits, mc_logits=mc_logits,
                                         past_key_values=body.past_key_values, hidden_states=body.hidden_states,
                                         attentions=body.attentions)
        return out if return_dict else out.to_tuple()


class GPT2ForQuestionAnswering(GPT2PreTrainedModel):
    """Span extraction: start and end logits per token from one Linear(n_embd, 2) (`qa_outputs`)."""

    _head_prefixes = ("qa_outputs.",)

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = GPT2Model(config)
        self.qa_outputs = nn.Linear(config.n_embd, 2)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                start_positions=None, end_positions=None, output_attentions=None, output_hidden_states=None,
                return_dict=None):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        body = _run_body(self, input_ids, None, attention_mask, token_type_ids, position_ids, inputs_embeds,
                         False, output_attentions, output_hidden_states)  # no cache: nothing decodes after this
        start_logits, end_logits = self.qa_outputs(body.last_hidden_state).unbind(-1)  # 2 x (B, T)
        loss = None
        if (start_positions is None) != (end_positions is None):
            raise InvalidInputError("The span loss needs both start_positions and end_positions; pass both (or neither).")
        if start_positions is not None:
            loss = span_loss(start_logits, end_logits, start_positions, end_positions)
        out = QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits.contiguous(),
                                           end_logits=end_logits.contiguous(), hidden_states=body.hidden_states,
                                           attentions=body.attentions)
        return out if return_dict else out.to_tuple()


def span_loss(start_logits, end_logits, start_positions, end_positions):
    """Mean of the start and end cross-entropies. As in the reference (BERT's SQuAD recipe), positions are
    clamped to [0, T] and T itself is ignored, so a span outside the input adds no loss (all outside -> NaN)."""
    T = start_logits.shape[-1]

    def one(logits, positions):
        positions = positions.to(logits.device)
        if positions.dim() > 1:
            positions = positions.squeeze(-1)
        return F.cross_entropy(logits.float(), positions.clamp(0, T), ignore_index=T)

    return (one(start_logits, start_positions) + one(end_logits, end_positions)) / 2


def last_token_index(hidden_len: int, batch: int, input_ids, attention_mask, pad_token_id):
    """Index of the token that classifies each row: (B,) tensor, or -1 for "the last position".

    attention_mask (B, past + T): the last position whose mask is 1 (left and right padding alike).
    Else pad_token_id with input_ids: the rightmost token that is not padding, as the reference.
    Else: the last position, which is only unambiguous for a batch of one.
    """
    if attention_mask is not None and attention_mask.dim() == 2:
        mask = attention_mask[:, -hidden_len:].bool()  # (B, T): the new tokens' part
        if not bool(mask.any(-1).all()):
            rows = (~mask.any(-1)).nonzero().flatten().tolist()
            raise InvalidInputError(f"attention_mask rows {rows} have no 1 among the input tokens, so there is no token to "
                             f"classify: each row needs at least one real (unpadded) token.")
        positions = torch.arange(hidden_len, device=mask.device)
        return torch.where(mask, positions, -1).amax(-1)  # (B,)
    if pad_token_id is not None and input_ids is not None:
        ids = input_ids.reshape(batch, -1)
        positions = torch.arange(ids.shape[-1], device=ids.device)
        return (positions * (ids != pad_token_id)).argmax(-1)  # (B,); an all-pad row gives 0, as the reference
    if batch != 1 and pad_token_id is None:
        raise InvalidInputError(f"Cannot tell where each of the {batch} sequences ends: pass the attention_mask (as the "
                         f"tokenizer returns it with padding=True) or set model.config.pad_token_id.")
    if pad_token_id is not None:  # inputs_embeds without a mask: padding cannot be seen
        warnings.warn("GPT2ForSequenceClassification cannot find padding in inputs_embeds: each row is classified "
                      "by its last position. Pass attention_mask to classify padded rows correctly.", stacklevel=3)
    return -1


def positions_from_mask(attention_mask, T: int):
    """Position ids counting only unmasked tokens, so a left-padded row sees the positions it has alone:
    (B, T) = cumsum(mask) - 1 over past + new tokens, the last T kept, pads clamped to 0."""
    pos = attention_mask.long().cumsum(-1) - 1  # (B, past + T)
    return pos[:, -T:].clamp(min=0)


class GPT2ForSequenceClassification(GPT2PreTrainedModel):
    """Classifies each sequence from the hidden state of its last real token through `score` (no bias).

    Unlike the reference, which needs config.pad_token_id for a batch larger than one, the attention_mask
    is used when given, and then position ids are counted from it as well (when none are passed), so a
    left- or right-padded row gets the logits it gets alone. Unpadded input is computed exactly as the reference.
    """

    _head_prefixes = ("score.",)

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = GPT2Model(config)
        self.score = nn.Linear(config.n_embd, self.num_labels, bias=False)
        self.post_init()

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, cache_position=None, cache=None):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if input_ids is not None and input_ids.dim() == 1:
            input_ids = input_ids[None]
        T = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        padded = attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all())
        if padded and position_ids is None:
            position_ids = positions_from_mask(attention_mask, T)
        body = _run_body(self, input_ids, past_key_values if cache is None else cache, attention_mask, token_type_ids,
                         position_ids, inputs_embeds, use_cache, output_attentions, output_hidden_states, cache_position)
        hidden = body.last_hidden_state  # (B, T, H)
        B = hidden.shape[0]
        last = last_token_index(T, B, input_ids, attention_mask, self.config.pad_token_id)
        pooled = hidden[torch.arange(B, device=hidden.device), last]  # (B, H)
        logits = self.score(pooled)  # (B, num_labels): scored only where it is needed
        loss = self.classification_loss(logits, labels) if labels is not None else None
        out = SequenceClassifierOutputWithPast(loss=loss, logits=logits, past_key_values=body.past_key_values,
                                               hidden_states=body.hidden_states, attentions=body.attentions)
        return out if return_dict else out.to_tuple()

    def classification_loss(self, logits, labels):
        """MSE, cross-entropy or BCE-with-logits by config.problem_type, which, when unset, is inferred and
        stored on the config as the reference does: one label -> regression; integer labels -> single-label."""
        labels = labels.to(logits.device)
        if self.config.problem_type is None:
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        logits = logits.float()
        if self.config.problem_type == "regression":
            if self.num_labels == 1:
                return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
            return F.mse_loss(logits, labels.to(logits.dtype))
        if self.config.problem_type == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class GPT2ForTokenClassification(GPT2PreTrainedModel):
    """Per-token logits through dropout and `classifier`; dropout p = config.classifier_dropout, else
    config.hidden_dropout, else 0.1 (the reference's order)."""

    _head_prefixes = ("classifier.",)

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = GPT2Model(config)
        p = getattr(config, "classifier_dropout", None)
        if p is None:
            p = getattr(config, "hidden_dropout", None)
        self.dropout = nn.Dropout(0.1 if p is None else p)
        self.classifier = nn.Linear(config.n_embd, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, cache_position=None, cache=None):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        body = _run_body(self, input_ids, past_key_values if cache is None else cache, attention_mask, token_type_ids,
                         position_ids, inputs_embeds, bool(use_cache), output_attentions, output_hidden_states,
                         cache_position)  # the output carries no cache: build none unless asked
        logits = self.classifier(self.dropout(body.last_hidden_state))  # (B, T, num_labels)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, self.num_labels).float(), labels.to(logits.device).reshape(-1))
        out = TokenClassifierOutput(loss=loss, logits=logits, hidden_states=body.hidden_states,
                                    attentions=body.attentions)
        return out if return_dict else out.to_tuple()
