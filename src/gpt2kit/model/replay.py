"""A decode step's blocks recorded once as their kernel calls, then replayed: the CPU's counterpart of the CUDA
graph (generation/graphs.py), for steps that run entirely in gpt2kit's own kernels (native/).

Where every product of a block is a fused quantized kernel and attention is the decode kernel, a GPT-2 small
step is ~60 kernel calls of ~100 us, and the Python between them (module calls, checks, allocations, ctypes
conversions) cost ~45 us each: the weight streams evict the interpreter's data from the caches between calls,
so each attribute read misses. Measured on a 2-core Xeon, int4 with quantized embeddings: a step 9.4 ms, its
kernel calls replayed bare 6.4 ms.

Recording runs the blocks once under a dispatch mode that sees every PyTorch op: only allocations and views
may run (their buffers are kept, so their addresses hold); any op that computes (a float32 GEMM, an add, a
value read back to Python) means the step is not only kernel calls, and it is not replayed. Every tensor a
recorded call is given must be one recorded, the step's input x, the plan's per-row key counts and slot ids
(both rewritten before each replay), a parameter or buffer of the blocks, or a cache buffer; else no replay.
A replay applies to the same shapes, the same cache buffers and a decode-kernel plan; anything else runs the
blocks as usual.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import native

aten = torch.ops.aten
# ops that only allocate or give another view of a buffer: they compute nothing a replay would have to redo
_ALLOCATIONS = {aten.empty.memory_format, aten.empty_strided.default}
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.select.int, aten.slice.Tensor, aten.unsqueeze.default,
          aten.squeeze.dim, aten.squeeze.default, aten.transpose.int, aten.t.default, aten.permute.default,
          aten.expand.default, aten.as_strided.default, aten.alias.default, aten.detach.default, aten.unbind.int,
          aten.split.Tensor, aten.to.dtype, aten.to.dtype_layout}


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _KernelsOnly(TorchDispatchMode):
    """Lets every op run; keeps what allocations return; notes the first op that computes."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # PyTorch otherwise wraps __torch_dispatch__ in torch._dynamo.disable, whose first call imports torch._dynamo
        # (and torch.distributed): ~1.5 s added to a process's first generate(). A recording never runs under
        # torch.compile, so there is nothing for that wrapper to disable.
        return False

    def __init__(self):
        super().__init__()
        self.made: list[torch.Tensor] = []
        self.refused: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _ALLOCATIONS:
            self.made.append(out)
        elif func in _VIEWS:
            srcs = {_storage(a) for a in args if isinstance(a, torch.Tensor)}
            outs = out if isinstance(out, (tuple, list)) else (out,)
            if self.refused is None and any(_storage(o) not in srcs for o in outs):
                self.refused = f"{func} copied"  # a cast that was not a no-op
        elif self.refused is None:
            self.refused = str(func)
        return out


class _Recorded:
    """One recorded step: its kernel calls and the tensors their addresses belong to, held so that no address is
    freed and reused while the recording may replay: its own buffers, the cache's (whose ids are part of the key)
    and the blocks' parameters and buffers. A weight edited in place is read as edited; a parameter or module
    replaced by another object is not seen by a recording made before (one runner's, one engine's)."""

    def __init__(self, calls, made, x, plan, out, cache, modules):
        self.calls = [(fn, ints) for fn, ints, _ in calls]  # [(kernel, int arguments)]
        self.made, self.x, self.out = made, x, out
        self.key_counts, self.slot_ids = plan.key_counts, plan.slot_ids
        self.buffers = (*cache.key_cache, *cache.value_cache)
        self.weights = (*modules.parameters(), *modules.buffers())


class DecodeReplay:
    """Recorded steps for one caller (generate()'s runner, a server's engine), up to `limit` shapes (a server's
    batch sizes). `run(blocks, x, cache, plan, modules)` returns blocks(x), replayed where it can be. `replays`
    counts the steps replayed; `refused` says why the latest step that could not be recorded was not (the op,
    or the tensor)."""

    def __init__(self, limit: int = 1):
        self.limit = limit
        self.recordings: dict = {}  # key -> _Recorded, oldest first
        self.refused_keys: set = set()
        self.refused: str | None = None
        self.replays = 0

    @property
    def calls(self):
        """The newest recording's kernel calls (None: nothing recorded)."""
        return next(reversed(self.recordings.values())).calls if self.recordings else None

    @staticmethod
    def _key(x, cache, plan):
        """None where a step cannot be replayed: not a decode-kernel plan (one new token per row, no key mask)."""
        if not plan.decode_kernel or x.device.type != "cpu":
            return None
        return (tuple(x.shape), x.dtype, tuple(map(id, cache.key_cache)), tuple(map(id, cache.value_cache)))

    def run(self, blocks, x, cache, plan, modules):
        key = self._key(x, cache, plan)
        if key is None or key in self.refused_keys:
            return blocks(x)
        rec = self.recordings.get(key)
        if rec is not None:
            return self._replay(rec, x, plan)
        return self._record(blocks, x, cache, plan, modules, key)

    def _replay(self, rec, x, plan):
        rec.x.copy_(x)
        rec.key_counts.copy_(plan.key_counts)
        rec.slot_ids.copy_(plan.slot_ids)
        for fn, args in rec.calls:
            if fn(*args) < 0:
                raise RuntimeError(f"gpt2kit kernel {fn.__name__} refused its recorded arguments.")
        self.replays += 1
        return rec.out

    def _record(self, blocks, x, cache, plan, modules, key):
        mode, calls = _KernelsOnly(), []
        native.RECORDING.calls = calls
        try:
            with mode:
                out = blocks(x)
        finally:
            native.RECORDING.calls = None
        why = mode.refused or ("no kernel calls" if not calls else None)
        if why is None:
            made = {_storage(t) for t in mode.made}
            known = made | {_storage(t) for t in (x, plan.key_counts, plan.slot_ids, *cache.key_cache,
                                                  *cache.value_cache, *modules.parameters(), *modules.buffers())}
            stray = next((t for _, _, ts in calls for t in ts if _storage(t) not in known), None)
            if stray is not None:
                why = f"a kernel was given a tensor made outside the step ({tuple(stray.shape)}, {stray.dtype})"
            elif _storage(out) not in made:
                why = "the step's output is not a recorded buffer"
        if why is not None:
            self.refused = why
            if len(self.refused_keys) >= 64:
                self.refused_keys.clear()
            self.refused_keys.add(key)
            return out
        if len(self.recordings) >= self.limit:
            del self.recordings[next(iter(self.recordings))]  # the oldest: its buffers and the cache's it held go
        self.recordings[key] = _Recorded(calls, mode.made, x, plan, out, cache, modules)
        return out
