"""Fused rotary embedding of interleaved pairs: one pass reads x, cos, sin once and writes the rotated x.

Matches: mistral_ref.rope.apply_rotary_emb(x, cos, sin) — same name, same arguments: every head's pairs
(x[2i], x[2i+1]) become (x0 cos - x1 sin, x0 sin + x1 cos), angles from mistral_ref.rope.rope_angles, math in
fp32, result in x's dtype.  One program handles one (sequence, token) and BLOCK_H heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels._common import check_device, check_float, check_no_grad, new_output


@triton.jit
def _rope_kernel(
    X, Cos, Sin, Out,
    stride_xb, stride_xt, stride_xh, stride_xd,
    stride_cb, stride_ct, stride_ci,
    stride_sb, stride_st, stride_si,
    stride_ob, stride_ot, stride_oh, stride_od,
    T, H, HALF,
    BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    bt = tl.program_id(0).to(tl.int64)
    b = bt // T
    t = bt % T
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_p = tl.arange(0, BLOCK_P)  # pair index i: features 2i and 2i+1
    p_valid = offs_p < HALF
    mask = (offs_h < H)[:, None] & p_valid[None, :]

    cos = tl.load(Cos + b * stride_cb + t * stride_ct + offs_p * stride_ci, mask=p_valid, other=0.0)
    cos = cos.to(tl.float32)
    sin = tl.load(Sin + b * stride_sb + t * stride_st + offs_p * stride_si, mask=p_valid, other=0.0)
    sin = sin.to(tl.float32)
    x_ptrs = X + b * stride_xb + t * stride_xt + offs_h[:, None] * stride_xh + 2 * offs_p[None, :] * stride_xd
    x0 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_H, BLOCK_P)
    x1 = tl.load(x_ptrs + stride_xd, mask=mask, other=0.0).to(tl.float32)
    out0 = x0 * cos[None, :] - x1 * sin[None, :]
    out1 = x0 * sin[None, :] + x1 * cos[None, :]
    o_ptrs = (Out + b * stride_ob + t * stride_ot
              + offs_h[:, None] * stride_oh + 2 * offs_p[None, :] * stride_od)
    tl.store(o_ptrs, out0.to(Out.dtype.element_ty), mask=mask)
    tl.store(o_ptrs + stride_od, out1.to(Out.dtype.element_ty), mask=mask)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of every head.

    x: (B, T, H, D), D even; cos, sin: (B, T, D/2) (fp32, from rope_angles; broadcast views are fine).
    returns (B, T, H, D) in x's dtype.
    """
    where = "apply_rotary_emb"
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        check_float(name, t, where)
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"{where}: x must be (B, T, H, D) with D even, got shape {tuple(x.shape)}")
    B, T, H, D = x.shape
    if cos.shape != (B, T, D // 2) or sin.shape != (B, T, D // 2):
        raise ValueError(f"{where}: cos and sin must be (B, T, D/2)={B, T, D // 2}, got {tuple(cos.shape)} "
                         f"and {tuple(sin.shape)}")
    check_device(where, x, cos, sin)
    check_no_grad(where, x, cos, sin)
    out = new_output((B, T, H, D), x.dtype, x.device)
    if out.numel():
        block_h = min(16, triton.next_power_of_2(H))
        _rope_kernel[(B * T, triton.cdiv(H, block_h))](
            x, cos, sin, out, *x.stride(), *cos.stride(), *sin.stride(), *out.stride(), T, H, D // 2,
            BLOCK_H=block_h, BLOCK_P=triton.next_power_of_2(D // 2),
        )
    return out


__all__ = ["apply_rotary_emb"]
