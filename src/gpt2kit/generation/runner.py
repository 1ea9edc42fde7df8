"""Forward passes for generation: a prefill of the prompt, then one-token decode steps.

`FastRunner` is the default: a preallocated cache (a StaticCache sized to the whole generation), a decode
step that calls the block modules directly on (B, C) rows with no mask building, position bookkeeping or
output objects, and logits for the newest position only. `ModelRunner` goes through `model.forward` with
the cache the user asked for (dynamic or static) and serves every case the fast path does not cover.
Both expose the same four operations, so the search strategies do not care which one runs.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ..model.cache import DynamicCache, StaticCache
from ..model.gpt2 import self_attention_mask
from ..model.layers import additive, eager_attention

# model -> (weight version key, [in, out] copy of the tied LM head); see head_weight_t
_HEAD_T: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def head_weight_t(model):
    """An [in, out] copy of the LM head for float32 on CPU, or None.

    Measured on this CPU (benchmarks/generate.py): a batch-1 float32 product against the 768 x 50257
    head takes ~6 ms from an [in, out] copy against ~12 ms through F.linear on the [out, in] table, for
    154 MB more memory; in bfloat16 the two are equal, so no copy is made there. The copy is cached per
    model and rebuilt when the weight changes (in-place edits bump its version)."""
    w = model.lm_head.weight
    if w.dtype != torch.float32 or w.device.type != "cpu" or w.requires_grad and torch.is_grad_enabled():
        return None
    key = (w.data_ptr(), w._version, tuple(w.shape))
    hit = _HEAD_T.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    wt = w.detach().t().contiguous()  # (C, V)
    _HEAD_T[model] = (key, wt)
    return wt


def fast_path_supported(model) -> bool:
    cfg = model.config
    body = getattr(model, "transformer", None)
    head = getattr(model, "lm_head", None)
    if body is None or not isinstance(head, torch.nn.Linear) or head.bias is not None or model.training:
        return False
    return not cfg.add_cross_attention


class _RunnerBase:
    def __init__(self, model, batch: int, max_len: int, attention_mask):
        self.model, self.cfg = model, model.config
        self.max_len = max_len
        self.padded = attention_mask is not None
        device = model.device
        # keys visible to each row: the prompt's real tokens, then everything generated
        self.key_mask = None
        if self.padded:
            self.key_mask = torch.ones(batch, max_len, dtype=torch.bool, device=device)
            self.key_mask[:, : attention_mask.shape[1]] = attention_mask.bool().to(device)
        self.n = 0  # positions stored in the cache

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` of the batch (finished rows leave; beams are reordered)."""
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, rows)
        self._select_cache(rows)


class FastRunner(_RunnerBase):
    def __init__(self, model, batch: int, max_len: int, attention_mask):
        super().__init__(model, batch, max_len, attention_mask)
        cfg = self.cfg
        self.body = model.transformer
        self.cache = StaticCache(cfg, max_batch_size=batch, max_cache_len=max_len, device=model.device,
                                 dtype=model.dtype)
        self.head_t = head_weight_t(model)
        self.H, self.D = cfg.n_head, cfg.n_embd // cfg.n_head
        self.eager = cfg._attn_implementation == "eager" or cfg.reorder_and_upcast_attn

    def logits(self, x):  # (B, C) -> (B, V)
        if self.head_t is not None:
            return x @ self.head_t
        return self.model.lm_head(x)

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask, position_ids):
        """The prompt through every block as the model's forward does, except that the last block, whose
        output feeds only the logits, runs its attention output, MLP and norm for the last position only
        (its keys and values are still stored for every position)."""
        body = self.body
        B, T = input_ids.shape
        if T == 1:  # nothing to save
            return self.step(input_ids[:, 0], position_ids[:, 0])
        x = body.wte(input_ids) + body.wpe(position_ids)  # (B, T, C)
        mask, is_causal = self_attention_mask(attention_mask, B, T, 0, T, x.device)
        for blk in body.h[:-1]:
            x = blk(x, cache=self.cache, mask=mask, is_causal=is_causal)[0]
        blk = body.h[-1]
        attn = blk.attn
        C, H, D = x.shape[-1], self.H, self.D
        qkv = attn.c_attn(blk.ln_1(x)).view(B, T, 3, H, D)
        k, v = qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)  # (B, H, T, D)
        k, v = self.cache.update(k, v, attn.layer_idx)
        q = qkv[:, -1:, 0].transpose(1, 2)  # (B, H, 1, D): the last position's query
        last_mask = None
        if attention_mask is not None:  # the last query may see every real token of its row
            last_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
            if self.eager:
                last_mask = additive(last_mask, q.dtype)
        if self.eager:
            y = eager_attention(q, k, v, last_mask, attn.scaling, 0.0, attn.upcast)[0]
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=last_mask, scale=attn.scaling)
        x = x[:, -1] + attn.c_proj(y.reshape(B, C))  # (B, C)
        mlp = blk.mlp
        x = x + mlp.c_proj(mlp.act(mlp.c_fc(blk.ln_2(x))))
        self.n = T
        return self.logits(body.ln_f(x))

    @torch.no_grad()
    def step(self, tokens, positions):
        """tokens, positions: (B,) -> logits (B, V) for the next position."""
        body, n, H, D = self.body, self.n, self.H, self.D
        x = body.wte(tokens) + body.wpe(positions)  # (B, C)
        B, C = x.shape
        mask = None
        if self.key_mask is not None:
            mask = self.key_mask[:, None, None, : n + 1]  # (B, 1, 1, n+1)
            if self.eager:
                mask = additive(mask, x.dtype)
        for i, blk in enumerate(body.h):
            attn = blk.attn
            qkv = attn.c_attn(blk.ln_1(x)).view(B, 3, H, D)
            q, k, v = qkv.unbind(1)  # 3 x (B, H, D)
            kc, vc = self.cache.key_cache[i], self.cache.value_cache[i]
            kc[:, :, n] = k
            vc[:, :, n] = v
            q = q[:, :, None]  # (B, H, 1, D)
            if self.eager:
                y = eager_attention(q, kc[:, :, : n + 1], vc[:, :, : n + 1], mask, attn.scaling, 0.0, attn.upcast)[0]
            else:
                y = F.scaled_dot_product_attention(q, kc[:, :, : n + 1], vc[:, :, : n + 1], attn_mask=mask,
                                                   scale=attn.scaling)
            x = x + attn.c_proj(y.view(B, C))
            mlp = blk.mlp
            x = x + mlp.c_proj(mlp.act(mlp.c_fc(blk.ln_2(x))))
        self.n = n + 1
        return self.logits(body.ln_f(x))

    def _select_cache(self, rows):
        c, n = self.cache, self.n
        if rows.numel() == c.key_cache[0].shape[0]:  # a reorder (beams): gather in place
            for kc in c.key_cache + c.value_cache:
                kc[:, :, :n] = kc[:, :, :n].index_select(0, rows)
        else:  # rows leave: shrink the buffers
            c.key_cache = [kc.index_select(0, rows) for kc in c.key_cache]
            c.value_cache = [vc.index_select(0, rows) for vc in c.value_cache]
            c.max_batch_size = rows.numel()

    def final_cache(self):
        self.cache._len = [self.n] * self.cache.num_layers
        return self.cache


class ModelRunner(_RunnerBase):
    """Through model.forward with a DynamicCache (cache_implementation="dynamic") or a StaticCache."""

    def __init__(self, model, batch: int, max_len: int, attention_mask, static: bool, cache=None):
        super().__init__(model, batch, max_len, attention_mask)
        if cache is not None:
            self.cache = cache
        elif static:
            self.cache = StaticCache(model.config, max_batch_size=batch, max_cache_len=max_len, device=model.device,
                                     dtype=model.dtype)
        else:
            self.cache = DynamicCache(model.config)

    def _run(self, input_ids, position_ids):
        n, T = self.n, input_ids.shape[1]
        mask = self.key_mask[:, : n + T] if self.key_mask is not None else None
        out = self.model(input_ids, past_key_values=self.cache, attention_mask=mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1, return_dict=True)
        self.n = n + T
        return out.logits[:, -1]

    def prefill(self, input_ids, attention_mask, position_ids):
        return self._run(input_ids, position_ids)

    @torch.no_grad()
    def step(self, tokens, positions):
        return self._run(tokens[:, None], positions[:, None])

    def _select_cache(self, rows):
        c = self.cache
        if isinstance(c, StaticCache) and rows.numel() != c.max_batch_size:
            c.key_cache = [kc.index_select(0, rows) for kc in c.key_cache]
            c.value_cache = [vc.index_select(0, rows) for vc in c.value_cache]
            c.max_batch_size = rows.numel()
        else:
            c.reorder_cache(rows)

    def final_cache(self):
        return self.cache
