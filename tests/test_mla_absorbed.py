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


def test_model_decodes_with_the_absorbed_path():
    """A Large-3-shaped tiny model decodes a ragged batch through its latent cache with the absorbed path: the
    logits of every step equal the expanded reference's, and greedy tokens are identical."""
    from test_mla import tiny

    from mistral_ref.backends.mla import use_absorbed_decode
    from mistral_ref.cache import KVCache
    from mistral_ref.generation import generate
    from mistral_ref.model import Transformer

    for scoring, q_lora in (("sigmoid", None), ("softmax", 12)):
        torch.manual_seed(0)
        model = Transformer(tiny(scoring, q_lora)).eval().set_backend("reference")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3)
        tokens = torch.randint(0, 50, (2, 30))
        with torch.no_grad():
            ref = model(tokens)
            use_absorbed_decode(model)
            assert all(layer.attention.absorbed_decode is not None for layer in model.layers)
            cache = KVCache(model.args, batch_size=2, max_seq_len=30)
            steps = [model(tokens[:, i:i + 1], torch.tensor([[i], [i]]), cache=cache) for i in range(30)]
        assert rel_err(torch.cat(steps, dim=1), ref) <= 1e-5
        prompts = [tokens[0, :5].tolist(), tokens[1, :13].tolist()]
        fast = [r.tokens for r in generate(model, prompts, 16, temperature=0.0, ignore_eos=True)]
        use_absorbed_decode(model, enabled=False)
        assert all(layer.attention.absorbed_decode is None for layer in model.layers)
        assert fast == [r.tokens for r in generate(model, prompts, 16, temperature=0.0, ignore_eos=True)]
