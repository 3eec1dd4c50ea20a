"""Rotary position embeddings (RoPE, Su et al. 2021) in the layout of native Mistral checkpoints.

Each head vector of width head_dim is read as head_dim/2 pairs (x[2i], x[2i+1]) — a complex number x[2i] + i x[2i+1]
— and pair i is rotated by the angle  position * theta ** (-2i / head_dim).  Native checkpoints ("consolidated")
rotate these *interleaved* pairs; Hugging Face checkpoints rotate the two *halves* (x[i], x[i + head_dim/2]) instead,
which is why q_proj / k_proj rows are permuted when converting (see checkpoint/names.py).  All angle math runs in fp32.
"""

from __future__ import annotations

import torch


def rope_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """Angular frequency of each pair: theta ** (-2i / head_dim), i = 0 .. head_dim/2 - 1.  (head_dim/2,) fp32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta**exponents)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every (position, pair) angle.

    positions: (B, T) integer token positions (negative = padding, treated as 0).
    returns cos, sin: (B, T, head_dim/2) fp32.
    """
    inv_freq = rope_frequencies(head_dim, theta).to(positions.device)  # (D/2,)
    angles = positions.clamp(min=0).float()[..., None] * inv_freq  # (B, T, D/2) radians
    return angles.cos(), angles.sin()


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of every head: (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos).

    x: (B, T, H, D); cos, sin: (B, T, D/2).  Computed in fp32, returned in x's dtype.
    """
    x_pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    x0, x1 = x_pairs[..., 0], x_pairs[..., 1]  # (B, T, H, D/2) each
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (B, T, H, D/2, 2)
    return rotated.flatten(-2).type_as(x)


def apply_rotary_emb_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The Hugging Face layout, for comparison: pair i is (x[i], x[i + D/2]) ("rotate_half").

    Equal to :func:`apply_rotary_emb` after permuting the head's features (checkpoint.permute_to_hf).
    x: (B, T, H, D); cos, sin: (B, T, D/2).
    """
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, T, H, D/2) each
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)
