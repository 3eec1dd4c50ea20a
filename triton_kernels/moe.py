"""Sparse mixture of experts as sorted dispatch + two grouped GEMMs (the fused-MoE layout of vLLM).

Matches: mistral_ref.moe.moe_forward(x, gate_weight, w1, w2, w3, top_k) -> (out, router_logits) — same name,
same arguments, same result: out[n] = sum_j weight[n, j] * w2_e(silu(w1_e x_n) * w3_e x_n), e = expert[n, j];
and mistral_ref.moe.mix_experts(x, weights, experts, w1, w2, w3) -> out for a routing computed elsewhere
(fine_moe.route_fine: 128 experts, top-4, group-limited; steps 2-5 below, the shared expert stays in the layer).

The N tokens x k choices make N*k "slots"; slot i = n * top_k + j belongs to token n = i // top_k.
  1. routing: mistral_ref.moe.route (the tiny router matmul, top-k and softmax over the k, in fp32) is reused
     as is, so expert choice is bit-identical to the reference.
  2. `_moe_align_kernel` (one program): counts the slots of each expert, pads each expert's run to a multiple
     of BLOCK_M, and writes `sorted_slots` (slot ids grouped by expert, in slot order within an expert — a
     stable sort — padding = the sentinel N*k) and `block_expert` (the expert of each BLOCK_M rows, -1 past
     the end).  No host synchronisation: buffers are sized for the worst case N*k + E*(BLOCK_M - 1).
  3. `_moe_gemm1_swiglu_kernel`: each program takes BLOCK_M sorted rows (all of one expert), gathers their
     tokens from x by index, multiplies by that expert's w1 and w3 tiles and stores silu(x w1^T) * (x w3^T).
  4. `_moe_gemm2_kernel`: multiplies those rows by the expert's w2, scales each row by its routing weight and
     stores it at its slot (padding rows are dropped).
  5. `_moe_sum_slots_kernel`: out[n] = sum of the k slots of token n, in fp32, in slot order (deterministic:
     no atomics anywhere).

Weights.  The kernels read stacked weights: w1, w3 (E, hidden, dim) and w2 (E, dim, hidden).  Stacked tensors
are used as they are.  A list of per-expert tensors (what mistral_ref.moe.MoeLayer passes) is stacked once
into a new tensor and cached, keyed on the identity of the listed tensors and validated on every call against
their storage pointer, dtype, shape and in-place version counter, so loading new weights or `model.to(...)`
restacks. The cache costs one extra copy of the expert weights and is freed when the listed tensors are;
callers that care about memory pass stacked tensors.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from mistral_ref.moe import route
from triton_kernels._common import (
    block_dim,
    check_device,
    check_float,
    check_no_grad,
    dot_precision,
    new_output,
    upcast,
)


# ---- 2. sort slots by expert, pad each expert's run to BLOCK_M ---------------------------------------------
@triton.jit
def _moe_align_kernel(
    Experts, SortedSlots, BlockExpert, num_slots, num_experts, max_blocks,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr,
):
    e_ids = tl.arange(0, BLOCK_E)
    offs = tl.arange(0, BLOCK_S)

    counts = tl.zeros([BLOCK_E], dtype=tl.int32)  # slots routed to each expert
    for start in range(0, num_slots, BLOCK_S):
        ex = tl.load(Experts + start + offs, mask=start + offs < num_slots, other=-1)
        counts += tl.sum((ex[:, None] == e_ids[None, :]).to(tl.int32), 0)
    padded = tl.cdiv(counts, BLOCK_M) * BLOCK_M
    ends = tl.cumsum(padded, 0)  # each expert's run is [starts[e], ends[e]) in the sorted order
    starts = ends - padded

    offs_b = tl.arange(0, BLOCK_B)
    for start_b in range(0, max_blocks, BLOCK_B):
        row = (start_b + offs_b) * BLOCK_M  # first sorted row of each block
        inside = (row[:, None] >= starts[None, :]) & (row[:, None] < ends[None, :])
        owner = tl.sum(tl.where(inside, e_ids[None, :], 0), 1)
        owner = tl.where(tl.max(inside.to(tl.int32), 1) > 0, owner, -1)
        tl.store(BlockExpert + start_b + offs_b, owner, mask=start_b + offs_b < max_blocks)

    placed = tl.zeros([BLOCK_E], dtype=tl.int32)  # slots of each expert written so far
    earlier = offs[:, None] > offs[None, :]  # (BLOCK_S, BLOCK_S): column slot comes before row slot
    for start in range(0, num_slots, BLOCK_S):
        valid = start + offs < num_slots
        ex = tl.load(Experts + start + offs, mask=valid, other=-1)
        onehot = (ex[:, None] == e_ids[None, :]).to(tl.int32)  # (BLOCK_S, BLOCK_E)
        same = (ex[:, None] == ex[None, :]) & earlier & valid[None, :]
        rank = tl.sum(same.to(tl.int32), 1)  # earlier slots of this block with the same expert
        dest = tl.sum(onehot * (starts + placed)[None, :], 1) + rank
        tl.store(SortedSlots + dest, start + offs, mask=valid)
        placed += tl.sum(onehot, 0)


def moe_align_block_size(experts: torch.Tensor, num_experts: int,
                         block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the slots by expert and pad each expert's run to a multiple of block_m.

    experts: (N, k) integer expert ids in [0, num_experts).
    returns sorted_slots (max_blocks * block_m,) int32 — slot ids (n * k + j) expert by expert, ascending
    within an expert, padding = N * k — and block_expert (max_blocks,) int32, the expert of each block or -1
    past the used blocks.  max_blocks = min(N*k, (N*k + E*(block_m - 1)) // block_m), the worst case.
    """
    num_slots = experts.numel()
    max_blocks = max(1, min(num_slots, (num_slots + num_experts * (block_m - 1)) // block_m))
    sorted_slots = torch.full((max_blocks * block_m,), num_slots, dtype=torch.int32, device=experts.device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=experts.device)
    flat = experts.reshape(-1).to(torch.int32)
    _moe_align_kernel[(1,)](
        flat, sorted_slots, block_expert, num_slots, num_experts, max_blocks,
        BLOCK_M=block_m, BLOCK_E=block_dim(num_experts), BLOCK_S=64, BLOCK_B=64,
    )
    return sorted_slots, block_expert


# ---- 3. grouped GEMM: w1 and w3 with the SwiGLU fused ------------------------------------------------------
@triton.jit
def _moe_gemm1_swiglu_kernel(
    X, W1, W3, SortedSlots, BlockExpert, Act,
    stride_xn, stride_xk,
    stride_w1e, stride_w1n, stride_w1k,
    stride_w3e, stride_w3n, stride_w3k,
    stride_am, stride_an,
    num_slots, DIM, HIDDEN,
    TOP_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(BlockExpert + pid_m).to(tl.int64)
    if e >= 0:  # blocks past the last expert's run have nothing to do
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # sorted rows
        slot = tl.load(SortedSlots + offs_m).to(tl.int64)
        row_valid = slot < num_slots  # padding rows read zeros
        token = slot // TOP_K
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # hidden features
        n_valid = offs_n < HIDDEN
        offs_k = tl.arange(0, BLOCK_K)
        acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # x w1^T
        acc3 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # x w3^T
        for k0 in range(0, DIM, BLOCK_K):
            k_valid = k0 + offs_k < DIM
            x = tl.load(X + token[:, None] * stride_xn + (k0 + offs_k)[None, :] * stride_xk,
                        mask=row_valid[:, None] & k_valid[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
            w_mask = k_valid[:, None] & n_valid[None, :]
            w1_ptrs = W1 + e * stride_w1e + offs_n[None, :] * stride_w1n + (k0 + offs_k)[:, None] * stride_w1k
            w1 = tl.load(w1_ptrs,
                         mask=w_mask, other=0.0)  # (BLOCK_K, BLOCK_N) = w1[e][n, k] transposed
            w3_ptrs = W3 + e * stride_w3e + offs_n[None, :] * stride_w3n + (k0 + offs_k)[:, None] * stride_w3k
            w3 = tl.load(w3_ptrs,
                         mask=w_mask, other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                w1 = w1.to(tl.float32)
                w3 = w3.to(tl.float32)
            acc1 = tl.dot(x, w1, acc1, input_precision=DOT_PRECISION)
            acc3 = tl.dot(x, w3, acc3, input_precision=DOT_PRECISION)
        act = acc1 * tl.sigmoid(acc1) * acc3  # silu(x w1^T) * (x w3^T)
        a_ptrs = Act + offs_m[:, None] * stride_am + offs_n[None, :] * stride_an
        tl.store(a_ptrs, act.to(Act.dtype.element_ty), mask=n_valid[None, :])


# ---- 4. grouped GEMM: w2, scaled by the routing weight, scattered to the slots -----------------------------
@triton.jit
def _moe_gemm2_kernel(
    Act, W2, SortedSlots, BlockExpert, RouteWeights, OutSlots,
    stride_am, stride_ak,
    stride_w2e, stride_w2n, stride_w2k,
    stride_os, stride_on,
    num_slots, DIM, HIDDEN,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(BlockExpert + pid_m).to(tl.int64)
    if e >= 0:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        slot = tl.load(SortedSlots + offs_m).to(tl.int64)
        row_valid = slot < num_slots
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output features (dim)
        n_valid = offs_n < DIM
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, HIDDEN, BLOCK_K):
            k_valid = k0 + offs_k < HIDDEN
            a = tl.load(Act + offs_m[:, None] * stride_am + (k0 + offs_k)[None, :] * stride_ak,
                        mask=k_valid[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
            w2_ptrs = W2 + e * stride_w2e + offs_n[None, :] * stride_w2n + (k0 + offs_k)[:, None] * stride_w2k
            w2 = tl.load(w2_ptrs,
                         mask=k_valid[:, None] & n_valid[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
            if UPCAST:
                a = a.to(tl.float32)
                w2 = w2.to(tl.float32)
            acc = tl.dot(a, w2, acc, input_precision=DOT_PRECISION)
        weight = tl.load(RouteWeights + slot, mask=row_valid, other=0.0)  # (BLOCK_M,) fp32
        acc = acc * weight[:, None]
        tl.store(OutSlots + slot[:, None] * stride_os + offs_n[None, :] * stride_on, acc,
                 mask=row_valid[:, None] & n_valid[None, :])


# ---- 5. sum over the k slots of each token -----------------------------------------------------------------
@triton.jit
def _moe_sum_slots_kernel(OutSlots, Out, stride_os, stride_on, stride_xn, stride_xd, DIM,
                          TOP_K: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    valid = offs < DIM
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in range(TOP_K):
        acc += tl.load(OutSlots + (n * TOP_K + j) * stride_os + offs * stride_on, mask=valid, other=0.0)
    tl.store(Out + n * stride_xn + offs * stride_xd, acc.to(Out.dtype.element_ty), mask=valid)


# ---- weights: stacked as they are, or lists stacked once and cached ----------------------------------------
_STACKED: dict[tuple[int, ...], tuple[list[weakref.ref], list[tuple], torch.Tensor]] = {}


def _fingerprint(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t._version, t.dtype, tuple(t.shape), tuple(t.stride()), t.device)


def stack_experts(w: Sequence[torch.Tensor] | torch.Tensor, name: str = "w") -> torch.Tensor:
    """(E, rows, cols) weights: a stacked tensor as is, or a list of E (rows, cols) tensors stacked + cached.

    The cache is keyed on the listed tensors' identity and checked against their storage, dtype, shape and
    version counter on every call (module docstring); an entry is dropped when its first tensor is freed.
    """
    if isinstance(w, torch.Tensor):
        if w.dim() != 3:
            raise ValueError(f"moe_forward: stacked {name} must be 3-D (E, rows, cols), got {tuple(w.shape)}")
        return w
    ws = list(w)
    if not ws:
        raise ValueError(f"moe_forward: {name} is an empty list of experts")
    if any(not isinstance(t, torch.Tensor) or t.dim() != 2 for t in ws):
        raise ValueError(f"moe_forward: every expert's {name} must be a 2-D tensor")
    key = tuple(id(t) for t in ws)
    prints = [_fingerprint(t) for t in ws]
    hit = _STACKED.get(key)
    if hit is not None and all(r() is t for r, t in zip(hit[0], ws)) and hit[1] == prints:
        return hit[2]
    with torch.no_grad():
        stacked = torch.stack([t.detach() for t in ws])  # (E, rows, cols)
    _STACKED[key] = ([weakref.ref(t) for t in ws], prints, stacked)
    weakref.finalize(ws[0], _STACKED.pop, key, None)
    return stacked


def clear_stack_cache() -> None:
    """Drop every cached stacked copy of per-expert weights."""
    _STACKED.clear()


# ---- the public entry points --------------------------------------------------------------------------------
def moe_tiles(dtype: torch.dtype) -> tuple[int, int, int]:
    """Default (block_m, block_n, block_k) of the grouped GEMMs: 64 x 64 x 64 for fp16 / bf16 (24 KB of shared
    memory a pipeline stage, so Triton's 3 stages fit the 99 KB of sm_86 / sm_89 parts; chosen by
    `python -m triton_kernels.bench --tiles`, figures in README "Triton kernels"), 64 x 64 x 32 for fp32 (whose
    tiles are twice the bytes)."""
    return (64, 64, 64) if dtype in (torch.float16, torch.bfloat16) else (64, 64, 32)


def _tiles(dtype: torch.dtype, block_m: int | None, block_n: int | None, block_k: int | None) -> tuple[int, ...]:
    default = moe_tiles(dtype)
    return tuple(b if b is not None else d for b, d in zip((block_m, block_n, block_k), default))


def moe_forward(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    w1: Sequence[torch.Tensor] | torch.Tensor,
    w2: Sequence[torch.Tensor] | torch.Tensor,
    w3: Sequence[torch.Tensor] | torch.Tensor,
    top_k: int,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for mistral_ref.moe.moe_forward: routed SwiGLU experts with sorted dispatch and grouped GEMMs.

    x: (N, dim); gate_weight: (E, dim); w1, w3: E x (hidden, dim) or (E, hidden, dim);
    w2: E x (dim, hidden) or (E, dim, hidden).
    returns out (N, dim) in x's dtype and router logits (N, E) fp32.
    block_m / block_n / block_k: GEMM tiles (powers of two >= 16), default `moe_tiles(x.dtype)`.
    """
    where = "moe_forward"
    block_m, block_n, block_k = _tiles(x.dtype, block_m, block_n, block_k)
    W1, W2, W3 = _check_experts(where, x, w1, w2, w3, (block_m, block_n, block_k))
    E, dim = W1.shape[0], x.shape[1]
    if gate_weight.shape != (E, dim):
        raise ValueError(f"{where}: gate_weight must be (E, dim)={E, dim}, got {tuple(gate_weight.shape)}")
    if not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"{where}: top_k must be in 1..{E} (the number of experts), got {top_k!r}")
    check_device(where, x, gate_weight, W1, W2, W3)
    check_no_grad(where, x, gate_weight, W1, W2, W3)
    weights, experts, logits = route(x, gate_weight, top_k)  # (N, k) fp32, (N, k) int64, (N, E) fp32
    return _dispatch(x, weights, experts, W1, W2, W3, block_m, block_n, block_k), logits


def mix_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    w1: Sequence[torch.Tensor] | torch.Tensor,
    w2: Sequence[torch.Tensor] | torch.Tensor,
    w3: Sequence[torch.Tensor] | torch.Tensor,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """Drop-in for mistral_ref.moe.mix_experts: the same kernels for a routing computed elsewhere (Mixtral's
    router, or fine_moe.route_fine's group-limited choice among 128 experts).

    x: (N, dim); weights: (N, k) float routing weights; experts: (N, k) integer expert ids; w1, w2, w3 as in
    moe_forward.  returns (N, dim) in x's dtype.  block_m / block_n / block_k: as in moe_forward.
    """
    where = "mix_experts"
    block_m, block_n, block_k = _tiles(x.dtype, block_m, block_n, block_k)
    W1, W2, W3 = _check_experts(where, x, w1, w2, w3, (block_m, block_n, block_k))
    E, N = W1.shape[0], x.shape[0]
    if experts.dim() != 2 or experts.shape[0] != N or weights.shape != experts.shape:
        raise ValueError(f"{where}: weights and experts must both be (N, k) with N={N}, got "
                         f"{tuple(weights.shape)} and {tuple(experts.shape)}")
    if experts.dtype.is_floating_point or not 1 <= experts.shape[1] <= E:
        raise ValueError(f"{where}: experts must be integer ids, k in 1..{E}; got {experts.dtype}, "
                         f"k={experts.shape[1]}")
    if N and (int(experts.min()) < 0 or int(experts.max()) >= E):
        raise ValueError(f"{where}: expert ids must be in 0..{E - 1}, got {int(experts.min())}..{int(experts.max())}")
    check_device(where, x, weights, experts, W1, W2, W3)
    check_no_grad(where, x, weights, W1, W2, W3)
    return _dispatch(x, weights.float(), experts, W1, W2, W3, block_m, block_n, block_k)


def _check_experts(where: str, x: torch.Tensor, w1, w2, w3, blocks: tuple[int, int, int]):
    """The stacked expert weights, after checking x, their shapes, dtypes and the tile sizes."""
    if x.dim() != 2:
        raise ValueError(f"{where}: x must be (N, dim), got shape {tuple(x.shape)}")
    check_float("x", x, where)
    W1, W2, W3 = stack_experts(w1, "w1"), stack_experts(w2, "w2"), stack_experts(w3, "w3")
    dim = x.shape[1]
    E, hidden = W1.shape[0], W1.shape[1]
    if W1.shape != (E, hidden, dim) or W3.shape != (E, hidden, dim) or W2.shape != (E, dim, hidden):
        raise ValueError(f"{where}: expected w1, w3 {(E, hidden, dim)} and w2 {(E, dim, hidden)}, got "
                         f"{tuple(W1.shape)}, {tuple(W3.shape)}, {tuple(W2.shape)}")
    if not (W1.dtype == W2.dtype == W3.dtype == x.dtype):
        raise TypeError(f"{where}: x and expert weights must share one dtype, got x {x.dtype}, "
                        f"w1 {W1.dtype}, w2 {W2.dtype}, w3 {W3.dtype}")
    for name, blk in zip(("block_m", "block_n", "block_k"), blocks):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{where}: {name} must be a power of two >= 16, got {blk}")
    return W1, W2, W3


def _dispatch(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor,
              W3: torch.Tensor, block_m: int, block_n: int, block_k: int) -> torch.Tensor:
    """Steps 2-5 of the module docstring for a routing (weights (N, k) fp32, experts (N, k)).  -> (N, dim)"""
    N, dim = x.shape
    E, hidden = W1.shape[0], W1.shape[1]
    top_k = experts.shape[1]
    out = new_output((N, dim), x.dtype, x.device)
    if N == 0:
        return out
    num_slots = N * top_k
    sorted_slots, block_expert = moe_align_block_size(experts, E, block_m)
    num_blocks = block_expert.numel()

    act = new_output((num_blocks * block_m, hidden), x.dtype, x.device)  # sorted rows, padding included
    out_slots = new_output((num_slots, dim), torch.float32, x.device)  # each slot's weighted expert output
    flags = dict(UPCAST=upcast(x.dtype), DOT_PRECISION=dot_precision(x.dtype))
    _moe_gemm1_swiglu_kernel[(num_blocks, triton.cdiv(hidden, block_n))](
        x, W1, W3, sorted_slots, block_expert, act,
        *x.stride(), *W1.stride(), *W3.stride(), *act.stride(),
        num_slots, dim, hidden, TOP_K=top_k, **flags,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    _moe_gemm2_kernel[(num_blocks, triton.cdiv(dim, block_n))](
        act, W2, sorted_slots, block_expert, weights.reshape(-1).contiguous(), out_slots,
        *act.stride(), *W2.stride(), *out_slots.stride(),
        num_slots, dim, hidden, **flags,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    block_d = min(1024, block_dim(dim))
    _moe_sum_slots_kernel[(N, triton.cdiv(dim, block_d))](
        out_slots, out, *out_slots.stride(), *out.stride(), dim, TOP_K=top_k, BLOCK_D=block_d,
    )
    return out


__all__ = ["moe_forward", "mix_experts", "moe_tiles", "moe_align_block_size", "stack_experts", "clear_stack_cache"]
