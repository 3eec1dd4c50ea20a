"""Decode attention of multi-head latent attention (MLA) over the latent cache, in latent space (absorbed).

Matches: mistral_ref.mla.latent_attention(q_nope, q_rope, latents, k_rope, kv_b_weight, v_head_dim, q_pos, k_pos,
scale) for T == 1 (:func:`latent_attention`, the "triton" backend's family function; T > 1 goes to the "torch"
form: absorbed einsums for short chunks, expanded keys + SDPA for long prompts).  It reads cache.LatentLayerCache
as it is: per token the normed latent (c numbers) and the rotated key part shared by all heads (r numbers); empty
slots hold position -1 (ragged batches).

The absorbed form (backends/mla.py explains it): with W_UK, W_UV the key and value halves of kv_b_proj,
  q_latent = W_UK^T q_nope                       (H, c)   one small product per step, in PyTorch
  score_s  = (q_latent . latent_s + q_rope . k_rope_s) * scale          over the cached tokens s
  o_latent = softmax(scores) @ latents           (H, c)   the kernels below
  out      = W_UV o_latent                       (H, v)   in PyTorch
Every head reads the same latents, so one program takes BLOCK_H heads (the M axis of tl.dot, padded to 16) and
loads each latent tile once for all of them: the cache is read once per step, c + r numbers per token, whatever
the number of heads.  As flash_decoding.py, the S axis is cut into `num_splits` chunks:
  1. `_latent_split_kernel`, grid (B, head blocks, num_splits): online softmax over its chunk (exp2, fp32),
     writing an unnormalised partial output (latent space), its row max m and sum l; key tiles that no query
     may see (empty slots, the future) cost only the load of their positions.
  2. flash decoding's `_decode_merge_kernel`, grid (B, H), with the latents as one KV head: the log-sum-exp
     merge; a padding query (position -1, sees no key) gets the reference's uniform average over all S latents.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mistral_ref.backends.mla import latent_attention as torch_latent_attention
from triton_kernels._common import (
    block_dim,
    check_device,
    check_float,
    check_no_grad,
    dot_precision,
    new_output,
    upcast,
)
from triton_kernels.flash_common import LOG2E
from triton_kernels.flash_decoding import _decode_merge_kernel, default_num_splits


@triton.jit
def _latent_split_kernel(
    QLat, QRope, Lat, KRope, QPos, KPos, PartAcc, PartM, PartL,
    stride_qlb, stride_qlh, stride_qlc,
    stride_qrb, stride_qrh, stride_qrr,
    stride_lb, stride_ls, stride_lc,
    stride_krb, stride_krs, stride_krr,
    stride_qpb, stride_kpb, stride_kps,
    S, H, C, R, qk_scale, keys_per_split, num_splits,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: b * stride_lb passes 2**31 for large caches
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # this program's heads
    split = tl.program_id(2)
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    h_valid = h < H
    c_valid = offs_c < C
    r_valid = offs_r < R

    q_lat = tl.load(QLat + b * stride_qlb + h[:, None] * stride_qlh + offs_c[None, :] * stride_qlc,
                    mask=h_valid[:, None] & c_valid[None, :], other=0.0)  # (BLOCK_H, BLOCK_C)
    q_rope = tl.load(QRope + b * stride_qrb + h[:, None] * stride_qrh + offs_r[None, :] * stride_qrr,
                     mask=h_valid[:, None] & r_valid[None, :], other=0.0)  # (BLOCK_H, BLOCK_R)
    if UPCAST:
        q_lat = q_lat.to(tl.float32)
        q_rope = q_rope.to(tl.float32)
    q_pos = tl.load(QPos + b * stride_qpb)  # scalar: the new token's position (-1 = padding row)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)

    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, S)
    for start_n in range(lo, hi, BLOCK_N):
        offs_s = start_n + offs_n
        s_valid = offs_s < hi
        k_pos = tl.load(KPos + b * stride_kpb + offs_s * stride_kps, mask=s_valid, other=-1)  # (BLOCK_N,)
        allowed = (k_pos >= 0) & (k_pos <= q_pos)  # mistral_ref.attention.attention_mask, one query, no window
        if tl.max(allowed.to(tl.int32)) > 0:  # skip tiles of empty slots
            lat = tl.load(Lat + b * stride_lb + offs_s[:, None] * stride_ls + offs_c[None, :] * stride_lc,
                          mask=s_valid[:, None] & c_valid[None, :], other=0.0)  # (BLOCK_N, BLOCK_C)
            kr = tl.load(KRope + b * stride_krb + offs_s[:, None] * stride_krs + offs_r[None, :] * stride_krr,
                         mask=s_valid[:, None] & r_valid[None, :], other=0.0)  # (BLOCK_N, BLOCK_R)
            if UPCAST:
                lat = lat.to(tl.float32)
                kr = kr.to(tl.float32)
            s = tl.dot(q_lat, tl.trans(lat), input_precision=DOT_PRECISION)  # q_nope . k_nope, in latent space
            s = tl.dot(q_rope, tl.trans(kr), s, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_H, BLOCK_N)
            s = tl.where(allowed[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: no -inf - -inf
            alpha = tl.math.exp2(m_i - m_use)
            p = tl.math.exp2(s - m_use[:, None])  # 0 where masked
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(lat.dtype), lat, input_precision=DOT_PRECISION)
            m_i = m_new

    # PartM, PartL: (B, H, num_splits); PartAcc: (B, H, num_splits, C)
    part = (b * H + h) * num_splits + split
    tl.store(PartM + part, m_i, mask=h_valid)
    tl.store(PartL + part, l_i, mask=h_valid)
    tl.store(PartAcc + part[:, None] * C + offs_c[None, :], acc, mask=h_valid[:, None] & c_valid[None, :])


def latent_tile(dtype: torch.dtype, n_heads: int, kv_lora_rank: int) -> tuple[int, int, int]:
    """Default (block_h, block_n, num_stages): heads a program (32, 16 in fp32) and a latent tile of at most 32 KB per
    pipeline stage (two stages), so the split kernel fits the 99 KB of shared memory of sm_86 / sm_89 with
    kv_lora_rank up to 512 (Mistral Large 3); tests/test_triton_compile.py checks it for sm_80, sm_89, sm_90.
    Untuned."""
    size = torch.tensor([], dtype=dtype).element_size()
    block_h = min(16 if size == 4 else 32, block_dim(n_heads))
    return block_h, max(16, min(64, (32 * 1024) // (block_dim(kv_lora_rank) * size))), 2


def latent_decode_attention(q_latent: torch.Tensor, q_rope: torch.Tensor, latents: torch.Tensor,
                            k_rope: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float,
                            num_splits: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """Attention of one new token per sequence over a latent cache, in latent space.

    q_latent: (B, H, c) the query's un-rotated part moved into latent space (W_UK^T q_nope); q_rope: (B, H, r);
    latents: (B, S, c) and k_rope: (B, S, r) — e.g. LatentLayerCache.latent[:, :, 0] / .k_rope[:, :, 0];
    q_pos: (B, 1); k_pos: (B, S), -1 for empty slots; scale: the softmax scale (mla.mla_softmax_scale).
    num_splits: chunks of the S axis (default: flash_decoding.default_num_splits); block_n: key tile (power of two
    >= 16, default from :func:`latent_tile`, as the heads a program).
    returns softmax(scores) @ latents, (B, H, c) in q_latent's dtype.
    """
    where = "latent_decode_attention"
    if q_latent.dim() != 3 or q_rope.dim() != 3 or latents.dim() != 3 or k_rope.dim() != 3:
        raise ValueError(f"{where}: q_latent, q_rope must be (B, H, c) / (B, H, r) and latents, k_rope (B, S, c) / "
                         f"(B, S, r); got {tuple(q_latent.shape)}, {tuple(q_rope.shape)}, {tuple(latents.shape)}, "
                         f"{tuple(k_rope.shape)}")
    B, H, C = q_latent.shape
    S, R = latents.shape[1], k_rope.shape[2]
    if q_rope.shape[:2] != (B, H) or latents.shape != (B, S, C) or k_rope.shape[:2] != (B, S) \
            or q_rope.shape[2] != R:
        raise ValueError(f"{where}: shapes do not agree: q_latent {tuple(q_latent.shape)}, q_rope "
                         f"{tuple(q_rope.shape)}, latents {tuple(latents.shape)}, k_rope {tuple(k_rope.shape)}")
    if q_pos.shape != (B, 1) or k_pos.shape != (B, S):
        raise ValueError(f"{where}: q_pos must be (B, 1)={B, 1} and k_pos (B, S)={B, S}; got "
                         f"{tuple(q_pos.shape)} and {tuple(k_pos.shape)}")
    if q_pos.is_floating_point() or k_pos.is_floating_point():
        raise TypeError(f"{where}: positions must be integer tensors, got {q_pos.dtype} and {k_pos.dtype}")
    for name, t in (("q_latent", q_latent), ("q_rope", q_rope), ("latents", latents), ("k_rope", k_rope)):
        check_float(name, t, where)
    if len({q_latent.dtype, q_rope.dtype, latents.dtype, k_rope.dtype}) != 1:
        raise TypeError(f"{where}: queries and the latent cache must share one dtype, got {q_latent.dtype}, "
                        f"{q_rope.dtype}, {latents.dtype}, {k_rope.dtype}")
    block_h, default_n, num_stages = latent_tile(q_latent.dtype, H, C)
    block_n = block_n or default_n
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"{where}: block_n must be a power of two >= 16, got {block_n}")
    check_device(where, q_latent, q_rope, latents, k_rope, q_pos, k_pos)
    check_no_grad(where, q_latent, q_rope, latents, k_rope)
    q_pos, k_pos = q_pos.long(), k_pos.long()

    out = new_output((B, H, C), q_latent.dtype, q_latent.device)
    if B == 0:
        return out
    if S == 0:
        return out.zero_()
    head_blocks = triton.cdiv(H, block_h)
    if num_splits is None:
        num_splits = default_num_splits(B, head_blocks, S, q_latent.device)
    if num_splits < 1:
        raise ValueError(f"{where}: num_splits must be >= 1, got {num_splits}")
    keys_per_split = triton.cdiv(triton.cdiv(S, num_splits), block_n) * block_n  # whole tiles, no empty split
    num_splits = triton.cdiv(S, keys_per_split)

    part_acc = new_output((B, H, num_splits, C), torch.float32, q_latent.device)
    part_m = new_output((B, H, num_splits), torch.float32, q_latent.device)
    part_l = new_output((B, H, num_splits), torch.float32, q_latent.device)
    block_c = block_dim(C)
    _latent_split_kernel[(B, head_blocks, num_splits)](
        q_latent, q_rope, latents, k_rope, q_pos, k_pos, part_acc, part_m, part_l,
        *q_latent.stride(), *q_rope.stride(), *latents.stride(), *k_rope.stride(),
        q_pos.stride(0), *k_pos.stride(),
        S, H, C, R, scale * LOG2E, keys_per_split, num_splits,
        UPCAST=upcast(q_latent.dtype), DOT_PRECISION=dot_precision(q_latent.dtype),
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_R=block_dim(R), num_warps=4,
        num_stages=num_stages,
    )
    # the merge is flash decoding's: the latents are its values, one KV head shared by all H query heads
    values = latents[:, :, None]  # (B, S, 1, C)
    _decode_merge_kernel[(B, H)](
        part_acc, part_m, part_l, values, out,
        *values.stride(), *out.stride(),
        S, H, C, num_splits,
        BLOCK_SPLITS=triton.next_power_of_2(num_splits), BLOCK_N=block_n, BLOCK_D=block_c,
    )
    return out


def latent_attention(q_nope: torch.Tensor, q_rope: torch.Tensor, latents: torch.Tensor, k_rope: torch.Tensor,
                     kv_b_weight: torch.Tensor, v_head_dim: int, q_pos: torch.Tensor, k_pos: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Drop-in for mistral_ref.mla.latent_attention (the "triton" backend's latent_attention): a decode step
    (T == 1) absorbs kv_b_proj around :func:`latent_decode_attention`; a prefill chunk (T > 1) runs the "torch"
    form (backends/mla.py: absorbed einsums for short chunks, expanded keys + PyTorch's fused attention beyond).
    returns (B, T, H, v) in q_nope's dtype."""
    B, T, H, n = q_nope.shape
    if T > 1:
        return torch_latent_attention(q_nope, q_rope, latents, k_rope, kv_b_weight, v_head_dim, q_pos, k_pos,
                                      scale)
    w = kv_b_weight.view(H, n + v_head_dim, -1)  # (H, n + v, c)
    q_latent = torch.einsum("bhn,hnc->bhc", q_nope[:, 0], w[:, :n])  # (B, H, c)
    out = latent_decode_attention(q_latent, q_rope[:, 0], latents, k_rope, q_pos, k_pos, scale)  # (B, H, c)
    return torch.einsum("bhc,hvc->bhv", out, w[:, n:])[:, None]  # (B, 1, H, v)


__all__ = ["latent_decode_attention", "latent_attention", "latent_tile"]
