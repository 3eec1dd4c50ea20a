"""backends/rope.py: RoPE as one complex product equals rope.apply_rotary_emb (fp32 within 1e-6, bf16 bitwise), with
plain RoPE and with YaRN (whose table also scales the magnitude)."""

from __future__ import annotations

import torch
from conftest import rel_err

from mistral_ref.backends.rope import apply_rotary_emb_complex, rope_rotations
from mistral_ref.config import YarnArgs
from mistral_ref.rope import apply_rotary_emb, rope_angles


def ragged_positions(B: int, T: int) -> torch.Tensor:
    pos = torch.arange(T).repeat(B, 1) - 3 * torch.arange(B)[:, None]
    return pos.masked_fill(pos < 0, -1)


def test_complex_rope_equals_reference():
    pos = ragged_positions(2, 9) + 1000
    x = torch.randn(2, 9, 5, 24)  # head_dim 24: not a power of two
    cos, sin = rope_angles(pos, 24, 1e6)
    rot = rope_rotations(pos, 24, 1e6)
    assert rot.shape == (2, 9, 12) and rot.dtype == torch.complex64
    assert rel_err(apply_rotary_emb_complex(x, rot), apply_rotary_emb(x, cos, sin)) < 1e-6
    xb = x.bfloat16()
    out = apply_rotary_emb_complex(xb, rot)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, apply_rotary_emb(xb, cos, sin))  # same fp32 arithmetic, same rounding


def test_complex_rope_with_yarn_equals_reference():
    pos = ragged_positions(2, 9) + 300
    x = torch.randn(2, 9, 3, 32)
    yarn = YarnArgs(factor=8.0, original_max_position_embeddings=16, beta=1.0, alpha=0.1)  # scaled by 1.208
    cos, sin = rope_angles(pos, 32, 1e4, yarn)
    rot = rope_rotations(pos, 32, 1e4, yarn)
    assert torch.allclose(rot.abs(), torch.full(rot.shape, yarn.attention_scaling))
    assert rel_err(apply_rotary_emb_complex(x, rot), apply_rotary_emb(x, cos, sin)) < 1e-6
    plain = apply_rotary_emb(x, *rope_angles(pos, 32, 1e4))
    assert rel_err(apply_rotary_emb(x, cos, sin), plain) > 0.1  # YaRN changes the rotation
