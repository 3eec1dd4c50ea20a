"""The absorbed latent attention (backends/mla.py) equals the reference (mla.latent_attention)."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from mistral_ref.backends.mla import absorbed_latent_attention
from mistral_ref.mla import latent_attention

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("T", [1, 5])
def test_absorbed_equals_expanded_keys_and_values(T):
    """Decode (T = 1) and a chunk, a ragged batch with padding and empty cache slots."""
    torch.manual_seed(0)
    B, S, H, n, r, v, c = 3, 11, 4, 6, 4, 5, 8
    q_nope, q_rope = torch.randn(B, T, H, n), torch.randn(B, T, H, r)
    latents, k_rope, w = torch.randn(B, S, c), torch.randn(B, S, r), torch.randn(H * (n + v), c)
    k_pos = torch.arange(S).expand(B, S).clone()
    k_pos[1, 7:] = -1  # empty slots
    q_pos = torch.arange(S - T, S).expand(B, T).clone()
    q_pos[1] = torch.arange(7 - T, 7)
    q_pos[2, 0] = -1  # padding
    kv = torch.einsum("bsc,oc->bso", latents, w).view(B, S, H, n + v)
    ref = latent_attention(q_nope, q_rope, kv[..., :n], k_rope, kv[..., n:], q_pos, k_pos, 0.3)
    out = absorbed_latent_attention(q_nope, q_rope, latents, k_rope, w, v, q_pos, k_pos, 0.3)
    assert out.shape == ref.shape == (B, T, H, v)
    assert rel_err(out, ref) <= 1e-5
    # it is not trivially equal: another value projection gives another answer
    assert rel_err(absorbed_latent_attention(q_nope, q_rope, latents, k_rope, w.flip(0), v, q_pos, k_pos, 0.3),
                   ref) > 1e-2
