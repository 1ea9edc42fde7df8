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

from ..model import onednn
from ..model.cache import DynamicCache, StaticCache
from ..model.gpt2 import self_attention_mask
from ..model.layers import Projection, additive, causal_additive_mask, eager_attention

# model -> (weight version key, [in, out] copy of the tied LM head); see head_weight_t
_HEAD_T: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def head_weight_t(model):
    """An [in, out] copy of the LM head for float32 on CPU, or None; used only where no packed weights are.

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


# model -> (weight version key, {projection or "head": oneDNN-packed weight}); see packed_weights
_PACKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
PACK_LIMIT_BYTES = 1 << 30  # never double more than 1 GiB of weights


def _projections(model):
    return [p for blk in model.transformer.h for p in (blk.attn.c_attn, blk.attn.c_proj, blk.mlp.c_fc, blk.mlp.c_proj)]


def pack_rows_hint(dtype, batch: int) -> int:
    """The row count oneDNN lays a packed weight out for. It matters in float32 only: measured on this AMD
    EPYC (2 threads, weights not in cache, GPT-2 small's matrices), at 32 rows a layout for 32 rows runs the
    four block products in 0.65/0.82/0.80 ms against 0.80/1.15/1.04 ms for a 1-row layout, and the 768 x 50257
    head in 13.2 against 16.6 ms; layouts for 8, 32 or 128 rows are alike from 4 to 64 rows. In bfloat16 the
    hint changes nothing measurable."""
    return 32 if dtype == torch.float32 and batch > 1 else 1


def packed_weights(model, build: bool = True, rows_hint: int = 1):
    """oneDNN-packed copies of every projection and of the LM head (CPU, float32 or bfloat16), or None.

    oneDNN re-lays a plain weight out into its blocked format on every call; packing once gives the same
    products (bit for bit in bfloat16) faster. Measured on this AMD EPYC, one thread, weights not in cache:
    bfloat16 at batch 1, the 12 blocks' 48 matrices 39 ms packed against 60 ms plain, the head 13.5 against
    29 ms; float32 at 1 row (2 threads) 20.1 against 28.7 ms per GPT-2 small decode step for the model's
    own addmm, at 8 rows 36 against 60 ms and 17 against 28.5 ms. rows_hint: see
    pack_rows_hint. It costs a second copy of the weights (GPT-2 small: 250 MB in bf16, 500 MB in fp32), kept
    per model (one layout at a time), rebuilt when a weight or the hint changes, and never made past
    PACK_LIMIT_BYTES. build=False only returns copies already made, in whatever layout."""
    projs = _projections(model)
    head = model.lm_head.weight
    dtype = head.dtype
    if head.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or not onednn.linear_available():
        return None
    if any(not isinstance(p, Projection) or p.weight.dtype != dtype for p in projs):
        return None
    if dtype == torch.bfloat16 and not onednn.bf16_available():
        return None
    weights = [p.weight for p in projs] + [head]
    key = (rows_hint,) + tuple((w.data_ptr(), w._version, w.dtype) for w in weights)
    hit = _PACKED.get(model)
    if hit is not None and (hit[0] == key or not build and hit[0][1:] == key[1:]):  # any layout serves a lookup
        return hit[1]
    _PACKED.pop(model, None)  # free a stale copy before building the new one
    if not build or sum(w.numel() * w.element_size() for w in weights) > PACK_LIMIT_BYTES:
        return None
    with torch.no_grad():
        packs = {p: torch.ops.mkldnn._reorder_linear_weight(p.weight.detach().t().contiguous(), rows_hint)
                 for p in projs}
        packs["head"] = torch.ops.mkldnn._reorder_linear_weight(head.detach(), rows_hint)
    _PACKED[model] = (key, packs)
    return packs


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


# float32 products with at least this many rows go through oneDNN (see FastRunner._linear)
ONEDNN_MIN_ROWS = 4


def _unfilled_static_cache(cfg, batch, max_len, device, dtype) -> StaticCache:
    """A StaticCache whose buffers are left unfilled (torch.empty): this runner reads only positions it has
    written, and zero-filling 2 x n_layer buffers costs ~3% of a 512-token prefill (340 MB at batch 32)."""
    cache = StaticCache(cfg, max_batch_size=batch, max_cache_len=1, device=device, dtype=dtype)
    shape = (batch, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
    cache.key_cache = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
    cache.value_cache = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
    cache.max_cache_len = max_len
    return cache


class FastRunner(_RunnerBase):
    def __init__(self, model, batch: int, max_len: int, attention_mask):
        super().__init__(model, batch, max_len, attention_mask)
        cfg = self.cfg
        self.body = model.transformer
        self.cache = _unfilled_static_cache(cfg, batch, max_len, model.device, model.dtype)
        self.H, self.D = cfg.n_head, cfg.n_embd // cfg.n_head
        self.eager = cfg._attn_implementation == "eager" or cfg.reorder_and_upcast_attn
        dev, dtype = model.device, model.dtype
        self.onednn = dev.type == "cpu" and dtype == torch.float32 and onednn.linear_available()
        # quantized projections (gpt2kit.quantization) run their own kernels: every product through proj(x)
        self.onednn = self.onednn and all(isinstance(p, Projection) for p in _projections(model))
        # every product through oneDNN-packed weights where they can be had (see packed_weights)
        self.packed = packed_weights(model, rows_hint=pack_rows_hint(dtype, batch))
        self.head_t = head_weight_t(model) if self.packed is None else None
        # GPT-2's tanh GELU fused into oneDNN's GEMM, as the model's own bf16 path does
        self.fused_gelu = cfg.activation_function in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

    def _linear(self, proj, x):
        """x (N, in) through a Projection: oneDNN's GEMM on the packed weight where there is one (it sums in
        another order than addmm: results differ in the last bits). Without one (a build lacking oneDNN, or
        weights past PACK_LIMIT_BYTES), float32 from ONEDNN_MIN_ROWS rows reads the [in, out] weight through a
        transposed view (no copy): measured on this AMD EPYC 50 against 71 ms for addmm at N=8 for the 12
        blocks' matrices, as MKL takes a generic path on AMD CPUs."""
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed[proj], proj.bias, "none", [], "")
        if self.onednn and x.shape[0] >= ONEDNN_MIN_ROWS and isinstance(proj, Projection):
            return torch.ops.mkldnn._linear_pointwise(x, proj.weight.t(), proj.bias, "none", [], "")
        return proj(x)

    def logits(self, x):  # (B, C) -> (B, V)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed["head"], None, "none", [], "")
        if self.onednn and x.shape[0] >= ONEDNN_MIN_ROWS:  # same measurement: 25 ms against 39 at 8 rows
            return torch.ops.mkldnn._linear_pointwise(x, self.model.lm_head.weight, None, "none", [], "")
        if self.head_t is not None:
            return x @ self.head_t
        return self.model.lm_head(x)

    def _block(self, i, blk, x, n, mask, is_causal, last_only=False):
        """One block on x (B, T, C) at positions n..n+T-1: stores keys/values at n.., attends over 0..n+T-1.
        last_only: the output is needed for the last position only (the prompt's last block)."""
        B, T, C = x.shape
        H, D = self.H, self.D
        attn = blk.attn
        qkv = self._linear(attn.c_attn, blk.ln_1(x).view(B * T, C)).view(B, T, 3, H, D)
        kc, vc = self.cache.key_cache[i], self.cache.value_cache[i]
        kc[:, :, n:n + T] = qkv[:, :, 1].transpose(1, 2)
        vc[:, :, n:n + T] = qkv[:, :, 2].transpose(1, 2)
        k, v = kc[:, :, : n + T], vc[:, :, : n + T]  # (B, H, n+T, D)
        q = qkv[:, :, 0]  # (B, T, H, D)
        if last_only and T > 1:
            q, x, T = q[:, -1:], x[:, -1:], 1
            if mask is not None:
                mask = mask[..., -1:, :]
            is_causal = False  # the last query sees every stored key its mask allows
        q = q.transpose(1, 2)  # (B, H, T, D)
        if self.eager:
            if mask is None and is_causal:
                mask = causal_additive_mask(T, k.shape[-2], q.dtype, q.device)
            elif mask is not None:
                mask = additive(mask, q.dtype)
            y = eager_attention(q, k, v, mask, attn.scaling, 0.0, attn.upcast)[0]
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                               scale=attn.scaling)
        x = x + self._linear(attn.c_proj, y.transpose(1, 2).reshape(B * T, C)).view(B, T, C)
        h = blk.ln_2(x)
        mlp = blk.mlp
        rows = B * T
        if self.packed is not None or (self.onednn and rows >= ONEDNN_MIN_ROWS):
            h = h.reshape(rows, C)
            if self.fused_gelu:  # oneDNN's tanh GELU in the GEMM's epilogue: within ~3e-6 of the formula,
                # and 12 passes over a (rows, 3072) tensor fewer (a 512-token prompt: 885 against 1082 ms)
                w = self.packed[mlp.c_fc] if self.packed is not None else mlp.c_fc.weight.t()
                h = torch.ops.mkldnn._linear_pointwise(h, w, mlp.c_fc.bias, "gelu", [], "tanh")
            else:
                h = mlp.act(self._linear(mlp.c_fc, h))
            return x + self._linear(mlp.c_proj, h).view(B, T, C)
        return x + mlp(h)  # the model's own MLP: in float32 at 1-3 rows, bit for bit the reference's

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask, position_ids):
        """The prompt through every block; the last block, whose output feeds only the logits, runs its
        attention output, MLP and norm for the last position only (keys and values are stored for all)."""
        body = self.body
        B, T = input_ids.shape
        x = body.wte(input_ids) + body.wpe(position_ids)  # (B, T, C)
        mask, is_causal = self_attention_mask(attention_mask, B, T, 0, T, x.device)
        last = len(body.h) - 1
        for i, blk in enumerate(body.h):
            x = self._block(i, blk, x, 0, mask, is_causal, last_only=i == last)
        self.n = T
        return self.logits(body.ln_f(x[:, -1]))

    @torch.no_grad()
    def step(self, tokens, positions):
        """tokens, positions: (B,) -> logits (B, V) for the next position."""
        body, n = self.body, self.n
        x = (body.wte(tokens) + body.wpe(positions))[:, None]  # (B, 1, C)
        mask = self.key_mask[:, None, None, : n + 1] if self.key_mask is not None else None  # (B, 1, 1, n+1)
        for i, blk in enumerate(body.h):
            x = self._block(i, blk, x, n, mask, False)
        self.n = n + 1
        return self.logits(body.ln_f(x[:, 0]))

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
