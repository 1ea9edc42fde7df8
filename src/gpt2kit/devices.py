"""The one device resolver: a user's device choice (--device, device_map=, device=) -> a torch.device."""
from __future__ import annotations

import torch

from .errors import DeviceUnavailableError, InvalidInputError

AUTO_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")  # transformers' device_map strategies


def device_unavailable(device: torch.device) -> str | None:
    """Why `device` cannot be used here (a phrase to put after the name the user gave), or None if it can."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"asks for a CUDA GPU, but PyTorch sees none here (torch {torch.__version__})"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"names CUDA device {device.index}, but there are only {torch.cuda.device_count()} CUDA device(s)"
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        return "asks for Apple's MPS, which is not available here"
    return None


def resolve_device(spec, what: str = "device") -> torch.device:
    """None (CPU), 'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:N', 'mps', an int (a CUDA
    index), a torch.device, or a device_map dict that puts everything on one device. `what` names the
    argument in messages (e.g. '--device', 'device_map')."""
    if isinstance(spec, dict):
        devices = set(spec.values())
        if len(devices) != 1:
            raise InvalidInputError(f"gpt2kit puts the whole model on one device; {what}={spec!r} splits it. "
                                    "Pass one device, e.g. 'cuda' or 'cpu'.")
        spec = devices.pop()
    if spec is None:
        return torch.device("cpu")
    if isinstance(spec, str):
        spec = spec.strip().lower()
        if spec in AUTO_NAMES:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device("cuda", spec) if isinstance(spec, int) and not isinstance(spec, bool) else torch.device(spec)
    except (RuntimeError, TypeError):
        raise InvalidInputError(f"{what} must be 'auto', 'cpu', 'cuda', 'cuda:N', 'mps', an int or a torch.device; "
                                f"got {spec!r}.") from None
    problem = device_unavailable(device)
    if problem:
        raise DeviceUnavailableError(f"{what} {spec!r} {problem}. Use 'cpu' or 'auto'.")
    if device.type == "meta":
        raise InvalidInputError(f"{what}='meta' would load no weights; build with torch.device('meta') and "
                                "from_config instead.")
    if device.type not in ("cpu", "cuda", "mps"):
        raise InvalidInputError(f"Unsupported device {spec!r}; use auto, cpu, cuda, cuda:N or mps.")
    return device
