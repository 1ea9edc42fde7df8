"""Key/value caches for incremental decoding.

Both caches hold, per layer, keys and values of shape (batch, n_head, seq, head_dim) and expose
`update(key, value, layer_idx, cache_position)`, which stores the new entries and returns the keys and
values the attention should read.

- DynamicCache grows as tokens arrive (amortised doubling, so a decode step does not copy the whole past).
- StaticCache is preallocated to `max_cache_len` and written in place at `cache_position`, as in
  gpt-fast: no allocation per step, and fixed shapes when `fixed_shape=True` (for CUDA graphs/compile).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from .. import native
from ..errors import ContextLengthError, InvalidInputError


class Cache:
    """Common interface. `get_seq_length()` is the number of positions already stored."""

    def update(self, key, value, layer_idx: int, cache_position=None):  # pragma: no cover - interface
        raise NotImplementedError

    def get_seq_length(self, layer_idx: int = 0) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def get_max_cache_shape(self):
        return None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def __len__(self):
        return self.num_layers


class DynamicCache(Cache):
    def __init__(self, config=None, num_layers: int | None = None):
        n = num_layers if num_layers is not None else (config.n_layer if config is not None else 0)
        self.num_layers = n
        self._k: list = [None] * n  # per layer: buffer (B, H, capacity, D)
        self._v: list = [None] * n
        self._len = [0] * n
        self._borrowed: set = set()  # layers whose stored k/v are views of a forward's tensors, not our buffers

    def _grow(self, layer_idx):
        while len(self._k) <= layer_idx:  # a cache built without a config learns its depth as it goes
            self._k.append(None), self._v.append(None), self._len.append(0)
        self.num_layers = len(self._k)

    def update(self, key, value, layer_idx: int, cache_position=None):
        self._grow(layer_idx)
        B, H, T, D = key.shape
        n = self._len[layer_idx]
        if n == 0:  # prefill: keep the projection's own tensors (no copy); the next update moves them to a buffer
            self._k[layer_idx], self._v[layer_idx], self._len[layer_idx] = key, value, T
            self._borrowed.add(layer_idx)
            return key, value
        buf_k, buf_v = self._k[layer_idx], self._v[layer_idx]
        if layer_idx in self._borrowed or n + T > buf_k.shape[2] or buf_k.shape[0] != B or buf_k.dtype != key.dtype:
            self._borrowed.discard(layer_idx)  # never write into a tensor the cache does not own
            capacity = max(n + T, 2 * n, 16)
            new_k = key.new_empty(B, H, capacity, D)
            new_v = value.new_empty(B, H, capacity, value.shape[-1])
            if n:
                new_k[:, :, :n] = buf_k[:, :, :n]
                new_v[:, :, :n] = buf_v[:, :, :n]
            self._k[layer_idx], self._v[layer_idx] = buf_k, buf_v = new_k, new_v
        buf_k[:, :, n:n + T] = key
        buf_v[:, :, n:n + T] = value
        self._len[layer_idx] = n + T
        return buf_k[:, :, :n + T], buf_v[:, :, :n + T]  # (B, H, n+T, D)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._len[layer_idx] if layer_idx < len(self._len) else 0

    @property
    def layers(self):
        return [(self._k[i][:, :, :n], self._v[i][:, :, :n]) for i, n in enumerate(self._len) if self._k[i] is not None]

    def __getitem__(self, layer_idx):
        return self.layers[layer_idx]

    def __iter__(self):
        return iter(self.layers)

    def to_legacy_cache(self):
        return tuple(self.layers)

    @classmethod
    def from_legacy_cache(cls, past) -> "DynamicCache":
        cache = cls(num_layers=len(past))
        for i, (k, v) in enumerate(past):
            cache.update(k, v, i)
        return cache

    def reorder_cache(self, beam_idx):
        for i in range(len(self._k)):
            if self._k[i] is not None:
                self._k[i] = self._k[i].index_select(0, beam_idx.to(self._k[i].device))
                self._v[i] = self._v[i].index_select(0, beam_idx.to(self._v[i].device))

    def crop(self, max_length: int) -> None:
        """Forget positions from `max_length` on (a negative value drops that many from the end)."""
        for i, n in enumerate(self._len):
            self._len[i] = max(0, n + max_length) if max_length < 0 else min(n, max_length)

    def reset(self):
        self._len = [0] * len(self._len)


@dataclass
class SlotWrite:
    """How one forward writes new keys/values into a StaticCache and what it then reads: planned once per
    forward (StaticCache.plan), used by every layer (StaticCache.write), applied by StaticCache.commit."""

    rows: torch.Tensor | None  # (B,) slot indices, or None for slots 0..B-1
    span: tuple | None  # (first, end) when the rows are consecutive slots: read and written as views
    starts: list  # per row, the cache position of its first new token
    T: int  # new tokens per row
    length: int  # positions every attention reads (the longest row after the write, or the whole buffer)
    # rows starting at different places: where each new key goes, as flat row indices (B*H*T,) of a layer's
    # buffer viewed as (slots*H*max_len, D), in the (B, H, T) order of the keys (else None)
    index: torch.Tensor | None
    at: torch.Tensor | None  # (T,) device positions, for a fixed-shape cache written at cache_position
    mask: torch.Tensor | None  # (B, 1, T, length) bool (True = may attend), or None with is_causal
    is_causal: bool
    # rows at different lengths: attention runs per group of consecutive rows (lo, hi, keys read, masked), each
    # reading only up to its longest row instead of every row up to the longest of all (None: one call)
    groups: list | None = None
    # one new token per row and no key mask: each row's query sees exactly its first key_counts[b] keys
    # (its new one last), and slot_ids[b] is its slot: (B,) int64 on the CPU, what decode_attention reads
    # instead of a mask (None otherwise)
    key_counts: torch.Tensor | None = None
    slot_ids: torch.Tensor | None = None
    decode_kernel: bool = False  # key_counts set and StaticCache.decode_kernel_fits(): asked once a step, not a layer


_DECODE_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


class StaticCache(Cache):
    """Preallocated keys and values for `max_batch_size` slots ("rows") of `max_cache_len` positions.

    Each slot has its own length, so rows at different positions decode in one step (model.decode, the
    server's slots); the cache is the only writer of its buffers: plan/write/commit for a forward, and
    reset_rows, copy_prefix, swap_rows, select_rows, reorder_cache, crop for the schedulers.
    """

    def __init__(self, config=None, max_batch_size: int = 1, max_cache_len: int | None = None, device=None,
                 dtype=None, *, num_layers=None, num_heads=None, head_dim=None, fixed_shape: bool = False,
                 batch_size: int | None = None, zero: bool = True):
        if batch_size is not None:
            max_batch_size = batch_size
        num_layers = num_layers or config.n_layer
        num_heads = num_heads or config.n_head
        head_dim = head_dim or (config.n_embd // config.n_head)
        self.max_cache_len = max_cache_len or (config.n_positions if config is not None else None)
        if not self.max_cache_len:
            raise InvalidInputError("StaticCache needs max_cache_len (or a config with n_positions).")
        self.max_batch_size = max_batch_size
        self.num_layers = num_layers
        self.fixed_shape = fixed_shape
        dtype = dtype or torch.get_default_dtype()
        shape = (max_batch_size, num_heads, self.max_cache_len, head_dim)
        # zero=False leaves the buffers unfilled: a reader that reads only positions written (model.decode
        # without fixed_shape) saves zero-filling 2 x n_layer buffers (~3% of a 512-token prefill)
        make = torch.zeros if zero or fixed_shape else torch.empty
        self.key_cache = [make(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.value_cache = [make(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * max_batch_size  # positions stored, per slot
        self.gathers = 0  # layer reads that had to copy scattered slots' rows (see write; schedulers avoid them)
        # fixed shape: which positions of each slot hold a key (read in full, masked)
        self.valid = torch.zeros(max_batch_size, self.max_cache_len, dtype=torch.bool, device=device) \
            if fixed_shape else None

    # -- one forward: plan, write per layer, commit ----------------------------------------------------
    def plan(self, T: int, rows: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
             cache_position: torch.Tensor | None = None) -> SlotWrite:
        """Plan writing T new positions to each row (slots `rows`, default 0..B-1) after what it holds.

        key_mask: (B, >= max length after the write) bool or 0/1, the keys each row may see (a left-padded
        prompt's padding is 0), else every stored key. cache_position: (T,) positions on the device, for a
        fixed-shape cache (CUDA graphs); the positions are then the same for all rows."""
        slots = list(range(self.max_batch_size)) if rows is None else rows.tolist()
        B = len(slots) if rows is not None else self.max_batch_size
        if rows is None and key_mask is not None:
            B = key_mask.shape[0]
        starts = [self.lengths[s] for s in slots[:B]] if rows is not None else self.lengths[:B]
        if rows is None and B != self.max_batch_size:
            raise InvalidInputError(f"StaticCache was built for batch size {self.max_batch_size}, got {B}: pass rows= "
                                    "to use some of its slots.")
        longest = max(starts) + T
        if longest > self.max_cache_len:
            raise ContextLengthError(f"StaticCache is full: it holds {self.max_cache_len} positions and {longest} were "
                                    "asked for. Build it with a larger max_cache_len.")
        device = self.key_cache[0].device
        uniform = min(starts) == max(starts)
        span = (0, B) if rows is None else (slots[0], slots[0] + B) if slots == list(range(slots[0], slots[0] + B)) else None
        at = None
        if self.fixed_shape:  # read in full through `valid`; nothing here reads a host value (CUDA graphs)
            if rows is not None or not uniform:
                raise InvalidInputError("A fixed-shape StaticCache writes every slot at the same positions: "
                                        "no rows=, equal lengths.")
            S = self.max_cache_len
            at = cache_position if cache_position is not None else torch.arange(starts[0], starts[0] + T, device=device)
            new = (torch.ones(B, T, dtype=torch.bool, device=device) if key_mask is None
                   else _as_bool(key_mask, S).index_select(1, at))
            self.valid.index_copy_(1, at, new)  # (B, S): positions that hold a key each row may see
            k_pos = torch.arange(S, device=device)
            mask = self.valid[:, None, None, :] & (k_pos[None, :] <= at[:, None])[None, None]  # (B, 1, T, S)
            return SlotWrite(None, (0, B), starts, T, S, None, at, mask, False)
        S = longest
        index = None
        if not uniform or span is None:  # one index_copy_ a buffer: indexing (row, :, position) took 7.8 ms
            # where this takes 47 us (32 rows of 12 x 64 floats, a 2-core Xeon)
            H, L = self.key_cache[0].shape[1], self.max_cache_len
            slot = torch.tensor(slots[:B], device=device)[:, None, None]  # (B, 1, 1)
            pos = torch.tensor(starts, device=device)[:, None, None] + torch.arange(T, device=device)  # (B, 1, T)
            index = ((slot * H + torch.arange(H, device=device)[None, :, None]) * L + pos).reshape(-1)  # (B*H*T,)
        mask, is_causal = None, False
        if uniform and key_mask is None:
            if T == 1 or starts[0] == 0:
                is_causal = T > 1  # one query sees everything stored; a fresh prompt is plainly causal
            else:
                mask = causal_mask(starts[0], T, S, device)[None, None]  # (1, 1, T, S)
        else:
            q_pos = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)  # (B, T)
            mask = torch.arange(S, device=device)[None, None, :] <= q_pos[:, :, None]  # (B, T, S)
            if key_mask is not None:
                mask = mask & _as_bool(key_mask, S)[:, None, :]
            mask = mask[:, None]  # (B, 1, T, S)
        key_counts = slot_ids = None
        if T == 1 and key_mask is None:
            key_counts, slot_ids = torch.tensor([n + 1 for n in starts]), torch.tensor(slots[:B])
        fused = key_counts is not None and self.decode_kernel_fits()
        groups = None  # (the fused decode kernel reads each row's own keys: no runs to choose, ~250 us for 32 rows)
        if not uniform and span is not None and not fused:
            kb = self.key_cache[0]
            row_bytes = 2 * kb.shape[1] * kb.shape[3] * kb.element_size()  # keys + values of one position
            groups = attention_groups([n + T for n in starts], GROUP_CALL_BYTES / row_bytes)
            if len(groups) == 1:
                groups = None
        return SlotWrite(rows, span, starts, T, S, index, None, mask, is_causal, groups, key_counts, slot_ids, fused)

    def write(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, plan: SlotWrite):
        """Store one layer's new keys/values (B, H, T, D) as planned; return what its attention reads:
        (B, H, plan.length, D) views of the buffers (a gathered copy when rows pick scattered slots)."""
        kb, vb = self.key_cache[layer_idx], self.value_cache[layer_idx]
        rows, T, S, span = plan.rows, plan.T, plan.length, plan.span
        if key.dtype is not kb.dtype:
            key, value = key.to(kb.dtype), value.to(vb.dtype)
        if span is not None and (span[0] != 0 or span[1] != kb.shape[0]):
            kb, vb = kb[span[0]:span[1]], vb[span[0]:span[1]]  # views: the rows' own slots
        if plan.at is not None:  # fixed shape: every row at the same device positions
            if span is not None:
                kb.index_copy_(2, plan.at, key)
                vb.index_copy_(2, plan.at, value)
            else:
                kb[rows[:, None], :, plan.at[None, :]] = key.permute(0, 2, 1, 3)
                vb[rows[:, None], :, plan.at[None, :]] = value.permute(0, 2, 1, 3)
        elif plan.index is not None:  # rows at different positions, or scattered slots
            D = key.shape[-1]
            full_k, full_v = self.key_cache[layer_idx], self.value_cache[layer_idx]  # (slots, H, max_len, D)
            full_k.view(-1, D).index_copy_(0, plan.index, key.reshape(-1, D))  # (B*H*T, D) at their rows
            full_v.view(-1, D).index_copy_(0, plan.index, value.reshape(-1, D))
        else:  # consecutive slots, every row at the same positions
            n = plan.starts[0]
            kb.narrow(2, n, T).copy_(key)
            vb.narrow(2, n, T).copy_(value)
        if span is not None:
            return kb.narrow(2, 0, S), vb.narrow(2, 0, S)  # (B, H, S, D)
        self.gathers += 1
        return kb[rows, :, :S], vb[rows, :, :S]  # gathered (a copy): scattered slots

    def decode_kernel_fits(self) -> bool:
        """Whether decode_attention's kernel takes this cache: on the CPU, float32 or bfloat16, head_dim a
        multiple of 16 up to 256, contiguous buffers, and the native library built for this CPU (AVX2 or
        AVX-512, and a C compiler)."""
        kb, vb = self.key_cache[0], self.value_cache[0]
        D = kb.shape[-1]
        return (kb.device.type == "cpu" and kb.dtype in _DECODE_KERNEL_DTYPES and D % 16 == 0 and D <= 256
                and kb.is_contiguous() and vb.is_contiguous() and native.library() is not None)

    def decode_attention(self, layer_idx: int, qkv: torch.Tensor, plan: SlotWrite, scaling: float) -> torch.Tensor:
        """A decode step's attention for one layer in one kernel call (native/attention.c): each row's new
        key and value, from its fused projection row qkv (B, 3C) or (B, 1, 3C) = q | k | v, go into its slot
        at its next position, then its query attends over its slot's keys. -> (B, C) or (B, 1, C). The caller
        checked layers.decode_attention_runs (one token per row, no key mask; the cache in qkv's dtype)."""
        kb, vb = self.key_cache[layer_idx], self.value_cache[layer_idx]  # (slots, H, len, D)
        slots, H, L, D = kb.shape
        B = qkv.shape[0]
        y = torch.empty(*qkv.shape[:-1], H * D, dtype=qkv.dtype)
        native.call(native.library().gpt2kit_decode_attention, qkv, qkv.stride(0), kb, vb, slots, L, plan.slot_ids,
                    plan.key_counts, B, H, D, scaling, int(qkv.dtype is torch.bfloat16), y, y.stride(0))
        return y

    def commit(self, plan: SlotWrite) -> None:
        slots = range(len(plan.starts)) if plan.rows is None else plan.rows.tolist()
        for s, start in zip(slots, plan.starts):
            self.lengths[s] = start + plan.T

    # -- transformers' interface -------------------------------------------------------------------------
    def update(self, key, value, layer_idx: int, cache_position=None):
        """Store one layer's keys/values for every slot after what they hold (transformers' call); the slots'
        lengths advance once the last layer is written."""
        B = key.shape[0]
        if B != self.max_batch_size:
            raise InvalidInputError(f"StaticCache was built for batch size {self.max_batch_size}, got {B}.")
        plan = self.plan(key.shape[2], cache_position=cache_position if self.fixed_shape else None)
        k, v = self.write(layer_idx, key, value, plan)
        if layer_idx == self.num_layers - 1:
            self.commit(plan)
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.lengths) if self.lengths else 0

    def get_max_cache_shape(self):
        return self.max_cache_len

    # -- slots -----------------------------------------------------------------------------------------
    def set_lengths(self, lengths) -> None:
        """Declare how many positions each slot holds (an int for all slots, or one per slot)."""
        self.lengths = [int(lengths)] * self.max_batch_size if isinstance(lengths, int) else [int(n) for n in lengths]

    def reset_rows(self, rows) -> None:
        """Empty the given slots (their buffers are overwritten by the next writes)."""
        for r in _as_list(rows):
            self.lengths[r] = 0
            if self.valid is not None:
                self.valid[r] = False

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Make slot `dst` hold the first n positions of slot `src` (a shared prompt prefix, computed once)."""
        if n > self.lengths[src]:
            raise InvalidInputError(f"Slot {src} holds {self.lengths[src]} positions; cannot copy {n}.")
        if src != dst:
            for buf in self.key_cache + self.value_cache:
                buf[dst, :, :n] = buf[src, :, :n]
            if self.valid is not None:
                self.valid[dst] = False
                self.valid[dst, :n] = self.valid[src, :n]
        self.lengths[dst] = n

    def swap_rows(self, a: int, b: int) -> None:
        """Exchange the contents of slots a and b: a scheduler keeps its decoding rows in consecutive slots
        this way, so that each step reads the buffers as views instead of gathering rows in every layer."""
        if a == b:
            return
        n = self.max_cache_len if self.fixed_shape else max(self.lengths[a], self.lengths[b])
        if n:
            for buf in self.key_cache + self.value_cache:
                buf[[a, b], :, :n] = buf[[b, a], :, :n]  # the right side is gathered (a copy) first
        if self.valid is not None:
            self.valid[[a, b]] = self.valid[[b, a]]
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only slots `rows`, in that order (finished rows leave): the buffers shrink."""
        keep = rows.tolist()
        self.key_cache = [kc.index_select(0, rows) for kc in self.key_cache]
        self.value_cache = [vc.index_select(0, rows) for vc in self.value_cache]
        if self.valid is not None:
            self.valid = self.valid.index_select(0, rows)
        self.lengths = [self.lengths[r] for r in keep]
        self.max_batch_size = len(keep)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Rows take the contents of rows beam_idx (beam search), in place: the batch size stays."""
        n = max(self.lengths) if not self.fixed_shape else self.max_cache_len
        for buf in self.key_cache + self.value_cache:
            idx = beam_idx.to(buf.device)
            buf[:, :, :n] = buf[:, :, :n].index_select(0, idx)
        if self.valid is not None:
            self.valid.copy_(self.valid.index_select(0, beam_idx.to(self.valid.device)))
        self.lengths = [self.lengths[i] for i in beam_idx.tolist()]

    reorder = reorder_cache

    def crop(self, max_length: int) -> None:
        """Forget positions from `max_length` on (a negative value drops that many from the end)."""
        self.lengths = [max(0, n + max_length) if max_length < 0 else min(n, max_length) for n in self.lengths]
        if self.valid is not None:
            for r, n in enumerate(self.lengths):
                self.valid[r, n:] = False

    def reset(self):
        self.lengths = [0] * self.max_batch_size
        for t in self.key_cache + self.value_cache:
            t.zero_()
        if self.valid is not None:
            self.valid.zero_()


# What one more attention call costs (its Python and slicing, ~25 us a layer), as bytes of keys and values
# it could instead have read at ~20 GB/s: measured on GPT-2 small, 32 rows of 64-640 positions, 2 cores
GROUP_CALL_BYTES = 512 * 1024


def attention_groups(lengths: list[int], call_cost: float, window: int = 32) -> list[tuple]:
    """Split rows 0..B-1 (their key counts `lengths`) into runs of consecutive rows that minimise
    sum(call_cost + rows * longest) -- the positions read plus a per-call cost in the same unit -- by
    dynamic programming over the split points (runs of at most `window` rows). -> [(lo, hi, longest, masked)]"""
    B = len(lengths)
    best, cut = [0.0] + [float("inf")] * B, [0] * (B + 1)
    for j in range(1, B + 1):
        longest = 0
        for i in range(j - 1, max(j - window, 0) - 1, -1):
            longest = max(longest, lengths[i])
            cost = best[i] + call_cost + (j - i) * longest
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out, j = [], B
    while j > 0:
        i = cut[j]
        run = lengths[i:j]
        out.append((i, j, max(run), min(run) != max(run)))
        j = i
    return out[::-1]


def _as_list(rows):
    if isinstance(rows, torch.Tensor):
        return rows.reshape(-1).tolist()
    return [rows] if isinstance(rows, int) else list(rows)


def _as_bool(key_mask: torch.Tensor, S: int) -> torch.Tensor:
    """(B, L) 0/1 or bool -> (B, S) bool; positions past L are False (hidden: they are not written yet)."""
    m = key_mask.bool() if key_mask.dtype != torch.bool else key_mask
    if m.shape[1] < S:
        m = torch.cat([m, m.new_zeros(m.shape[0], S - m.shape[1])], 1)
    return m[:, :S]


def causal_mask(start: int, T: int, S: int, device) -> torch.Tensor:
    """(T, S) bool: query i (at position start + i) may see keys 0..start + i."""
    q_pos = torch.arange(start, start + T, device=device)[:, None]
    return torch.arange(S, device=device)[None, :] <= q_pos
