"""RMSNorm (Zhang & Sennrich 2019): the normalisation before attention, before the feed-forward and before the
output projection of every Mistral model."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # typing only
    from mistral_ref.backends import Backend


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, normalised in fp32 and cast back before the weight multiplies.

    x: (..., dim); weight: (dim,) -> (..., dim)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.type_as(x)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learnt scale (`weight`, initialised to ones)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, ops: Backend) -> torch.Tensor:
        """x: (..., dim) -> (..., dim)"""
        return ops.rms_norm(x, self.weight, self.eps)
