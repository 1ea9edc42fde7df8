"""The projection's training path on CPU: forward and both gradients through oneDNN's GEMM.

PyTorch's CPU `addmm`/`mm` go to MKL, which takes a generic code path on AMD processors; oneDNN's
matmul does not. Measured on this 2-core AMD EPYC (GPT-2 small's matrices, 1024 rows, float32): the
forward 153-206 GFLOP/s against 133-166 for addmm, the weight gradient of the 768 x 2304 attention
projection 208 against 130. In bfloat16 (autocast) both libraries are alike, so only float32 takes this path.
The op (`torch.ops.mkldnn._linear_pointwise`) has no autograd formula of its own: the Function below
gives it the textbook one, y = x W + b => dx = dy W^T, dW = x^T dy, db = sum(dy).
"""
from __future__ import annotations

import torch

from . import onednn


def use_training_linear(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """float32 on CPU, gradients wanted, no autocast, not inside torch.compile (which traces addmm itself)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return False
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        return False
    return onednn.linear_available()


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        # x: (N, in); weight: (in, out), GPT-2's [in, out] layout; bias: (out,) or None
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight.t(), bias, "none", [], "")  # (N, out)

    @staticmethod
    def backward(ctx, grad_y):  # grad_y: (N, out)
        x, weight = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.mkldnn._linear_pointwise(grad_y, weight, None, "none", [], "")  # (N, in)
        if ctx.needs_input_grad[1]:
            # x^T dy as a "linear" of x^T (in, N) against dy^T (out, N): (in, out)
            grad_w = torch.ops.mkldnn._linear_pointwise(x.t(), grad_y.t(), None, "none", [], "")
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.sum(0)
        return grad_x, grad_w, grad_b


def training_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (N, in) @ weight (in, out) + bias, differentiable, through oneDNN (see use_training_linear)."""
    return _OneDNNLinear.apply(x, weight, bias)
