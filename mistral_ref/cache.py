"""The KV cache: keys (after rotary embedding) and values of past tokens, preallocated once per request.

A full-attention layer keeps one slot per position (capacity = prompt + max_tokens, never the model's advertised
context).  A sliding-window layer of W keys keeps a *rolling buffer* of W slots: position p lives in slot p % W,
so its memory stays W slots however long generation runs.  Each slot also records the position it holds (-1 when
empty), and attention masks are built from those positions (attention.attention_mask), which makes wrap-around,
chunked prefill and ragged batches one and the same case.
"""

from __future__ import annotations

import torch

from mistral_ref.config import ModelArgs


class CacheOverflowError(ValueError):
    """A position beyond what the cache was allocated for."""


class LayerCache:
    """Keys, values and their positions for one layer.  k, v: (B, S, n_kv_heads, head_dim); pos: (B, S) int64."""

    def __init__(self, batch_size: int, capacity: int, rolling: bool, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.capacity, self.rolling = capacity, rolling
        self.k = torch.zeros(batch_size, capacity, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((batch_size, capacity), -1, dtype=torch.long, device=device)

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Store new keys/values and return what attention must look at.

        k, v: (B, T, n_kv_heads, head_dim); positions: (B, T), -1 for padding (not stored).
        returns keys, values (B, S', n_kv_heads, head_dim) and their positions (B, S').
        A rolling buffer receiving several tokens at once could overwrite keys that the chunk's first queries still
        need, so then attention sees the old buffer concatenated with the new chunk (S' = S + T); every other case
        writes first and attends to the buffer itself (S' = S).
        """
        if self.rolling and k.shape[1] > 1:
            keys = torch.cat([self.k, k], dim=1)
            values = torch.cat([self.v, v], dim=1)
            key_pos = torch.cat([self.pos, positions], dim=1)
            self._write(k, v, positions)
            return keys, values, key_pos
        self._write(k, v, positions)
        return self.k, self.v, self.pos

    def _write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        if not self.rolling and int(positions.max()) >= self.capacity:
            raise CacheOverflowError(
                f"position {int(positions.max())} does not fit a KV cache allocated for {self.capacity} positions "
                "(allocate prompt + max_tokens)")
        if k.shape[1] == 1:  # decode: one token per row, every row writes (padding rows write to a dead slot)
            b = torch.arange(k.shape[0], device=k.device)
            p = positions[:, 0]
            valid = p >= 0
            slot = p.clamp(min=0) % self.capacity
            self.k[b[valid], slot[valid]] = k[valid, 0]
            self.v[b[valid], slot[valid]] = v[valid, 0]
            self.pos[b[valid], slot[valid]] = p[valid]
            return
        # Only the newest `capacity` positions of each row survive in a rolling buffer: write just those, so no two
        # writes of one call target the same slot.
        newest = positions.max(dim=1, keepdim=True).values  # (B, 1)
        keep = (positions >= 0) & (positions > newest - self.capacity)  # (B, T)
        b, t = keep.nonzero(as_tuple=True)
        slot = positions[b, t] % self.capacity
        self.k[b, slot] = k[b, t]
        self.v[b, slot] = v[b, t]
        self.pos[b, slot] = positions[b, t]


class KVCache:
    """One LayerCache per transformer block, sized for `max_seq_len` = prompt + max_tokens positions."""

    def __init__(self, args: ModelArgs, batch_size: int, max_seq_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.max_seq_len = max_seq_len
        self.layers: list[LayerCache] = []
        for layer_id in range(args.n_layers):
            window = args.window_for_layer(layer_id)
            rolling = window is not None and window < max_seq_len
            capacity = window if rolling else max_seq_len
            self.layers.append(LayerCache(batch_size, capacity, rolling, args.n_kv_heads, args.head_dim, dtype,
                                          device))

    def __getitem__(self, layer_id: int) -> LayerCache:
        return self.layers[layer_id]

    def nbytes(self) -> int:
        """Bytes held by keys and values (what the cache costs)."""
        return sum(c.k.nbytes + c.v.nbytes for c in self.layers)
