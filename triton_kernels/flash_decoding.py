"""Decode attention: one new query per sequence over the KV cache, split across programs (flash-decoding).

Matches: mistral_ref.attention.attention(q, k, v, q_pos, k_pos, window) for T == 1 — the same mask rule from
positions, so it reads mistral_ref.cache.LayerCache buffers as they are: a full cache whose empty slots hold
position -1 (ragged batches: every row has its own length), or a rolling sliding-window buffer where position
p sits in slot p % W and slots wrap around.  A padding query (position -1) sees no key and gets the
reference's uniform average over all S slots.

Algorithm (flash-decoding, Dao et al. 2023).  A decode step has only B x n_heads query rows, too few to fill a
GPU, while the cache can hold 32k keys.  So the S axis is cut into `num_splits` chunks:
  1. `_decode_split_kernel`, grid (B, n_kv_heads, num_splits): one program takes all n_rep query heads that
     share a kv head (so each K/V tile is loaded once for the whole GQA group; the heads are the M axis of
     tl.dot, padded to 16) and runs an online softmax over its chunk, writing an unnormalised partial output,
     its row max m and its sum l (log2 domain) in fp32.  Key tiles with no visible key (empty slots, outside
     the window, in the future) cost only the load of their positions.
  2. `_decode_merge_kernel`, grid (B, n_heads): combines the partials with the log-sum-exp rule
         out = sum_i 2^(m_i - m) acc_i / sum_i 2^(m_i - m) l_i,   m = max_i m_i.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels._common import block_dim, dot_precision, new_output, upcast
from triton_kernels.flash_common import LOG2E, attend_tile, check_attention_inputs, tile_config


@triton.jit
def _decode_split_kernel(
    Q, K, V, QPos, KPos, PartAcc, PartM, PartL,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_qpb, stride_kpb, stride_kps,
    S, N_REP, D, window, qk_scale, keys_per_split, num_splits,
    HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: b * stride_kb passes 2**31 for large caches
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    H = tl.num_programs(1) * N_REP

    offs_g = tl.arange(0, BLOCK_H)  # query heads of this GQA group, padded to BLOCK_H >= 16
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    h = kvh * N_REP + offs_g
    g_valid = offs_g < N_REP
    d_valid = offs_d < D

    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_valid[:, None] & d_valid[None, :], other=0.0)  # (BLOCK_H, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = tl.load(QPos + b * stride_qpb)  # scalar: the new token's position (-1 = padding row)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)

    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, S)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    for start_n in range(lo, hi, BLOCK_N):
        offs_s = start_n + offs_n
        s_valid = offs_s < hi
        k_pos = tl.load(KPos + b * stride_kpb + offs_s * stride_kps, mask=s_valid, other=-1)  # (BLOCK_N,)
        allowed = (k_pos >= 0) & (k_pos <= q_pos)  # mistral_ref.attention.attention_mask, one query
        if HAS_WINDOW:
            allowed = allowed & (k_pos > q_pos - window)
        if tl.max(allowed.to(tl.int32)) > 0:  # skip tiles of empty slots / keys outside the window
            k_ptrs = k_base + offs_s[:, None] * stride_ks + offs_d[None, :] * stride_kd
            v_ptrs = v_base + offs_s[:, None] * stride_vs + offs_d[None, :] * stride_vd
            kv_mask = s_valid[:, None] & d_valid[None, :]
            m_i, l_i, acc = attend_tile(q, k_ptrs, v_ptrs, kv_mask, allowed[None, :], m_i, l_i, acc, qk_scale,
                                        UPCAST, DOT_PRECISION)

    # PartM, PartL: (B, H, num_splits); PartAcc: (B, H, num_splits, D)
    part = (b * H + h) * num_splits + split
    tl.store(PartM + part, m_i, mask=g_valid)
    tl.store(PartL + part, l_i, mask=g_valid)
    tl.store(PartAcc + part[:, None] * D + offs_d[None, :], acc, mask=g_valid[:, None] & d_valid[None, :])


@triton.jit
def _decode_merge_kernel(
    PartAcc, PartM, PartL, V, Out,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_oh, stride_od,
    S, N_REP, D, num_splits,
    BLOCK_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    H = tl.num_programs(1)
    offs_p = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    p_valid = offs_p < num_splits
    d_valid = offs_d < D

    part = (b * H + h) * num_splits + offs_p
    m = tl.load(PartM + part, mask=p_valid, other=float("-inf"))  # (BLOCK_SPLITS,)
    l = tl.load(PartL + part, mask=p_valid, other=0.0)
    acc = tl.load(PartAcc + part[:, None] * D + offs_d[None, :], mask=p_valid[:, None] & d_valid[None, :],
                  other=0.0)  # (BLOCK_SPLITS, BLOCK_D)
    m_max = tl.max(m, 0)
    m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.math.exp2(m - m_use)  # 0 for splits that saw nothing (m = -inf)
    l_sum = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0)  # (BLOCK_D,)

    if l_sum == 0.0:  # the query saw no key at all: the reference gives the uniform average of all S values
        offs_n = tl.arange(0, BLOCK_N)
        v_base = V + b * stride_vb + (h // N_REP) * stride_vh
        v_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start_n in range(0, S, BLOCK_N):
            offs_s = start_n + offs_n
            v = tl.load(v_base + offs_s[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                        mask=(offs_s < S)[:, None] & d_valid[None, :], other=0.0)
            v_sum += tl.sum(v.to(tl.float32), 0)
        out = v_sum
        l_sum = l_sum + S
    out = out / l_sum
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_d * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=d_valid)


def default_num_splits(batch: int, n_kv_heads: int, seq_len: int, device: torch.device,
                       min_keys_per_split: int = 256, max_splits: int = 64) -> int:
    """How many chunks to cut the cache into: enough programs to fill the GPU (about 2 per SM), but no chunk
    shorter than `min_keys_per_split` keys.  Short contexts (and the CPU interpreter) use one split."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(2 * sms, batch * n_kv_heads)
    return max(1, min(want, triton.cdiv(seq_len, min_keys_per_split), max_splits))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                     k_pos: torch.Tensor, window: int | None, num_splits: int | None = None,
                     block_n: int | None = None) -> torch.Tensor:
    """Attention of one new token per sequence over a KV cache (split-K over the cache length, LSE merge).

    q: (B, 1, n_heads, head_dim); k, v: (B, S, n_kv_heads, head_dim) — e.g. LayerCache.k / .v; q_pos: (B, 1);
    k_pos: (B, S), -1 for empty slots; window: keys a query sees or None.
    num_splits: chunks of the S axis (default: `default_num_splits`); block_n: key tile (power of two >= 16,
    default from flash_common.tile_config).
    returns (B, 1, n_heads, head_dim) in q's dtype.
    """
    check_attention_inputs(q, k, v, q_pos, k_pos, window, "decode_attention")
    q_pos, k_pos = q_pos.long(), k_pos.long()
    _, default_n, num_stages = tile_config(q.dtype)
    block_n = block_n or default_n
    B, T, H, D = q.shape
    if T != 1:
        raise ValueError(f"decode_attention: expects one query token per sequence (T == 1), got T={T}; "
                         "use prefill_attention for prefill")
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"decode_attention: block_n must be a power of two >= 16, got {block_n}")
    S, H_kv = k.shape[1], k.shape[2]
    n_rep = H // H_kv
    out = new_output((B, 1, H, D), q.dtype, q.device)
    if B == 0:
        return out
    if S == 0:
        return out.zero_()
    if num_splits is None:
        num_splits = default_num_splits(B, H_kv, S, q.device)
    if num_splits < 1:
        raise ValueError(f"decode_attention: num_splits must be >= 1, got {num_splits}")
    # every split gets a whole number of key tiles; drop splits that would be empty
    keys_per_split = triton.cdiv(triton.cdiv(S, num_splits), block_n) * block_n
    num_splits = triton.cdiv(S, keys_per_split)

    part_acc = new_output((B, H, num_splits, D), torch.float32, q.device)
    part_m = new_output((B, H, num_splits), torch.float32, q.device)
    part_l = new_output((B, H, num_splits), torch.float32, q.device)
    block_d = block_dim(D)
    _decode_split_kernel[(B, H_kv, num_splits)](
        q, k, v, q_pos, k_pos, part_acc, part_m, part_l,
        q.stride(0), q.stride(2), q.stride(3), *k.stride(), *v.stride(),
        q_pos.stride(0), *k_pos.stride(),
        S, n_rep, D, window or 0, D**-0.5 * LOG2E, keys_per_split, num_splits,
        HAS_WINDOW=window is not None, UPCAST=upcast(q.dtype), DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_H=block_dim(n_rep), BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4, num_stages=num_stages,
    )
    _decode_merge_kernel[(B, H)](
        part_acc, part_m, part_l, v, out,
        *v.stride(), out.stride(0), out.stride(2), out.stride(3),
        S, n_rep, D, num_splits,
        BLOCK_SPLITS=triton.next_power_of_2(num_splits), BLOCK_N=block_n, BLOCK_D=block_d,
    )
    return out


__all__ = ["decode_attention", "default_num_splits"]
