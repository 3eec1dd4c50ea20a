"""Grouped-query attention with an optional sliding window (Mistral 7B paper, section 2).

Every rule of who-sees-whom lives in one function, :func:`attention_mask`: a query at position p sees the keys at
positions p-W+1 .. p (W keys, itself included) when the layer has a window W, else all keys 0 .. p.  Masks are
built from token *positions*, not from tensor indices, so the same code serves a plain forward pass, a chunked
prefill against a KV cache, a rolling (circular) window buffer and ragged batches (position -1 marks padding or an
empty cache slot).

The reference :func:`attention` is what the Triton kernel (triton_kernels.flash_attention.attention) replaces: same
name, same arguments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mistral_ref.config import ModelArgs
from mistral_ref.rope import apply_rotary_emb, rope_angles


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


class Attention(nn.Module):
    """The attention half of a block: project to q, k, v; rotate q, k; attend; project back with wo."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.rope_theta = args.rope_theta
        self.window = args.window_for_layer(layer_id)
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.backend = "torch"  # "torch" (the reference above) or "triton" (triton_kernels)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache=None) -> torch.Tensor:
        """x: (B, T, dim); positions: (B, T) (-1 = padding); cache: a cache.LayerCache or None.  -> (B, T, dim)"""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        cos, sin = rope_angles(positions, self.head_dim, self.rope_theta)  # (B, T, head_dim/2)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        if cache is None:
            keys, values, k_pos = k, v, positions
        else:  # keys are cached after the rotation
            keys, values, k_pos = cache.update(k, v, positions)  # (B, S, n_kv_heads, head_dim), (B, S)
        if self.backend == "triton":
            from triton_kernels import attention as attention_impl
        else:
            attention_impl = attention
        out = attention_impl(q, keys, values, positions, k_pos, self.window)  # (B, T, n_heads, head_dim)
        return self.wo(out.reshape(B, T, self.n_heads * self.head_dim))
