"""Grouped-query attention with an optional sliding window (Mistral 7B paper, section 2).

Every rule of who-sees-whom lives in one function, :func:`attention_mask`: a query at position p sees the keys at
positions p-W+1 .. p (W keys, itself included) when the layer has a window W, else all keys 0 .. p.  Masks are
built from token *positions*, not from tensor indices, so the same code serves a plain forward pass, a chunked
prefill against a KV cache, a rolling (circular) window buffer and ragged batches (position -1 marks padding or an
empty cache slot).

The reference :func:`attention` is what the Triton kernel (triton_kernels.flash_attention.attention) replaces: same
name, same arguments.  :func:`sdpa_attention` computes the same function with PyTorch's fused kernel; it is what the
model runs by default (backend "torch"); backend "reference" runs the plain code below instead.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mistral_ref.config import ModelArgs
from mistral_ref.rope import apply_rotary_emb, apply_rotary_emb_complex, rope_angles, rope_rotations

if TYPE_CHECKING:  # the cache module imports nothing from here; typing only
    from mistral_ref.cache import LayerCache

# CPUs without bf16/fp16 matrix instructions (AVX512-BF16, AMX) get slow reduced-precision matmuls from PyTorch:
# on an AVX2 EPYC a bf16 GEMM runs ~10x slower than an fp32 GEMM on the same data.  Such products run in fp32.
_SLOW_CPU_MATMUL = {
    dtype for dtype, native in ((torch.bfloat16, torch.ops.mkldnn._is_mkldnn_bf16_supported),
                                (torch.float16, torch.ops.mkldnn._is_mkldnn_fp16_supported)) if not native()
}


UPCAST_MIN_ROWS = 4  # see linear()
SPLIT_MAX_ROWS = 32  # see split_linear()


def upcast_on_cpu(x: torch.Tensor) -> bool:
    """True if a matmul on `x` is faster in fp32 than in x's dtype: bf16/fp16 on a CPU without native support."""
    return x.device.type == "cpu" and x.dtype in _SLOW_CPU_MATMUL


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) (no bias), with two CPU fast paths that compute the same products.

    x: (..., in); weight: (out, in) -> (..., out) in x's dtype.
    * bf16/fp16 products of at least UPCAST_MIN_ROWS rows run in fp32 where upcast_on_cpu says the native product
      is slow: upcasting costs a pass over the weight, far less than a slow GEMM, but more than a product of 1-3
      rows (decode; an expert's few tokens), which is bound by memory (reading bf16 moves half the bytes).
      Measured on an AVX2 EPYC, 1 thread, weight 2048 x 768 from DRAM, native / upcast ms: 1 row 0.40 / 0.59,
      2 rows 0.65 / 0.83, 4 rows 1.25 / 0.86, 64 rows 21.8 / 3.6.  Equal to the native product up to the rounding
      of its accumulation.
    * fp32 products of fewer than SPLIT_MAX_ROWS rows (decode) go through :func:`split_linear`.
    * inside a compiled decode step (Transformer.compile_decode), a one-row bf16/fp16 product on such a CPU is
      written as multiply-and-sum: inductor makes it one loop that converts each weight as it streams in, 19 GB/s
      against 13 GB/s for PyTorch's bf16 matrix-vector kernel (AVX2 EPYC, 2 threads).  fp32 accumulation.
    """
    rows = x.numel() // max(1, x.shape[-1])
    if upcast_on_cpu(x):
        if rows == 1 and torch.compiler.is_compiling():
            return multiply_sum_linear(x, weight)
        if rows >= UPCAST_MIN_ROWS:
            xf, block = x.float(), max(1, (2 << 20) // max(1, weight.shape[1]))  # upcast <= 8 MB of weight at once
            return torch.cat([split_linear(xf, _upcast(w)) for w in weight.split(block)], dim=-1).to(x.dtype)
    elif x.dtype == torch.float32:
        return split_linear(x, weight)  # (F.linear itself off the CPU or for many rows)
    return F.linear(x, weight)


def multiply_sum_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) written as an elementwise product summed over `in`, accumulated in fp32.

    x: (..., in); weight: (out, in) -> (..., out) in x's dtype.  Eagerly this materialises (..., out, in): only
    for compiled code, where it becomes one loop (see linear).
    """
    return (weight.float() * x.float()[..., None, :]).sum(-1).to(x.dtype)  # (..., out, in) -> (..., out)


_scratch = threading.local()  # per thread: one reused fp32 buffer for weight upcasts (see _upcast)


def _upcast(w: torch.Tensor) -> torch.Tensor:
    """w.float(), written into a reused per-thread buffer when no gradient is needed.

    A fresh multi-megabyte tensor is mapped anew by the allocator at every call, and touching its pages costs more
    than the conversion itself: on a 2-core VM, 0.8 ms instead of 0.08 ms for a 1024 x 512 expert matrix, which
    made page faults three quarters of a bf16 MoE prefill.  The buffer grows to the largest upcast block (8 MB).
    """
    if w.requires_grad and torch.is_grad_enabled():
        return w.float()  # differentiable (training): a plain copy
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < w.numel():
        with torch.inference_mode(False):  # a normal tensor: usable inside and outside inference mode
            buffer = _scratch.buffer = torch.empty(w.numel(), dtype=torch.float32)
    return buffer[: w.numel()].view(w.shape).copy_(w)


@torch.compiler.assume_constant_result  # a compiled decode step bakes the count in (it only sets the split)
def _threads() -> int:
    return torch.get_num_threads()


def split_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 F.linear(x, weight) for a few rows of x, with every thread reading its own block of the weight.

    x: (..., in); weight: (out, in) -> (..., out).  A matrix-vector product is bound by how fast the weight streams
    from memory, but the BLAS behind F.linear runs a product of a few rows on one core.  Viewing the weight as
    P blocks of out/P rows, torch.bmm hands one block to each thread: the same dot products, in the same order
    (tests/test_fast_paths.py checks equality).  Measured on a 2-core AVX2 EPYC, fp32 weights from DRAM, 1 row,
    F.linear / split: 2048 x 768 11.4 / 15.7 GB/s, 32000 x 768 11.5 / 17.9 GB/s; 8 rows 5.1 / 9.4 GB/s.
    Products of SPLIT_MAX_ROWS rows or more (prefill) are efficient GEMMs already: plain F.linear.
    """
    rows, (out_features, in_features) = x.numel() // max(1, x.shape[-1]), weight.shape
    parts = _threads()  # one block per thread
    if (rows >= SPLIT_MAX_ROWS or parts == 1 or out_features % parts or not weight.is_contiguous()
            or x.device.type != "cpu"):
        return F.linear(x, weight)
    blocks = weight.view(parts, out_features // parts, in_features)  # (P, out/P, in), no copy
    xs = x.reshape(1, rows, in_features).expand(parts, rows, in_features)  # (P, rows, in), no copy
    out = torch.bmm(xs, blocks.transpose(1, 2))  # (P, rows, out/P)
    return out.transpose(0, 1).reshape(*x.shape[:-1], out_features)


class Linear(nn.Linear):
    """nn.Linear without bias that multiplies with :func:`linear`.  Parameter name as nn.Linear's: `weight`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)"""
        return linear(x, self.weight)


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


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None
) -> torch.Tensor:
    """:func:`attention` computed by PyTorch's fused kernel (F.scaled_dot_product_attention): same arguments, same
    result (fp32: within 1e-6 relative; tests/test_fast_paths.py), without materialising (B, H, T, S) scores.

    The boolean mask enters as an additive bias of finfo.min on masked keys — the reference's masked_fill — so a
    query that sees no key gets the same uniform average (SDPA with a boolean mask would return zeros there).
    Grouped-query heads are handled by the kernel (enable_gqa), not by copying keys.  A bf16/fp16 decode step
    (T == 1) on a CPU without native support runs in fp32: the reduced-precision kernel is several times slower.
    """
    if q.shape[1] == 1 and torch.compiler.is_compiling():
        # A compiled decode step: the reference's plain math fuses into a few loops, cheaper than the fused
        # kernel's fixed cost for one query per row (0.14 ms per call on a 2-core CPU).
        return attention(q, k, v, q_pos, k_pos, window)
    dtype = q.dtype
    if q.shape[1] == 1 and upcast_on_cpu(q):
        q, k, v = q.float(), k.float(), v.float()
    start = _causal_prompt(q_pos, k_pos, window)
    if start is not None:  # the mask is plain causal: the kernel's causal mode skips the masked half
        T = q.shape[1]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k[:, start:start + T].transpose(1, 2),
                                             v[:, start:start + T].transpose(1, 2), is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).to(dtype)
    allowed = attention_mask(q_pos, k_pos, window)[:, None]  # (B, 1, T, S)
    bias = torch.where(allowed, 0.0, torch.finfo(q.dtype).min).to(q.dtype)  # (B, 1, T, S)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=bias, enable_gqa=True)  # (B, n_heads, T, head_dim)
    return out.transpose(1, 2).to(dtype)  # (B, T, n_heads, head_dim)


def _causal_prompt(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> int | None:
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


class Attention(nn.Module):
    """The attention half of a block: project to q, k, v; rotate q, k; attend; project back with wo."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.rope_theta = args.rope_theta
        self.window = args.window_for_layer(layer_id)
        self.wq = Linear(args.dim, args.n_heads * args.head_dim)
        self.wk = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wv = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim)
        # "torch": PyTorch with the fast paths that equal the reference (sdpa_attention, complex RoPE);
        # "reference": the plain functions above (attention, apply_rotary_emb); "triton": triton_kernels.
        self.backend = "torch"

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache | None = None,
                rope: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, dim); positions: (B, T) (-1 = padding); cache: a cache.LayerCache or None;
        rope: (B, T, head_dim/2) complex rotations (rope.rope_rotations), computed once per forward pass by the
        model and shared by its layers (computed here when None).  -> (B, T, dim)"""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.backend == "reference" or torch.compiler.is_compiling():  # inductor has no complex arithmetic
            cos, sin = rope_angles(positions, self.head_dim, self.rope_theta)  # (B, T, head_dim/2)
            q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        else:
            if rope is None:
                rope = rope_rotations(positions, self.head_dim, self.rope_theta)  # (B, T, head_dim/2) complex
            q, k = apply_rotary_emb_complex(q, rope), apply_rotary_emb_complex(k, rope)
        if cache is None:
            keys, values, k_pos = k, v, positions
        else:  # keys are cached after the rotation
            keys, values, k_pos = cache.update(k, v, positions)  # (B, S, n_kv_heads, head_dim), (B, S)
        if self.backend == "triton":
            from triton_kernels import attention as attention_impl
        else:
            attention_impl = attention if self.backend == "reference" else sdpa_attention
        out = attention_impl(q, keys, values, positions, k_pos, self.window)  # (B, T, n_heads, head_dim)
        return self.wo(out.reshape(B, T, self.n_heads * self.head_dim))
