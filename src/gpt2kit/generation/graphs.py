"""The decode step over fixed shapes, captured once in a CUDA graph and replayed for every token
(gpt-fast's approach): on a GPU one small-batch step is hundreds of tiny kernel launches, and a replay
issues them all at once.

Fixed shapes: the step attends over the whole preallocated cache through a key mask (B, 1, 1, L) that marks
the positions each row may see, and writes its new key and value at a position held in a device tensor,
so the same captured kernels serve every step. The batch size stays fixed (finished rows keep decoding pad
tokens, as in the reference); beams are reordered in place.

NOT YET RUN ON A GPU: this session had no GPU machine. The fixed-shape step is tested on the CPU
(tests/test_generation.py runs it uncaptured against transformers); a capture that fails falls back to
the uncaptured step with a warning.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..model.layers import additive, eager_attention
from .runner import FastRunner


class GraphRunner(FastRunner):
    fixed_batch = True

    def __init__(self, model, batch: int, max_len: int, attention_mask, capture: bool | None = None):
        super().__init__(model, batch, max_len, attention_mask)
        for buf in self.cache.key_cache + self.cache.value_cache:  # read in full (masked): no garbage, no NaN
            buf.zero_()
        dev = model.device
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=dev)  # keys each row may see
        self.tok = torch.zeros(batch, dtype=torch.long, device=dev)  # the step's inputs, fixed addresses
        self.pos = torch.zeros(batch, dtype=torch.long, device=dev)
        self.at = torch.zeros(1, dtype=torch.long, device=dev)  # the cache position the step writes
        self.capture = dev.type == "cuda" if capture is None else capture
        self.graph, self.out = None, None

    def prefill(self, input_ids, attention_mask, position_ids):
        logits = super().prefill(input_ids, attention_mask, position_ids)
        T = input_ids.shape[1]
        self.valid[:, :T] = attention_mask.bool() if attention_mask is not None else True
        return logits

    def _fixed_step(self):
        body, H, D = self.body, self.H, self.D
        x = body.wte(self.tok) + body.wpe(self.pos)  # (B, C)
        B, C = x.shape
        mask = self.valid[:, None, None, :]  # (B, 1, 1, L)
        if self.eager:
            mask = additive(mask, x.dtype)
        for i, blk in enumerate(body.h):
            attn = blk.attn
            qkv = self._linear(attn.c_attn, blk.ln_1(x)).view(B, 3, H, D)
            kc, vc = self.cache.key_cache[i], self.cache.value_cache[i]
            kc.index_copy_(2, self.at, qkv[:, 1, :, None])
            vc.index_copy_(2, self.at, qkv[:, 2, :, None])
            q = qkv[:, 0, :, None]  # (B, H, 1, D)
            if self.eager:
                y = eager_attention(q, kc, vc, mask, attn.scaling, 0.0, attn.upcast)[0]
            else:
                y = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=attn.scaling)
            x = x + self._linear(attn.c_proj, y.reshape(B, C))
            x = x + blk.mlp(blk.ln_2(x))
        return self.logits(body.ln_f(x))

    def _capture(self):
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up; it writes only position n, which the replay rewrites
                for _ in range(2):
                    self._fixed_step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.out = self._fixed_step()
            self.graph = graph
        except Exception as e:  # noqa: BLE001 - any capture failure: decode uncaptured instead
            warnings.warn(f"CUDA graph capture of the decode step failed ({type(e).__name__}: {e}); "
                          "decoding without a graph.", RuntimeWarning, stacklevel=3)
            self.capture, self.graph = False, None

    @torch.no_grad()
    def step(self, tokens, positions):
        n = self.n
        self.tok.copy_(tokens)
        self.pos.copy_(positions)
        self.at.fill_(n)
        self.valid[:, n] = True
        if self.capture and self.graph is None:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            logits = self.out.clone()  # the next replay overwrites self.out
        else:
            logits = self._fixed_step()
        self.n = n + 1
        return logits

    def select(self, rows):
        if rows.numel() != self.valid.shape[0]:
            raise RuntimeError("GraphRunner keeps a fixed batch; rows cannot leave it.")
        self.valid.copy_(self.valid.index_select(0, rows))
        for buf in self.cache.key_cache + self.cache.value_cache:  # in place: the graph holds these addresses
            buf.copy_(buf.index_select(0, rows))
