"""Fast expert dispatch: the mixture of experts of moe.moe_forward with the work grouped by expert.

Equals: moe.moe_forward(x, gate_weight, w1, w2, w3, top_k) and, for a router's precomputed choice (Mixtral's or
fine_moe.route_fine's), moe.mix_experts(x, weights, experts, w1, w2, w3) (backend "reference"), tested in
tests/test_backends_moe.py.  Also here: :func:`stack_experts`, which lays a layer's experts out as (E, ...) tensors
(the parameters become views: no extra memory), read by compiled decoding (:func:`moe_one_token`) and by the
Triton MoE kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mistral_ref.backends import cpu_gemv
from mistral_ref.backends.linear import linear, upcast_on_cpu
from mistral_ref.moe import route
from mistral_ref.quantize import QuantizedExperts


def moe_forward_grouped(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    w1: Sequence[torch.Tensor] | torch.Tensor,
    w2: Sequence[torch.Tensor] | torch.Tensor,
    w3: Sequence[torch.Tensor] | torch.Tensor,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """moe.moe_forward with the work grouped by expert: same arguments, same result (fp32: within 1e-6).
    Mixtral's router (moe.route), then :func:`mix_experts_grouped`."""
    if x.shape[0] == 1 and gemv_experts_apply(x, w1) and cpu_gemv.library() is not None:
        return cpu_gemv.experts_moe(x, gate_weight, w1, w3, w2, top_k, torch.get_num_threads())  # one call
    weights, experts, logits = route(x, gate_weight, top_k)  # (N, k), (N, k), (N, E)
    return mix_experts_grouped(x, weights, experts, w1, w2, w3), logits


# Several bf16 tokens' experts go to cpu_gemv.experts_rows (one call on AMX tiles) where it takes them; False: the
# loop an expert (benchmarks/bench_attention.py part 5 times both)
AMX_EXPERTS = True
# Several fp32 tokens with stacked experts go to torch._grouped_mm where it runs on the CPU (grouped_mm_applies);
# False: the loop an expert
GROUPED_MM = True


def mix_experts_grouped(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    w1: Sequence[torch.Tensor] | torch.Tensor,
    w2: Sequence[torch.Tensor] | torch.Tensor,
    w3: Sequence[torch.Tensor] | torch.Tensor,
) -> torch.Tensor:
    """moe.mix_experts (any router's weights (N, k) and experts (N, k): Mixtral's, fine_moe.route_fine's) with
    the work grouped by expert.  returns (N, dim) in x's dtype.

    The N*k (token, expert) assignments are sorted by expert, so each expert multiplies one contiguous block of
    rows and only experts that received tokens are visited; a single token (decode at batch 1) just runs its k
    experts.  Each token's outputs are summed in increasing expert order, as in the reference.  The per-expert
    counts become Python ints: one host synchronisation per call, free on a CPU.  A single token whose experts
    the C kernels take is one call: :func:`mix_one_token_gemv` for stacked experts (:func:`gemv_experts_apply`),
    cpu_gemv.swiglu_chosen for experts kept as separate weights (the k chosen ones' tensors); either sums the k
    outputs in fp32, then rounds (the reference rounds after each expert).  Where :func:`pads_rows`, each expert
    multiplies :func:`row_bucket` rows, its own first, so the shapes of the products recur from prompt to prompt
    (:func:`bucketed_rows`: not the few rows the C kernels take).  Several bf16 tokens on a CPU with AMX tiles:
    every expert in one call (cpu_gemv.experts_rows), the rows rounded as :func:`swiglu` rounds them; several
    fp32 tokens with stacked experts: three torch._grouped_mm calls for the layer (:func:`grouped_mm_applies`).
    """
    top_k = experts.shape[1]
    if x.shape[0] == 1 and gemv_experts_apply(x, w1) and cpu_gemv.library() is not None:
        return mix_one_token_gemv(x, weights, experts, w1, w2, w3, torch.get_num_threads())
    if x.shape[0] == 1:  # one token: gather its k experts, in increasing expert order like the reference
        chosen = experts[0].tolist()
        w1s, w3s, w2s = ([w[e] for e in chosen] for w in (w1, w3, w2))  # the k experts' weights each
        checked = cpu_gemv.chosen_or_none(x, w1s, w3s, w2s) if cpu_gemv.library() is not None else None
        if checked is not None:
            return cpu_gemv.swiglu_chosen(x, w1s, w3s, w2s, weights[0].float(), torch.get_num_threads(), checked)
        out, w = torch.zeros_like(x), weights[0].to(x.dtype)  # (1, dim), (k,)
        for slot, e in sorted(enumerate(chosen), key=lambda se: se[1]):
            out += swiglu(x, w1[e], w3[e], w2[e]) * w[slot]
        return out
    flat = experts.flatten()  # (N*k,) expert of assignment token*k + slot
    order = flat.argsort(stable=True)  # (N*k,) assignments grouped by expert, tokens in order within a group
    counts = torch.bincount(flat, minlength=len(w1)).tolist()  # assignments per expert
    token = order // top_k  # (N*k,) token of each sorted assignment
    if AMX_EXPERTS and cpu_gemv.experts_rows_apply(x, w1, w2, w3):  # bf16, AMX tiles: every expert in one call
        ys = cpu_gemv.experts_rows(x, token, counts, w1, w3, w2)
        if ys is not None:
            return weighted_sum(x, ys, weights, order, token)
    if grouped_mm_applies(x, w1, w2, w3):  # stacked fp32 experts: three grouped products for the layer
        offsets = torch.tensor(counts).cumsum(0).to(torch.int32)  # (E,) end of each expert's rows
        xs = x[token]  # (N*k, dim) expert after expert
        gate = torch._grouped_mm(xs, w1.transpose(1, 2), offs=offsets)  # (N*k, hidden)
        up = torch._grouped_mm(xs, w3.transpose(1, 2), offs=offsets)
        ys = torch._grouped_mm(swiglu_in_place(gate, up), w2.transpose(1, 2), offs=offsets)  # (N*k, dim)
        return weighted_sum(x, ys, weights, order, token)
    rows = bucketed_rows(counts, x, w1)  # rows each expert multiplies
    spare = max(r - n for r, n in zip(rows, counts))  # the last expert's extra rows read past the end
    xs = x[torch.cat([token, token.new_zeros(spare)]) if spare else token]  # (N*k + spare, dim) expert after expert
    ys = torch.empty(len(token), x.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n:  # (the rows past n belong to the next experts: multiplied, then dropped)
            ys[start:start + n] = swiglu(xs[start:start + rows[e]], w1[e], w3[e], w2[e])[:n]  # (n, dim)
            start += n
    return weighted_sum(x, ys, weights, order, token)


def weighted_sum(x: torch.Tensor, ys: torch.Tensor, weights: torch.Tensor, order: torch.Tensor,
                 token: torch.Tensor) -> torch.Tensor:
    """Each sorted assignment's expert output (ys, (N*k, dim), in `order`) times its router weight, summed into its
    token's row (token: (N*k,)).  -> (N, dim) in x's dtype"""
    ys *= weights.flatten()[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token, ys)


def grouped_mm_applies(x: torch.Tensor, w1: Any, w2: Any, w3: Any) -> bool:
    """Whether mix_experts_grouped multiplies several tokens' experts by torch._grouped_mm (one call a product for
    the layer, each expert's rows by its slice of the stack) instead of one product an expert: fp32 tokens and
    stacked fp32 experts (stack_experts: (E, out, in)) on a CPU, no autograd, GROUPED_MM and a torch whose
    _grouped_mm runs on the CPU (:func:`cpu_grouped_mm`).  Its products are the per-expert products within fp32
    rounding (tests/test_backends_moe.py: 1e-6); the loop instead pays Python and dispatch for every small
    product (Small 4: 128 experts x 3 a layer)."""
    return (GROUPED_MM and x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2
            and all(isinstance(w, torch.Tensor) and not isinstance(w, QuantizedExperts) and w.dim() == 3
                    and w.dtype == torch.float32 and w.device.type == "cpu" for w in (w1, w2, w3))
            and not (torch.is_grad_enabled() and (x.requires_grad or w1.requires_grad or w2.requires_grad
                                                  or w3.requires_grad))
            and cpu_grouped_mm())


@functools.cache
def cpu_grouped_mm() -> bool:
    """Whether this torch's _grouped_mm runs fp32 products on the CPU and gives the per-group products (checked
    once, on a small case with an empty group)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    try:
        y = torch._grouped_mm(x, w.transpose(1, 2), offs=torch.tensor([2, 2, 5], dtype=torch.int32))
    except (RuntimeError, NotImplementedError):
        return False
    return torch.allclose(y, torch.cat([x[:2] @ w[0].T, x[2:] @ w[2].T]), rtol=1e-5, atol=1e-6)


def pads_rows(x: torch.Tensor, w1: Sequence[torch.Tensor] | torch.Tensor | QuantizedExperts) -> bool:
    """Whether mix_experts_grouped rounds each expert's rows up (row_bucket): bf16 / fp16 products on a CPU that
    runs them natively.  There PyTorch calls oneDNN, which compiles a kernel for each new shape the first time it
    sees it (on a Xeon with AMX a 300-row bf16 product took 6x longer the first time), and the row counts of the
    experts change with every prompt.  fp32 products (MKL) and quantized experts have no such cost."""
    return (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and not upcast_on_cpu(x)
            and not isinstance(w1, QuantizedExperts))


def bucketed_rows(counts: list[int], x: torch.Tensor,
                  w1: Sequence[torch.Tensor] | torch.Tensor | QuantizedExperts) -> list[int]:
    """The rows each expert multiplies for counts[e] tokens: row_bucket(n) where :func:`pads_rows`, except for the
    products the C kernels take (fewer than cpu_gemv.MAX_ROWS rows of a bf16 weight: a decode batch's few tokens
    an expert), which compile nothing per shape and whose time grows with every row; else n."""
    if not pads_rows(x, w1):
        return counts
    few = cpu_gemv.MAX_ROWS.get(cpu_gemv.kind(w1[0]) or "", 0) if cpu_gemv.library() is not None else 0
    return [n if n < few else row_bucket(n) for n in counts]


def row_bucket(n: int) -> int:
    """n rounded up to a multiple of 16, or of n's leading power of two / 8 (at most 1/8 more rows): a few dozen
    shapes cover every count up to thousands of rows, so the products' compiled kernels are reused."""
    step = max(16, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


def swiglu_in_place(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's silu(gate) * up (moe.swiglu), in gate's memory where no gradient needs gate (`gate` is a fresh
    product its caller owns): an expert allocates no second hidden-sized tensor.  bf16 on a CPU: one C pass
    (cpu_gemv.swiglu, as the "torch" backend's ops.swiglu); else torch's two kernels in place, bitwise.
    gate, up: (..., hidden_dim) -> (..., hidden_dim)"""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return F.silu(gate) * up
    if cpu_gemv.swiglu_applies(gate, up) and cpu_gemv.library() is not None:
        return cpu_gemv.swiglu(gate, up, in_place=True, checked=True)
    return F.silu(gate, inplace=True).mul_(up)


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert: w2(silu(w1 x) * w3 x) with the fast CPU products.  x: (n, dim) -> (n, dim)"""
    return linear(swiglu_in_place(linear(x, w1), linear(x, w3)), w2)


def moe_one_token(
    x: torch.Tensor, gate_weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """moe.moe_forward for a single token with the experts stacked: what a compiled decode step runs.
    Mixtral's router (moe.route), then :func:`mix_one_token`."""
    weights, experts, logits = route(x, gate_weight, top_k)  # (1, k), (1, k), (1, E)
    return mix_one_token(x, weights, experts, w1, w2, w3), logits


def mix_one_token(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w1: torch.Tensor,
                  w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """moe.mix_experts for a single token with the experts stacked (any router's weights (1, k), experts (1, k)).

    x: (1, dim); w1, w3: (E, hidden, dim); w2: (E, dim, hidden) — the stacks of :func:`stack_experts`.
    The chosen experts are indexed with a tensor, not a Python int, so torch.compile traces the whole step as one
    graph; written as multiply-and-sum (not einsum, which would copy the gathered matrices into a bmm), inductor
    turns each product into one loop that reads only the k chosen experts' rows.  fp32 accumulation; result in
    x's dtype (fp32: equal to the reference within 1e-6; summed over the k slots, not in expert order).
    """
    chosen = experts[0]  # (k,)
    xf = x.float()  # (1, dim)
    gate = (w1[chosen].float() * xf).sum(-1)  # (k, hidden)
    up = (w3[chosen].float() * xf).sum(-1)  # (k, hidden)
    hidden = (F.silu(gate) * up).to(x.dtype).float()  # rounded like the reference's activations
    y = (w2[chosen].float() * hidden[:, None, :]).sum(-1)  # (k, dim)
    out = (y.to(x.dtype).float() * weights[0, :, None].float()).sum(0, keepdim=True)  # (1, dim)
    return out.to(x.dtype)


def gemv_experts_apply(x: torch.Tensor, w1: torch.Tensor | Sequence[torch.Tensor] | QuantizedExperts) -> bool:
    """The C kernels take this token's expert products (cpu_gemv.experts_swiglu, experts_moe): stacked bf16 or
    fp32 experts (x in their dtype), or stacked quantized ones, on a CPU."""
    if isinstance(w1, torch.Tensor):
        return x.device.type == "cpu" and x.dtype == w1.dtype in (torch.bfloat16, torch.float32) and w1.dim() == 3
    return cpu_gemv.quantized_experts(x, w1)


def mix_one_token_gemv(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                       w1: torch.Tensor | QuantizedExperts, w2: torch.Tensor | QuantizedExperts,
                       w3: torch.Tensor | QuantizedExperts, threads: int) -> torch.Tensor:
    """mix_one_token with the C kernels (backends/cpu_gemv.py) for bf16 or fp32 stacked experts (E, out, in) or
    stacked quantized ones (QuantizedExperts): one operator call (cpu_gemv.experts_swiglu) for the layer, whose products
    read only the k chosen experts' weights.  Rounded like the reference's products: gate, up, the hidden
    activations and each expert's output in x's dtype; summed over the k slots in fp32."""
    return cpu_gemv.experts_swiglu(x, w1, w3, w2, experts[0], weights[0].float(), threads)  # (1, dim)


def stack_experts(layer: nn.Module) -> None:
    """Move a MoeLayer's (or FineMoeLayer's routed) expert weights into three stacked tensors, w1/w3 (E, hidden,
    dim) and w2 (E, dim, hidden), kept as ``layer.stacked``, and make every expert's parameter a view of its slice:
    one copy at call time, no extra memory after; state dict names and values unchanged.

    Quantized experts (mistral_ref/quantize.py) are stacked the same way into three QuantizedExperts (stacked
    codes and scales; each QuantizedWeight's buffers become views).  Converting or moving the layer afterwards
    (.to, .float, ...) drops the stacks (MoeLayer._apply).  Experts of different shapes (an expert-parallel rank,
    whose remote experts are empty placeholders) are left as they are.
    """
    layer.stacked = None
    experts = layer.experts
    if any(not isinstance(e.w1.weight, torch.Tensor) for e in experts):  # quantized
        kinds = [[getattr(e, name).weight for e in experts] for name in ("w1", "w2", "w3")]
        if all(QuantizedExperts.stackable(ws) for ws in kinds):
            layer.stacked = tuple(QuantizedExperts(ws) for ws in kinds)
        return
    if any(len({getattr(e, name).weight.shape for e in experts}) > 1 for name in ("w1", "w2", "w3")):
        return
    stacks = []
    for name in ("w1", "w2", "w3"):
        linears = [getattr(e, name) for e in experts]
        stacked = torch.stack([lin.weight.detach() for lin in linears])  # (E, out, in)
        for lin, w in zip(linears, stacked):
            lin.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
        stacks.append(stacked)
    layer.stacked = tuple(stacks)


def stack_all_experts(model: nn.Module) -> None:
    """stack_experts on every MoE layer of a model (those with stacks already keep them)."""
    for module in model.modules():
        if hasattr(module, "experts") and hasattr(module, "stacked") and module.stacked is None:
            stack_experts(module)
