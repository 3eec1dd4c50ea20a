"""Attention through PyTorch's fused kernel (F.scaled_dot_product_attention).

Equals: attention.attention(q, k, v, q_pos, k_pos, window) (backend "reference"): same arguments, same result
(fp32 within 1e-6 relative; tests/test_backends_attention.py), without materialising (B, H, T, S) scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mistral_ref.attention import attention_mask
from mistral_ref.backends.linear import upcast_on_cpu


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None
) -> torch.Tensor:
    """attention.attention computed by F.scaled_dot_product_attention.

    q: (B, T, n_heads, head_dim); k, v: (B, S, n_kv_heads, head_dim); q_pos: (B, T); k_pos: (B, S).
    The boolean mask enters as an additive bias of finfo.min on masked keys — the reference's masked_fill — so a
    query that sees no key gets the same uniform average (SDPA with a boolean mask would return zeros there).
    Grouped-query heads are handled by the kernel (enable_gqa), not by copying keys.  A bf16/fp16 decode step
    (T == 1) on a CPU without native support runs in fp32: the reduced-precision kernel is several times slower.
    """
    dtype = q.dtype
    if q.shape[1] == 1 and upcast_on_cpu(q):
        q, k, v = q.float(), k.float(), v.float()
    start = causal_prompt(q_pos, k_pos, window)
    if start is not None:  # the mask is plain causal: the kernel's causal mode skips the masked half
        T = q.shape[1]
        return causal_sdpa(q, k[:, start:start + T], v[:, start:start + T]).to(dtype)
    allowed = attention_mask(q_pos, k_pos, window)[:, None]  # (B, 1, T, S)
    bias = torch.where(allowed, 0.0, torch.finfo(q.dtype).min).to(q.dtype)  # (B, 1, T, S)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=bias, enable_gqa=True)  # (B, n_heads, T, head_dim)
    return out.transpose(1, 2).to(dtype)  # (B, T, n_heads, head_dim)


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """attention.attention of a prompt on its own keys, query t seeing keys 0 .. t: the kernel's causal mode.
    q: (B, T, n_heads, head_dim); k, v: (B, T, n_kv_heads, head_dim) -> (B, T, n_heads, head_dim)"""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         enable_gqa=True)
    return out.transpose(1, 2)


def causal_prompt(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> int | None:
    """Where a prompt attends only to itself, the index of its keys in k_pos, else None.

    That is the case of a forward pass without cache, and of a prompt's first chunk into an empty cache (a full
    layer writes it to slots 0..T-1; a rolling layer appends it after its empty buffer): unpadded rows of
    consecutive positions, every other key slot empty (-1), and no window shorter than the prompt.  Then
    attention_mask is exactly "key j <= query j", which SDPA's is_causal computes without a mask.  Checked on
    the host (T > 1 only: a prefill, where a few small reductions cost nothing).
    """
    B, T = q_pos.shape
    S = k_pos.shape[1]
    if T == 1 or (window is not None and T > window):
        return None
    if not bool(((q_pos[:, 1:] - q_pos[:, :-1]) == 1).all()) or int(q_pos[:, 0].min()) < 0:
        return None
    for start in {0, S - T}:
        if (torch.equal(k_pos[:, start:start + T], q_pos) and bool((k_pos[:, :start] < 0).all())
                and bool((k_pos[:, start + T:] < 0).all())):
            return start
    return None
