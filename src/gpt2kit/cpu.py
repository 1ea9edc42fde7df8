"""What this CPU can do, in one place: its flags and the instruction set PyTorch and oneDNN actually use.

Every benchmark prints `instruction_set()` beside its figures (the machine can change between sessions), and
the kernel choices read the same facts. ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA can lower what PyTorch and
oneDNN use below what the CPU has (e.g. to measure an AVX2-only machine's paths on an AVX-512 one); the
description then says so, and no longer claims the AVX-512 extensions the libraries are not using.
"""
from __future__ import annotations

import functools
import os

import torch


@functools.cache
def _cpuinfo(field: str) -> str:
    """The first /proc/cpuinfo line's value for `field` ('flags', 'vendor_id', ...); '' where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> frozenset[str]:
    """The kernel's flags for this CPU (/proc/cpuinfo); empty where there is no such file."""
    return frozenset(_cpuinfo("flags").split())


def limited() -> list[str]:
    """The environment variables that lower the instruction set PyTorch / oneDNN / MKL / gpt2kit's own kernels
    (native/__init__.py) use, as NAME=value."""
    names = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "GPT2KIT_NATIVE_ISA")
    return [f"{k}={os.environ[k]}" for k in names if os.environ.get(k)]


def instruction_set() -> str:
    """This CPU's vector instruction set as PyTorch uses it, e.g. 'AVX512 (+BF16, VNNI)' or 'AVX2 (limited by
    ATEN_CPU_CAPABILITY=avx2; the CPU has avx512f avx512_bf16)'."""
    flags = cpu_flags()
    base = torch.backends.cpu.get_cpu_capability()
    caps = []
    if base.startswith("AVX512"):
        caps = [name for flag, name in (("avx512_bf16", "BF16"), ("avx512_vnni", "VNNI"), ("amx_tile", "AMX"),
                                        ("avx512_fp16", "FP16")) if flag in flags]
    text = f"{base} (+{', '.join(caps)})" if caps else base
    if limited():
        has = " ".join(f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags) or "no AVX-512"
        text += f" (limited by {', '.join(limited())}; the CPU has {has})"
    return text


def vendor() -> str:
    """'GenuineIntel', 'AuthenticAMD', ... ('' where /proc/cpuinfo does not say)."""
    return _cpuinfo("vendor_id")


@functools.cache
def mkl_gemv_wins() -> bool:
    """Whether PyTorch's MKL matrix-vector product beats oneDNN's on packed weights for one row: on Intel CPUs
    MKL runs its own tuned kernels (a Xeon with AVX-512, GPT-2 small's 48 block matrices at one row: 16.9-19.8
    against 19.7-25.4 ms packed; decode 26 -> 29 tokens/s), while on AMD it takes a generic path (a 2-core
    EPYC: 28.7 against 20.1 ms packed)."""
    return vendor() == "GenuineIntel" and torch.backends.mkl.is_available()
