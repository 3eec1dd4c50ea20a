"""Rotary position embeddings (RoPE, Su et al. 2021) in the layout of native Mistral checkpoints, and YaRN.

Each head vector of width head_dim is read as head_dim/2 pairs (x[2i], x[2i+1]) — a complex number x[2i] + i x[2i+1]
— and pair i is rotated by the angle  position * theta ** (-2i / head_dim).  Native checkpoints ("consolidated")
rotate these *interleaved* pairs; Hugging Face checkpoints rotate the two *halves* (x[i], x[i + head_dim/2]) instead,
which is why q_proj / k_proj rows are permuted when converting (see checkpoint/names.py).  All angle math runs in fp32.

YaRN (Peng et al. 2023; Ministral 3, Devstral Small 2) stretches a context trained with `original` positions
`factor` times: pairs that turn many times within the original context (high frequencies, small i) keep their
frequency; pairs that turn less than once are slowed down `factor` times, so positions up to factor * original
look like positions the model has seen; a linear ramp blends the pairs between.  It may also multiply cos and sin
by 0.1 * ln(factor) + 1 (config.YarnArgs.attention_scaling), which sharpens attention.
"""

from __future__ import annotations

import math

import torch

from mistral_ref.config import YarnArgs


def rope_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """Angular frequency of each pair: theta ** (-2i / head_dim), i = 0 .. head_dim/2 - 1.  (head_dim/2,) fp32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta**exponents)


def yarn_correction_range(head_dim: int, theta: float, yarn: YarnArgs) -> tuple[int, int]:
    """The pairs (low, high) between which YaRN blends: pairs below `low` keep their trained frequency, pairs
    above `high` are slowed down `factor` times.

    Pair i turns original / (2 pi / freq_i) times within the original context; solving "turns = beta" (and
    "= alpha") for i gives low (and high), rounded outwards and clamped to 0 .. head_dim - 1 (transformers'
    truncate=True).
    """
    original = yarn.original_max_position_embeddings

    def pair_turning(turns: float) -> float:  # the (fractional) pair index that turns `turns` times
        return head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    return max(math.floor(pair_turning(yarn.beta)), 0), min(math.ceil(pair_turning(yarn.alpha)), head_dim - 1)


def yarn_frequencies(head_dim: int, theta: float, yarn: YarnArgs) -> torch.Tensor:
    """YaRN's frequency of each pair: a blend of the trained frequency and that frequency / factor.

    returns (head_dim/2,) fp32: theta ** (-2i / head_dim) for i < low, the same / factor for i > high, a linear
    blend between (yarn_correction_range).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    period = theta**exponents  # (D/2,)  1 / frequency: each pair's wavelength / 2 pi, in positions
    trained = 1.0 / period  # rope_frequencies: kept for fast-turning pairs ("extrapolation")
    stretched = 1.0 / (yarn.factor * period)  # slowed down factor times ("interpolation")
    low, high = yarn_correction_range(head_dim, theta, yarn)
    if low == high:
        high += 0.001  # (transformers' guard against a zero-width ramp)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # 0 .. 1
    keep = 1 - ramp  # weight of the trained frequency: 1 below low, 0 above high
    return stretched * (1 - keep) + trained * keep


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float, yarn: YarnArgs | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every (position, pair) angle.

    positions: (B, T) integer token positions (negative = padding, treated as 0); yarn: YaRN scaling or None.
    returns cos, sin: (B, T, head_dim/2) fp32 — with YaRN, both multiplied by yarn.attention_scaling.
    """
    if yarn is None:
        inv_freq = rope_frequencies(head_dim, theta)
    else:
        inv_freq = yarn_frequencies(head_dim, theta, yarn)
    angles = positions.clamp(min=0).float()[..., None] * inv_freq.to(positions.device)  # (B, T, D/2) radians
    if yarn is None:
        return angles.cos(), angles.sin()
    scale = yarn.attention_scaling
    return angles.cos() * scale, angles.sin() * scale


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
