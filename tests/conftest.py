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
