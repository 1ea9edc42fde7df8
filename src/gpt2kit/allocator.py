"""glibc malloc: settings for the processes gpt2kit owns (the `gpt2kit` command), never for library users;
and `release_freed_memory`, which changes no setting (for loops of large temporaries, in any process).

By default glibc serves every allocation above a moving threshold (128 KB at start) with fresh pages from
mmap and hands them back on free, and trims the heap's top as soon as it passes twice that threshold. A
forward pass allocates tensors of several MB again and again, so each one is page-faulted anew; in this
project's 2-core KVM guest that cost ~10% of a GPT-2 small prefill (a 512-token prompt: ~530 against ~480 ms
with the settings below, measured with MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_). Keeping allocations
up to 32 MB (glibc's ceiling for this setting) in the heap, and the heap untrimmed up to 1 GB, lets freed
blocks be reused. The price: the process keeps up to that much memory it no longer uses until it exits.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 1 << 30
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")


def keep_freed_memory_for_reuse() -> bool:
    """Apply the settings above on Linux with glibc; True if they took. Left alone where the user chose an
    allocator or malloc settings of their own, or set GPT2KIT_DEFAULT_MALLOC=1."""
    if not sys.platform.startswith("linux") or os.environ.get("GPT2KIT_DEFAULT_MALLOC"):
        return False
    if any(os.environ.get(name) for name in _USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt  # glibc's; musl and others lack it
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    took_mmap = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    took_trim = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    return took_mmap and took_trim


def _libc_malloc_trim():
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim  # glibc's
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
    return trim


_MALLOC_TRIM = _libc_malloc_trim() if sys.platform.startswith("linux") else None


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system now (glibc's malloc_trim; nothing elsewhere). For a loop
    that makes and drops large temporaries while the memory it keeps must stay small: after the first large
    block is freed, glibc's moving threshold serves blocks of that size from its arenas, which keep them when
    freed. Quantizing a float32 checkpoint while loading it held 0.25-0.66x the checkpoint in anonymous memory
    at its peak without this (GPT-2 small to int8, four fresh processes), 0.22-0.26x with it after each tensor."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
