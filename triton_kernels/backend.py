"""The "triton" backend: this package's kernels in the record mistral_ref's models compute with.

Registered when triton_kernels is imported, and advertised by the `mistral_ref.backends` entry point, so
``model.set_backend("triton")`` finds it without an import.  Each kernel equals the reference function named in
triton_kernels/__init__.py; products stay F.linear (cuBLAS on a GPU) and the cache write is the reference one.
YaRN needs no kernel change: rope.rope_angles builds the (cos, sin) table with YaRN's frequencies and factor, and
the RoPE kernel only multiplies by it; Ministral 3's query scaling is plain math in attention.Attention.forward
before the attention kernel, and interleaved windows are each layer's `window` argument.  Latent attention (Mistral
Small 4 / Large 3) decodes with the latent-space kernel of latent_decode.py and prefills with the "torch" form;
fine-grained experts go through the same MoE kernels (moe.mix_experts, given fine_moe.route_fine's choice).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mistral_ref.backends import Backend
from mistral_ref.backends.moe import stack_all_experts
from mistral_ref.backends.reference import update_cache
from mistral_ref.moe import swiglu
from mistral_ref.rope import rope_angles
from triton_kernels.flash_attention import attention
from triton_kernels.latent_decode import latent_attention
from triton_kernels.moe import mix_experts, moe_forward
from triton_kernels.norm import rms_norm
from triton_kernels.rope import apply_rotary_emb


def rotate(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The RoPE kernel with the (cos, sin) table of rope.rope_angles (YaRN included).  x: (B, T, H, D)."""
    return apply_rotary_emb(x, *cos_sin)


BACKEND = Backend(name="triton", linear=F.linear, rms_norm=rms_norm, rope_table=rope_angles, rope=rotate,
                  attention=attention, moe=moe_forward, mix_experts=mix_experts, swiglu=swiglu,
                  update_cache=update_cache, latent_attention=latent_attention,
                  prepare=(stack_all_experts,))  # the MoE kernel reads the model's stacked experts, no copy
