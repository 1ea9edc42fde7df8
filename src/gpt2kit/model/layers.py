"""The pieces of a GPT-2 block: projection, attention (self and cross), MLP, block.

Parameter names are the checkpoint's own (`c_attn`, `c_proj`, `c_fc`, `ln_1`, ...), so a state dict
maps one to one onto the files the GPT-2 world uses.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache import Cache, SlotWrite, causal_mask
from .linear import ACTIVATIONS, Projection, check_activation, in_decode  # noqa: F401 - ACTIVATIONS re-exported
from ..errors import InvalidInputError


def eager_attention(q, k, v, mask, scaling: float, dropout: float, upcast: bool):
    """Explicit softmax(q k^T * scaling + mask) v, returning the probabilities too.

    q: (B, H, T, D); k, v: (B, H, S, D); mask: None or additive (B or 1, 1, T, S).
    `upcast` is the Mistral-style stability option: scores and softmax in float32, the scale folded
    into the product (reorder_and_upcast_attn).
    """
    if upcast:
        B, H, T, D = q.shape
        S = k.shape[-2]
        with torch.autocast(q.device.type, enabled=False):
            scores = torch.baddbmm(
                torch.empty(B * H, T, S, dtype=torch.float32, device=q.device),
                q.reshape(B * H, T, D).float(), k.transpose(-1, -2).reshape(B * H, D, S).float(),
                beta=0, alpha=scaling,
            ).view(B, H, T, S)
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)) * scaling  # (B, H, T, S)
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    if dropout > 0:
        probs = F.dropout(probs, p=dropout, training=True)
    return torch.matmul(probs, v), probs  # (B, H, T, D), (B, H, T, S)


def decode_attention_runs(qkv, cache, plan, dropout: float, eager: bool) -> bool:
    """Whether a decode step's attention runs fused in gpt2kit's kernel (native/attention.c, through
    StaticCache.decode_attention): one new token per row and no key mask (plan.key_counts), SDPA (not eager),
    no dropout, no gradient, the fused qkv in the cache's dtype, and a cache the kernel takes
    (StaticCache.decode_kernel_fits: CPU, float32 or bfloat16, head_dim a multiple of 16 up to 256, the
    native library built for this CPU)."""
    if not plan.decode_kernel or eager or dropout != 0.0:  # plan.decode_kernel: key_counts and the cache fits
        return False
    return (qkv.dtype is cache.key_cache[0].dtype and qkv.stride(-1) == 1
            and not (torch.is_grad_enabled() and qkv.requires_grad))


def attend(q, k, v, mask, is_causal: bool, *, scaling: float, dropout: float, upcast: bool, eager: bool):
    """The one attention switch, used by every path: eager (explicit softmax, probabilities returned; the
    Mistral-style upcast applies here only, as in transformers) or PyTorch's SDPA. (A decode step's one
    query per row under SDPA runs fused in gpt2kit's kernel where decode_attention_runs says so: softmax in
    float32 as SDPA's CPU kernel computes it, within ~1e-6 of it in float32.)

    q: (B, H, T, D); k, v: (B, H, S, D); mask: None, bool (True = attend) or additive, broadcastable to
    (B, 1, T, S); is_causal: T queries at the last T of S positions, nothing else hidden."""
    T, S = q.shape[-2], k.shape[-2]
    if eager:
        if mask is None and is_causal:
            mask = causal_additive_mask(T, S, q.dtype, q.device)
        elif mask is not None:
            mask = additive(mask, q.dtype)
        return eager_attention(q, k, v, mask, scaling, dropout, upcast)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                       is_causal=is_causal and mask is None and T > 1, scale=scaling)
    return y, None


class Attention(nn.Module):
    """Multi-head attention; self-attention with a fused QKV projection, or cross-attention
    (queries from `q_attn`, keys and values from the encoder states through `c_attn`)."""

    # the kernel the latest planned attention (model.decode) ran: "fused", "sdpa" or "eager"; set through
    # __dict__, which skips nn.Module.__setattr__'s bookkeeping (12 layers a decode step)
    last_attention: str | None = None

    def __init__(self, config, layer_idx: int, is_cross_attention: bool = False):
        super().__init__()
        self.n_embd, self.n_head = config.n_embd, config.n_head
        self.head_dim = self.n_embd // self.n_head
        self.layer_idx = layer_idx
        self.is_cross_attention = is_cross_attention
        self.config = config
        # one scale for both backends: 1/sqrt(d) and, optionally, 1/(layer_idx + 1)
        scaling = self.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scaling /= float(layer_idx + 1)
        self.scaling = scaling
        self.upcast = bool(config.reorder_and_upcast_attn)
        if is_cross_attention:
            self.c_attn = Projection(self.n_embd, 2 * self.n_embd)
            self.q_attn = Projection(self.n_embd, self.n_embd)
        else:
            self.c_attn = Projection(self.n_embd, 3 * self.n_embd)
        self.c_proj = Projection(self.n_embd, self.n_embd)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def _heads(self, x):  # (B, T, C) -> (B, H, T, D)
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)

    def forward(self, x, *, cache: Cache | None = None, cache_position=None, mask=None, is_causal=False,
                encoder_hidden_states=None, output_attentions=False, plan: SlotWrite | None = None,
                last: int | None = None, parts=None, final: bool = False, residual=None, norm=None):
        """x: (B, T, C). With `plan` (model.decode), keys/values go into a StaticCache as planned and the mask
        comes from the plan; `last`: only the last `last` queries are computed (keys and values for all T).
        With `parts` (decode_parts), x is (1, N, C): the tokens of several groups of rows, one after another.
        residual: the block's residual stream at the output's positions, added to the output (by the output
        projection itself, which a quantized one fuses into its kernel); norm: the block's layer norm, not yet
        applied to x (the QKV projection applies it: a quantized one in its kernel)."""
        if parts is not None:
            return self._forward_parts(x, cache, parts, final, residual, norm), None
        B, T, C = x.shape
        dropout = self.attn_dropout.p if self.training else 0.0
        eager = output_attentions or self.config._attn_implementation == "eager"
        probs = None
        if self.is_cross_attention:
            if norm is not None:
                x = norm(x)
            q = self._heads(self.q_attn(x))
            k, v = self.c_attn(encoder_hidden_states).split(self.n_embd, dim=2)
            k, v = self._heads(k), self._heads(v)  # (B, H, S_enc, D)
            y, probs = attend(q, k, v, mask, is_causal, scaling=self.scaling, dropout=dropout, upcast=self.upcast,
                              eager=eager)
        else:
            qkv = self.c_attn(x, norm=norm)  # (B, T, 3C)
            if plan is not None and decode_attention_runs(qkv, cache, plan, dropout, eager):
                self.__dict__["last_attention"] = "fused"
                y = cache.decode_attention(self.layer_idx, qkv, plan, self.scaling)  # (B, 1, C)
                return self.c_proj(y, residual=residual), None  # eval, no dropout (decode_attention_runs)
            q, k, v = self._qkv(qkv, B, T)  # (B, H, T, D) each
            if plan is not None:
                y = self._attend_planned(q, k, v, cache, plan, last, dropout, eager)
            else:
                if cache is not None:
                    k, v = cache.update(k, v, self.layer_idx, cache_position)  # (B, H, S, D)
                y, probs = attend(q, k, v, mask, is_causal, scaling=self.scaling, dropout=dropout,
                                  upcast=self.upcast, eager=eager)
        y = y.transpose(1, 2).reshape(B, y.shape[2], C)  # (B, T or last, C)
        return self._output(y, residual), probs

    def _output(self, y, residual):
        return project_out(self.c_proj, self.resid_dropout, y, residual, self.training)

    def _qkv(self, qkv, B: int, T: int):
        """(B*T tokens, 3C) fused projection -> q, k, v (B, H, T, D): the strides of split + per-head view +
        transpose, in three ops instead of seven."""
        return qkv.view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def _attend_planned(self, q, k, v, cache, plan: SlotWrite, last, dropout: float = 0.0, eager: bool = False):
        """Write k, v (B, H, T, D) into the cache as planned and attend over what each row may see; `last`:
        only the last `last` queries are computed. -> (B, H, T or last, D)"""
        T = q.shape[2]
        k, v = cache.write(self.layer_idx, k, v, plan)  # (B, H, S, D)
        mask, is_causal = plan.mask, plan.is_causal
        if last is not None and last < T:  # the final block: only the last queries go on
            q = q[:, :, -last:]  # (B, H, last, D)
            if mask is not None:
                mask = mask[..., -last:, :]
            elif is_causal:
                mask, is_causal = causal_mask(k.shape[-2] - T, T, k.shape[-2], q.device)[-last:][None, None], False
        eager = eager or self.config._attn_implementation == "eager"
        self.__dict__["last_attention"] = "eager" if eager else "sdpa"
        if plan.groups is not None:  # rows at different lengths (a server's step)
            return self._attend_groups(q, k, v, mask, plan.groups, dropout, eager)
        return attend(q, k, v, mask, is_causal, scaling=self.scaling, dropout=dropout, upcast=self.upcast,
                      eager=eager)[0]

    def _forward_parts(self, x, cache, parts, final: bool, residual=None, norm=None):
        """x (1, N, C): the new tokens of every part, one part after another -> (1, N', C) (N' = N, or in the
        final block the kept positions). One projection over all N tokens, attention part by part."""
        C = x.shape[-1]
        qkv = self.c_attn(x, norm=norm).view(-1, 3 * C)  # (N, 3C)
        eager = self.config._attn_implementation == "eager"
        ys, off = [], 0
        for p in parts:
            n = p.B * p.T
            rows, off = qkv[off:off + n], off + n  # (B_i * T_i, 3C)
            if decode_attention_runs(rows, cache, p.plan, 0.0, eager):  # decoding rows: one token each
                self.__dict__["last_attention"] = "fused"
                ys.append(cache.decode_attention(self.layer_idx, rows, p.plan, self.scaling))  # (B_i, C)
                continue
            q, k, v = self._qkv(rows, p.B, p.T)  # (B_i, H, T_i, D) each
            y = self._attend_planned(q, k, v, cache, p.plan, p.last if final else None)  # (B_i, H, T', D)
            ys.append(y.transpose(1, 2).reshape(-1, C))
        return self._output(torch.cat(ys)[None], residual)  # (1, N', C)

    def _attend_groups(self, q, k, v, mask, groups, dropout, eager):
        """q: (B, H, T, D), k/v: (B, H, S, D), mask (B, 1, T, S): one attention call per run of rows (lo, hi,
        n, masked), each over the first n keys only (StaticCache.attention_groups chose the runs)."""
        T = q.shape[2]
        ys = []
        for lo, hi, n, masked in groups:
            m = mask[lo:hi, :, :, :n] if masked or T > 1 else None  # equal lengths, one query: every key is seen
            y, _ = attend(q[lo:hi], k[lo:hi, :, :n], v[lo:hi, :, :n], m, False, scaling=self.scaling,
                          dropout=dropout, upcast=self.upcast, eager=eager)
            ys.append(y)
        return torch.cat(ys, 0)  # (B, H, T, D)


def additive(mask, dtype):
    """Boolean (True = attend) -> additive with finfo.min where hidden: finite, so a fully hidden row
    gives a harmless uniform softmax instead of NaN. A float mask is taken as additive already."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask.to(dtype)


def causal_additive_mask(T: int, S: int, dtype, device):
    """(1, 1, T, S) additive mask letting query i (the last T of S positions) see keys <= S - T + i."""
    q_pos = torch.arange(S - T, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    return torch.zeros(T, S, dtype=dtype, device=device).masked_fill(k_pos > q_pos, torch.finfo(dtype).min)[None, None]


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm, called without F.layer_norm's wrapper: a GPT-2 small decode step runs 25 of them, and on
    a 2-core CPU each Python frame between two GEMMs runs with cold caches (several us each)."""

    def forward(self, x):
        p = self._parameters
        return torch.layer_norm(x, self.normalized_shape, p["weight"], p["bias"], self.eps)


def project_out(proj, dropout, y, residual, training: bool):
    """A sublayer's output projection, proj(y) (+ residual): in eval the residual add is the projection's own
    (a quantized one fuses it into its kernel); in training dropout comes before it. Dropout is the identity
    in eval: not even a module call (decode steps count them)."""
    if training:
        y = dropout(proj(y))
        return y if residual is None else y + residual
    return proj(y, residual=residual)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        check_activation(config.activation_function)
        self.c_fc = Projection(config.n_embd, config.inner_dim)
        self.c_proj = Projection(config.inner_dim, config.n_embd)
        self.activation = config.activation_function
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x, residual=None, norm=None):  # (B, T, C) -> (B, T, C) (+ residual); norm: not yet applied
        h = self.c_fc(x, self.activation, norm=norm)  # (B, T, inner): the activation fused into the GEMM where it pays
        return project_out(self.c_proj, self.dropout, h, residual, self.training)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), [x + cross(ln_cross_attn(x))], x + mlp(ln_2(x))."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        if config.add_cross_attention:
            self.crossattention = Attention(config, layer_idx, is_cross_attention=True)
            self.ln_cross_attn = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, *, cache=None, cache_position=None, mask=None, is_causal=False,
                encoder_hidden_states=None, encoder_mask=None, output_attentions=False, plan=None, last=None,
                parts=None, final=False):
        """`last`: the final block of model.decode computes only the last `last` positions (decode_parts: the
        flat indices of the kept positions, or None). In model.decode the layer norms go to the projections
        after them, whose kernels apply them (a quantized one in its prologue): a decode step's 24 layer norms
        each cost ~20-45 us as an op of their own, with the caches the weight streams have just evicted."""
        fuse = in_decode()
        h = x if fuse else self.ln_1(x)
        if parts is not None:
            if last is not None:
                x = x[:, last]  # (1, N', C): the kept positions of every part
        elif last is not None and last < x.shape[1]:
            x = x[:, -last:]  # only the last positions go on (model.decode's final block)
        x, probs = self.attn(h, cache=cache, cache_position=cache_position, mask=mask, is_causal=is_causal,
                             output_attentions=output_attentions, plan=plan, last=last, parts=parts, final=final,
                             residual=x, norm=self.ln_1 if fuse else None)  # x + attention
        cross_probs = None
        if encoder_hidden_states is not None:
            if not hasattr(self, "crossattention"):
                raise InvalidInputError("encoder_hidden_states were passed, but this model has no cross-attention "
                                        "layers: build it with GPT2Config(add_cross_attention=True).")
            c, cross_probs = self.crossattention(self.ln_cross_attn(x), mask=encoder_mask,
                                                 encoder_hidden_states=encoder_hidden_states,
                                                 output_attentions=output_attentions)
            x = x + c
        x = self.mlp(x, residual=x, norm=self.ln_2) if fuse else self.mlp(self.ln_2(x), residual=x)  # x + mlp
        return x, probs, cross_probs
