"""SwiGLU feed-forward and the sparse mixture of experts of Mixtral (Jiang et al. 2024, "Mixtral of Experts").

A router (`gate`, a dim -> num_experts linear map) scores every expert for every token; each token visits its
top-k experts and mixes their outputs with weights softmax(top-k scores).  :func:`moe_forward` is the reference
math; the layer calls it through `ops.moe`, which the other backends replace with faster equal functions
(mistral_ref/backends/moe.py sorts the work by expert; triton_kernels.moe.moe_forward runs grouped GEMMs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mistral_ref.config import ModelArgs

if TYPE_CHECKING:  # typing only
    from mistral_ref.backends import Backend


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x).  w1 is the gate projection, w3 the up projection, w2 the down projection."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor, ops: Backend) -> torch.Tensor:
        """x: (..., dim) -> (..., dim); ops: the backend's functions (ops.linear is x @ weight.T, ops.linears
        several products of x)."""
        return ops.linear(self.hidden(x, ops), self.w2.weight)

    def hidden(self, x: torch.Tensor, ops: Backend) -> torch.Tensor:
        """forward before w2: silu(w1 x) * w3 x, (..., dim) -> (..., hidden_dim)."""
        gate, up = ops.linears(x, (self.w1.weight, self.w3.weight))  # (..., hidden_dim) each
        return ops.swiglu(gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's hidden activations, silu(gate) * up, where silu(g) = g * sigmoid(g).  (..., hidden) -> (..., hidden)"""
    return F.silu(gate) * up


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


Weights = Sequence[torch.Tensor] | torch.Tensor  # E tensors, or one stacked (E, ...) tensor


def moe_forward(x: torch.Tensor, gate_weight: torch.Tensor, w1: Weights, w2: Weights, w3: Weights,
                top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference sparse MoE: loop over experts, each processing the tokens routed to it.

    x: (N, dim); gate_weight: (E, dim); w1[e], w3[e]: (hidden, dim); w2[e]: (dim, hidden) — a list of E tensors or
    a stacked (E, ...) tensor.  returns out (N, dim) in x's dtype and router logits (N, E) fp32.
    """
    weights, experts, logits = route(x, gate_weight, top_k)
    return mix_experts(x, weights, experts, w1, w2, w3), logits


class ExpertWeights(Sequence):
    """The E weights named `name` ("w1", "w2" or "w3") of a layer's unstacked experts, each looked up when indexed
    (MoeLayer and FineMoeLayer hand these to `ops.moe`: a decode step looks up its k experts, not all E)."""

    def __init__(self, experts: nn.ModuleList, name: str):
        self.experts, self.name = experts, name

    def __len__(self) -> int:
        return len(self.experts)

    def __getitem__(self, e):  # type: ignore[override]
        if isinstance(e, slice):
            return [self[i] for i in range(*e.indices(len(self)))]
        return getattr(self.experts[e], self.name).weight  # (hidden, dim) for w1, w3; (dim, hidden) for w2


def mix_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w1: Weights, w2: Weights,
                w3: Weights) -> torch.Tensor:
    """The routed experts' weighted sum, an expert at a time.  x: (N, dim); weights (N, k) fp32 and experts (N, k)
    from a router; w1[e], w3[e]: (hidden, dim); w2[e]: (dim, hidden).  returns (N, dim) in x's dtype."""
    out = torch.zeros_like(x)
    for e in range(len(w1)):
        token_idx, slot = torch.where(experts == e)  # tokens that chose expert e, and in which of their k slots
        if token_idx.numel() == 0:
            continue
        xe = x[token_idx]  # (n_e, dim)
        ye = F.linear(swiglu(F.linear(xe, w1[e]), F.linear(xe, w3[e])), w2[e])  # (n_e, dim)
        out.index_add_(0, token_idx, ye * weights[token_idx, slot, None].to(x.dtype))
    return out


class MoeLayer(nn.Module):
    """Mixtral's sparse feed-forward: `gate` router + `experts` (names as in the checkpoints)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        assert args.moe is not None
        self.top_k = args.moe.num_experts_per_tok
        self.gate = nn.Linear(args.dim, args.moe.num_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(args.dim, args.hidden_dim) for _ in range(args.moe.num_experts))
        # A layout, not math: a fast backend may move the experts' weights into (E, ...) tensors that their
        # parameters then view (backends/moe.py: stack_experts); moving or converting the module drops them.
        self.stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _apply(self, fn, recurse=True):
        self.stacked = None  # the experts are about to get new tensors: stacks would be stale
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor, ops: Backend) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, dim) -> (B, T, dim), and router logits (B*T, num_experts) fp32 for the auxiliary loss."""
        flat = x.reshape(-1, x.shape[-1])  # (N, dim)
        if self.stacked is not None:
            w1, w2, w3 = self.stacked  # (E, hidden, dim), (E, dim, hidden), (E, hidden, dim)
        else:  # E tensors each, looked up when indexed
            w1, w2, w3 = (ExpertWeights(self.experts, name) for name in ("w1", "w2", "w3"))
        out, logits = ops.moe(flat, self.gate.weight, w1, w2, w3, self.top_k)
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
