"""Fused RMSNorm: one program per row reads it once, normalises in fp32 and multiplies by the weight.

Matches: mistral_ref.model.RMSNorm.forward (module state passed explicitly): rms_norm(x, norm.weight,
norm.eps) == norm(x).  Same rounding as the reference: normalise in fp32, cast to x's dtype, then multiply by
the weight in the promoted dtype of (weight, x) — computed in fp32 and rounded once, which is what PyTorch
does for halves.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels._common import check_device, check_float, check_no_grad, new_output


@triton.jit
def _rms_norm_kernel(X, W, Out, stride_xm, stride_om, DIM, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    valid = offs < DIM
    x = tl.load(X + row * stride_xm + offs, mask=valid, other=0.0).to(tl.float32)  # (BLOCK_D,)
    inv_rms = tl.math.rsqrt(tl.sum(x * x, 0) / DIM + eps)
    normed = (x * inv_rms).to(X.dtype.element_ty).to(tl.float32)  # the reference's .type_as(x)
    w = tl.load(W + offs, mask=valid, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_om + offs, (w * normed).to(Out.dtype.element_ty), mask=valid)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2, -1) + eps)), normalised in fp32.

    x: (..., dim); weight: (dim,); eps: added to the mean square.
    returns (..., dim) in the promoted dtype of weight and x (x's dtype when they match).
    """
    where = "rms_norm"
    check_float("x", x, where)
    check_float("weight", weight, where)
    if x.dim() < 1 or weight.shape != (x.shape[-1],):
        raise ValueError(f"{where}: weight must be (dim,) with dim = x.shape[-1]; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    check_device(where, x, weight)
    check_no_grad(where, x, weight)
    dim = x.shape[-1]
    rows = x.reshape(-1, dim)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    weight = weight.contiguous()
    out = new_output(tuple(rows.shape), torch.promote_types(weight.dtype, x.dtype), x.device)
    if rows.shape[0]:
        block_d = triton.next_power_of_2(dim)
        _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, rows.stride(0), out.stride(0), dim, float(eps),
                                           BLOCK_D=block_d, num_warps=min(16, max(4, block_d // 1024)))
    return out.view(x.shape)


__all__ = ["rms_norm"]
