"""The GPT-2 body (GPT2Model) and the base class every GPT-2 model shares (GPT2PreTrainedModel).

`forward` returns hidden states; heads (heads.py) turn them into logits or task outputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import GPT2Config
from .cache import Cache, DynamicCache, StaticCache
from .layers import Block, LayerNorm, Projection
from .outputs import BaseModelOutputWithPastAndCrossAttentions
from ..errors import InvalidArgumentError, InvalidInputError, NotSupportedError, check_context_length


class GPT2PreTrainedModel(nn.Module):
    """Shared plumbing: config, initialisation, checkpoint I/O, embeddings, device/dtype helpers."""

    config_class = GPT2Config
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _tied_weights_keys = ()  # names of parameters tied to transformer.wte.weight

    def __init__(self, config: GPT2Config):
        super().__init__()
        if not isinstance(config, GPT2Config):
            raise InvalidArgumentError(f"{type(self).__name__} needs a GPT2Config, got {type(config).__name__}.")
        config.validate()
        self.config = config

    # -- initialisation (GPT-2's: normal(0, initializer_range); residual projections / sqrt(2 n_layer)) --
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (Projection, nn.Linear)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def post_init(self) -> None:
        """Initialise every weight as GPT-2 does, then tie the LM head. Called at the end of __init__."""
        self.apply(self._init_weights)
        residual_std = self.config.initializer_range / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=residual_std)
        self.tie_weights()

    def init_weights(self) -> None:
        self.post_init()

    # -- embeddings and tying ---------------------------------------------------------------------
    @property
    def base_model(self) -> "GPT2Model":
        return getattr(self, self.base_model_prefix, self)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.base_model.wte

    def set_input_embeddings(self, embeddings: nn.Embedding) -> None:
        self.base_model.wte = embeddings
        self.tie_weights()

    def get_output_embeddings(self):
        return getattr(self, "lm_head", None)

    def tie_weights(self) -> None:
        """Share the LM head's weight with the token embedding when config.tie_word_embeddings."""
        head = self.get_output_embeddings()
        wte = self.base_model.wte
        if head is not None and self.config.tie_word_embeddings and isinstance(wte, nn.Embedding):
            head.weight = wte.weight  # (a quantized table is shared with the head by the quantization)

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Grow or shrink the vocabulary, keeping the old rows. New rows start, as in transformers 5, near the
        mean of the old embeddings (mean_resizing=True: drawn from N(mean, 1e-9 * covariance), which keeps
        the new tokens' logits close to the average instead of random), or from GPT-2's N(0, initializer_range)."""
        wte = self.get_input_embeddings()
        if new_num_tokens is None and pad_to_multiple_of is None:
            return wte
        if not isinstance(wte, nn.Embedding):
            raise NotSupportedError("The token embedding is quantized; resize the float model, then quantize it.")
        n = new_num_tokens if new_num_tokens is not None else wte.num_embeddings
        if pad_to_multiple_of:
            n = int(math.ceil(n / pad_to_multiple_of) * pad_to_multiple_of)
        if n <= 0:
            raise InvalidInputError(f"new_num_tokens must be positive, got {n}.")
        old = wte.weight.data
        new = nn.Embedding(n, old.shape[1], device=old.device, dtype=old.dtype)
        nn.init.normal_(new.weight, mean=0.0, std=self.config.initializer_range)
        keep = min(n, old.shape[0])
        new.weight.data[:keep] = old[:keep]
        if mean_resizing and n > old.shape[0]:
            new.weight.data[keep:] = _rows_near_mean(old, n - keep)
        self.base_model.wte = new
        head = self.get_output_embeddings()
        if head is not None and not self.config.tie_word_embeddings:
            new_head = type(head)(head.in_features, n, bias=head.bias is not None, device=old.device, dtype=head.weight.dtype)
            nn.init.normal_(new_head.weight, mean=0.0, std=self.config.initializer_range)
            new_head.weight.data[:keep] = head.weight.data[:keep]
            if mean_resizing and n > keep:
                new_head.weight.data[keep:] = _rows_near_mean(head.weight.data, n - keep)
            self.lm_head = new_head
        elif head is not None:
            head.out_features = n
        self.config.vocab_size = n
        self.tie_weights()
        return self.get_input_embeddings()

    # -- bookkeeping ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.parameters() if p.is_floating_point()).dtype

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        seen, total = set(), 0
        skip = set()
        if exclude_embeddings:
            skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        for p in self.parameters():  # tied parameters are counted once
            if id(p) in seen or id(p) in skip or (only_trainable and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes held by the parameters (shared ones once) and, by default, the buffers (quantized weights
        are buffers), as transformers counts them."""
        total = sum(p.numel() * p.element_size() for p in self.parameters())
        if return_buffers:
            total += sum(b.numel() * b.element_size() for b in self.buffers())
        return total

    def can_generate(self) -> bool:
        return hasattr(self, "lm_head")

    @classmethod
    def from_config(cls, config: GPT2Config, **kwargs):
        attn = kwargs.pop("attn_implementation", None)
        dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
        if kwargs:
            raise InvalidArgumentError(f"Unknown argument(s) to from_config: {', '.join(sorted(kwargs))}.")
        config = config.copy()
        if attn is not None:
            config._attn_implementation = attn
            config.validate()
        model = cls(config)
        if dtype is not None and dtype != "auto":
            from ..weights.checkpoint import parse_dtype
            model.to(parse_dtype(dtype))
        return model

    # -- checkpoint I/O (implemented in weights/checkpoint.py) ------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        from ..weights.checkpoint import load_pretrained

        return load_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        from ..weights.checkpoint import save_pretrained

        save_pretrained(self, save_directory, **kwargs)

    @property
    def generation_config(self):
        """The model's default generation settings (from generation_config.json, else from the config)."""
        cfg = self.__dict__.get("_generation_config")
        if cfg is None:
            from ..generation.config import GenerationConfig

            cfg = self.__dict__["_generation_config"] = GenerationConfig.from_model_config(self.config)
        return cfg

    @generation_config.setter
    def generation_config(self, value):
        self.__dict__["_generation_config"] = value

    def generate(self, *args, **kwargs):
        """Generate token ids; see gpt2kit.generation (the engine works on token ids only)."""
        from ..generation.engine import generate

        return generate(self, *args, **kwargs)

    def set_attn_implementation(self, name: str) -> None:
        self.config._attn_implementation = name
        self.config.validate()


def _rows_near_mean(weight: torch.Tensor, count: int) -> torch.Tensor:
    """`count` rows drawn from N(mean, 1e-9 * cov) of `weight`'s rows (the mean itself when cov is singular)."""
    w = weight.float()  # (V, C)
    mean = w.mean(0)
    centered = w - mean
    cov = centered.T @ centered / w.shape[0] * 1e-9  # (C, C)
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0:
        return mean.expand(count, -1).to(weight.dtype)
    noise = torch.randn(count, w.shape[1], device=w.device) @ chol.T
    return (mean + noise).to(weight.dtype)


def _resolve_cache(past_key_values, use_cache: bool, config) -> Cache | None:
    if past_key_values is None:
        return DynamicCache(config) if use_cache else None
    if isinstance(past_key_values, Cache):
        return past_key_values
    if isinstance(past_key_values, (tuple, list)):  # legacy ((k, v), ...) per layer
        return DynamicCache.from_legacy_cache(past_key_values)
    raise InvalidArgumentError(f"past_key_values must be a DynamicCache, StaticCache or a tuple of (key, value) per layer, "
                    f"got {type(past_key_values).__name__}.")


def self_attention_mask(attention_mask, B: int, T: int, past: int, S: int, device):
    """The mask for T queries at positions past..past+T-1 over S stored keys.

    Returns (mask, is_causal): mask is None, a boolean (B or 1, 1, T, S) tensor (True = may attend), or a
    caller's additive float mask; is_causal tells SDPA to apply its own causal mask when nothing else is needed.
    """
    if attention_mask is not None and attention_mask.dim() == 4:  # a custom mask: bool (True = attend) or additive
        return attention_mask.to(device), False
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != B:
            raise InvalidInputError(f"attention_mask must have shape (batch, past + new tokens) = ({B}, {past + T}), "
                             f"got {tuple(attention_mask.shape)}.")
        if attention_mask.shape[1] != past + T:
            raise InvalidInputError(f"attention_mask covers {attention_mask.shape[1]} positions, but the cache holds {past} "
                             f"and {T} are new: it must cover all {past + T}.")
        if bool(attention_mask.all()):  # nothing padded: the cheap paths below apply
            attention_mask = None
    if attention_mask is None and S == past + T:
        if T == 1:
            return None, False  # one query sees everything stored
        if past == 0:
            return None, True
    q_pos = torch.arange(past, past + T, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        keep = torch.zeros(B, S, dtype=torch.bool, device=device)
        keep[:, : past + T] = attention_mask.to(device=device).bool()
        allowed = allowed & keep[:, None, None, :]  # (B, 1, T, S)
    return allowed, False


def encoder_mask_4d(mask):
    """(B, S_enc) 0/1 mask -> boolean (B, 1, 1, S_enc); a 4-D mask passes through."""
    if mask is None or mask.dim() == 4:
        return mask
    return mask.bool()[:, None, None, :]


class GPT2Model(GPT2PreTrainedModel):
    """Token + position embeddings, n_layer blocks, final layer norm."""

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.post_init()

    @property
    def base_model(self):
        return self

    def forward(
        self,
        input_ids=None,
        past_key_values=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cache_position=None,
        cache=None,
    ):
        cfg = self.config
        if cache is not None:  # transformers 5 spells past_key_values `cache`
            past_key_values = cache
        use_cache = cfg.use_cache if use_cache is None else use_cache
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = cfg.return_dict if return_dict is None else return_dict

        if (input_ids is None) == (inputs_embeds is None):
            raise InvalidInputError("Pass exactly one of input_ids or inputs_embeds.")
        if input_ids is not None:
            if input_ids.dim() == 1:
                input_ids = input_ids[None]
            input_shape = input_ids.shape
            input_ids = input_ids.reshape(-1, input_shape[-1])  # (B, T); extra leading dims folded in
            B, T = input_ids.shape
            device = input_ids.device
        else:
            input_shape = inputs_embeds.shape[:-1]
            B, T = inputs_embeds.shape[0], inputs_embeds.shape[1]
            device = inputs_embeds.device
        if T == 0:
            raise InvalidInputError("The input has no tokens: pass at least one token id.")

        cache_obj = _resolve_cache(past_key_values, use_cache, cfg)
        past = cache_obj.get_seq_length() if cache_obj is not None else 0

        if position_ids is None:
            check_context_length(past, T, cfg.n_positions, what="new tokens")
            position_ids = torch.arange(past, past + T, device=device)[None]  # (1, T)
        else:
            position_ids = position_ids.reshape(-1, T)
            if not torch.compiler.is_compiling() and (bool((position_ids >= cfg.n_positions).any()) or bool((position_ids < 0).any())):
                raise InvalidInputError(f"position_ids must lie in [0, {cfg.n_positions - 1}] (n_positions={cfg.n_positions}); "
                                 f"got values from {int(position_ids.min())} to {int(position_ids.max())}.")
        if input_ids is not None and not torch.compiler.is_compiling():
            if bool((input_ids >= cfg.vocab_size).any()) or bool((input_ids < 0).any()):
                raise InvalidInputError(f"input_ids must lie in [0, {cfg.vocab_size - 1}] (vocab_size); got values from "
                                 f"{int(input_ids.min())} to {int(input_ids.max())}.")

        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)  # (B, T, C)
        x = inputs_embeds + self.wpe(position_ids)
        if token_type_ids is not None:  # GPT-2 embeds segment ids with the token table
            x = x + self.wte(token_type_ids.reshape(-1, T))
        x = self.drop(x)

        S = past + T
        if isinstance(cache_obj, StaticCache) and cache_obj.fixed_shape:
            S = cache_obj.max_cache_len
        mask, is_causal = self_attention_mask(attention_mask, B, T, past, S, device)
        plan = None
        if isinstance(cache_obj, StaticCache) and (mask is None or mask.dtype == torch.bool):
            # one plan for every layer: where the keys go and what each query may read
            if cache_obj.max_batch_size != B:
                raise InvalidInputError(f"StaticCache was built for batch size {cache_obj.max_batch_size}, got {B}.")
            key_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
            plan = cache_obj.plan(T, key_mask=key_mask, cache_position=cache_position)
        enc_mask = None
        if encoder_hidden_states is not None:
            enc_mask = encoder_mask_4d(encoder_attention_mask)

        hidden_states = () if output_hidden_states else None
        attentions = () if output_attentions else None
        cross_attentions = () if output_attentions and cfg.add_cross_attention else None
        for block in self.h:
            if output_hidden_states:
                hidden_states += (x,)
            x, probs, cross_probs = block(x, cache=cache_obj, cache_position=cache_position, mask=mask,
                                          is_causal=is_causal, encoder_hidden_states=encoder_hidden_states,
                                          encoder_mask=enc_mask, output_attentions=output_attentions, plan=plan)
            if output_attentions:
                attentions += (probs,)
                if cross_attentions is not None:
                    cross_attentions += (cross_probs,)
        if plan is not None:
            cache_obj.commit(plan)
        x = self.ln_f(x)
        x = x.view(*input_shape, x.shape[-1])
        if output_hidden_states:
            hidden_states += (x,)

        out = BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=x,
            past_key_values=cache_obj if use_cache else None,
            hidden_states=hidden_states,
            attentions=attentions,
            cross_attentions=cross_attentions,
        )
        return out if return_dict else out.to_tuple()

    def decode(self, input_ids, cache: StaticCache, rows=None, position_ids=None, key_mask=None, cache_position=None,
               last: int | None = 1, replay=None):
        """The lean forward of generation and serving: (B, T) new tokens per row -> final hidden states
        (B, last or T, C). Each row writes its keys/values into its own slot of `cache` after what the slot
        holds and attends over that slot only; see GPT2LMHeadModel.decode. replay: a model.replay.DecodeReplay,
        which runs the blocks as their recorded kernel calls where a step is only those."""
        B, T = input_ids.shape
        plan = cache.plan(T, rows, key_mask, cache_position)
        x = self._embed_planned(input_ids, plan, position_ids)  # (B, T, C)
        final = len(self.h) - 1

        def blocks(x):
            for i, block in enumerate(self.h):
                x = block(x, cache=cache, plan=plan, last=last if i == final else None)[0]
            return x

        x = blocks(x) if replay is None else replay.run(blocks, x, cache, plan, self.h)
        cache.commit(plan)
        return self.ln_f(x)

    def decode_parts(self, parts, cache: StaticCache) -> torch.Tensor:
        """Several groups of rows in one forward, each with its own token count: parts = [(ids (B_i, T_i),
        rows (B_i,), last_i)] on disjoint slots (a server's decoding rows with T=1 beside a prompt chunk of
        T=512). The projections run once over all N = sum(B_i * T_i) tokens, so the weights are read once
        a step; attention runs per part. -> final hidden states (1, sum(B_i * kept_i), C), parts in order,
        each row's kept (last_i, or all T_i for None) positions in row order."""
        if any(rows is None for _, rows, _ in parts):
            raise InvalidInputError("decode_parts needs the slots of every part: pass rows= (a (B_i,) tensor) for each.")
        slots = [r for _, rows, _ in parts for r in rows.tolist()]
        if len(set(slots)) != len(slots):
            raise InvalidInputError(f"decode_parts: a slot may be in one part only, got slots {slots}.")
        plans = [cache.plan(ids.shape[1], rows) for ids, rows, _ in parts]  # all before any commit
        x = torch.cat([self._embed_planned(ids, plan).flatten(0, 1) for (ids, _, _), plan in zip(parts, plans)])
        steps = [PartStep(plan, ids.shape[0], ids.shape[1], None if last is None or last >= ids.shape[1] else last)
                 for (ids, _, last), plan in zip(parts, plans)]
        keep = _kept_positions(steps, x.device)  # (N',) or None when every position goes on
        final = len(self.h) - 1
        x = x[None]  # (1, N, C)
        for i, block in enumerate(self.h):
            x = block(x, cache=cache, parts=steps, last=keep if i == final else None, final=i == final)[0]
        for plan in plans:
            cache.commit(plan)
        return self.ln_f(x)

    def _embed_planned(self, input_ids, plan, position_ids=None):
        """Token + position embeddings of the new tokens (B, T) -> (B, T, C); positions from the plan."""
        if position_ids is None:
            T = input_ids.shape[1]
            check_context_length(max(plan.starts), T, self.config.n_positions, what="new tokens")
            start = torch.tensor(plan.starts, device=input_ids.device)[:, None]  # (B, 1)
            # a decode step's positions are the starts themselves: two small ops fewer (~40 us each, cold)
            position_ids = start if T == 1 else start + torch.arange(T, device=input_ids.device)  # (B, T)
        return self.wte(input_ids) + self.wpe(position_ids)


@dataclass
class PartStep:
    """One part of a decode_parts forward: its cache plan, B rows of T new tokens, and how many of each row's
    last positions the final block computes (None: all)."""

    plan: object
    B: int
    T: int
    last: int | None


def _kept_positions(steps, device):
    """Flat indices (N',) of the positions the final block computes, or None when every position is kept."""
    if all(s.last is None for s in steps):
        return None
    idx, off = [], 0
    for s in steps:
        pos = torch.arange(s.B * s.T, device=device).view(s.B, s.T)
        idx.append((pos if s.last is None else pos[:, -s.last:]).reshape(-1) + off)
        off += s.B * s.T
    return torch.cat(idx)
