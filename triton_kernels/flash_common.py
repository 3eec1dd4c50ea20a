"""What the two attention kernels share: the online-softmax step over a key tile, input checks, tile sizes.

flash_attention.py (prefill) and flash_decoding.py (decode) both import this module; neither imports the other
except flash_attention.attention, the entry point, which sends T == 1 to flash_decoding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels._common import check_device, check_float, check_no_grad

LOG2E = 1.4426950408889634


@triton.jit
def attend_tile(q, k_ptrs, v_ptrs, kv_mask, allowed, m_i, l_i, acc, qk_scale,
                 UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over a key tile: returns the updated running max, sum and output.

    q: (M, D) block; k_ptrs, v_ptrs, kv_mask: (N, D) tile; allowed: (M, N) or (1, N) mask; m_i, l_i: (M,);
    acc: (M, D) fp32.  Scores are in log2 units (qk_scale includes log2(e)): exp2 gives softmax weights.
    """
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (M, N)
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: no -inf - -inf
    alpha = tl.math.exp2(m_i - m_use)  # rescales what was accumulated under the old max
    p = tl.math.exp2(s - m_use[:, None])  # (M, N), 0 where masked
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                           k_pos: torch.Tensor, window: int | None, where: str) -> None:
    """Shapes, dtypes and devices of an attention call; raises ValueError/TypeError naming what is wrong."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{where}: q, k, v must be 4-D (B, T, H, D) / (B, S, Hkv, D); got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{where}: k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{where}: k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} "
                         "in batch or head_dim")
    if H % k.shape[2]:
        raise ValueError(f"{where}: n_heads={H} must be a multiple of n_kv_heads={k.shape[2]}")
    if q_pos.shape != (B, T) or k_pos.shape != (B, k.shape[1]):
        raise ValueError(f"{where}: q_pos must be (B, T)={B, T} and k_pos (B, S)={B, k.shape[1]}; got "
                         f"{tuple(q_pos.shape)} and {tuple(k_pos.shape)}")
    if q_pos.is_floating_point() or k_pos.is_floating_point():
        raise TypeError(f"{where}: positions must be integer tensors, got {q_pos.dtype} and {k_pos.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t, where)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{where}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"{where}: window must be None or a positive number of keys, got {window!r}")
    check_device(where, q, k, v, q_pos, k_pos)
    check_no_grad(where, q, k, v)


def tile_config(dtype: torch.dtype) -> tuple[int, int, int]:
    """Default (block_m, block_n, num_stages) of the attention kernels.

    Chosen to fit every CUDA GPU from sm_80 on, including the 99 KB of shared memory of sm_86 / sm_89 parts
    (tests/test_triton_compile.py compiles them for sm_80, sm_89 and sm_90 and checks the shared memory):
    64 x 64 tiles for fp16 / bf16, 32 x 32 for fp32 (whose exact "ieee" dots run on the CUDA cores), two
    pipeline stages.  Untuned: a GPU owner can pass other block sizes.
    """
    return (64, 64, 2) if dtype in (torch.float16, torch.bfloat16) else (32, 32, 2)
