"""Forward passes for generation: a prefill of the prompt, then one-token decode steps.

`DecodeRunner` is the default: a StaticCache sized to the whole generation, driven through the model's lean
decode entry (`model.decode`: no output objects, logits for the newest position only, packed weights where
the policy in model/linear.py says they pay). `ModelRunner` goes through `model.forward` with the cache the
user asked for (dynamic, static, or one they passed in) and serves every case the decode entry does not.
Both expose the same operations, so the search strategies do not care which one runs; neither touches a
block, a weight or a kernel.
"""
from __future__ import annotations

import torch

from ..model.cache import DynamicCache, StaticCache
from ..model.replay import DecodeReplay


def decode_supported(model) -> bool:
    """model.decode covers GPT2LMHeadModel in inference, without cross-attention."""
    return hasattr(model, "decode") and not model.training and not model.config.add_cross_attention


class _KeyMask:
    """The keys each row may see: the prompt's real tokens, then everything generated (None: all)."""

    def __init__(self, batch: int, max_len: int, attention_mask, device):
        self.mask = None
        if attention_mask is not None:
            self.mask = torch.ones(batch, max_len, dtype=torch.bool, device=device)
            self.mask[:, : attention_mask.shape[1]] = attention_mask.bool().to(device)

    def select(self, rows):
        if self.mask is not None:
            self.mask = self.mask.index_select(0, rows)


class DecodeRunner:
    def __init__(self, model, batch: int, max_len: int, attention_mask):
        self.model = model
        # unfilled buffers: the decode entry reads only positions it has written
        self.cache = StaticCache(model.config, max_batch_size=batch, max_cache_len=max_len, device=model.device,
                                 dtype=model.dtype, zero=False)
        self.keys = _KeyMask(batch, max_len, attention_mask, model.device)
        self.replay = DecodeReplay()  # the steps' blocks as recorded kernel calls, where they are only those

    def prefill(self, input_ids, attention_mask, position_ids):  # (B, P) -> logits (B, V) for the next position
        return self.model.decode(input_ids, self.cache, position_ids=position_ids, key_mask=self.keys.mask)[:, -1]

    def step(self, tokens, positions):  # tokens, positions: (B,) -> logits (B, V)
        return self.model.decode(tokens[:, None], self.cache, position_ids=positions[:, None],
                                 key_mask=self.keys.mask, replay=self.replay)[:, -1]

    def step_greedy(self, tokens, positions, banned=None):  # -> (ids (B,), None) or (None, logits (B, V))
        return self.model.decode_greedy(tokens[:, None], self.cache, position_ids=positions[:, None],
                                        key_mask=self.keys.mask, replay=self.replay, banned=banned)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Only `rows` go on (finished rows leave the batch and the cache)."""
        self.keys.select(rows)
        self.cache.select_rows(rows)

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i takes the state of row rows[i] (beam search)."""
        self.keys.select(rows)
        self.cache.reorder_cache(rows)

    def final_cache(self):
        return self.cache


class ModelRunner:
    """Through model.forward with a DynamicCache (cache_implementation="dynamic"), a StaticCache, or the
    cache the caller passed (which may already hold a prefix of the prompt: `past`)."""

    def __init__(self, model, batch: int, max_len: int, attention_mask, static: bool, cache=None, past: int = 0):
        self.model = model
        self.keys = _KeyMask(batch, max_len, attention_mask, model.device)
        if cache is not None:
            self.cache = cache
        elif static:
            self.cache = StaticCache(model.config, max_batch_size=batch, max_cache_len=max_len, device=model.device,
                                     dtype=model.dtype)
        else:
            self.cache = DynamicCache(model.config)
        self.n = past  # positions the cache holds

    def _run(self, input_ids, position_ids):
        n, T = self.n, input_ids.shape[1]
        mask = self.keys.mask[:, : n + T] if self.keys.mask is not None else None
        out = self.model(input_ids, past_key_values=self.cache, attention_mask=mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1, return_dict=True)
        self.n = n + T
        return out.logits[:, -1]

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask, position_ids):  # only the tokens the cache does not hold yet
        return self._run(input_ids[:, self.n:], position_ids[:, self.n:])

    @torch.no_grad()
    def step(self, tokens, positions):
        return self._run(tokens[:, None], positions[:, None])

    def keep_rows(self, rows):
        self.keys.select(rows)
        if isinstance(self.cache, StaticCache):
            self.cache.select_rows(rows)
        else:
            self.cache.reorder_cache(rows)  # index_select: the rows that stay

    def reorder(self, rows):
        self.keys.select(rows)
        self.cache.reorder_cache(rows)

    def final_cache(self):
        return self.cache


def make_runner(model, plan):
    """The runner for a generation plan (engine.Plan): the decode entry where it applies, model.forward else."""
    B = plan.input_ids.shape[0]
    impl = plan.cfg.cache_implementation
    if plan.cache is not None:  # the caller's cache, already holding a prefix of the prompt
        return ModelRunner(model, B, plan.max_length, plan.attention_mask, static=False, cache=plan.cache,
                           past=plan.past)
    if impl == "dynamic" or not decode_supported(model):
        return ModelRunner(model, B, plan.max_length, plan.attention_mask, static=impl == "static")
    if model.device.type == "cuda":  # fixed shapes, the decode step replayed from a CUDA graph
        from .graphs import GraphRunner

        return GraphRunner(model, B, plan.max_length, plan.attention_mask)
    return DecodeRunner(model, B, plan.max_length, plan.attention_mask)
