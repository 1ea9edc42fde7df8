"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

The schedule of GPT-2/GPT-3 style training (Radford et al. 2019; Brown et al. 2020, appendix B;
Loshchilov & Hutter 2017 for the cosine shape). Written as a picklable callable for LambdaLR so that
the scheduler's state_dict (its step count) is all a resumed run needs.
"""
from __future__ import annotations

import math

import torch
from ..errors import InvalidInputError


class WarmupCosine:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.1):
        if warmup_steps < 0 or total_steps <= 0:
            raise InvalidInputError(f"warmup_steps must be >= 0 and total_steps > 0, got {warmup_steps} and {total_steps}.")
        if not 0.0 <= min_ratio <= 1.0:
            raise InvalidInputError(f"min_ratio must lie in [0, 1], got {min_ratio}.")
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.1):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_ratio))
