"""The quantized weight formats, bit for bit as bitsandbytes 0.50 (and transformers 5) store them, plus the
affine int4 of gpt-fast / torchao. Pure tensor code, no modules: modules.py computes with these.

All matrices here are in Linear layout W [out, in] (N, K): bitsandbytes quantizes GPT-2's Conv1D weights
after transposing them, so the flattened order (and so the 64-value blocks) runs along a row of W.

4-bit (QLoRA, https://arxiv.org/abs/2305.14314; bitsandbytes' quantize_4bit):
  blocks of `blocksize` consecutive values of W.flatten(); each scaled by 1 / its absmax, clamped to
  [-1, 1] and rounded to the nearest of 16 code values (NF4 or FP4); two codes per byte, the first in the
  high nibble; data uint8 [(N*K+1)//2, 1], absmax float32 [blocks].
  Double quant: absmax minus its mean (`offset`) is quantized again, blockwise (256) with the signed 8-bit
  dynamic map (Dettmers, https://arxiv.org/abs/1511.04561), nearest value, ties to the lower code.
8-bit (LLM.int8, https://arxiv.org/abs/2208.07339): W cast to float16, SCB = row absmax,
  CB = round(W * 127 / SCB) int8 [N, K].
int4 affine (gpt-fast): per row, groups of `group_size` inputs: scale = (max - min) / 15, zero = min + 8 * scale,
  q = round((w - min) / scale) in [0, 15]; w ~ (q - 8) * scale + zero.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch

from ..errors import InvalidInputError

# NF4: the 16 quantiles of N(0, 1) normalised to [-1, 1], as bitsandbytes hard-codes them
NF4_VALUES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
# FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2), by bit pattern, before dividing by the largest (12)
FP4_VALUES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
QUANT_TYPES = ("nf4", "fp4")


@functools.cache
def code_4bit(quant_type: str) -> torch.Tensor:
    """The 16 code values (float32), indexed by the 4-bit pattern."""
    if quant_type not in QUANT_TYPES:
        raise InvalidInputError(f"4-bit quant_type must be 'nf4' or 'fp4', got {quant_type!r}.")
    values = torch.tensor(NF4_VALUES if quant_type == "nf4" else FP4_VALUES, dtype=torch.float32)
    return values / values.abs().max()


@functools.cache
def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic map (256 sorted float32 values in [-1, 1]) that double quant uses.

    For each exponent e = 0..6, 2**e evenly spaced fraction midpoints on [0.1, 1] scaled by 10**(e-6),
    with both signs; plus 0 and 1 (bitsandbytes' create_dynamic_map(); stored as `nested_quant_map`)."""
    values = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (e - 6)
        values += (scale * mids).tolist() + (-scale * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


# -- 4-bit -------------------------------------------------------------------------------------------

@dataclass
class Quantized4bit:
    """One matrix in bitsandbytes' 4-bit format (all tensors on CPU or the model's device)."""

    data: torch.Tensor  # uint8 [(N*K+1)//2, 1]: two codes per byte, high nibble first
    shape: tuple  # (N, K) of the Linear-layout weight
    dtype: torch.dtype  # the weight's dtype before quantization (dequantize's output dtype)
    quant_type: str
    blocksize: int
    absmax: torch.Tensor  # float32 [blocks]; with double quant: uint8 [blocks] codes of absmax - offset
    offset: float | None = None  # double quant: the mean subtracted from absmax
    nested_absmax: torch.Tensor | None = None  # float32 [ceil(blocks / 256)]
    nested_code: torch.Tensor | None = None  # float32 [256]

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def block_absmax(self) -> torch.Tensor:
        """The float32 absmax of every block (double quant undone)."""
        if not self.double_quant:
            return self.absmax
        scales = dequantize_blockwise_8bit(self.absmax, self.nested_absmax, self.nested_code, NESTED_BLOCKSIZE)
        return scales + torch.tensor(self.offset, dtype=torch.float32)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """The checkpoint tensors transformers + bitsandbytes write for this weight (prefix = 'h.0.attn.c_attn.')."""
        out = {prefix + "weight": self.data, prefix + "weight.absmax": self.absmax,
               prefix + "weight.quant_map": code_4bit(self.quant_type).clone()}
        state = {"quant_type": self.quant_type, "blocksize": self.blocksize, "dtype": _dtype_name(self.dtype),
                 "shape": list(self.shape)}
        if self.double_quant:
            out[prefix + "weight.nested_absmax"] = self.nested_absmax
            out[prefix + "weight.nested_quant_map"] = self.nested_code.clone()
            state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=self.offset)
        out[prefix + f"weight.quant_state.bitsandbytes__{self.quant_type}"] = pack_json(state)
        return out

    def nbytes(self) -> int:
        tensors = [self.data, self.absmax] + ([self.nested_absmax, self.nested_code] if self.double_quant else [])
        return sum(t.numel() * t.element_size() for t in tensors) + 16 * 4


def quantize_4bit(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                  double_quant: bool = False) -> Quantized4bit:
    """bitsandbytes.functional.quantize_4bit(weight, blocksize, compress_statistics=double_quant, quant_type),
    byte for byte. `weight` is the Linear-layout matrix (or any tensor), float32/16 or bfloat16."""
    if blocksize not in BLOCKSIZES:
        raise InvalidInputError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, got {blocksize}.")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InvalidInputError(f"4-bit quantization needs a float32/float16/bfloat16 weight, got {weight.dtype}.")
    code = code_4bit(quant_type).to(weight.device)
    flat = weight.detach().reshape(-1).float()  # (n,)
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)  # (n // blocksize, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # multiply by the reciprocal (full blocks) and divide (the tail), as the reference does: bit-exact scaling
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, (flat[full:] / tail_max).clamp(-1, 1)])
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    order = torch.argsort(code)  # nearest code value: bucket between sorted midpoints, then back to bit patterns
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    q = order[torch.bucketize(scaled, midpoints, out_int32=True)].to(torch.uint8)
    data = ((q[0::2] << 4) | q[1::2])[:, None]  # (ceil(n/2), 1)
    out = Quantized4bit(data=data, shape=tuple(weight.shape), dtype=weight.dtype, quant_type=quant_type,
                        blocksize=blocksize, absmax=absmax)
    if double_quant:
        offset = absmax.mean()
        out.absmax, out.nested_absmax = quantize_blockwise_8bit(absmax - offset, dynamic_map().to(weight.device),
                                                                NESTED_BLOCKSIZE)
        out.nested_code = dynamic_map().to(weight.device)
        out.offset = offset.item()
    return out


def unpack_codes(data: torch.Tensor) -> torch.Tensor:
    """uint8 bytes -> their 4-bit codes, high nibble first: (m,) -> (2m,) uint8."""
    data = data.reshape(-1)
    return torch.stack([data >> 4, data & 0xF], dim=1).reshape(-1)


def dequantize_4bit(q: Quantized4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight back from its codes (bitsandbytes.functional.dequantize_4bit, exactly): code * block absmax
    in float32, then cast. Returns q.shape."""
    n = q.shape[0] * q.shape[1] if len(q.shape) == 2 else int(torch.tensor(q.shape).prod())
    values = code_4bit(q.quant_type).to(q.data.device)[unpack_codes(q.data).int()][:n]  # (n,) float32
    scales = q.block_absmax()
    full = n - n % q.blocksize
    out = torch.empty(n, dtype=torch.float32, device=values.device)
    out[:full] = (values[:full].view(-1, q.blocksize) * scales[: full // q.blocksize, None]).reshape(-1)
    if full < n:
        out[full:] = values[full:] * scales[-1]
    return out.view(q.shape).to(dtype or q.dtype)


# -- blockwise 8-bit (double quant's absmax) ---------------------------------------------------------

def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit: per block, absmax; x * (1 / absmax), clamped to [-1, 1], to the nearest of the 256
    sorted `code` values (ties to the lower one), as bitsandbytes' torch reference kernel computes it.
    Returns (uint8 codes like x, float32 absmax [blocks]). (bitsandbytes 0.50's compiled CPU kernel picks the
    neighbouring code for values within ~1.5e-5 of a midpoint between two codes; see the tests.)"""
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)  # zero padding never raises an absmax
    normed = (padded * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)[:n]
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(normed, midpoints, out_int32=True).to(torch.uint8).view(x.shape), absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """code[q] * absmax of its block, float32 (q's shape)."""
    values = code[q.reshape(-1).int()]
    scale = absmax.repeat_interleave(blocksize)[: values.numel()]
    return (values * scale).view(q.shape)


# -- LLM.int8 ----------------------------------------------------------------------------------------

def quantize_int8_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' Int8Params quantization: (CB int8 [N, K], SCB float32 [N]) of the float16-cast weight."""
    w = weight.detach().to(torch.float16).contiguous()
    scb = w.abs().amax(dim=1).float()  # (N,)
    cb = torch.round(w * (127.0 / scb[:, None])).to(torch.int8)
    return cb, scb


def dequantize_int8_rowwise(cb: torch.Tensor, scb: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """CB * SCB / 127 as bitsandbytes' int8_vectorwise_dequant rounds it (times the float32 reciprocal of 127)."""
    return (cb * scb[:, None] * INV_127).to(dtype)


INV_127 = 7.874015718698502e-3  # float32(1 / 127)


# -- affine int4 / symmetric int8 (torchao's weight-only modes) ----------------------------------------

def by_row_chunks(fn, weight: torch.Tensor, rows: int = 4096):
    """fn(weight[chunk]) -> a tuple of tensors, applied to chunks of `rows` rows and concatenated along dim 0:
    the same result for a row-wise quantization, with the float temporaries of one chunk at a time (a
    50257-row embedding quantized whole held ~0.4 GB of them)."""
    parts = [fn(weight[i:i + rows]) for i in range(0, weight.shape[0], rows)]
    return tuple(torch.cat(p) for p in zip(*parts))


def quantize_int4_affine(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, groups of `group_size` inputs (gpt-fast's int4 weight-only): returns (q int32 [N, K] in 0..15,
    scales float32 [N, K/g], zeros float32 [N, K/g]) with w ~ (q - 8) * scale + zero."""
    N, K = weight.shape
    if K % group_size:
        raise InvalidInputError(f"int4 needs the input size ({K}) to be a multiple of group_size={group_size}.")
    w = weight.detach().float().view(N, K // group_size, group_size)
    hi, lo = w.amax(dim=-1), w.amin(dim=-1)
    scales = (hi - lo).clamp(min=1e-6) / 15
    zeros = lo + scales * 8
    q = torch.round((w - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32)
    return q.view(N, K), scales, zeros


def dequantize_int4_affine(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    N, K = q.shape
    g = K // scales.shape[1]
    # (q - 8) * scale + zero rounded once (addcmul is a fused multiply-add), as the native kernels compute it
    w = torch.addcmul(zeros[..., None], q.view(N, -1, g).float() - 8, scales[..., None])
    return w.view(N, K)


# -- the packed quant state -------------------------------------------------------------------------------

def pack_json(state: dict) -> torch.Tensor:
    """A dict as the uint8 tensor of its JSON text (bitsandbytes' `quant_state.bitsandbytes__*` entry)."""
    return torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)


def unpack_json(tensor: torch.Tensor) -> dict:
    try:
        return json.loads(bytes(tensor.reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInputError(f"A bitsandbytes quant_state entry is not valid JSON ({e}); the checkpoint is corrupt.") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
