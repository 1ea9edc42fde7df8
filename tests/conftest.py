"""Shared test fixtures. Tests are offline: the Hub is switched off for the whole session."""
import os
import pathlib

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one compute thread, here and in every process a test starts: the tests' models are tiny, and on a shared
# 2-core machine OpenMP threads spinning against other jobs made the suite 2.3x slower under load, against
# 1.5x with one thread (measured on four test files); no test's result depends on the thread count
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """../shared beside the checkout (CI has it); tests that need it skip with a reason where it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: this test reads the project's shared corpus/vocabulary")
    return SHARED


def _native_builds():
    from gpt2kit import native

    return native.runnable_isas() or ["none"]


@pytest.fixture(params=_native_builds())
def native_build(request, monkeypatch):
    """Runs a test once per build of gpt2kit's kernels this CPU can run (native/__init__.py: "avx512" and "avx2" on an
    AVX-512 machine, "avx2" on an AVX2-only one), with `native.library()` returning that build ("none", None, on a
    CPU that runs neither)."""
    from gpt2kit import native

    lib = None if request.param == "none" else native.load(request.param)  # None: no C compiler
    monkeypatch.setattr(native, "library", lambda: lib)  # None: the tests see PyTorch's paths, as such a CPU runs
    return request.param
