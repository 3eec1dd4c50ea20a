"""Backend "reference": the plain functions of the reference modules, nothing else.

What a student reads is what runs: F.linear for every product, norm.rms_norm, rope.rope_angles +
rope.apply_rotary_emb, attention.attention (explicit scores and mask), moe.moe_forward and moe.mix_experts (a loop
over experts), moe.swiglu, cache.LayerCache.update, mla.latent_attention (every cached latent expanded into
per-head keys and values).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mistral_ref.attention import attention
from mistral_ref.backends import Backend
from mistral_ref.cache import LayerCache
from mistral_ref.mla import latent_attention
from mistral_ref.moe import mix_experts, moe_forward, swiglu
from mistral_ref.norm import rms_norm
from mistral_ref.rope import apply_rotary_emb, rope_angles


def rotate(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """apply_rotary_emb with the (cos, sin) table of rope_angles.  x: (B, T, H, D)."""
    return apply_rotary_emb(x, *cos_sin)


def update_cache(cache: LayerCache, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
    """cache.update(k, v, positions): store this chunk's keys and values, return what attention looks at."""
    return cache.update(k, v, positions)


BACKEND = Backend(name="reference", linear=F.linear, rms_norm=rms_norm, rope_table=rope_angles, rope=rotate,
                  attention=attention, moe=moe_forward, mix_experts=mix_experts, swiglu=swiglu,
                  update_cache=update_cache,
                  latent_attention=latent_attention)
