"""The absorbed form of latent attention (DeepSeek-V2, appendix "MLA inference"): attend over the cached latents
directly instead of expanding every cached token into per-head keys and values.

mla.latent_attention takes k_nope = latent @ W_UK and v = latent @ W_UV for every cached token (S x H x (n + v)
numbers, recomputed at every decode step).  Since

    q_nope . k_nope = q_nope . (W_UK latent) = (W_UK^T q_nope) . latent          (per head, W_UK: (n, c))
    probs @ v       = probs @ (W_UV latent)  = W_UV (probs @ latent)              (per head, W_UV: (v, c))

the same scores and output come from folding W_UK into the query and W_UV into the output: the work per cached
token drops from H x (n + v) x c (expansion) to 2 x H x c (two dot products in latent space), which is what makes
a long-context decode step cheap.  Equal to mla.latent_attention within fp32 rounding (tests/test_mla_absorbed.py).

:func:`use_absorbed_decode` installs it on a model's latent-attention layers for decode steps (one token per row
with a cache); prefill keeps the expanded form.  It is not (yet) a part of the backend record, so set_backend does
not choose it: that would need an ``ops.latent_attention`` entry in backends/__init__.py (PARTS, Backend).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mistral_ref.attention import attention_mask


def absorbed_latent_attention(q_nope: torch.Tensor, q_rope: torch.Tensor, latents: torch.Tensor,
                              k_rope: torch.Tensor, kv_b_weight: torch.Tensor, v_head_dim: int,
                              q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """Latent attention computed in latent space.

    q_nope: (B, T, H, n); q_rope: (B, T, H, r); latents: (B, S, c) (kv_a_layernorm'd); k_rope: (B, S, r);
    kv_b_weight: (H * (n + v), c), kv_b_proj.weight; q_pos (B, T), k_pos (B, S).  returns (B, T, H, v) in
    q_nope's dtype, equal to mla.latent_attention on the expanded keys and values.
    """
    H, n = q_nope.shape[2], q_nope.shape[3]
    w = kv_b_weight.view(H, n + v_head_dim, -1)  # (H, n + v, c)
    w_uk, w_uv = w[:, :n], w[:, n:]  # (H, n, c), (H, v, c)
    q_latent = torch.einsum("bthn,hnc->bthc", q_nope, w_uk)  # the query moved into latent space
    scores = torch.einsum("bthc,bsc->bhts", q_latent, latents)  # = q_nope . k_nope
    scores = scores + torch.einsum("bthd,bsd->bhts", q_rope, k_rope)
    mask = attention_mask(q_pos, k_pos, None)[:, None]  # (B, 1, T, S)
    scores = (scores.float() * scale).masked_fill(~mask, torch.finfo(torch.float32).min)
    probs = F.softmax(scores, dim=-1).to(q_nope.dtype)  # (B, H, T, S)
    out_latent = torch.einsum("bhts,bsc->bthc", probs, latents)  # (B, T, H, c)
    return torch.einsum("bthc,hvc->bthv", out_latent, w_uv)  # (B, T, H, v)


def use_absorbed_decode(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Make every latent-attention layer of `model` decode with :func:`absorbed_latent_attention` (enabled=False
    returns to the expanded reference).  Returns the model."""
    for module in model.modules():
        if hasattr(module, "absorbed_decode"):
            module.absorbed_decode = absorbed_latent_attention if enabled else None
    return model
