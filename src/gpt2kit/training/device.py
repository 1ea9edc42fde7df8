"""--device names -> torch devices, with an error a person can act on when the device is absent."""
from __future__ import annotations

import torch

from ..utils import device_unavailable


def resolve_device(name: str | None) -> torch.device:
    """'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"Unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps.") from None
    problem = device_unavailable(dev)
    if problem:
        raise ValueError(f"--device {name} {problem}; use --device cpu.")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"Unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps.")
    return dev
