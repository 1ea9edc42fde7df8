"""The pieces of a GPT-2 block: projection, attention (self and cross), MLP, block.

Parameter names are the checkpoint's own (`c_attn`, `c_proj`, `c_fc`, `ln_1`, ...), so a state dict
maps one to one onto the files the GPT-2 world uses.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import onednn
from .cache import Cache
from .training_linear import training_linear, use_training_linear
from ..errors import InvalidInputError


class Projection(nn.Module):
    """y = x @ W + b with W stored [in, out], the layout of GPT-2's checkpoints ("Conv1D").

    Kept in this layout on purpose: on CPU a batch-1 `x @ W` over a 768-wide [in, out] matrix reads it
    faster than `F.linear` over [out, in] (DESIGN.md, measured), and checkpoints load without a transpose.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
        shape = x.shape[:-1] + (self.out_features,)
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        if use_onednn(x2, self.weight):  # bias (and activation) fused into the bf16 GEMM
            algorithm = {"gelu_tanh": "tanh", "gelu_erf": "none"}.get(activation, "")
            attr = "gelu" if activation.startswith("gelu") else activation
            return torch.ops.mkldnn._linear_pointwise(x2, self.weight.t(), self.bias, attr, [], algorithm).view(shape)
        if use_training_linear(x2, self.weight):  # float32 training on CPU: oneDNN forward and backward
            y = training_linear(x2, self.weight, self.bias)
        else:
            y = torch.addmm(self.bias, x2, self.weight) if self.bias is not None else x2 @ self.weight
        if activation != "none":
            y = ACTIVATIONS[ONEDNN_ACTIVATIONS_INV[activation]](y)
        return y.view(shape)  # (..., out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layout=[in, out]"


def _gelu_new(x):  # OpenAI's tanh approximation, written out as the reference does
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "gelu_python": lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,
    "silu": F.silu,
    "swish": F.silu,
    "mish": F.mish,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "linear": lambda x: x,
}


# activations oneDNN can fuse into a GEMM epilogue, by our name -> its name (gelu_new is the tanh approximation)
ONEDNN_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                      "gelu": "gelu_erf", "gelu_python": "gelu_erf", "relu": "relu"}
ONEDNN_ACTIVATIONS_INV = {"gelu_tanh": "gelu_pytorch_tanh", "gelu_erf": "gelu", "relu": "relu"}


FUSED_F32_MIN_ROWS = 256  # float32 takes the fused path only for prefill-sized inputs (see use_onednn)


def use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether to run a projection through oneDNN's fused linear (bias + activation in the GEMM epilogue).

    Inference on CPU only (the op has no autograd formula). Measured on GPT-2 small's shapes, 1 x 1024 tokens:
    - bfloat16 (needs native bf16 support): the fused op takes 50 ms where addmm plus a separate tanh-GELU
      take 76 ms; GPT-2's five-op GELU formula alone costs a third of a bf16 forward.
    - float32: only from FUSED_F32_MIN_ROWS rows on (prefill), where it is faster; it sums in another order
      than addmm (~1e-6 relative). Shorter inputs and decode steps keep addmm and the explicit GELU formula,
      bit for bit the reference's.
    """
    if x.device.type != "cpu" or weight.dtype != x.dtype:
        return False
    if x.dtype == torch.float32:
        if x.shape[0] < FUSED_F32_MIN_ROWS:
            return False
    elif x.dtype != torch.bfloat16:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    return onednn.linear_available() and onednn.bf16_available()


def get_activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise InvalidInputError(f"Unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}.") from None


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


class Attention(nn.Module):
    """Multi-head attention; self-attention with a fused QKV projection, or cross-attention
    (queries from `q_attn`, keys and values from the encoder states through `c_attn`)."""

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
                encoder_hidden_states=None, output_attentions=False):
        B, T, C = x.shape
        if self.is_cross_attention:
            q = self._heads(self.q_attn(x))
            k, v = self.c_attn(encoder_hidden_states).split(self.n_embd, dim=2)
            k, v = self._heads(k), self._heads(v)  # (B, H, S_enc, D)
        else:
            q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
            q, k, v = self._heads(q), self._heads(k), self._heads(v)  # (B, H, T, D)
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx, cache_position)  # (B, H, S, D)
        dropout = self.attn_dropout.p if self.training else 0.0
        backend = self.config._attn_implementation
        if output_attentions or backend == "eager":
            if mask is None and is_causal:  # eager needs the causal mask spelled out
                mask = causal_additive_mask(T, k.shape[-2], q.dtype, q.device)
            elif mask is not None:
                mask = additive(mask, q.dtype)
            y, probs = eager_attention(q, k, v, mask, self.scaling, dropout, self.upcast)
        else:
            if mask is not None and mask.dtype != torch.bool:
                mask = mask.to(q.dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                               is_causal=is_causal and mask is None, scale=self.scaling)
            probs = None
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        y = self.resid_dropout(self.c_proj(y))
        return y, probs


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


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Projection(config.n_embd, config.inner_dim)
        self.c_proj = Projection(config.inner_dim, config.n_embd)
        self.act = get_activation(config.activation_function)
        self.fused_act = ONEDNN_ACTIVATIONS.get(config.activation_function)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        if self.fused_act is not None and use_onednn(x.reshape(-1, x.shape[-1]), self.c_fc.weight):
            h = self.c_fc(x, activation=self.fused_act)  # (B, T, inner), GELU fused into the GEMM
        elif self.fused_act == "gelu_tanh" and torch.is_grad_enabled() and self.c_fc.weight.requires_grad:
            # training: PyTorch's one-kernel tanh GELU (and its one-kernel backward) instead of the five-op
            # formula, which autograd differentiates op by op: 7 against 36 ms forward + backward on a
            # (1024, 3072) float32 input; the two agree within 2.4e-7
            h = F.gelu(self.c_fc(x), approximate="tanh")
        else:
            h = self.act(self.c_fc(x))
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), [x + cross(ln_cross_attn(x))], x + mlp(ln_2(x))."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        if config.add_cross_attention:
            self.crossattention = Attention(config, layer_idx, is_cross_attention=True)
            self.ln_cross_attn = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, *, cache=None, cache_position=None, mask=None, is_causal=False,
                encoder_hidden_states=None, encoder_mask=None, output_attentions=False):
        a, probs = self.attn(self.ln_1(x), cache=cache, cache_position=cache_position, mask=mask,
                             is_causal=is_causal, output_attentions=output_attentions)
        x = x + a
        cross_probs = None
        if encoder_hidden_states is not None:
            if not hasattr(self, "crossattention"):
                raise InvalidInputError("encoder_hidden_states were passed, but this model has no cross-attention layers: "
                                 "build it with GPT2Config(add_cross_attention=True).")
            c, cross_probs = self.crossattention(self.ln_cross_attn(x), mask=encoder_mask,
                                                 encoder_hidden_states=encoder_hidden_states,
                                                 output_attentions=output_attentions)
            x = x + c
        x = x + self.mlp(self.ln_2(x))
        return x, probs, cross_probs
