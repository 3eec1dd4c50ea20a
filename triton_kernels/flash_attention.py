"""Flash attention for prefill (many queries per sequence), with the mask rule of the reference.

Matches: mistral_ref.attention.attention(q, k, v, q_pos, k_pos, window) — same name, same arguments, same
result: softmax(q k^T * head_dim**-0.5 masked by attention_mask(q_pos, k_pos, window)) v, grouped-query heads,
and a query that sees no key at all (a padding row) gets the uniform average of all S values, exactly as the
reference.

Algorithm (FlashAttention-2, Dao 2023).  One program owns BLOCK_M queries of one (sequence b, query head h)
and walks the keys of kv head h // n_rep in tiles of BLOCK_N with an online softmax: a running row max m, a
running sum l of exp(s - m) and an unnormalised output acc, rescaled by exp(m_old - m_new) whenever the max
grows.
  * GQA: the kv head is found by index arithmetic; K and V are never repeated in memory.
  * Masks come from the position tensors (-1 = padding / empty slot), so a causal prompt, a chunked prefill
    against a cache (T != S), a rolling window buffer and ragged batches are one code path.
  * Tile skipping.  When positions are contiguous (key slot s holds position base_b + s or is empty: a
    prompt, a left-padded batch, a full KV cache; see `contiguous_base`), the loop runs only over the key
    tiles between the window's start for the block's first query and its last query (FlashAttention's
    causal bound, extended to the window).  For any other layout (a rolling buffer plus a new chunk) every
    tile's positions are read and a tile that no query of the block may see is skipped without loading K/V.
  * Rows masked inside a tile: scores become -inf and the max used for exp is replaced by 0 while it is still
    -inf, so exp(-inf - 0) = 0 instead of NaN.  A row that saw no key ends with l = 0; those rows (and only
    they) take a second pass summing V over all S keys to produce the reference's uniform average.
  * Exponentials are exp2 with log2(e) folded into the softmax scale.
  * head_dim: any size; the D axis is padded to a power of two >= 16 with masked loads.

:func:`attention` is the public entry point used by the model
(``Transformer.set_backend(attention="triton")``): it sends single-token decode steps (T == 1) to
triton_kernels.flash_decoding and everything else here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels._common import block_dim, dot_precision, new_output, upcast
from triton_kernels.flash_common import LOG2E, attend_tile, check_attention_inputs, tile_config
from triton_kernels.flash_decoding import decode_attention


@triton.jit
def _flash_prefill_kernel(
    Q, K, V, QPos, KPos, KBase, Out,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_qpb, stride_qpt, stride_kpb, stride_kps,
    T, S, H, N_REP, D, window, qk_scale,  # qk_scale = head_dim**-0.5 * log2(e)
    HAS_WINDOW: tl.constexpr, KV_CONTIGUOUS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: b * stride_qb passes 2**31 for long batches
    h = pid_bh % H
    kvh = h // N_REP  # grouped-query attention: this query head reads kv head h // n_rep

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows of this program
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < T
    d_valid = offs_d < D

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = tl.load(QPos + b * stride_qpb + offs_m * stride_qpt, mask=m_valid, other=-1)  # (BLOCK_M,)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of the (log2-scaled) scores
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # running sum of exp2(s - m_i) * v

    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    lo = 0
    hi = S
    if KV_CONTIGUOUS:  # key s holds position base + s (or is empty): only slots lo .. hi-1 can be seen
        base = tl.load(KBase + b)
        q_first = tl.min(tl.where(q_pos >= 0, q_pos, 1 << 62))
        hi = tl.minimum(tl.max(q_pos) - base + 1, S).to(tl.int32)
        if HAS_WINDOW:
            lo = (tl.maximum(q_first - window + 1 - base, 0) // BLOCK_N * BLOCK_N).to(tl.int32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_s = start_n + offs_n
        s_valid = offs_s < S
        k_pos = tl.load(KPos + b * stride_kpb + offs_s * stride_kps, mask=s_valid, other=-1)  # (BLOCK_N,)
        # the single mask rule of mistral_ref.attention.attention_mask, from positions
        allowed = (k_pos[None, :] >= 0) & (k_pos[None, :] <= q_pos[:, None])  # (BLOCK_M, BLOCK_N)
        if HAS_WINDOW:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
        k_ptrs = k_base + offs_s[:, None] * stride_ks + offs_d[None, :] * stride_kd
        v_ptrs = v_base + offs_s[:, None] * stride_vs + offs_d[None, :] * stride_vd
        kv_mask = s_valid[:, None] & d_valid[None, :]
        if KV_CONTIGUOUS:  # the bounds already dropped invisible tiles
            m_i, l_i, acc = attend_tile(q, k_ptrs, v_ptrs, kv_mask, allowed, m_i, l_i, acc, qk_scale,
                                        UPCAST, DOT_PRECISION)
        else:  # any layout (rolling buffer + chunk): skip tiles that no query of this block may see
            if tl.max(allowed.to(tl.int32)) > 0:
                m_i, l_i, acc = attend_tile(q, k_ptrs, v_ptrs, kv_mask, allowed, m_i, l_i, acc, qk_scale,
                                            UPCAST, DOT_PRECISION)

    # Rows that saw no key at all: the reference's softmax over a fully masked row is uniform over all S keys.
    no_key = l_i == 0.0
    if tl.max(no_key.to(tl.int32)) > 0:
        v_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start_n in range(0, S, BLOCK_N):
            offs_s = start_n + offs_n
            v = tl.load(v_base + offs_s[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                        mask=(offs_s < S)[:, None] & d_valid[None, :], other=0.0)
            v_sum += tl.sum(v.to(tl.float32), 0)
        acc = tl.where(no_key[:, None], v_sum[None, :], acc)
        l_i = tl.where(no_key, S * 1.0, l_i)

    out = acc / l_i[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


def contiguous_base(k_pos: torch.Tensor) -> torch.Tensor | None:
    """(B,) base such that every key slot s holds position base + s or is empty (-1), or None if none exists.

    True for a prompt (base 0), a left-padded ragged prompt (base -padding) and a full, non-rolling KV cache
    (base 0, empty slots -1); false for a rolling window buffer.  One host synchronisation per prefill call.
    """
    slot = torch.arange(k_pos.shape[1], device=k_pos.device)
    offset = k_pos - slot  # (B, S): the base each valid slot implies
    valid = k_pos >= 0
    lo = torch.where(valid, offset, torch.iinfo(offset.dtype).max).amin(1)
    hi = torch.where(valid, offset, torch.iinfo(offset.dtype).min).amax(1)
    has_key = valid.any(1)
    if not bool(((lo == hi) | ~has_key).all()):
        return None
    return torch.where(has_key, hi, 0).to(torch.int64).contiguous()


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                      k_pos: torch.Tensor, window: int | None, block_m: int | None = None,
                      block_n: int | None = None, num_warps: int = 4, num_stages: int | None = None) -> torch.Tensor:
    """Prefill attention with the flash kernel (any T, including 1).

    q: (B, T, n_heads, head_dim); k, v: (B, S, n_kv_heads, head_dim); q_pos: (B, T); k_pos: (B, S) integer
    positions, -1 = padding / empty slot; window: keys a query sees (p-W+1 .. p) or None.
    returns (B, T, n_heads, head_dim) in q's dtype.
    block_m / block_n: tile sizes (powers of two >= 16), default `tile_config(q.dtype)`; num_warps / num_stages:
    Triton's launch options (default 4 and `tile_config`'s stages; `python -m triton_kernels.bench --tiles` times
    others on a GPU).
    """
    check_attention_inputs(q, k, v, q_pos, k_pos, window, "prefill_attention")
    q_pos, k_pos = q_pos.long(), k_pos.long()
    default_m, default_n, default_stages = tile_config(q.dtype)
    block_m, block_n, num_stages = block_m or default_m, block_n or default_n, num_stages or default_stages
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"prefill_attention: {name} must be a power of two >= 16, got {blk}")
    if num_warps not in (1, 2, 4, 8, 16) or num_stages < 1:
        raise ValueError(f"prefill_attention: num_warps must be 1, 2, 4, 8 or 16 and num_stages >= 1, got "
                         f"{num_warps} and {num_stages}")
    B, T, H, D = q.shape
    S, H_kv = k.shape[1], k.shape[2]
    out = new_output((B, T, H, D), q.dtype, q.device)
    if B * T == 0:
        return out
    if S == 0:  # the reference's einsum over no keys is zero
        return out.zero_()
    base = contiguous_base(k_pos)
    grid = (triton.cdiv(T, block_m), B * H)
    _flash_prefill_kernel[grid](
        q, k, v, q_pos, k_pos, k_pos if base is None else base, out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *q_pos.stride(), *k_pos.stride(),
        T, S, H, H // H_kv, D, window or 0, D**-0.5 * LOG2E,
        HAS_WINDOW=window is not None, KV_CONTIGUOUS=base is not None, UPCAST=upcast(q.dtype),
        DOT_PRECISION=dot_precision(q.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_dim(D),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
              window: int | None) -> torch.Tensor:
    """Drop-in for mistral_ref.attention.attention: decode kernel when T == 1, flash prefill kernel otherwise.

    q: (B, T, n_heads, head_dim); k, v: (B, S, n_kv_heads, head_dim); q_pos: (B, T); k_pos: (B, S).
    returns (B, T, n_heads, head_dim) in q's dtype.
    """
    if q.dim() == 4 and q.shape[1] == 1:
        return decode_attention(q, k, v, q_pos, k_pos, window)
    return prefill_attention(q, k, v, q_pos, k_pos, window)


__all__ = ["attention", "prefill_attention", "contiguous_base"]
