"""Grouped-query attention with an optional sliding window (Mistral 7B paper, section 2).

Every rule of who-sees-whom lives in one function, :func:`attention_mask`: a query at position p sees the keys at
positions p-W+1 .. p (W keys, itself included) when the layer has a window W, else all keys 0 .. p.  Masks are
built from token *positions*, not from tensor indices, so the same code serves a plain forward pass, a chunked
prefill against a KV cache, a rolling (circular) window buffer and ragged batches (position -1 marks padding or an
empty cache slot).

Ministral 3 also scales each query by its position (:func:`llama4_query_scale`, the "llama 4 scaling"): 1 within the
original context, 1 + beta * ln(2) in the next stretch of that length, and so on, which keeps attention from
flattening at long range.  It is plain math on q in :meth:`Attention.forward`, so no attention kernel knows of it.

:func:`attention` is the reference math.  The layer does its arithmetic through `ops`, the record of functions of
the model's backend (mistral_ref/backends): with backend "reference" those are the plain functions of this file
and rope.py and F.linear; the other backends compute the same functions faster (each tested equal to these).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from mistral_ref.config import Llama4Scaling, ModelArgs

if TYPE_CHECKING:  # typing only: neither module imports this one
    from mistral_ref.backends import Backend
    from mistral_ref.cache import LayerCache


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which keys each query may attend to.

    q_pos: (B, T) query positions; k_pos: (B, S) key positions, -1 for padding / empty slots.
    returns: (B, T, S) bool, True = attend.  Causal, and within the last `window` positions if a window is set.
    """
    q = q_pos[:, :, None]  # (B, T, 1)
    k = k_pos[:, None, :]  # (B, 1, S)
    allowed = (k >= 0) & (k <= q)
    if window is not None:
        allowed &= k > q - window
    return allowed


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None
) -> torch.Tensor:
    """Reference scaled dot-product attention with grouped-query heads.

    q: (B, T, n_heads, head_dim); k, v: (B, S, n_kv_heads, head_dim); q_pos: (B, T); k_pos: (B, S).
    returns: (B, T, n_heads, head_dim) in q's dtype.  Softmax in fp32, scale head_dim ** -0.5.
    A query that sees no key at all (a padding row) gets a uniform average instead of NaN.
    """
    n_rep = q.shape[2] // k.shape[2]  # query heads per key-value head
    k = k.repeat_interleave(n_rep, dim=2)  # (B, S, n_heads, head_dim)
    v = v.repeat_interleave(n_rep, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5  # (B, H, T, S)
    mask = attention_mask(q_pos, k_pos, window)[:, None]  # (B, 1, T, S)
    scores = scores.float().masked_fill(~mask, torch.finfo(torch.float32).min)
    probs = F.softmax(scores, dim=-1).to(q.dtype)  # (B, H, T, S)
    return torch.einsum("bhts,bshd->bthd", probs, v)


def at_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[b, rows[b]] for every row b, as a length-1 axis: (B, T, ...), rows (B,) -> (B, 1, ...)"""
    return x[torch.arange(x.shape[0], device=x.device), rows][:, None]


def llama4_query_scale(positions: torch.Tensor, scaling: Llama4Scaling) -> torch.Tensor:
    """The factor each query is multiplied by: 1 + beta * ln(1 + floor(p / original_max_position_embeddings)).

    positions: (B, T) (-1 = padding, treated as 0).  returns (B, T) fp32: 1 for p < original, 1 + beta * ln 2
    up to 2 * original, 1 + beta * ln 3 up to 3 * original, ...
    """
    stretch = torch.div(positions.clamp(min=0), scaling.original_max_position_embeddings, rounding_mode="floor")
    return 1 + scaling.beta * torch.log(1 + stretch.float())


class Attention(nn.Module):
    """The attention half of a block: project to q, k, v; rotate q, k; scale q (llama_4_scaling); attend; project
    back with wo.  Layer `layer_id` has the window args.window_for_layer(layer_id) (interleaved windows)."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.window = args.window_for_layer(layer_id)
        self.llama_4_scaling = args.llama_4_scaling
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: Any, ops: Backend,
                cache: LayerCache | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, dim); positions: (B, T) (-1 = padding); rope: the rotation table of these positions
        (ops.rope_table, computed once per forward pass and shared by the layers); ops: the backend's functions;
        cache: a cache.LayerCache or None; rows: (B,) the one query per row whose output is wanted (the keys and
        values of all T go to the cache), or None for all.  -> (B, T, dim), or (B, 1, dim) with rows"""
        return ops.linear(self.attend(x, positions, rope, ops, cache, rows).flatten(2), self.wo.weight)

    def attend(self, x: torch.Tensor, positions: torch.Tensor, rope: Any, ops: Backend,
               cache: LayerCache | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """forward before wo: each head's output, (B, T or 1, n_heads, head_dim)."""
        B, T, _ = x.shape
        q, k, v = ops.linears(x, (self.wq.weight, self.wk.weight, self.wv.weight))  # three products of x
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        q, k = ops.rope(q, rope), ops.rope(k, rope)
        if self.llama_4_scaling is not None:  # Ministral 3: queries (not keys) grow with their position
            q = q * llama4_query_scale(positions, self.llama_4_scaling).to(q.dtype)[:, :, None, None]
        if cache is None:
            keys, values, k_pos = k, v, positions
        else:  # keys are cached after the rotation
            keys, values, k_pos = ops.update_cache(cache, k, v, positions)  # cache.update: (B, S, kv, hd), (B, S)
        if rows is not None:  # one query a row: (B, 1, n_heads, head_dim), (B, 1)
            q, positions = at_rows(q, rows), at_rows(positions, rows)
        return ops.attention(q, keys, values, positions, k_pos, self.window)  # (B, T or 1, n_heads, head_dim)
