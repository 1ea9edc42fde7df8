"""The training loss: next-token cross-entropy fused with the LM head, computed in row chunks.

GPT-2's head turns every position into 50257 logits: for a batch of 2048 tokens that is a 411 MB float32
tensor, which the plain path writes, upcasts, log-softmaxes, and reads back several times over in the
backward pass. Here the logits of a chunk of rows are made, reduced to their loss, turned in place into
their gradient (softmax - one-hot) and multiplied straight into the gradients of the hidden states and
of the head's weight, then dropped. Same loss (log-sum-exp in float32), a fraction of the memory
traffic. The idea is the "fused linear cross-entropy" of Liger-Kernel / Apple's Cut Cross-Entropy
(Wijmans et al. 2024); this is a plain PyTorch rendering of the textbook gradient.
"""
from __future__ import annotations

import torch
from torch import nn

from ..model import linear

IGNORE_INDEX = -100


# bfloat16: keep every row's logit gradient (N, V) and make the head's weight gradient in one GEMM at the end,
# as long as that buffer stays under this size (1024 rows x 50257: 103 MB); past it, one GEMM per chunk
G_BUFFER_LIMIT_BYTES = 512 << 20
GRAD_W_SLAB = 8192  # vocabulary rows per product of that weight gradient


class Workspace:
    """Scratch tensors that live only inside one forward of the fused loss, kept from call to call.

    On this machine (a KVM guest) touching freshly allocated memory is what costs: a bf16 -> float32 copy of
    a (256, 50257) chunk takes 24 ms into a new tensor and 2 ms into a reused one, so the weight's
    low-precision copy and the per-chunk logits are written into buffers made once. Nothing handed to
    autograd (the returned gradients) ever lives here, so a second forward before the first backward is safe.
    """

    def __init__(self):
        self._bufs: dict = {}

    def get(self, name: str, shape, dtype, device) -> torch.Tensor:
        t = self._bufs.get(name)
        if t is None or t.shape != torch.Size(shape) or t.dtype != dtype or t.device != device:
            self._bufs.pop(name, None)  # free the old one first
            t = self._bufs[name] = torch.empty(shape, dtype=dtype, device=device)
        return t


def _head_logits(h, w, out):
    """h (n, C) @ w (V, C)^T, into `out` (n, V) where the policy keeps addmm (model/linear.py); its float32
    training path is oneDNN's GEMM, into a new tensor (the op has no out= form)."""
    if linear.choose_path(h, w, training=True) == linear.ADDMM:
        return torch.mm(h, w.t(), out=out)
    return torch.ops.mkldnn._linear_pointwise(h, w, None, "none", [], "")


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, chunk: int, compute_dtype, want_grad: bool, ws: Workspace):
        # hidden: (N, C); weight: (V, C) (the tied embedding); target: (N,) with -100 = ignore
        dev = hidden.device
        h = hidden.to(compute_dtype)
        w = weight if weight.dtype == compute_dtype else ws.get("w", weight.shape, compute_dtype, dev).copy_(weight)
        N, V = h.shape[0], w.shape[0]
        n_max = min(chunk, N)
        valid = target != IGNORE_INDEX
        n_valid = int(valid.sum())
        safe_target = torch.where(valid, target, 0)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        denom = max(n_valid, 1)  # the mean's 1/denom is folded into the logit gradients, so the big gradients
        # leave here already scaled (no second pass over a (V, C) tensor in backward)
        need_h, need_w = want_grad and ctx.needs_input_grad[0], want_grad and ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = None
        # low precision: one weight-gradient GEMM over all rows (float32 accumulation inside, one rounding)
        # instead of a low-precision product per chunk upcast and summed
        g_all = None
        if need_w and compute_dtype != torch.float32 and N * V * h.element_size() <= G_BUFFER_LIMIT_BYTES:
            g_all = ws.get("g_all", (N, V), compute_dtype, dev)
        rows = torch.arange(n_max, device=h.device)
        for s in range(0, N, chunk):
            hc, t, keep = h[s: s + chunk], safe_target[s: s + chunk], valid[s: s + chunk]
            r = rows[: hc.shape[0]]
            n = hc.shape[0]
            logits = _head_logits(hc, w, ws.get("logits_lp", (n_max, V), compute_dtype, dev)[:n])  # (n, V)
            if logits.dtype != torch.float32:
                logits = ws.get("logits", (n_max, V), torch.float32, dev)[:n].copy_(logits)
            target_logit = logits[r, t]  # (n,)
            top = logits.amax(dim=-1, keepdim=True)  # (n, 1)
            probs = logits.sub_(top).exp_()  # unnormalised softmax, in place
            norm = probs.sum(dim=-1, keepdim=True)  # (n, 1)
            total += ((top.squeeze(1) + norm.squeeze(1).log() - target_logit) * keep).sum()  # log-sum-exp - target
            if not (need_h or need_w):
                continue
            probs.mul_(keep[:, None] / (norm * denom))  # softmax / denom (zero on ignored rows)
            probs[r, t] -= keep.to(probs.dtype) / denom  # d(loss)/d(logits_i) = (softmax - one-hot) / denom
            if g_all is not None:
                g = g_all[s: s + chunk]
                g.copy_(probs)
            else:
                g = probs.to(compute_dtype)  # (n, V)
            if need_h:
                torch.mm(g, w, out=grad_h[s: s + chunk])  # (n, C)
            if need_w and g_all is None:
                if compute_dtype != torch.float32:
                    part = (g.t() @ hc).float()
                    grad_w = part if grad_w is None else grad_w.add_(part)
                elif grad_w is None:
                    grad_w = torch.mm(g.t(), hc)  # (V, C), written whole: no zero-filled buffer to add into
                else:
                    grad_w.addmm_(g.t(), hc)
        if g_all is not None:
            # (V, C) in slabs of the vocabulary: measured in bf16 on this CPU (1024 rows, GPT-2's head) 203 ms
            # against 239-255 ms for one product, whose transposed (V, N) operand streams worse
            grad_lp = ws.get("grad_w_lp", weight.shape, compute_dtype, dev)
            for v in range(0, V, GRAD_W_SLAB):
                torch.mm(g_all[:, v: v + GRAD_W_SLAB].t(), h, out=grad_lp[v: v + GRAD_W_SLAB])
            grad_w = grad_lp.float()  # (V, C)
        elif need_w and grad_w is None:  # no rows at all
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        ctx.save_for_backward(*(x for x in (grad_h, grad_w) if x is not None))
        ctx.flags = (need_h, need_w, hidden.dtype, weight.dtype)
        return total / denom if n_valid else total * float("nan")

    @staticmethod
    def backward(ctx, grad_out):
        need_h, need_w, h_dtype, w_dtype = ctx.flags
        saved = list(ctx.saved_tensors)
        # the usual case, loss.backward() on the mean itself: the gradients are final (on CPU the check is free;
        # on a GPU it would wait for the device, so there they are always multiplied)
        unit = grad_out.device.type == "cpu" and grad_out.numel() == 1 and float(grad_out) == 1.0

        def scaled(g, dtype):
            return g.to(dtype) if unit else (g * grad_out).to(dtype)

        grad_h = scaled(saved.pop(0), h_dtype) if need_h else None
        grad_w = scaled(saved.pop(0), w_dtype) if need_w else None
        return grad_h, grad_w, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int = 256,
                         compute_dtype: torch.dtype | None = None, workspace: Workspace | None = None) -> torch.Tensor:
    """mean_i CE(hidden_i @ weight^T, target_i) over targets != -100, without materialising all logits.

    hidden (N, C), weight (V, C), target (N,). `compute_dtype` is the matmul precision (default: autocast's
    when autocast is on, else hidden's); the log-sum-exp and the loss are float32 either way. `workspace`
    keeps the scratch buffers for the next call (a training loop passes the same one every step)."""
    if compute_dtype is None:
        device_type = hidden.device.type
        compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    with torch.autocast(hidden.device.type, enabled=False):
        want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
        return _LinearCrossEntropy.apply(hidden, weight, target, chunk, compute_dtype, want_grad,
                                         workspace if workspace is not None else Workspace())


class CausalLMLoss(nn.Module):
    """Wraps a GPT2LMHeadModel so that forward(x, y) is the mean next-token loss: the module that
    DistributedDataParallel wraps, so that its gradient hooks see the fused head too."""

    def __init__(self, model, fused: bool = True, chunk: int = 256):
        super().__init__()
        self.model, self.fused, self.chunk = model, fused, chunk
        self.workspace = Workspace()  # scratch kept across steps (see Workspace)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x, y: (B, T) inputs and their next tokens
        if not self.fused:
            logits = self.model(input_ids=x, use_cache=False).logits  # (B, T, V)
            return nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        hidden = self.model.transformer(input_ids=x, use_cache=False).last_hidden_state  # (B, T, C)
        return linear_cross_entropy(hidden.flatten(0, 1), self.model.lm_head.weight, y.flatten(), self.chunk,
                                    workspace=self.workspace)
