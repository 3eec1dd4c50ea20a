"""SwiGLU feed-forward and the sparse mixture of experts of Mixtral (Jiang et al. 2024, "Mixtral of Experts").

A router (`gate`, a dim -> num_experts linear map) scores every expert for every token; each token visits its
top-k experts and mixes their outputs with weights softmax(top-k scores).  The reference :func:`moe_forward` is
what the Triton dispatch kernel (triton_kernels.moe.moe_forward) replaces: same name, same arguments.
:func:`moe_forward_grouped` computes the same function with the work sorted by expert; it is what the model runs
by default (backend "torch"); backend "reference" runs :func:`moe_forward`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mistral_ref.attention import Linear, linear
from mistral_ref.config import ModelArgs


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x).  w1 is the gate projection, w3 the up projection, w2 the down projection."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = Linear(dim, hidden_dim)
        self.w2 = Linear(hidden_dim, dim)
        self.w3 = Linear(dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) -> (..., dim)"""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def route(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose experts: top-k of the router logits, then softmax over those k (all in fp32).

    x: (N, dim); gate_weight: (num_experts, dim).
    returns weights (N, k) fp32 summing to 1, experts (N, k) int64, router logits (N, num_experts) fp32.
    Equal to Hugging Face's softmax over all experts -> top-k -> renormalise (the softmax is monotone).
    Router math is fp32 so a token's choice never depends on the dtype of its neighbours' computation.
    """
    logits = F.linear(x.float(), gate_weight.float())  # (N, E)
    top_logits, experts = torch.topk(logits, top_k, dim=-1)  # (N, k)
    weights = F.softmax(top_logits, dim=-1)  # (N, k)
    return weights, experts, logits


def moe_forward(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    w1: Sequence[torch.Tensor] | torch.Tensor,
    w2: Sequence[torch.Tensor] | torch.Tensor,
    w3: Sequence[torch.Tensor] | torch.Tensor,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference sparse MoE: loop over experts, each processing the tokens routed to it.

    x: (N, dim); gate_weight: (E, dim); w1[e], w3[e]: (hidden, dim); w2[e]: (dim, hidden) — a list of E tensors or
    a stacked (E, ...) tensor.  returns out (N, dim) in x's dtype and router logits (N, E) fp32.
    """
    weights, experts, logits = route(x, gate_weight, top_k)
    out = torch.zeros_like(x)
    for e in range(len(w1)):
        token_idx, slot = torch.where(experts == e)  # tokens that chose expert e, and in which of their k slots
        if token_idx.numel() == 0:
            continue
        xe = x[token_idx]  # (n_e, dim)
        ye = F.linear(F.silu(F.linear(xe, w1[e])) * F.linear(xe, w3[e]), w2[e])  # (n_e, dim)
        out.index_add_(0, token_idx, ye * weights[token_idx, slot, None].to(x.dtype))
    return out, logits


def moe_forward_grouped(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    w1: Sequence[torch.Tensor] | torch.Tensor,
    w2: Sequence[torch.Tensor] | torch.Tensor,
    w3: Sequence[torch.Tensor] | torch.Tensor,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`moe_forward` with the work grouped by expert: same arguments, same result (fp32: within 1e-6).

    The N*k (token, expert) assignments are sorted by expert, so each expert multiplies one contiguous block of
    rows and only experts that received tokens are visited; a single token (decode at batch 1) just runs its k
    experts.  Each token's outputs are summed in increasing expert order, as in the reference.  The per-expert
    counts become Python ints: one host synchronisation per call, free on a CPU.
    """
    weights, experts, logits = route(x, gate_weight, top_k)  # (N, k), (N, k), (N, E)
    if x.shape[0] == 1:  # one token: gather its k experts, in increasing expert order like the reference
        out, w = torch.zeros_like(x), weights[0].to(x.dtype)  # (1, dim), (k,)
        for slot, e in sorted(enumerate(experts[0].tolist()), key=lambda se: se[1]):
            out += _swiglu(x, w1[e], w3[e], w2[e]) * w[slot]
        return out, logits
    flat = experts.flatten()  # (N*k,) expert of assignment token*k + slot
    order = flat.argsort(stable=True)  # (N*k,) assignments grouped by expert, tokens in order within a group
    counts = torch.bincount(flat, minlength=len(w1)).tolist()  # assignments per expert
    token = order // top_k  # (N*k,) token of each sorted assignment
    xs = x[token]  # (N*k, dim) the rows each expert must process, expert after expert
    ys = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts):
        if n:
            ys[start:start + n] = _swiglu(xs[start:start + n], w1[e], w3[e], w2[e])  # (n, dim)
            start += n
    ys *= weights.flatten()[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token, ys), logits


def _swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert: w2(silu(w1 x) * w3 x) with attention.linear.  x: (n, dim) -> (n, dim)"""
    return linear(F.silu(linear(x, w1)) * linear(x, w3), w2)


def moe_one_token(
    x: torch.Tensor, gate_weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`moe_forward` for a single token with the experts stacked: what a compiled decode step runs.

    x: (1, dim); w1, w3: (E, hidden, dim); w2: (E, dim, hidden) — the stacked tensors of MoeLayer.stack_experts.
    The chosen experts are indexed with a tensor, not a Python int, so torch.compile traces the whole step as one
    graph; written as multiply-and-sum (not einsum, which would copy the gathered matrices into a bmm), inductor
    turns each product into one loop that reads only the k chosen experts' rows.  fp32 accumulation; result in
    x's dtype (fp32: equal to the reference within 1e-6; summed over the k slots, not in expert order).
    """
    weights, experts, logits = route(x, gate_weight, top_k)  # (1, k), (1, k), (1, E)
    chosen = experts[0]  # (k,)
    xf = x.float()  # (1, dim)
    gate = (w1[chosen].float() * xf).sum(-1)  # (k, hidden)
    up = (w3[chosen].float() * xf).sum(-1)  # (k, hidden)
    hidden = (F.silu(gate) * up).to(x.dtype).float()  # rounded like the reference's activations
    y = (w2[chosen].float() * hidden[:, None, :]).sum(-1)  # (k, dim)
    out = (y.to(x.dtype).float() * weights[0, :, None]).sum(0, keepdim=True)  # (1, dim)
    return out.to(x.dtype), logits


class MoeLayer(nn.Module):
    """Mixtral's sparse feed-forward: `gate` router + `experts` (names as in the checkpoints)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        assert args.moe is not None
        self.top_k = args.moe.num_experts_per_tok
        self.gate = nn.Linear(args.dim, args.moe.num_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(args.dim, args.hidden_dim) for _ in range(args.moe.num_experts))
        # "torch": moe_forward_grouped; "reference": moe_forward; "triton": triton_kernels.moe_forward
        self.backend = "torch"
        self.stacked: dict[str, torch.Tensor] | None = None  # see stack_experts

    def stack_experts(self) -> None:
        """Move the experts' weights into three stacked tensors, w1/w3 (E, hidden, dim) and w2 (E, dim, hidden),
        and make every expert's parameter a view of its slice: one copy at call time, no extra memory after.

        A compiled decode step then gathers the chosen experts by index (:func:`moe_one_token`) instead of leaving
        the graph.  Converting or moving the module afterwards (.to, .float, ...) gives the experts new tensors
        and drops the stacks (see _apply).  Experts of different shapes (an expert-parallel rank, whose remote
        experts are empty placeholders) are left as they are: such a layer keeps the eager dispatch.
        """
        self.stacked = None
        if any(len({getattr(e, name).weight.shape for e in self.experts}) > 1 for name in ("w1", "w2", "w3")):
            return
        self.stacked = {}
        for name in ("w1", "w2", "w3"):
            linears = [getattr(e, name) for e in self.experts]
            stacked = torch.stack([lin.weight.detach() for lin in linears])  # (E, out, in)
            for lin, w in zip(linears, stacked):
                lin.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
            self.stacked[name] = stacked

    def _apply(self, fn, recurse=True):
        self.stacked = None  # the experts are about to get new tensors: the stacks would be stale
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, dim) -> (B, T, dim), and router logits (B*T, num_experts) fp32 for the auxiliary loss."""
        flat = x.reshape(-1, x.shape[-1])  # (N, dim)
        one_token = flat.shape[0] == 1 and self.stacked is not None and self.backend == "torch"
        if one_token and torch.compiler.is_compiling():  # see stack_experts
            s = self.stacked
            out, logits = moe_one_token(flat, self.gate.weight, s["w1"], s["w2"], s["w3"], self.top_k)
            return out.view_as(x), logits
        w1 = [e.w1.weight for e in self.experts]
        w2 = [e.w2.weight for e in self.experts]
        w3 = [e.w3.weight for e in self.experts]
        if self.backend == "triton":
            from triton_kernels import moe_forward as moe_impl
        else:
            moe_impl = moe_forward if self.backend == "reference" else moe_forward_grouped
            if torch.compiler.is_compiling():  # a data-dependent dispatch: run it eagerly (a graph break)
                moe_impl = torch.compiler.disable(moe_impl)
        out, logits = moe_impl(flat, self.gate.weight, w1, w2, w3, self.top_k)
        return out.view_as(x), logits


def load_balancing_loss(router_logits: Sequence[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss as transformers computes it for Mixtral (no padding mask).

    router_logits: one (N, E) tensor per MoE layer.  With all layers' tokens pooled:
      f[k, e] = fraction of tokens whose k-th choice is e;  P[e] = mean router probability of e;
      loss = E * sum_{k,e} f[k, e] * P[e].   A perfectly balanced router gives top_k.
    """
    logits = torch.cat([lg.float() for lg in router_logits], dim=0)  # (layers * N, E)
    probs = F.softmax(logits, dim=-1)
    _, chosen = torch.topk(probs, top_k, dim=-1)  # (L*N, k)
    f = F.one_hot(chosen, num_experts).float().mean(dim=0)  # (k, E)
    p = probs.mean(dim=0)  # (E,)
    return (f * p[None, :]).sum() * num_experts
