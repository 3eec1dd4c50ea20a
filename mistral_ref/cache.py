"""The KV cache: keys (after rotary embedding) and values of past tokens, preallocated once per request.

A full-attention layer keeps one slot per position (capacity = prompt + max_tokens, never the model's
advertised context).  A sliding-window layer of W keys keeps a *rolling buffer* of W slots: position p lives
in slot p % W, so its memory stays W slots however long generation runs.  Each slot also records the position
it holds (-1 when empty), and attention masks are built from those positions (attention.attention_mask), which
makes wrap-around, chunked prefill and ragged batches one and the same case.

:meth:`LayerCache.update` takes a chunk of T > 1 tokens (prefill, chunked prefill) or one token per row (decode:
:meth:`LayerCache.write_one`, the same work at step 10 and step 10,000, apart from attention itself).
The layers reach the cache through their backend (`ops.update_cache`): the fast backends add shortcuts for the
decode write (mistral_ref/backends), each equal to :meth:`LayerCache.update`.
"""

from __future__ import annotations

import torch

from mistral_ref.config import ModelArgs


class CacheOverflowError(ValueError):
    """A position beyond what the cache was allocated for."""


class LayerCache:
    """Keys, values and their positions for one layer.

    k, v: (B, S, n_kv_heads, head_dim) in the model's dtype; pos: (B, S) int64, the position held by each slot
    (-1 = empty).  S = capacity: the window W for a rolling layer, else the request's prompt + max_tokens.
    """

    def __init__(self, batch_size: int, capacity: int, rolling: bool, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.capacity, self.rolling = capacity, rolling
        self.k = torch.zeros(batch_size, capacity, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((batch_size, capacity), -1, dtype=torch.long, device=device)

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store new keys/values and return what attention must look at.

        k, v: (B, T, n_kv_heads, head_dim); positions: (B, T), -1 for padding (not stored).
        returns keys, values (B, S', n_kv_heads, head_dim) and their positions (B, S').
        A rolling buffer receiving several tokens at once could overwrite keys that the chunk's first queries
        still need, so then attention sees the old buffer concatenated with the new chunk (S' = S + T); every
        other case writes first and attends to the buffer itself (S' = S).
        """
        self.check_fits(positions)
        if k.shape[1] == 1:
            self.write_one(k, v, positions)
            return self.k, self.v, self.pos
        if self.rolling:
            keys = torch.cat([self.k, k], dim=1)
            values = torch.cat([self.v, v], dim=1)
            key_pos = torch.cat([self.pos, positions], dim=1)
            self._write_chunk(k, v, positions)
            return keys, values, key_pos
        self._write_chunk(k, v, positions)
        return self.k, self.v, self.pos

    def check_fits(self, positions: torch.Tensor) -> None:
        """Raise CacheOverflowError if a position does not fit a full (non-rolling) layer's slots."""
        if not self.rolling:
            newest = int(positions.max())
            if newest >= self.capacity:
                raise CacheOverflowError(
                    f"position {newest} does not fit a KV cache allocated for {self.capacity} positions "
                    "(allocate prompt + max_tokens)")

    def write_one(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Decode: one token per row into slot position % capacity; a row at position -1 (padding, a finished
        row) leaves its slot alone.  k, v: (B, 1, n_kv_heads, head_dim); positions: (B, 1)."""
        p = positions[:, 0]  # (B,)
        valid = p >= 0
        rows = torch.arange(k.shape[0], device=k.device)
        slot = p.clamp(min=0) % self.capacity  # (B,)  (p < capacity for a full layer: the modulo is a no-op)
        keep = valid[:, None, None]
        self.k[rows, slot] = torch.where(keep, k[:, 0], self.k[rows, slot])
        self.v[rows, slot] = torch.where(keep, v[:, 0], self.v[rows, slot])
        self.pos[rows, slot] = torch.where(valid, p, self.pos[rows, slot])

    def _write_chunk(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Prefill: T tokens per row, -1 = padding.

        Only the newest `capacity` positions of each row survive in a rolling buffer: write just those, so no
        two writes of one call target the same slot.
        """
        newest = positions.max(dim=1, keepdim=True).values  # (B, 1)
        keep = (positions >= 0) & (positions > newest - self.capacity)  # (B, T)
        b, t = keep.nonzero(as_tuple=True)
        slot = positions[b, t] % self.capacity
        self.k[b, slot] = k[b, t]
        self.v[b, slot] = v[b, t]
        self.pos[b, slot] = positions[b, t]


class LatentLayerCache(LayerCache):
    """The cache of a latent-attention layer (mla.py): per token the normed latent (kv_lora_rank numbers) and
    the rotated key part shared by all heads (qk_rope_head_dim), not per-head keys and values.

    Stored in LayerCache's slots so every write rule (decode, chunks, padding) is the same code: `k` holds the
    latents (B, S, 1, kv_lora_rank), `v` the rotary keys (B, S, 1, qk_rope_head_dim); :attr:`latent` and
    :attr:`k_rope` name them.  Never rolling (latent attention has no window).
    """

    def __init__(self, batch_size: int, capacity: int, kv_lora_rank: int, qk_rope_head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.capacity, self.rolling = capacity, False
        self.k = torch.zeros(batch_size, capacity, 1, kv_lora_rank, dtype=dtype, device=device)
        self.v = torch.zeros(batch_size, capacity, 1, qk_rope_head_dim, dtype=dtype, device=device)
        self.pos = torch.full((batch_size, capacity), -1, dtype=torch.long, device=device)

    @property
    def latent(self) -> torch.Tensor:
        """(B, S, 1, kv_lora_rank): the kv_a_layernorm'd latents."""
        return self.k

    @property
    def k_rope(self) -> torch.Tensor:
        """(B, S, 1, qk_rope_head_dim): the rotated key parts."""
        return self.v


def layer_capacity(args: ModelArgs, layer_id: int, max_seq_len: int) -> tuple[int, bool]:
    """(slots, rolling) of one layer's cache: a window W < max_seq_len rolls over W slots, else one per position."""
    window = args.window_for_layer(layer_id)
    rolling = window is not None and window < max_seq_len
    return (window if rolling else max_seq_len), rolling


def bytes_per_slot(args: ModelArgs) -> int:
    """Numbers one layer caches per token: 2 x n_kv_heads x head_dim (keys and values), or
    kv_lora_rank + qk_rope_head_dim for latent attention."""
    if args.mla is not None:
        return args.mla.kv_lora_rank + args.mla.qk_rope_head_dim
    return 2 * args.n_kv_heads * args.head_dim


def cache_nbytes(args: ModelArgs, batch_size: int, max_seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of keys and values a KVCache(args, batch_size, max_seq_len, dtype) will hold, before allocating it."""
    per_slot = bytes_per_slot(args) * torch.tensor([], dtype=dtype).element_size()
    slots = sum(layer_capacity(args, i, max_seq_len)[0] for i in range(args.n_layers))
    return batch_size * slots * per_slot


class KVCache:
    """One LayerCache per transformer block, sized for `max_seq_len` = prompt + max_tokens positions.

    A layer with a window W < max_seq_len gets a rolling buffer of W slots; every other layer gets max_seq_len
    slots.  Memory: 2 x n_layers x batch_size x slots x n_kv_heads x head_dim x dtype size (:meth:`nbytes`).
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_seq_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.layers: list[LayerCache] = []
        for layer_id in range(args.n_layers):
            capacity, rolling = layer_capacity(args, layer_id, max_seq_len)
            if args.mla is not None:  # latent attention: the compressed latent + rotary key per token
                self.layers.append(LatentLayerCache(batch_size, capacity, args.mla.kv_lora_rank,
                                                    args.mla.qk_rope_head_dim, dtype, device))
                continue
            self.layers.append(
                LayerCache(batch_size, capacity, rolling, args.n_kv_heads, args.head_dim, dtype, device))

    def __getitem__(self, layer_id: int) -> LayerCache:
        return self.layers[layer_id]

    def __len__(self) -> int:
        return len(self.layers)

    def check_fits(self, positions: torch.Tensor) -> None:
        """Raise CacheOverflowError if a position does not fit the full-attention layers' slots."""
        full = [layer for layer in self.layers if not layer.rolling]
        if full:
            full[0].check_fits(positions)  # every full layer has max_seq_len slots

    def nbytes(self) -> int:
        """Bytes held by keys and values (what the cache costs)."""
        return sum(c.k.nbytes + c.v.nbytes for c in self.layers)
