"""Fast RoPE: the rotation of rope.apply_rotary_emb as one complex multiplication.

Equals: rope.rope_angles + rope.apply_rotary_emb (backend "reference"): (x0 + i x1) * (cos + i sin) is
(x0 cos - x1 sin, x0 sin + x1 cos), the same fp32 arithmetic in one kernel instead of about ten.  With YaRN the
table holds cos and sin times yarn.attention_scaling, i.e. rotations of that length: the product scales as well.
"""

from __future__ import annotations

import torch

from mistral_ref.config import YarnArgs
from mistral_ref.rope import rope_angles


def rope_rotations(positions: torch.Tensor, head_dim: int, theta: float, yarn: YarnArgs | None = None
                   ) -> torch.Tensor:
    """e^(i * angle) for every (position, pair): the rotations of rope_angles as complex numbers (of length 1,
    or yarn.attention_scaling with YaRN).

    positions: (B, T) (negative = padding, treated as 0).  returns: (B, T, head_dim/2) complex64.
    Computed once per forward pass and shared by every layer.
    """
    cos, sin = rope_angles(positions, head_dim, theta, yarn)
    return torch.complex(cos, sin)


def apply_rotary_emb_complex(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """rope.apply_rotary_emb written as a complex product.

    x: (B, T, H, D); rotations: (B, T, D/2) complex64 from :func:`rope_rotations`.  Returned in x's dtype.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, H, D/2) complex64
    return torch.view_as_real(pairs * rotations[:, :, None, :]).flatten(-2).type_as(x)
