"""Key/value caches for incremental decoding.

Both caches hold, per layer, keys and values of shape (batch, n_head, seq, head_dim) and expose
`update(key, value, layer_idx, cache_position)`, which stores the new entries and returns the keys and
values the attention should read.

- DynamicCache grows as tokens arrive (amortised doubling, so a decode step does not copy the whole past).
- StaticCache is preallocated to `max_cache_len` and written in place at `cache_position`, as in
  gpt-fast: no allocation per step, and fixed shapes when `fixed_shape=True` (for CUDA graphs/compile).
"""
from __future__ import annotations

import torch
from ..errors import InvalidInputError


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


class StaticCache(Cache):
    def __init__(self, config=None, max_batch_size: int = 1, max_cache_len: int | None = None, device=None,
                 dtype=None, *, num_layers=None, num_heads=None, head_dim=None, fixed_shape: bool = False,
                 batch_size: int | None = None):
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
        self.key_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.value_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._len = [0] * num_layers

    def update(self, key, value, layer_idx: int, cache_position=None):
        B, H, T, D = key.shape
        n = self._len[layer_idx]
        if n + T > self.max_cache_len:
            raise InvalidInputError(f"StaticCache is full: it holds {self.max_cache_len} positions and {n + T} were asked for. "
                             "Build it with a larger max_cache_len.")
        if B != self.max_batch_size:
            raise InvalidInputError(f"StaticCache was built for batch size {self.max_batch_size}, got {B}.")
        k_buf, v_buf = self.key_cache[layer_idx], self.value_cache[layer_idx]
        if cache_position is not None and self.fixed_shape:
            k_buf.index_copy_(2, cache_position, key.to(k_buf.dtype))
            v_buf.index_copy_(2, cache_position, value.to(v_buf.dtype))
        else:
            k_buf[:, :, n:n + T] = key
            v_buf[:, :, n:n + T] = value
        self._len[layer_idx] = n + T
        if self.fixed_shape:  # the causal mask hides the unwritten tail
            return k_buf, v_buf
        return k_buf[:, :, :n + T], v_buf[:, :, :n + T]  # (B, H, n+T, D)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._len[layer_idx]

    def get_max_cache_shape(self):
        return self.max_cache_len

    def reorder_cache(self, beam_idx):
        for i in range(self.num_layers):
            self.key_cache[i].copy_(self.key_cache[i].index_select(0, beam_idx.to(self.key_cache[i].device)))
            self.value_cache[i].copy_(self.value_cache[i].index_select(0, beam_idx.to(self.value_cache[i].device)))

    def crop(self, max_length: int) -> None:
        for i, n in enumerate(self._len):
            self._len[i] = max(0, n + max_length) if max_length < 0 else min(n, max_length)

    def reset(self):
        self._len = [0] * self.num_layers
        for t in self.key_cache + self.value_cache:
            t.zero_()
