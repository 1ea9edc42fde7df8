"""Small helpers shared across gpt2kit."""
from __future__ import annotations

import os
import random
import tempfile

import torch


def set_seed(seed: int) -> None:
    """Seed Python, PyTorch (CPU and CUDA) so that sampling and training are reproducible."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np  # optional

        np.random.seed(seed % (2**32))
    except ImportError:
        pass


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically: a temporary file in the same folder, fsync, then rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_path(path: str):
    """Context manager yielding a temporary path beside `path`; renamed onto `path` on success."""
    return _AtomicPath(path)


class _AtomicPath:
    def __init__(self, path):
        self.path = path
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
        os.close(fd)

    def __enter__(self):
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            os.replace(self.tmp, self.path)
        elif os.path.exists(self.tmp):
            os.unlink(self.tmp)
        return False


_SAID: set[str] = set()


def warn_once(message: str, stacklevel: int = 2) -> None:
    """A UserWarning shown once per process however often the code path runs (a loop over batches, a
    server's requests), unlike warnings.warn, which the caller's filters may repeat."""
    if message in _SAID:
        return
    _SAID.add(message)
    import warnings

    warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)
