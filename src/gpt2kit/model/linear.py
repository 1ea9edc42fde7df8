"""How a projection runs: the one policy (choose_path), the activations it can fuse, and the modules that own
their packed weights (Projection for the blocks' Conv1D matrices, LMHead for the tied head).

Paths, chosen per call from the dtype, the device, the row count, whether gradients are wanted, whether a
decode step is running (see `decoding`) and what this CPU's oneDNN offers (onednn.py):
- ADDMM:   torch.addmm / F.linear and the activation's own formula: bit for bit what transformers computes.
- ONEDNN:  oneDNN's linear with the bias and activation in the GEMM's epilogue, on the plain weight.
- PACKED:  the same on a copy of the weight packed once into oneDNN's blocked layout for a row-count hint
           (oneDNN re-lays a plain weight out on every call). Decode steps only: they repeat one product
           shape thousands of times.
- NATIVE:  gpt2kit's own float32 / bfloat16 kernel (native/dense.c) for a decode step of up to NATIVE_MAX_ROWS
           rows (by dtype), with the block's layer norm, the tanh GELU and the residual add in the same call: reading the
           weight as fast as MKL's one-row product, it saves the small ops around it, and makes the step only
           gpt2kit's kernels, which model/replay.py then replays without the Python between them. bfloat16
           weights are widened to float32 in registers (either build, AVX-512 or AVX2: native bf16 or not).
- WIDENED: bfloat16 weights on a CPU without native bf16 products, where oneDNN's and ATen's bf16 GEMMs
           emulate bf16 and run 5-7x slower than float32 (measured on an AVX2 Zen 3: 4.1 against 29 tokens/s
           decoding GPT-2 small): computed from a packed float32 copy of the weight, output cast back to bf16.
- TRAIN:   float32 training on CPU: oneDNN forward and both gradients (an autograd Function below). PyTorch's
           CPU addmm goes to MKL, which takes a generic path on AMD processors: measured on a 2-core EPYC
           (GPT-2 small's matrices, 1024 rows) 153-206 against 133-166 GFLOP/s forward, the attention
           projection's weight gradient 208 against 130.

Measured reasons for the thresholds (GPT-2 small's shapes, 2 threads):
- NATIVE up to 2 rows: its kernel reads GPT-2 small's 48 block matrices at one row at 22.0 GB/s against MKL's
  21.1, the head at 25-26 against 24-25 (a 2-core Xeon); a float32 decode step of 2 rows took 32.6 ms against
  38.5 for oneDNN packed, but 46.2 against 43.8 at 4 rows and 59.1 against 49.8 at 8 (1.12x and 1.04x faster
  only where the step is replayed, model/replay.py), 87 against 65 at 16. bfloat16 up to 4 rows: oneDNN's packed
  bf16 product decodes slowly at few rows even with native bf16 (a step of GPT-2 small on the Xeon, AVX512-BF16:
  45.6 / 41.7 / 42.6 / 46.6 ms at 1 / 2 / 4 / 8 rows against 22.0 / 25.9 / 39.9 / 60.5 in the widening kernel,
  not replayed), where float32 took 25-28 ms at one row.
- float32 inference takes ONEDNN only from FUSED_F32_MIN_ROWS rows on (a prefill), where the fused epilogue
  pays; it sums in another order than addmm (~1e-6 relative), so shorter inputs keep the reference's bits.
- bf16 inference with native bf16 always fuses: addmm plus the five-op GELU took 76 ms where the fused op took
  50 ms at 1 x 1024 tokens; the GELU formula alone was a third of a bf16 forward.
- PACKED at batch 1, bf16: the 48 block matrices 39 against 60 ms plain, the head 13.5 against 29 ms; float32
  20.1 against 28.7 ms per decode step on an AMD EPYC, but on an Intel Xeon MKL's one-row product (ADDMM) is
  the faster (cpu.mkl_gemv_wins); at 32 rows a 32-row layout runs the block products 20-30% faster than a
  1-row layout (pack_rows_hint), and from 8 rows packed beats MKL on the Xeon too (29.6 against 44.6 ms).
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import onednn
from .. import cpu, native
from ..errors import InvalidInputError

ADDMM, ONEDNN, PACKED, WIDENED, TRAIN = "addmm", "onednn", "onednn-packed", "float32-copy", "onednn-train"
NATIVE = "native"
ARGMAX_SCREEN = "native-argmax-int8-screen"  # LMHead.argmax: the head's argmax through its int8 screen
ARGMAX_SCREEN_BF16 = "native-argmax-bf16-screen"  # ... through its bfloat16 screen (3 rows and more, any_rows)

# rows up to which a decode step takes NATIVE, by dtype (see the thresholds below)
NATIVE_MAX_ROWS = {torch.float32: 2, torch.bfloat16: 4}
FUSED_F32_MIN_ROWS = 256  # float32 inference fuses from a prefill's row count on (see above)
UNPACKED_F32_MIN_ROWS = 4  # a decode without packed weights: oneDNN on the plain weight from this many rows


def screen_bounds(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """cw (V,) for the head's int8 screen (LMHead.argmax): |screen - logit| <= |x| cw[n] for any input x, where the
    screen is native int8_mm's x . q[n] * scale[n] and the logit native nk_row's x . w[n]. By Cauchy-Schwarz the
    quantization error is at most |x| |w[n] - scale[n] q[n]|; each float32 sum (16 lanes of K/16 FMAs, 4 levels of
    adds, the scale's product) is off by at most (K/16 + 6) 2^-24 of the sum of |terms| <= |x| |row|, and the
    kernel's float comparisons of screen +- bound by ~2 2^-24 of |x| |row| more: taken as K/16 + 12 for each of
    the two rows; all rounded up 1%. Computed in float64, a block of rows at a time."""
    V, K = w.shape
    gamma = (K / 16 + 12) * 2.0 ** -24
    cw = torch.empty(V)
    for i in range(0, V, 4096):
        wd = w[i:i + 4096].detach().double()
        qd = q[i:i + 4096].double() * scale[i:i + 4096].double()[:, None]
        err = (wd - qd).norm(dim=1) + gamma * (wd.norm(dim=1) + qd.norm(dim=1))
        cw[i:i + 4096] = err * 1.01
    return cw


BF16_U = 2.0 ** -8  # bfloat16's unit roundoff: 8 significant bits, rounded to nearest


def bf16_screen_bounds(w: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """cw (V,) for the head's bfloat16 screen (LMHead.argmax at 3 rows and more): the screen is oneDNN's bf16
    product of x rounded to bf16 (x') by wb = bf16(w), accumulated in float32 in an order of its own and rounded
    to bf16 on output; the logit is native nk_row's float32 x . w[n]. Then |screen - logit| <= |x| cw[n] + rel
    |screen| (rel = SCREEN_BF16_REL, the output's rounding), where by Cauchy-Schwarz x . w - x' . wb is at most
    |x - x'| |w| + |x'| |w - wb| <= u |x| |w| + (1 + u) |x| |w - wb|; any float32 sum of K products is off by at
    most (K + 2) 2^-24 of the sum of |products| <= (1 + u) |x| |wb|, nk_row's by (K/16 + 12) 2^-24 |x| |w| (as
    screen_bounds); all rounded up 1% (which also covers the bf16 kernel's flushing of denormal inputs and
    outputs, 2^-126 each, for any hidden state a model's final norm gives). Computed in float64, a block of rows
    at a time."""
    V, K = w.shape
    u, g_any, g_nk = BF16_U, (K + 2) * 2.0 ** -24, (K / 16 + 12) * 2.0 ** -24
    cw = torch.empty(V)
    for i in range(0, V, 4096):
        wd, bd = w[i:i + 4096].detach().double(), wb[i:i + 4096].double()
        wn, bn = wd.norm(dim=1), bd.norm(dim=1)
        cw[i:i + 4096] = (u * wn + (1 + u) * (wd - bd).norm(dim=1) + g_nk * wn + g_any * (1 + u) * bn) * 1.01
    return cw


# the bf16 screen's output rounding, |out - s| <= u |s| <= u / (1 - u) |out| when rounded to nearest (oneDNN's
# vcvtneps2bf16); taken as twice that, which holds for any rounding to bf16, and rounded up 1%
SCREEN_BF16_REL = 2 * BF16_U / (1 - 2 * BF16_U) * 1.01


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

# the one table of activations oneDNN can fuse into a GEMM epilogue: our name -> (its attr, its algorithm)
FUSABLE = {"gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh"), "gelu_fast": ("gelu", "tanh"),
           "gelu": ("gelu", "none"), "gelu_python": ("gelu", "none"), "relu": ("relu", "")}
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise InvalidInputError(f"Unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}.")


def apply_activation(y: torch.Tensor, name: str | None, one_kernel: bool = False) -> torch.Tensor:
    """The activation `name` (a config activation_function) on y, unfused. one_kernel (training, decode
    steps): the tanh GELUs use PyTorch's one-kernel GELU (and its one-kernel backward) instead of the five-op
    formula the reference writes out, which autograd differentiates op by op (7 against 36 ms forward +
    backward on a (1024, 3072) float32 input; within 2.4e-7)."""
    if name is None:
        return y
    if one_kernel and name in TANH_GELUS:
        return F.gelu(y, approximate="tanh")
    return ACTIVATIONS[name](y)


# -- decode steps: packed weights for a row-count hint ---------------------------------------------------
class _DecodeLocal(threading.local):
    state = None  # a _DecodeState while a decode step runs in this thread


class _DecodeState(NamedTuple):
    rows_hint: int  # the row count packed weights are laid out for
    pack: bool  # whether projections may hold packed copies
    dtype: torch.dtype | None  # the model's dtype, for which `path` was decided
    path: str | None  # the policy's answer for (dtype, no grad, this state), decided once per step; None: ask
    head_path: str | None  # the same for the vocabulary head


_DECODE = _DecodeLocal()
PACK_LIMIT_BYTES = 1 << 30  # a decode never packs (doubles) more than 1 GiB of weights


def pack_rows_hint(dtype, batch: int) -> int:
    """The row count oneDNN lays a packed weight out for. It matters in float32 only (measured on a 2-core
    EPYC, GPT-2 small's matrices, weights not in cache): at 32 rows a 32-row layout runs the four block
    products in 0.65/0.82/0.80 ms against 0.80/1.15/1.04 ms for a 1-row layout, and the head in 13.2 against
    16.6 ms; layouts for 8, 32 or 128 rows are alike from 4 to 64 rows. In bfloat16 it changes nothing."""
    return 32 if dtype == torch.float32 and batch > 1 else 1


def in_decode() -> bool:
    """Whether a decode step (model.decode) is running in this thread."""
    return _DECODE.state is not None


@contextmanager
def decoding(rows_hint: int, pack: bool = True, dtype: torch.dtype | None = None, device_type: str = "cpu",
             rows: int | None = None):
    """Within this block (one decode step or prefill of model.decode, gradients off), projections may use
    packed weights. With the model's dtype given, the policy is asked once here for every projection of that
    dtype instead of once per product (the per-call checks cost ~10 us each, 49 products a GPT-2 small step).
    rows: the step's row count (batch x new tokens), where known."""
    old = _DECODE.state
    state = _DecodeState(rows_hint, pack, None, None, None)
    path = head_path = None
    if dtype is not None and pack:
        n = rows if rows is not None else rows_hint
        path = _policy(device_type, dtype, dtype, False, state, n)
        head_path = _policy(device_type, dtype, dtype, False, state, n, head=True)
    _DECODE.state = state._replace(dtype=dtype, path=path, head_path=head_path)
    try:
        yield
    finally:
        _DECODE.state = old


# -- the policy ------------------------------------------------------------------------------------------
def wants_grad(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


def choose_path(x: torch.Tensor, weight: torch.Tensor, training: bool = False, head: bool = False) -> str:
    """The one decision of how a projection of x (..., in) by `weight` runs (see the module docstring).
    training=True: a product inside a training step's own autograd Function (the fused loss), grad or not.
    head=True: the vocabulary head (LMHead)."""
    state = _DECODE.state
    if (state is not None and state.path is not None and weight.dtype is state.dtype and x.dtype is state.dtype
            and not training and not torch.is_grad_enabled()):
        return state.head_path if head else state.path  # decided by _policy when the decode step began
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return _policy(x.device.type, x.dtype, weight.dtype, training or wants_grad(x, weight), state, rows, head)


def _policy(device_type: str, x_dtype, dtype, grad: bool, decode: _DecodeState | None, rows: int,
            head: bool = False) -> str:
    if device_type != "cpu" or torch.compiler.is_compiling() or not onednn.linear_available():
        return ADDMM
    if x_dtype != dtype:
        return ADDMM
    if grad:
        if dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
            return TRAIN
        return ADDMM
    if dtype == torch.bfloat16:
        if decode is not None and rows <= NATIVE_MAX_ROWS[dtype] and native.library() is not None:
            return NATIVE
        if not onednn.bf16_available():
            return WIDENED
        return PACKED if decode is not None and decode.pack else ONEDNN
    if dtype == torch.float32:
        if decode is not None:
            if rows <= NATIVE_MAX_ROWS[dtype] and native.library() is not None:
                return NATIVE  # as fast as MKL's product or oneDNN's packed one, and fused (see above)
            if decode.pack:  # a block's one-row product on an Intel CPU: MKL's is the faster (cpu.py); not
                # the head's (50257 x 768 at one row on the Xeon: 7.1 ms packed against 8.0 in MKL). One row:
                # a step of one (a server with one request) or a generation laid out for one (its prefill too)
                one_row = rows == 1 or decode.rows_hint == 1
                return ADDMM if one_row and not head and cpu.mkl_gemv_wins() else PACKED
            return ONEDNN if rows >= UNPACKED_F32_MIN_ROWS else ADDMM
        return ONEDNN if rows >= FUSED_F32_MIN_ROWS else ADDMM
    return ADDMM


def _still(copy: tuple, w: torch.Tensor) -> bool:
    """Whether a copy derived from a weight, keyed (weight, storage, version, ...), is still that weight's: the
    same tensor, storage and version (a load, `.to()`, an in-place edit or a new tensor make it stale)."""
    return copy[0] is w and copy[1] == w.data_ptr() and copy[2] == w._version


class _PolicyLinear:
    """What Projection and LMHead share: running the chosen path, and owning a packed copy of the weight.

    The packed copy is keyed by the weight's identity, storage and version, so it is dropped and rebuilt
    when the weight changes: a load, `.to()`, an in-place edit (which bumps the version) or a new tensor."""

    _pack = None  # (key, rows_hint, packed weight (out, in) blocked, float32 bias or None)
    last_path: str | None = None  # the path the latest call took (tests and benchmarks read it)

    def _weight_out_in(self) -> torch.Tensor:  # (out, in), a view where possible
        raise NotImplementedError

    def _packed(self, rows_hint: int, widen: bool):
        """(packed weight, float32 bias or None): the copy held if it is still this weight's, else a new one."""
        w = self._parameters["weight"]
        p = self._pack  # (weight, storage, version, rows_hint, widen, packed, bias)
        if p is not None and _still(p, w) and p[4] == widen and (p[3] == rows_hint or widen):
            return p[5], p[6]
        self._pack = None  # free the stale copy before building the new one
        with torch.no_grad():
            src = self._weight_out_in().detach()
            if widen:
                src = src.float()
            packed = torch.ops.mkldnn._reorder_linear_weight(src.contiguous(), rows_hint)
            bias = self.bias.detach().float() if widen and self.bias is not None else None
        self._pack = (w, w.data_ptr(), w._version, rows_hint, widen, packed, bias)
        return packed, bias

    def drop_packed(self) -> None:
        self._pack = None

    @property
    def packed_weight(self):
        """The packed copy this module holds now (None: none), and the row count it is laid out for."""
        return (None, None) if self._pack is None else (self._pack[5], self._pack[3])

    def _run(self, x: torch.Tensor, activation: str | None = None, path: str | None = None,
             residual: torch.Tensor | None = None, norm=None) -> torch.Tensor:
        """(..., in) -> (..., out) along `path` (default: the policy's choice for this call), of `norm(x)` where
        given (the block's layer norm) and plus `residual` where given (the block's residual add): a quantized
        projection fuses both into its kernel. oneDNN's linear takes any leading dimensions itself, so the
        decode paths run no reshapes around it."""
        params = self._parameters  # not through nn.Module.__getattr__: this runs 49 times a GPT-2 small step
        w = params["weight"]
        path = path or choose_path(x, w)
        if path == NATIVE:
            y = self._native(x, w, params["bias"], activation, residual, norm)
            if y is not None:
                return y
            path = ADDMM  # an input or weight the kernel does not take
        if norm is not None:
            x = norm(x)
        if residual is not None:
            return self._run(x, activation, path) + residual
        self.__dict__["last_path"] = path  # past nn.Module.__setattr__ (~10 us a call)
        fused = FUSABLE.get(activation, _NOT_FUSED) if activation is not None else _UNFUSED
        if path == PACKED:  # first: the path of every decode step
            y = _linear_pointwise(x, self._packed(_DECODE.state.rows_hint, widen=False)[0], params["bias"],
                                  fused[0], [], fused[1])
        elif path == ADDMM:
            # F.linear on the [out, in] view folds (..., in) to rows in C++ and calls the very addmm(bias, x, W)
            # the reference's Conv1D calls: the same bits, two Python-level ops fewer than reshape + view
            y = F.linear(x, self._weight_out_in(), params["bias"])
            # a decode step (model.decode) takes the one-kernel tanh GELU, as the packed path's fused one is:
            # 1 op instead of 8 on a (1, 3072) row, within ~1e-7; model.forward keeps the formula's bits
            return apply_activation(y, activation, one_kernel=in_decode() or wants_grad(x, w))
        elif path == TRAIN:
            x2 = x.reshape(-1, x.shape[-1])  # (N, in)
            y = apply_activation(_OneDNNLinear.apply(x2, self._weight_in_out(), self.bias), activation, one_kernel=True)
            return y.view(x.shape[:-1] + (y.shape[-1],))
        elif path == ONEDNN:
            y = _linear_pointwise(x, self._weight_out_in(), params["bias"], fused[0], [], fused[1])
        else:  # WIDENED
            state = _DECODE.state
            packed, bias = self._packed(state.rows_hint if state else 1, widen=True)
            y = _linear_pointwise(x.float(), packed, bias, fused[0], [], fused[1]).to(x.dtype)
        return y if fused is not _NOT_FUSED else apply_activation(y, activation)

    _layout = 0  # the weight's layout for native/dense.c: 0 [in, out] (Conv1D), 1 [out, in] (nn.Linear)

    def _native(self, x, w, bias, activation, residual, norm):
        """NATIVE: act(norm(x) @ W + b) + residual in one call of gpt2kit_f32_mm (bf16: gpt2kit_bf16_mm), the norm,
        act and residual where its prologue and epilogue take them (else applied around them); None where the kernel
        does not take x or W."""
        K = x.shape[-1]
        M = x.numel() // K if K else 0
        dt = x.dtype
        if (dt not in _NATIVE_DTYPES or w.dtype is not dt or not x.is_cpu or not w.is_cpu or not x.is_contiguous()
                or not w.is_contiguous() or M < 1 or M > NATIVE_MAX_ROWS[dt] or K != w.shape[self._layout]
                or (bias is not None and bias.dtype is not dt)):
            return None
        N = w.shape[1 - self._layout]
        ln = native.NO_NORM
        if norm is not None:
            ln = native.kernel_norm(norm, K, dt) if K % 16 == 0 else None
            if ln is None:
                x, ln = norm(x).contiguous(), native.NO_NORM
        act = 1 if activation in TANH_GELUS else 0
        later = activation if activation is not None and not act else None  # an activation the kernel lacks
        shape = (*x.shape[:-1], N)
        res = (residual if residual is not None and later is None and native.kernel_residual(residual, shape, dt)
               else None)
        y = torch.empty(shape, dtype=dt)
        lib = native.library()
        fn = lib.gpt2kit_f32_mm if dt is torch.float32 else lib.gpt2kit_bf16_mm
        native.call(fn, x, M, K, K, w, N, self._layout, bias, y, N, act, res, *ln)
        self.__dict__["last_path"] = NATIVE
        if later is not None:
            y = apply_activation(y, later, one_kernel=True)
        return y if residual is None or res is not None else y + residual


_NATIVE_DTYPES = (torch.float32, torch.bfloat16)
_linear_pointwise = torch.ops.mkldnn._linear_pointwise
_UNFUSED = ("none", "")  # no activation
_NOT_FUSED = ("none", "", "applied after the product")  # an activation oneDNN cannot fuse


class Projection(_PolicyLinear, nn.Module):
    """y = act(x @ W + b) with W stored [in, out], the layout of GPT-2's checkpoints ("Conv1D").

    Kept in this layout on purpose: on CPU a batch-1 `x @ W` over a 768-wide [in, out] matrix reads it
    faster than `F.linear` over [out, in] (DESIGN.md, measured), and checkpoints load without a transpose.
    A quantized module with the same forward(x, activation) can be swapped in for it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def _weight_in_out(self):
        return self.weight

    def _weight_out_in(self):
        return self.weight.t()

    # (..., in) -> (..., out), y = act(x @ W + b): the policy's path, one Python frame (decode steps run 48)
    forward = _PolicyLinear._run

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half(): the packed copy belongs to the old weights
        self._pack = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layout=[in, out]"


class LMHead(_PolicyLinear, nn.Linear):
    """The language-modelling head: an nn.Linear ([vocab, n_embd], tied to the token embedding), whose
    products follow the same policy as the blocks' (a packed copy during decode steps)."""

    _layout = 1

    def _weight_in_out(self):
        return self.weight.t()

    def _weight_out_in(self):
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., V)
        path = choose_path(x, self.weight, head=True)
        if path == ADDMM:
            self.__dict__["last_path"] = ADDMM
            return F.linear(x, self.weight, self.bias)  # the reference's own call, for its bits
        return self._run(x, None, path)

    _screen = None  # (weight, storage, version, int8 copy (V, C), its row scales (V,), bounds (V,)) for argmax
    _screen16 = None  # (weight, storage, version, rows hint, packed bf16 copy, bounds (V,)): argmax at more rows
    last_candidates: list | None = None  # per row, the outputs the latest argmax summed again in float32

    def argmax(self, x: torch.Tensor, banned: torch.Tensor | None = None, *,
               any_rows: bool = False) -> torch.Tensor | None:
        """(B, C) -> (B,) int64: the index of each row's largest logit, exactly as forward's logits in this decode
        step give it (first of equals; `banned` ids (n,) never chosen, as a processor's -inf), for a float32
        step that takes NATIVE (up to NATIVE_MAX_ROWS rows). Every logit is first screened from an int8 copy of
        the weight (a quarter of the bytes: the float32 head is ~30% of what a GPT-2 small step reads) by the
        native int8 kernel; native gpt2kit_head_argmax then rules out every output whose screen plus its proven
        error bound (screen_bounds) stays below another's screen minus its bound, and sums the few left again in
        float32. None where that path does not apply or a logit is not finite: the caller computes the logits.

        any_rows=True (the server's greedy rows): more rows too, on a CPU with native bf16 products (AVX512-BF16 or
        AMX), screened by oneDNN's packed bf16 product from a bf16 copy of the weight (at 32 rows of GPT-2 small,
        3.1 ms against 11.8 ms for the float32 head's packed product, 2-core Xeon) with bf16_screen_bounds. There
        the step's logits come from oneDNN's float32 GEMM, so the token is the argmax of the logits as the
        native row kernel sums them, the arithmetic of a 1-row step: a row's token does not depend on the rows
        beside it (it can differ from the argmax of oneDNN's logits only where two logits lie within their
        float32 rounding of each other)."""
        w = self._parameters["weight"]
        B = x.shape[0] if x.dim() == 2 else 0
        if (self.bias is not None or w.dtype is not torch.float32 or x.dtype is not torch.float32 or not x.is_cpu
                or not w.is_cpu or B < 1 or not x.is_contiguous() or not w.is_contiguous()
                or x.shape[1] != w.shape[1] or x.shape[1] % 32):
            return None
        lib = native.library()
        if lib is None:
            return None
        V, K = w.shape
        if B <= NATIVE_MAX_ROWS[torch.float32] and choose_path(x, w, head=True) == NATIVE:
            q, scale, cw = self._screen_weights(w)
            z, rel, path = torch.empty(B, V), 0.0, ARGMAX_SCREEN
            native.call(lib.gpt2kit_int8_mm, x, B, K, K, q, V, scale, None, z, V, 0, None, None, None, 0.0)
        elif any_rows and onednn.bf16_native():
            packed, cw = self._screen_bf16(w)
            z = _linear_pointwise(x.to(torch.bfloat16), packed, None, "none", [], "").float()  # (B, V)
            rel, path = SCREEN_BF16_REL, ARGMAX_SCREEN_BF16
        else:
            return None
        if banned is not None:
            banned = banned.to(device="cpu", dtype=torch.long).reshape(-1).contiguous()
        out = torch.empty(B, dtype=torch.long)
        counts = torch.empty(B, dtype=torch.long)
        rc = native.call(lib.gpt2kit_head_argmax, x, B, K, K, w, z, V, cw, rel, V, banned,
                         0 if banned is None else banned.numel(), out, counts)
        if rc != 0:
            return None
        self.__dict__["last_path"] = path
        self.__dict__["last_candidates"] = counts.tolist()
        return out

    def _screen_bf16(self, w):
        """The bf16 screen: oneDNN's packed copy of bf16(w) (laid out for the decode step's row hint, else 32 rows)
        and its error bounds, rebuilt when the weight changes."""
        state = _DECODE.state
        hint = state.rows_hint if state is not None and state.rows_hint else 32
        s = self._screen16
        if s is not None and _still(s, w) and s[3] == hint:
            return s[4:]
        self._screen16 = None
        with torch.no_grad():
            wb = w.detach().to(torch.bfloat16)  # (V, C)
            cw = bf16_screen_bounds(w, wb)
            packed = torch.ops.mkldnn._reorder_linear_weight(wb, hint)
        del wb
        self._screen16 = (w, w.data_ptr(), w._version, hint, packed, cw)
        return packed, cw

    def _screen_weights(self, w):
        """The int8 copy of the weight (rows scaled by their largest |w| / 127, rounded to nearest), its scales
        and the screen's error bounds, rebuilt when the weight changes."""
        s = self._screen
        if s is not None and _still(s, w):
            return s[3:]
        self._screen = None
        with torch.no_grad():
            wd = w.detach()
            V = wd.shape[0]
            scale = torch.empty(V)  # (V,)
            q = torch.empty(wd.shape, dtype=torch.int8)  # (V, C); a block of rows at a time: no full-size temporaries
            for i in range(0, V, 4096):
                rows = wd[i:i + 4096]
                scale[i:i + 4096] = (rows.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
                q[i:i + 4096] = torch.round(rows / scale[i:i + 4096, None]).clamp_(-127, 127)
            cw = screen_bounds(wd, q, scale)
        self._screen = (w, w.data_ptr(), w._version, q, scale, cw)
        return q, scale, cw

    def drop_packed(self) -> None:
        self._pack = None
        self._screen = self._screen16 = None

    def _apply(self, fn, recurse=True):
        self._pack = None
        self._screen = self._screen16 = None
        return super()._apply(fn, recurse)


def packable_bytes(model) -> int:
    """Bytes a decode would pack: every projection and the head that the policy may pack."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, _PolicyLinear))


def drop_packed(model) -> None:
    """Free every packed copy the model's projections hold (they are rebuilt on the next decode)."""
    for m in model.modules():
        if isinstance(m, _PolicyLinear):
            m.drop_packed()


def path_counts(model) -> dict:
    """{path: number of projections whose latest call took it}: what tests and benchmarks check."""
    counts: dict = {}
    for m in model.modules():
        if isinstance(m, _PolicyLinear) and m.last_path is not None:
            counts[m.last_path] = counts.get(m.last_path, 0) + 1
    return counts


class _OneDNNLinear(torch.autograd.Function):
    """oneDNN's linear has no autograd formula of its own: this gives it the textbook one,
    y = x W + b => dx = dy W^T, dW = x^T dy, db = sum(dy)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        # x: (N, in); weight: (in, out), GPT-2's [in, out] layout; bias: (out,) or None
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight.t(), bias, "none", [], "")  # (N, out)

    @staticmethod
    def backward(ctx, grad_y):  # grad_y: (N, out)
        x, weight = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.mkldnn._linear_pointwise(grad_y, weight, None, "none", [], "")  # (N, in)
        if ctx.needs_input_grad[1]:
            # x^T dy as a "linear" of x^T (in, N) against dy^T (out, N): (in, out)
            grad_w = torch.ops.mkldnn._linear_pointwise(x.t(), grad_y.t(), None, "none", [], "")
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.sum(0)
        return grad_x, grad_w, grad_b
