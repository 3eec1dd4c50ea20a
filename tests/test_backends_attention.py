"""backends/sdpa.py: attention through F.scaled_dot_product_attention equals attention.attention (fp32 within
1e-5 relative; bf16 close), with GQA, windows shorter than the keys, ragged batches and fully masked rows."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from mistral_ref.attention import attention, attention_mask
from mistral_ref.backends.sdpa import causal_prompt, sdpa_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def ragged_positions(B: int, T: int) -> torch.Tensor:
    """Row b starts 3*b positions later, its first 3*b slots are padding (-1): some rows see no key at all."""
    pos = torch.arange(T).repeat(B, 1) - 3 * torch.arange(B)[:, None]
    return pos.masked_fill(pos < 0, -1)


@pytest.mark.parametrize("window", [None, 1, 4])
@pytest.mark.parametrize("T", [1, 7])
def test_sdpa_attention_equals_reference(window, T):
    """GQA (6 query heads over 2 kv heads), a window shorter than the keys, padded rows whose queries see no key:
    the reference gives those a uniform average of the values, and so must the fast path."""
    g = torch.Generator().manual_seed(T)
    B, S, H, K, D = 3, 11, 6, 2, 16
    q, k, v = (torch.randn(B, n, h, D, generator=g) for n, h in ((T, H), (S, K), (S, K)))
    k_pos = ragged_positions(B, S)
    q_pos = k_pos[:, -T:].clone()
    q_pos[2] = -1  # a whole row of padding queries
    assert not attention_mask(q_pos, k_pos, window)[2].any()
    ref = attention(q, k, v, q_pos, k_pos, window)
    out = sdpa_attention(q, k, v, q_pos, k_pos, window)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < 1e-5
    torch.testing.assert_close(out[2], v.mean(dim=1, keepdim=True).repeat_interleave(H // K, 2)[2].expand(T, H, D))
    ref16 = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), q_pos, k_pos, window)
    out16 = sdpa_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), q_pos, k_pos, window)
    assert out16.dtype == torch.bfloat16
    assert rel_err(out16, ref) < 3e-2 and rel_err(ref16, ref) < 3e-2


@pytest.mark.parametrize("case", ["no_cache", "empty_full_cache", "empty_rolling_cache", "second_chunk",
                                  "padded", "window_shorter"])
def test_sdpa_causal_mode_only_where_the_mask_is_plain_causal(case):
    """A prompt attending only to itself runs SDPA's is_causal (no mask); anything else keeps the mask.  Both
    equal the reference."""
    g = torch.Generator().manual_seed(7)
    B, T, H, K, D = 2, 6, 4, 2, 8
    q_pos = torch.arange(T).repeat(B, 1) + torch.tensor([[0], [3]])  # rows at different offsets
    window, start = None, None
    if case == "no_cache":
        k_pos, start = q_pos, 0
    elif case == "empty_full_cache":  # slots 0..T-1 written, the rest empty
        k_pos, start = torch.cat([q_pos, torch.full((B, 5), -1)], 1), 0
    elif case == "empty_rolling_cache":  # an empty buffer of W slots, then the chunk
        window = 8
        k_pos, start = torch.cat([torch.full((B, window), -1), q_pos], 1), window
    elif case == "second_chunk":  # earlier keys are visible: needs the mask
        k_pos = torch.cat([q_pos - T, q_pos], 1)
    elif case == "padded":
        q_pos = q_pos.clone()
        q_pos[1, :2] = -1
        k_pos = q_pos
    else:  # a window shorter than the prompt
        window, k_pos = 3, q_pos
    assert causal_prompt(q_pos, k_pos, window) == start
    S = k_pos.shape[1]
    q, k, v = (torch.randn(B, n, h, D, generator=g) for n, h in ((T, H), (S, K), (S, K)))
    assert rel_err(sdpa_attention(q, k, v, q_pos, k_pos, window), attention(q, k, v, q_pos, k_pos, window)) < 1e-5
