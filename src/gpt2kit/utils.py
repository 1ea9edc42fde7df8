"""Small helpers shared across gpt2kit."""
from __future__ import annotations

import os
import random
import secrets

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


def _create_temp_beside(path: str) -> tuple[int, str]:
    """(fd, name) of a new empty file beside `path`, for an atomic write onto it.

    Created with mode 0o666 and the umask applied by the kernel, as open() (and so transformers'
    save_pretrained) would create `path` itself; tempfile.mkstemp's 0o600 would survive the rename and
    leave saved models readable by their owner only."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    while True:
        tmp = os.path.join(folder, f".tmp-{secrets.token_hex(6)}-{os.path.basename(path)}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically: a temporary file in the same folder, fsync, then rename."""
    fd, tmp = _create_temp_beside(path)
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
    """Context manager yielding a temporary path beside `path` for a writer that takes a file name (safetensors,
    torch.save, savefig); on success it is fsynced and renamed onto `path`."""
    return _AtomicPath(path)


class _AtomicPath:
    def __init__(self, path):
        self.path = path
        fd, self.tmp = _create_temp_beside(path)
        self.mode = os.fstat(fd).st_mode & 0o777  # 0o666 less the umask
        os.close(fd)

    def __enter__(self):
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            fd = os.open(self.tmp, os.O_RDONLY)
            try:
                os.fsync(fd)  # the data is on disk before the name points at it
                if os.fstat(fd).st_mode & 0o777 != self.mode:  # the writer made a file of its own (safetensors: 0o600)
                    os.chmod(self.tmp, self.mode)
            finally:
                os.close(fd)
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
