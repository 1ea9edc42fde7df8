"""Quantized projections: drop-in replacements for a block's Projection, with its forward contract
`forward(x: (..., in), activation=None) -> (..., out)`.

Each holds one matrix in its stored format (formats.py) and picks its kernel by batch size, as measured
on this CPU (README-quantization.md):
- up to LUT4_MAX_ROWS / INT8_MAX_ROWS rows by kernel build (decode, small batches, short prefills): the fused kernels of
  native/quantized.c, which decode the weights in registers and read them once (0.5 byte a weight for 4-bit, 1 for
  int8); from 8 rows on tiled: a chunk of weights decoded into float32 once and multiplied by every row; where the CPU
  has AMX, NF4 / FP4 from 32 rows (up to 256) and int8 from 16 (any number) on the tile unit (native/amx.h);
- more rows (prefill): decode 1024 output rows at a time into float32 and multiply with BLAS, where the
  product is bound by arithmetic, not by reading the weights;
- without the native library (no compiler / neither AVX2 nor AVX-512) or off the CPU: PyTorch ops (the packed int8
  kernel, or dequantize-and-multiply), slower for 4-bit.
Products are computed in float32 on the CPU (bfloat16/float16 activations are cast, once, in and out): the kernels
decode to float32, and half-precision products are slower on CPUs, but for NF4 / FP4 on AMX, where a lower compute
dtype is honoured: bfloat16 as one bf16 product (as bitsandbytes computes), float16 as three (bf16x2, ~2^-16 relative:
more than float16's 2^-11), float32 as six (float32-exact); fewer products run faster (AMX_PARTS). Elsewhere the
config's compute dtype is used.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from . import formats as Q
from .. import native
from ..errors import InvalidInputError
from ..model.linear import TANH_GELUS, apply_activation, in_decode

logger = logging.getLogger("gpt2kit.quantization")

SMALL_BATCH = 16  # rows up to which the fused kernels run where a module names no limits of its own
# Rows up to which the fused kernels (tiled from 8 rows, native/quantized.c TILED_MIN_M; at most TILED_MAX_M = 256)
# beat decoding into float32 and BLAS (4-bit) or PyTorch's _weight_int8pack_mm (int8), by kernel build. Measured on
# GPT-2 small's and XL's four block shapes (2 Xeon threads, alternating in one process): 4-bit avx512 tiled 1.95-2.01x
# at 24 rows, 1.49-1.61x at 48, 0.96x / 1.32x at 64, 0.77-0.84x at 128; avx2 (BLAS not held to AVX2: conservative)
# 1.01x / 1.25x at 24, 0.95x / 1.19x at 32, 0.79x at 48; int8 avx512 1.73-1.78x at 24, 1.36-1.48x at 64, 1.03-1.13x
# at 128, 1.10x at 256; avx2 0.87x at 24. Before the tiled kernel: 4-bit 16 (avx512) and 12 (avx2), int8 16.
# avx2 on a real AVX2-only CPU (AMD EPYC, Zen 3 class, 2026-12-04; int8 against decoding into float32 and BLAS, for
# without native bf16 _weight_int8pack_mm is slow; XL / small, best of 3 calls, two interleaved rounds): NF4 1.16x /
# 1.04x at 24 rows, 0.96x / 0.94x at 32; int4 1.21x / 0.99x at 32, 1.07x / 0.78x at 48; int8 1.10x / 1.43x at 48,
# 0.90x / 1.17x at 64. Again after the AVX2 tiled kernel's 3 x 4 tiles (a32cae3; the same CPU and harness): NF4 1.57x /
# 1.48x at 24, 1.32x / 1.25x at 32, 1.13-1.17x / 1.12-1.15x at 48, 1.01x / 1.03x at 64; int4 1.32x / 1.33x at 32,
# 0.95x / 1.04x at 48, 1.01x / 1.02x at 64; int8 1.29x / 1.42x at 48, 1.12x / 1.10x at 64, 0.98x / 0.96x at 96.
# Where the AMX kernels run (native/amx.h, lib.amx: from 32 rows for 4-bit, 16 for int8) 4-bit takes them up to 256
# rows: against decoding into float32 and BLAS, GPT-2 XL's four block products took 0.49-0.55x the time at 64 rows,
# 0.58-0.95x at 128, 0.85-0.91x at 256 (2 Xeon threads, best of 7 calls, two interleaved runs).
LUT4_MAX_ROWS = {"avx512": 48, "avx512-amx": 256, "avx2": 48}
INT4_MAX_ROWS = {"avx512": 48, "avx2": 32}  # affine int4 (its zero points): the tiled kernel, AMX or not
# int8 where AMX runs: any number of rows (native/quantized.c calls it 256 rows at a time past TILED_MAX_M), exact, where
# _weight_int8pack_mm rounds the activations to bf16: 2.0-2.7x its speed at 512-2048 rows of GPT-2 XL's and small's
# four block products, 4.5e-7 of the largest output against float64 where it is 5.3e-3 (2 Xeon threads, best of 5)
INT8_MAX_ROWS = {"avx512": 256, "avx512-amx": 1 << 62, "avx2": 64}
# gpt2kit_lut4_mm's kernels by the status it returns (native/quantized.c): the row-at-a-time float lookup, the integer
# int4 ones (AVX512-VNNI, AVX2), NF4 / FP4's one-row kernel on codes read as dwords (AVX-512), the tiled one (8 rows
# and more), NF4 / FP4's AMX one (native/amx.h)
LUT4_NAMES = ("fused-lut4", "fused-int4-vnni", "fused-int4-avx2", "fused-lut4-packed", "fused-lut4-tiled",
              "fused-lut4-amx")
DEQUANT_ROWS = 1024  # output rows decoded at once on the large-batch path
# the bf16 parts NF4 / FP4's AMX kernel splits each operand into, by compute dtype (native/amx.h); any other: 3. With
# fewer than 3 it beats decoding into float32 and BLAS at any number of rows (C harness, GPT-2 XL's shapes at 16 rows:
# one part 2.0-3.2x the tiled float32 kernel, two 1.3-1.8x, where three ran 0.8-1.3x), so those take no row limit.
AMX_PARTS = {torch.bfloat16: 1, torch.float16: 2}


NO_NORM = native.NO_NORM


class QuantizedProjection(nn.Module):
    """Base: y = x @ W^T + b with W [out, in] held quantized. Subclasses provide `_fused_ok()`: whether the fused
    kernel takes this matrix's shape (`_fused(M)` adds the library and the row count), `_product(x, lead, act, res, ln) -> (y, fused)` for x (*lead, in) float32 contiguous on
    the CPU (the fused branch: `_fused_product`, over the kernel and stored tensors `_kernel_spec(lib, bias)`
    names): fused, y (*lead, out) from a fused kernel that layer-normed x first (ln: weight, bias, eps, or
    NO_NORM), applied act (1: tanh GELU) and added res itself; else y (M, out) (the fused kernels read and write
    those shapes as they are: in a decode step a reshape or view costs ~15 us with caches the weight streams
    have just evicted), and `dequantize() -> W [out, in]` for everything else."""

    mode = ""
    # which path the last forward took (tests assert the fast path ran); set through __dict__, past
    # nn.Module.__setattr__ (~3 us, 49 calls a GPT-2 small decode step), as Projection.last_path
    last_kernel = ""
    last_epilogue = ""  # what the last fused kernel call applied after its product: "gelu", "+residual"
    last_prologue = ""  # and before it: "layer_norm"
    last_call = ""  # "lean": the decode step's one-call path (_decode_call), "general": forward's full checks

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, compute_dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor, activation: str | None = None, residual: torch.Tensor | None = None,
                norm: nn.LayerNorm | None = None):
        """act(norm(x) @ W^T + b) (+ residual): a block's layer norm and residual add, where the caller passes
        them, are done here, and in a decode step the fused kernels apply the layer norm in their prologue, the
        tanh GELU and the residual in their epilogue (each of those small ops costs ~20-45 us with the caches the
        weight stream has just evicted)."""
        decode = in_decode()
        if decode:
            y = self._decode_call(x, activation, residual, norm)
            if y is not None:
                return y
        self.__dict__["last_call"] = "general"
        if x.shape[-1] != self.in_features:
            raise InvalidInputError(f"{type(self).__name__} takes inputs of {self.in_features} features, got a tensor "
                                    f"of shape {tuple(x.shape)}.")
        lead = x.shape[:-1]
        if x.device.type == "cpu":
            f32 = x.dtype is torch.float32
            ln = NO_NORM
            if norm is not None:
                fusable = native.kernel_norm(norm, self.in_features) if decode and f32 and self._fused(math.prod(lead)) else None
                if fusable is not None:
                    ln = fusable
                else:
                    x = norm(x)
            xf = x if f32 else x.float()
            act = 1 if activation in TANH_GELUS and decode else 0
            res = residual if (residual is not None and f32
                               and native.kernel_residual(residual, (*lead, self.out_features))) else None
            y, fused = self._product(xf.contiguous(), lead, act, res, ln)  # float32, bias added
            if not fused:  # the fallbacks compute (M, out)
                y = y.view(*lead, self.out_features)
            else:  # the kernel's prologue and epilogue did what they were asked
                activation = None if act else activation
                residual = None if res is not None else residual
                self.__dict__["last_epilogue"] = ("gelu" if act else "") + ("+residual" if res is not None else "")
                self.__dict__["last_prologue"] = "layer_norm" if ln is not NO_NORM else ""
        else:
            if norm is not None:
                x = norm(x)
            dtype = self.compute_dtype or x.dtype
            w = self.dequantize().to(dtype)
            bias = self.bias.to(dtype) if self.bias is not None else None
            y = torch.nn.functional.linear(x.to(dtype), w, bias)
            self.__dict__["last_kernel"] = "dequantize"
        if y.dtype is not x.dtype:
            y = y.to(x.dtype)
        if activation is not None:  # a config activation_function; a decode step's tanh GELU is one kernel
            y = apply_activation(y, activation, one_kernel=decode)
        return y if residual is None else y + residual

    def _decode_call(self, x, activation, residual, norm):
        """A decode step's product as one kernel call with as little Python around it as can be: every attribute,
        check and conversion costs several us with the caches the weight streams have just evicted (the general
        path below spent ~50-70 us a call around a ~30 us kernel call, a GPT-2 small step making 49). The kernel
        and the addresses of the stored tensors are built once (`_kernel_args`). None where this does not apply
        (not float32, not contiguous, too many rows, another activation, ...): the general path runs."""
        k = self.__dict__.get("_kernel")
        if k is None or (k and (k[3] != self._buffers["weight"].data_ptr() or k[4] is not native.library())):
            k = self._kernel_args()  # new, the weight's storage swapped, or another kernel build loaded
        if not k or x.dtype is not torch.float32 or not x.is_cpu:
            return None
        shape = x.shape
        lead = shape[:-1]
        M = math.prod(lead)
        if shape[-1] != self.in_features or M > k[5] or not x.is_contiguous():
            return None
        act = 0
        if activation is not None:
            if activation not in TANH_GELUS:
                return None
            act = 1
        out = (*lead, self.out_features)
        res = 0
        if residual is not None:
            if not native.kernel_residual(residual, out):
                return None
            res = residual.data_ptr()
        ln = native.NO_NORM
        if norm is not None:
            ln = native.kernel_norm(norm, self.in_features)
            if ln is None:
                return None
        y = torch.empty(out)
        fn, static, names = k[0], k[1], k[2]
        ln_w = ln[0].data_ptr() if norm is not None else 0
        args = (x.data_ptr(), M, self.in_features, self.in_features, *static, y.data_ptr(), self.out_features, act, res,
                ln_w, ln[1].data_ptr() if ln_w else 0, ln[2])
        rc = native.invoke(fn, args, x, y, residual, ln[0], ln[1])
        d = self.__dict__
        d["last_call"] = "lean"
        d["last_kernel"] = names[rc]
        d["last_epilogue"] = ("gelu" if act else "") + ("+residual" if res else "")
        d["last_prologue"] = "layer_norm" if ln_w else ""
        return y

    _row_limits = None  # by kernel build (lib.isa): the most rows the fused kernel takes (None: SMALL_BATCH)

    def _max_rows(self, lib) -> int:
        if not self._row_limits:
            return SMALL_BATCH
        return self._row_limits.get(lib.isa + "-amx" if lib.amx else lib.isa, self._row_limits.get(lib.isa, SMALL_BATCH))

    def _fused_ok(self) -> bool:  # whether the fused kernel takes this matrix's shape
        return True

    def _fused(self, M: int) -> bool:
        """Whether the fused kernel runs M rows: the library is built, M is within its row limit, the shape fits."""
        lib = native.library()
        return lib is not None and M <= self._max_rows(lib) and self._fused_ok()

    def _kernel_args(self):
        """(kernel, its arguments between x's and y's as addresses and ints, the variant names by status, the
        weight's address, the library, the most rows it takes) for `_decode_call`, cached until an attribute is set,
        the module is moved or cast, its weight's storage is swapped or another library is loaded (checked each
        call); False where the fused kernel cannot take this module."""
        k = False
        b, bias = self._buffers, self._parameters.get("bias")
        lib = native.library()
        on_cpu = all(t is None or t.device.type == "cpu" for t in [bias, *b.values()])
        if lib is not None and on_cpu and self._fused(1) and (bias is None or bias.dtype is torch.float32):
            fn, static, names = self._kernel_spec(lib, bias)
            k = (fn, tuple(t.data_ptr() if isinstance(t, torch.Tensor) else t for t in static), names,
                 b["weight"].data_ptr(), lib, self._max_rows(lib))
        self.__dict__["_kernel"] = k
        return k

    def _fused_product(self, x, lead, act, res, ln):
        """y (*lead, out) float32 from the fused kernel `_kernel_spec` names, the general path's call of it."""
        fn, static, names = self._kernel_spec(native.library(), self._bias32())
        y = torch.empty(*lead, self.out_features, dtype=torch.float32)
        rc = native.call(fn, x, math.prod(lead), self.in_features, self.in_features, *static, y, self.out_features, act,
                         res, *ln)
        self.__dict__["last_kernel"] = names[rc]
        return y

    def __setattr__(self, name, value):  # a buffer or the bias replaced: the cached addresses are stale
        self.__dict__.pop("_kernel", None)
        super().__setattr__(name, value)

    def _apply(self, fn, recurse=True):
        """`model.to(dtype)` / `.half()` leave the stored statistics (scales, absmax, zeros, code tables) in
        float32: they are part of the format and the kernels read them as float32 (cast to bfloat16, every
        logit came out NaN); `.to(device)` moves them. The bias follows the model's dtype."""
        buffers, self._buffers = self._buffers, {}
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers = buffers
        ref = next((b for b in buffers.values() if b is not None), None)
        if ref is not None:
            device = fn(torch.empty(0, device=ref.device)).device
            for name, buf in buffers.items():
                if buf is not None:
                    buffers[name] = buf.to(device)
        if getattr(self, "_int4pack", None) is not None:
            self._int4pack = None  # PyTorch's packed copy, rebuilt from the moved buffers
        self.__dict__.pop("_kernel", None)
        return self

    def _bias32(self):
        b = self._parameters.get("bias")  # the dict itself: nn.Module.__getattr__ costs ~1.5 us a lookup
        return b if b is None or b.dtype is torch.float32 else b.float()

    def _dequantized_product(self, x2: torch.Tensor) -> torch.Tensor:
        """Prefill: float32 W decoded DEQUANT_ROWS output rows at a time, multiplied by BLAS."""
        out = torch.empty(x2.shape[0], self.out_features, dtype=torch.float32)
        bias = self._bias32()
        whole = None  # the whole matrix, decoded once where rows cannot be decoded alone
        for n0 in range(0, self.out_features, DEQUANT_ROWS):
            n1 = min(n0 + DEQUANT_ROWS, self.out_features)
            w = whole[n0:n1] if whole is not None else self.dequantize_rows(n0, n1)  # (n1 - n0, in) float32
            if w is None:
                whole = self.dequantize().float()
                w = whole[n0:n1]
            out[:, n0:n1] = torch.addmm(bias[n0:n1], x2, w.t()) if bias is not None else x2 @ w.t()
        self.__dict__["last_kernel"] = "dequantize+mm"
        return out

    def dequantize_rows(self, n0: int, n1: int) -> torch.Tensor | None:
        """Output rows n0..n1 decoded to float32 (n1 - n0, in), or None where this format (or this machine, without
        the native library) decodes only the whole matrix."""
        return None

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.buffers(recurse=False)) + list(self.parameters(recurse=False)))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


class Linear4bit(QuantizedProjection):
    """bitsandbytes' 4-bit format (NF4 / FP4, optional double quant), exactly as stored by it."""

    _row_limits = LUT4_MAX_ROWS

    def __init__(self, q: Q.Quantized4bit, bias: torch.Tensor | None, compute_dtype=None):
        out_features, in_features = q.shape
        super().__init__(in_features, out_features, bias, compute_dtype)
        self.mode = q.quant_type
        self.quant_type, self.blocksize, self.quant_dtype = q.quant_type, q.blocksize, q.dtype
        self.register_buffer("weight", q.data.contiguous())  # uint8 [(N*K+1)//2, 1]
        self.register_buffer("absmax", q.block_absmax().float().contiguous())  # float32 per block, for compute
        self.double_quant = q.double_quant
        self.offset = q.offset
        if q.double_quant:  # the stored (compressed) statistics, kept to save the checkpoint as it was read
            self.register_buffer("absmax_codes", q.absmax)
            self.register_buffer("nested_absmax", q.nested_absmax)
            self.register_buffer("nested_quant_map", q.nested_code)
        self.register_buffer("quant_map", Q.code_4bit(q.quant_type).clone())

    def quantized(self) -> Q.Quantized4bit:
        dq = self.double_quant
        return Q.Quantized4bit(data=self.weight, shape=(self.out_features, self.in_features), dtype=self.quant_dtype,
                               quant_type=self.quant_type, blocksize=self.blocksize,
                               absmax=self.absmax_codes if dq else self.absmax, offset=self.offset,
                               nested_absmax=self.nested_absmax if dq else None,
                               nested_code=self.nested_quant_map if dq else None)

    def dequantize(self) -> torch.Tensor:
        return Q.dequantize_4bit(self.quantized(), torch.float32)

    def _fused_ok(self) -> bool:
        return self.in_features % self.blocksize == 0 and self.blocksize % 32 == 0

    def dequantize_rows(self, n0, n1):
        lib = native.library()
        if lib is None or not self._fused_ok():
            return None
        out = torch.empty(n1 - n0, self.in_features, dtype=torch.float32)
        native.call(lib.gpt2kit_lut4_dequant, self.weight, n0, n1, self.in_features, self.quant_map, self.absmax, None,
                    self.blocksize, out, None)
        return out

    # True: float32-exact products at every row count, whatever the compute dtype (replace.batch_invariant; a server
    # sets it, so that a request's completion does not depend on how many rows share its steps)
    batch_invariant = False

    @property
    def amx_parts(self) -> int:
        """The bf16 parts the AMX kernel computes in (AMX_PARTS by compute dtype; 3: float32-exact). Fewer parts
        run only from AMX's row counts, while fewer rows (a decode step) compute in float32: the rounding then
        depends on the rows a call holds, unless batch_invariant."""
        return 3 if self.batch_invariant else AMX_PARTS.get(self.compute_dtype, 3)

    def _max_rows(self, lib) -> int:
        if lib.amx and self.amx_parts < 3:
            return 1 << 62
        return super()._max_rows(lib)

    def _kernel_spec(self, lib, bias):
        b = self._buffers
        return (lib.gpt2kit_lut4_mm, (b["weight"], self.out_features, b["quant_map"], b["absmax"], 0, self.blocksize,
                                      self.amx_parts, bias), LUT4_NAMES)

    def _product(self, x, lead, act=0, res=None, ln=NO_NORM):
        M = math.prod(lead)
        if self._fused(M):
            return self._fused_product(x, lead, act, res, ln), True
        return self._dequantized_product(x.view(M, self.in_features)), False

    def checkpoint_entries(self, prefix: str) -> dict[str, torch.Tensor]:
        """The keys transformers + bitsandbytes save for this module (prefix 'transformer.h.0.attn.c_attn.')."""
        out = self.quantized().state_dict(prefix)
        if self.bias is not None:
            out[prefix + "bias"] = self.bias.detach()
        return out


class LinearInt4(QuantizedProjection):
    """Affine int4 per group of `group_size` inputs (TorchAoConfig('int4_weight_only')): codes in the same
    nibble layout as bitsandbytes' 4-bit (row-major, high nibble first), w = (q - 8) * scale + zero."""

    _row_limits = INT4_MAX_ROWS

    mode = "int4"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int, compute_dtype=None):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias, compute_dtype)
        def packed(w):  # (n, in) float -> (n, in / 2) uint8 codes, high nibble first, and (n, in / g) scales, zeros
            q, scales, zeros = Q.quantize_int4_affine(w, group_size)
            flat = q.reshape(-1).to(torch.uint8)
            return ((flat[0::2] << 4) | flat[1::2]).view(w.shape[0], in_features // 2), scales, zeros

        codes, scales, zeros = Q.by_row_chunks(packed, weight)
        self.group_size = group_size
        self.register_buffer("weight", codes)
        self.register_buffer("scales", scales.contiguous())  # float32 [N, K / group_size]
        self.register_buffer("zeros", zeros.contiguous())
        self.register_buffer("code", torch.arange(16, dtype=torch.float32) - 8)
        self._int4pack = None  # PyTorch's packed layout, built on first use where the native library is absent

    def codes(self) -> torch.Tensor:
        return Q.unpack_codes(self.weight).view(self.out_features, self.in_features)

    def dequantize(self) -> torch.Tensor:
        return Q.dequantize_int4_affine(self.codes().int(), self.scales, self.zeros)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The dequantized rows `ids` (n,) -> (n, in) float32 (an embedding lookup): decoded by the native
        kernel where it is built (one call instead of ~12 small ops, ~0.2 ms a GPT-2 small decode step)."""
        lib = native.library()
        if lib is not None and ids.device.type == "cpu" and self.weight.device.type == "cpu":
            if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < self.out_features):
                raise IndexError(f"index out of range: token ids must be in [0, {self.out_features})")
            out = torch.empty(ids.shape[0], self.in_features, dtype=torch.float32)
            idx = ids.to(torch.int64).contiguous()
            native.call(lib.gpt2kit_lut4_dequant, self.weight, 0, idx.shape[0], self.in_features, self.code,
                        self.scales, self.zeros, self.group_size, out, idx)
            return out
        codes = Q.unpack_codes(self.weight[ids]).view(ids.shape[0], self.in_features)
        return Q.dequantize_int4_affine(codes.int(), self.scales[ids], self.zeros[ids])

    def dequantize_rows(self, n0, n1):
        lib = native.library()
        if lib is None:
            return None
        out = torch.empty(n1 - n0, self.in_features, dtype=torch.float32)
        native.call(lib.gpt2kit_lut4_dequant, self.weight, n0, n1, self.in_features, self.code, self.scales, self.zeros,
                    self.group_size, out, None)
        return out

    def _kernel_spec(self, lib, bias):
        b = self._buffers
        # status 1 / 2: at one row, integer dot products over x split into three 7-bit pieces (AVX512-VNNI / AVX2)
        return (lib.gpt2kit_lut4_mm, (b["weight"], self.out_features, b["code"], b["scales"], b["zeros"], self.group_size,
                                      3, bias), LUT4_NAMES)

    def _product(self, x, lead, act=0, res=None, ln=NO_NORM):
        M = math.prod(lead)
        if self._fused(M):
            return self._fused_product(x, lead, act, res, ln), True
        x2 = x.view(M, self.in_features)
        if native.library() is None and self.out_features % 16 == 0:  # PyTorch's packed int4 kernel wants N % 16 == 0
            return self._int4pack_product(x2), False
        return self._dequantized_product(x2), False

    def _int4pack_product(self, x2):
        if self._int4pack is None:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes().int(), 1)
            sz = torch.stack([self.scales, self.zeros], -1).transpose(0, 1).contiguous()  # [K/g, N, 2]
            self._int4pack = (packed, sz.to(torch.bfloat16))
        packed, sz = self._int4pack
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), packed, self.group_size, sz).float()
        self.__dict__["last_kernel"] = "aten-int4pack"
        return y + self.bias.float() if self.bias is not None else y


class Linear8bit(QuantizedProjection):
    """LLM.int8's storage (bitsandbytes Linear8bitLt): CB int8 [N, K] and SCB, the float32 row absmax.

    Weight-only: activations stay in float32 (bfloat16 on the large-batch path), so every input column is
    computed at high precision, not only those above llm_int8_threshold, which bitsandbytes splits out
    because it also quantizes activations to int8."""

    _row_limits = INT8_MAX_ROWS

    mode = "int8"

    def __init__(self, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None, threshold: float = 6.0,
                 compute_dtype=None):
        out_features, in_features = cb.shape
        super().__init__(in_features, out_features, bias, compute_dtype)
        self.threshold = threshold
        self.register_buffer("weight", cb.contiguous())
        self.register_buffer("SCB", scb.float().contiguous())
        self.register_buffer("scale", (self.SCB * Q.INV_127).contiguous())  # per output row

    def dequantize(self) -> torch.Tensor:
        return Q.dequantize_int8_rowwise(self.weight, self.SCB)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The dequantized rows `ids` (n,) -> (n, in) float32 (an embedding lookup)."""
        return Q.dequantize_int8_rowwise(self.weight[ids], self.SCB[ids])

    def _fused_ok(self) -> bool:
        return self.in_features % 32 == 0

    def dequantize_rows(self, n0, n1):  # times the row scale, as the fused kernels apply it (one rounding, not two)
        return self.weight[n0:n1].float().mul_(self.scale[n0:n1, None])

    def _kernel_spec(self, lib, bias):
        b = self._buffers
        return lib.gpt2kit_int8_mm, (b["weight"], self.out_features, b["scale"], bias), ("fused-int8", "fused-int8-tiled", "fused-int8-amx")

    def _product(self, x, lead, act=0, res=None, ln=NO_NORM):
        M = math.prod(lead)
        if self._fused(M):
            return self._fused_product(x, lead, act, res, ln), True
        from ..model import onednn

        x2 = x.view(M, self.in_features)
        if onednn.bf16_available():  # AMX / AVX512-BF16: PyTorch's packed int8 kernel on bf16 activations
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight, self.scale.to(torch.bfloat16))
            self.__dict__["last_kernel"] = "aten-int8pack"
            y = y.float()
            return (y + self.bias.float() if self.bias is not None else y), False
        return self._dequantized_product(x2), False

    def checkpoint_entries(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {prefix + "weight": self.weight, prefix + "SCB": self.SCB,
               prefix + "weight_format": torch.tensor(0, dtype=torch.uint8)}  # 0 = "row", bitsandbytes' only layout
        if self.bias is not None:
            out[prefix + "bias"] = self.bias.detach()
        return out
