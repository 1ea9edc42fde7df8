"""TEMPORARY: the CONTRACTS.md decode entry over model.forward, until `model.decode` lands on main.

Same signature and cache operations as `GPT2LMHeadModel.decode` over a `StaticCache`, built from one
DynamicCache per slot and one forward per row (correct, not fast). Delete this file when main has decode.
"""
from __future__ import annotations

import torch

from ..errors import ContextLengthError
from ..model.cache import DynamicCache


class ShimCache:
    def __init__(self, config, max_batch_size: int, max_cache_len: int, device=None, dtype=None):
        self.config, self.max_batch_size, self.max_cache_len = config, max_batch_size, max_cache_len
        self.slots = [DynamicCache(config) for _ in range(max_batch_size)]

    @property
    def lengths(self) -> list[int]:
        return [c.get_seq_length() for c in self.slots]

    def reset_rows(self, rows) -> None:
        for r in rows:
            self.slots[int(r)] = DynamicCache(self.config)

    def copy_prefix(self, src_row: int, dst_row: int, n: int) -> None:
        layers = [(k[:, :, :n].clone(), v[:, :, :n].clone()) for k, v in self.slots[src_row].layers]
        self.slots[dst_row] = DynamicCache.from_legacy_cache(layers) if n else DynamicCache(self.config)


def shim_decode(model, input_ids, cache: ShimCache, rows=None, position_ids=None, logits_to_keep=1):
    rows = list(range(input_ids.shape[0])) if rows is None else rows.tolist()
    out = []
    for b, r in enumerate(rows):
        slot = cache.slots[r]
        if slot.get_seq_length() + input_ids.shape[1] > cache.max_cache_len:
            raise ContextLengthError(f"slot {r} is full ({cache.max_cache_len} positions)")
        o = model(input_ids[b:b + 1], past_key_values=slot, use_cache=True, logits_to_keep=logits_to_keep)
        out.append(o.logits.float())
    return torch.cat(out)  # (B, keep, V)
