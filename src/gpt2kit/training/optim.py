"""AdamW with weight-decay groups.

Decay applies to matrices (projections, embeddings, the LM head); biases and layer-norm gains are left
alone, as in GPT-2-style training recipes (Loshchilov & Hutter 2019 decouple the decay; nanoGPT and
the GPT-3 paper decay only 2-D weights). Tied parameters appear once.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fused_supported(device: torch.device) -> bool:
    """torch.optim.AdamW(fused=True) runs one kernel per step over all parameters; CPU support came in torch 2.4."""
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return False
    try:
        p = nn.Parameter(torch.zeros(1, device=device))
        p.grad = torch.zeros_like(p)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, TypeError):
        return False


def build_adamw(model: nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95), eps: float = 1e-8,
                fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over `model`'s parameters in two groups; fused when the device supports it (fused=None)."""
    device = next(model.parameters()).device
    if fused is None:
        fused = fused_supported(device)
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps,
                             **({"fused": True} if fused else {}))
