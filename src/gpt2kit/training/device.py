"""--device names -> torch devices, with an error a person can act on when the device is absent."""
from __future__ import annotations

import torch


def resolve_device(name: str | None) -> torch.device:
    """'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"Unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} asks for a CUDA GPU, but none is available here "
                             f"(torch {torch.__version__}); use --device cpu.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s).")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"--device {name} asks for Apple's MPS, which is not available here; use --device cpu.")
    elif dev.type != "cpu":
        raise ValueError(f"Unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps.")
    return dev
