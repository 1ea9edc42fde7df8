"""The decode step over fixed shapes, captured once in a CUDA graph and replayed for every token
(gpt-fast's approach): on a GPU one small-batch step is hundreds of tiny kernel launches, and a replay
issues them all at once.

Fixed shapes: the cache is a fixed-shape StaticCache (every attention reads the whole buffer through the
cache's own mask of valid positions), and the step's inputs (tokens, positions, the cache position it
writes) live in device tensors at fixed addresses, so the same captured kernels serve every step. The batch
size stays fixed (finished rows keep decoding pad tokens, as in the reference); beams are reordered in place.

NOT YET RUN ON A GPU: no GPU machine was lent to the sessions that wrote it. The fixed-shape step is tested
on the CPU (tests/test_generation.py runs it uncaptured against transformers); a capture that fails falls
back to the uncaptured step with a warning.
"""
from __future__ import annotations

import warnings

import torch

from ..model.cache import StaticCache
from .runner import DecodeRunner, _KeyMask


class GraphRunner(DecodeRunner):
    fixed_batch = True
    step_greedy = None  # every step is the captured graph's, logits and all

    def __init__(self, model, batch: int, max_len: int, attention_mask, capture: bool | None = None):
        self.model = model
        dev = model.device
        self.cache = StaticCache(model.config, max_batch_size=batch, max_cache_len=max_len, device=dev,
                                 dtype=model.dtype, fixed_shape=True)
        self.keys = _KeyMask(batch, max_len, attention_mask, dev)  # read by the prefill only: the cache keeps it
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=dev)  # the step's inputs, fixed addresses
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.at = torch.zeros(1, dtype=torch.long, device=dev)  # the cache position the step writes
        self.capture = dev.type == "cuda" if capture is None else capture
        self.graph, self.out = None, None

    def _fixed_step(self):
        return self.model.decode(self.tok, self.cache, position_ids=self.pos, cache_position=self.at)[:, -1]

    def _capture(self):
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            n = self.cache.lengths[0]
            with torch.cuda.stream(side):  # warm-up; it writes only position n, which the replay rewrites
                for _ in range(2):
                    self._fixed_step()
                    self.cache.set_lengths(n)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.out = self._fixed_step()
            self.cache.set_lengths(n)
            self.graph = graph
        except Exception as e:  # noqa: BLE001 - any capture failure: decode uncaptured instead
            warnings.warn(f"CUDA graph capture of the decode step failed ({type(e).__name__}: {e}); "
                          "decoding without a graph.", RuntimeWarning, stacklevel=3)
            self.capture, self.graph = False, None

    @torch.no_grad()
    def step(self, tokens, positions):
        n = self.cache.lengths[0]
        self.tok.copy_(tokens[:, None])
        self.pos.copy_(positions[:, None])
        self.at.fill_(n)
        if self.capture and self.graph is None:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            logits = self.out.clone()  # the next replay overwrites self.out
        else:
            logits = self._fixed_step()
        self.cache.set_lengths(n + 1)
        return logits

    def keep_rows(self, rows):
        raise RuntimeError("GraphRunner keeps a fixed batch; rows cannot leave it.")

    def reorder(self, rows):  # in place: the graph holds these addresses
        self.cache.reorder_cache(rows)
