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

from mistral_ref.config import FineMoeArgs, ModelArgs

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
        """x: (..., dim) -> (..., dim); ops: the backend's functions (ops.linear is x @ weight.T)."""
        return ops.linear(F.silu(ops.linear(x, self.w1.weight)) * ops.linear(x, self.w3.weight), self.w2.weight)


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
        else:  # E tensors each
            w1, w2, w3 = ([getattr(e, name).weight for e in self.experts] for name in ("w1", "w2", "w3"))
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


# ---- fine-grained experts (DeepSeek-MoE; Mistral Small 4, Mistral Large 3) ----------------------------------------

def route_fine(x: torch.Tensor, gate_weight: torch.Tensor, moe: FineMoeArgs,
               bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose experts the DeepSeek way: score, keep the best groups, top-k, renormalise, scale (all fp32).

    x: (N, dim); gate_weight: (E, dim); bias: (E,) e_score_correction_bias (sigmoid scoring) or None.
      scores = softmax(logits) or sigmoid(logits)                              (N, E)
      choice = scores + bias (the bias steers which experts are chosen, never their weights)
      group score = sum of the 2 best choice scores in each of n_group groups; only the topk_group best groups'
      experts stay eligible; experts = top num_experts_per_tok eligible choice scores
      weights = their scores (/ their sum if norm_topk_prob) x routed_scaling_factor
    returns weights (N, k) fp32, experts (N, k) int64, router logits (N, E) fp32.  Every row is computed on its
    own, so a token's experts never depend on the other tokens of the batch.
    """
    logits = F.linear(x.float(), gate_weight.float())  # (N, E)
    scores = logits.softmax(-1) if moe.scoring_func == "softmax" else logits.sigmoid()
    choice = scores if bias is None else scores + bias.float()
    N, E, G = x.shape[0], moe.num_experts, moe.n_group
    group_scores = choice.view(N, G, E // G).topk(min(2, E // G), dim=-1).values.sum(-1)  # (N, G)
    best_groups = group_scores.topk(moe.topk_group, dim=-1).indices  # (N, topk_group)
    eligible = torch.zeros(N, G, dtype=torch.bool, device=x.device).scatter_(1, best_groups, True)
    eligible = eligible[:, :, None].expand(N, G, E // G).reshape(N, E)
    experts = choice.masked_fill(~eligible, float("-inf")).topk(moe.num_experts_per_tok, dim=-1).indices  # (N, k)
    weights = scores.gather(1, experts)  # (N, k)
    if moe.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * moe.routed_scaling_factor, experts, logits


def routed_experts_forward(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                           w1: Sequence[torch.Tensor], w2: Sequence[torch.Tensor], w3: Sequence[torch.Tensor]
                           ) -> torch.Tensor:
    """Reference mix of the routed experts: loop over experts, each SwiGLU on the tokens routed to it.

    x: (N, dim); weights (N, k) fp32 and experts (N, k) from route_fine; w1[e], w3[e]: (hidden, dim);
    w2[e]: (dim, hidden).  returns (N, dim) in x's dtype.
    """
    out = torch.zeros_like(x)
    for e in range(len(w1)):
        token_idx, slot = torch.where(experts == e)  # tokens that chose expert e, and in which of their k slots
        if token_idx.numel() == 0:
            continue
        xe = x[token_idx]  # (n_e, dim)
        ye = F.linear(F.silu(F.linear(xe, w1[e])) * F.linear(xe, w3[e]), w2[e])  # (n_e, dim)
        out.index_add_(0, token_idx, ye * weights[token_idx, slot, None].to(x.dtype))
    return out


class FineMoeLayer(nn.Module):
    """Shared expert(s) + fine-grained routed experts (Mistral Small 4, Mistral Large 3).

    out = shared_experts(x) + sum over the k chosen e of weight_e x experts[e](x).  `gate` is the router
    (`gate.weight`, and `gate.e_score_correction_bias` for sigmoid scoring), `experts` the routed SwiGLUs of width
    moe_intermediate_size, `shared_experts` one SwiGLU of width n_shared_experts x moe_intermediate_size.
    The routed mix is the reference loop (routed_experts_forward) with every backend: the Mixtral fast paths
    (ops.moe) know only softmax-over-top-k routing.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        moe = args.fine_moe
        assert moe is not None
        self.moe = moe
        self.gate = nn.Linear(args.dim, moe.num_experts, bias=False)
        if moe.scoring_func == "sigmoid":
            self.gate.register_buffer("e_score_correction_bias", torch.zeros(moe.num_experts))
        self.experts = nn.ModuleList(
            FeedForward(args.dim, moe.moe_intermediate_size) for _ in range(moe.num_experts))
        self.shared_experts = (FeedForward(args.dim, moe.moe_intermediate_size * moe.n_shared_experts)
                               if moe.n_shared_experts else None)

    def forward(self, x: torch.Tensor, ops: Backend) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, dim) -> (B, T, dim), and router logits (B*T, num_experts) fp32."""
        flat = x.reshape(-1, x.shape[-1])  # (N, dim)
        bias = getattr(self.gate, "e_score_correction_bias", None)
        weights, experts, logits = route_fine(flat, self.gate.weight, self.moe, bias)
        w1, w2, w3 = ([getattr(e, name).weight for e in self.experts] for name in ("w1", "w2", "w3"))
        out = routed_experts_forward(flat, weights, experts, w1, w2, w3)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat, ops)
        return out.view_as(x), logits
