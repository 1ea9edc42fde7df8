"""gpt2kit's own CPU kernels, built and loaded for this CPU once per machine: quantized.c (the fused
dequantize-and-multiply products of quantized projections), dense.c (float32 and bfloat16 products of decode steps, and
the greedy head's argmax pick over a screen of its logits) and
attention.c (a decode step's attention: the new keys written, one query per row), one library; rows.h holds the
layer norm and epilogue the products share, simd.h the 16-lane vector they are written in.

The library is compiled with the system C compiler (`cc`, or $CC) at first use, for the CPU it runs on, in one of
two builds (`ISAS`): "avx512" (-march=native, where the CPU has AVX-512 F/BW/VL) or "avx2" (-march=native
-mno-avx512f: AVX2 + FMA, the AVX2-only CPUs; it also runs on an AVX-512 one, so the tests hold both builds
against PyTorch on either kind of machine). `library()` loads the best this CPU runs, or the one
$GPT2KIT_NATIVE_ISA names. Built into ~/.cache/gpt2kit/kernels (or $GPT2KIT_CACHE) under a name that hashes the
source, the compiler, the build and the CPU's flags; called through ctypes (which releases the GIL). Where there is
no compiler or neither instruction set, `library()` returns None and the callers use PyTorch's own kernels.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import torch

from ..cpu import cpu_flags
from ..errors import InvalidInputError

logger = logging.getLogger("gpt2kit.native")

SOURCES = [os.path.join(os.path.dirname(__file__), name) for name in ("quantized.c", "dense.c", "attention.c")]
HEADERS = [os.path.join(os.path.dirname(__file__), name) for name in ("simd.h", "vecmath.h", "rows.h", "amx.h")]  # part of the source hash


def _cache_dir() -> str:
    root = os.environ.get("GPT2KIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gpt2kit")
    return os.path.join(root, "kernels")


ISAS = ("avx512", "avx2")  # the builds, best first
_NEEDS = {"avx512": {"avx512f", "avx512bw", "avx512vl", "avx2", "fma"}, "avx2": {"avx2", "fma"}}
_FLAGS = {"avx512": ["-march=native"], "avx2": ["-march=native", "-mno-avx512f"]}


def runnable_isas() -> list[str]:
    """The builds this CPU can run, best first (none off x86-64)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    return [isa for isa in ISAS if _NEEDS[isa] <= cpu_flags()]


@functools.cache
def chosen_isa() -> str | None:
    """The build `library()` loads, decided once a process: $GPT2KIT_NATIVE_ISA where set, else the best this CPU
    runs; None with GPT2KIT_NATIVE_KERNELS=0 or where it runs neither."""
    if os.environ.get("GPT2KIT_NATIVE_KERNELS", "1") == "0":
        logger.info("GPT2KIT_NATIVE_KERNELS=0: gpt2kit's own kernels are off; PyTorch's run instead.")
        return None
    runnable = runnable_isas()
    asked = os.environ.get("GPT2KIT_NATIVE_ISA", "").strip().lower()
    if asked:
        if asked not in ISAS:
            raise InvalidInputError(f"GPT2KIT_NATIVE_ISA={asked!r}: choose one of {', '.join(ISAS)}, or leave it unset.")
        return asked  # load() refuses one this CPU cannot run
    if not runnable:
        logger.info("Neither AVX-512 nor AVX2 + FMA on this CPU: gpt2kit's own kernels are not built; PyTorch's run.")
    return runnable[0] if runnable else None


def library():
    """The loaded kernel library of the chosen build (`chosen_isa`; its `isa` attribute names it), or None (no
    compiler, neither instruction set, or GPT2KIT_NATIVE_KERNELS=0)."""
    isa = chosen_isa()
    return None if isa is None else load(isa)


@functools.cache
def load(isa: str):
    """The library built for `isa` (one of ISAS, which this CPU must run), built at first use; None where it cannot
    be built (no compiler, a compiler error: logged)."""
    if isa not in runnable_isas():
        raise InvalidInputError(f"This CPU cannot run gpt2kit's {isa!r} kernels (it runs: "
                                f"{', '.join(runnable_isas()) or 'neither'}); if GPT2KIT_NATIVE_ISA asks for it, "
                                "unset it or choose another.")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        logger.warning("No C compiler found: quantized projections use PyTorch's kernels (NF4/FP4 are then slow). "
                       "Install gcc to build gpt2kit's fused 4-bit kernels.")
        return None
    source = b""
    for name in SOURCES + HEADERS:
        with open(name, "rb") as f:
            source += f.read()
    key = hashlib.sha256(source + cc.encode() + isa.encode() + " ".join(sorted(cpu_flags())).encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"gpt2kit_kernels_{isa}_{key}.so")
    if not os.path.exists(path):
        try:
            _compile(cc, path, _FLAGS[isa])
        except (OSError, subprocess.CalledProcessError) as e:
            detail = e.stderr.decode(errors="replace")[-500:] if isinstance(e, subprocess.CalledProcessError) else e
            logger.warning("Could not build gpt2kit's native kernels (%s); using PyTorch's kernels.", detail)
            return None
    lib = ctypes.CDLL(path)
    i64, p = ctypes.c_int64, ctypes.c_void_p
    f32 = ctypes.c_float
    lib.gpt2kit_lut4_mm.argtypes = [p, i64, i64, i64, p, i64, p, p, p, i64, i64, p, p, i64, i64, p, p, p, f32]
    lib.gpt2kit_lut4_dequant.argtypes = [p, i64, i64, i64, p, p, p, i64, p, p]
    lib.gpt2kit_int8_mm.argtypes = [p, i64, i64, i64, p, i64, p, p, p, i64, i64, p, p, p, f32]
    lib.gpt2kit_f32_mm.argtypes = [p, i64, i64, i64, p, i64, i64, p, p, i64, i64, p, p, p, f32]
    lib.gpt2kit_bf16_mm.argtypes = lib.gpt2kit_f32_mm.argtypes
    lib.gpt2kit_decode_attention.argtypes = [p, i64, p, p, i64, i64, p, p, i64, i64, i64, ctypes.c_float, i64, p,
                                             i64]
    lib.gpt2kit_head_argmax.argtypes = [p, i64, i64, i64, p, p, i64, p, f32, i64, p, i64, p, p]
    lib.gpt2kit_amx_min_rows.argtypes = [i64, i64]
    for fn in (lib.gpt2kit_amx_min_rows, lib.gpt2kit_lut4_mm, lib.gpt2kit_lut4_dequant, lib.gpt2kit_int8_mm, lib.gpt2kit_f32_mm,
               lib.gpt2kit_bf16_mm, lib.gpt2kit_decode_attention, lib.gpt2kit_head_argmax):
        fn.restype = ctypes.c_int
    lib.isa = isa
    # the one-row integer int4 kernel this build has (quantized.c), by the name the quantized modules report
    lib.int4_integer = ("fused-int4-vnni" if "avx512_vnni" in cpu_flags() else None) if isa == "avx512" else "fused-int4-avx2"
    # and NF4 / FP4's one-row kernel: the packed one (codes read as dwords) is AVX-512's
    lib.lut4_one_row = "fused-lut4-packed" if isa == "avx512" else "fused-lut4"
    # where the AMX kernels run (amx.h: built for AMX-BF16, Linux granted the tile state, GPT2KIT_AMX is not 0), the
    # fewest rows they take by format: int8's, and NF4 / FP4's by the bf16 parts it computes in (3: float32's
    # precision, 2: float16's and more, 1: bf16's); else None
    lib.amx = ({"lut4": {parts: lib.gpt2kit_amx_min_rows(0, parts) for parts in (1, 2, 3)},
                "int8": lib.gpt2kit_amx_min_rows(1, 3)} if lib.gpt2kit_amx_min_rows(0, 3) else None)
    return lib


def _compile(cc: str, path: str, flags: list[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    try:
        subprocess.run([cc, "-O3", *flags, "-fopenmp", "-shared", "-fPIC", *SOURCES, "-o", tmp],
                       check=True, capture_output=True)
        os.replace(tmp, path)  # atomic: a concurrent build or reader never sees half a library
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


NO_NORM = (None, None, 0.0)  # the product kernels' layer-norm arguments (weight, bias, eps) when there is none


def kernel_norm(norm, in_features: int, dtype=torch.float32):
    """(weight, bias, eps) of a layer norm the product kernels can apply in their prologue (affine, on the CPU, over
    the input's features, its parameters in the kernel's dtype), else None: the caller applies it first."""
    p = norm._parameters
    w, b = p.get("weight"), p.get("bias")
    if (w is None or b is None or w.dtype is not dtype or b.dtype is not dtype or not w.is_cpu
            or not b.is_cpu or w.numel() != in_features):
        return None
    return w, b, norm.eps


def kernel_residual(residual, shape, dtype=torch.float32) -> bool:
    """Whether the product kernels' epilogue can add this residual to an output of `shape`."""
    return (residual.dtype is dtype and residual.is_cpu and residual.shape == shape
            and residual.is_contiguous())


class _Recording(threading.local):
    """While model/replay.py records a decode step (this thread only): the kernel calls made, each as
    (kernel, its arguments as ints, the tensors it was given), in order; None otherwise."""

    calls = None


RECORDING = _Recording()


def invoke(fn, ints: tuple, *tensors) -> int:
    """fn(*ints): a kernel called with its arguments already as ints (the quantized modules' lean decode call
    builds them itself). `tensors`: those the ints address (None entries allowed), kept by a recording. Returns
    the kernel's status (>= 0: which variant ran); a negative one (arguments it refuses) raises."""
    rc = fn(*ints)
    if rc < 0:
        raise RuntimeError(f"gpt2kit kernel {getattr(fn, '__name__', fn)} refused its arguments (status {rc}).")
    calls = RECORDING.calls
    if calls is not None:  # a decode step being recorded (model/replay.py)
        calls.append((fn, ints, tuple(t for t in tensors if isinstance(t, torch.Tensor))))
    return rc


def call(fn, *args) -> int:
    """fn(*args) with every tensor argument passed by its address (then as `invoke`). The tensors stay referenced
    (by `args`) until the kernel returns, so a temporary (a bias cast to float32) cannot be freed and its memory
    handed to the output first; plain ints rather than c_void_p objects (~0.5 us less each, ~300 a decode step)."""
    return invoke(fn, tuple([a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]), *args)
