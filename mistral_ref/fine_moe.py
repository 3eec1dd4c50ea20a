"""Fine-grained mixture of experts (DeepSeek-MoE; Mistral Small 4, Mistral Large 3): many small routed experts
chosen by a group-limited, renormalised router, plus shared experts every token visits.

Read after moe.py: the experts are the same SwiGLU `FeedForward`, mixed by the same function (`moe.mix_experts`,
called as ``ops.mix_experts``: the reference loop, or a backend's grouped dispatch / Triton kernel); only the router
(`route_fine`) and the shared expert differ from Mixtral's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mistral_ref.config import FineMoeArgs, ModelArgs
from mistral_ref.moe import ExpertWeights, FeedForward

if TYPE_CHECKING:  # typing only
    from mistral_ref.backends import Backend


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


class FineMoeLayer(nn.Module):
    """Shared expert(s) + fine-grained routed experts (Mistral Small 4, Mistral Large 3).

    out = shared_experts(x) + sum over the k chosen e of weight_e x experts[e](x).  `gate` is the router
    (`gate.weight`, and `gate.e_score_correction_bias` for sigmoid scoring), `experts` the routed SwiGLUs of width
    moe_intermediate_size, `shared_experts` one SwiGLU of width n_shared_experts x moe_intermediate_size.
    The routed mix is ``ops.mix_experts`` (moe.mix_experts or a backend's equal form), given route_fine's choice.
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
        # A layout, as MoeLayer.stacked: the routed experts' weights as (E, ...) tensors (backends/moe.py)
        self.stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _apply(self, fn, recurse=True):
        self.stacked = None  # new tensors for the experts: stacks would be stale
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor, ops: Backend) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, dim) -> (B, T, dim), and router logits (B*T, num_experts) fp32."""
        flat = x.reshape(-1, x.shape[-1])  # (N, dim)
        bias = getattr(self.gate, "e_score_correction_bias", None)
        weights, experts, logits = route_fine(flat, self.gate.weight, self.moe, bias)
        if self.stacked is not None:
            w1, w2, w3 = self.stacked  # (E, hidden, dim), (E, dim, hidden), (E, hidden, dim)
        else:  # E tensors each, looked up when indexed
            w1, w2, w3 = (ExpertWeights(self.experts, name) for name in ("w1", "w2", "w3"))
        out = ops.mix_experts(flat, weights, experts, w1, w2, w3)  # (N, dim)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat, ops)
        return out.view_as(x), logits
