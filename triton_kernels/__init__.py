"""Triton kernels for the hot paths of mistral_ref, each computing the same function as a PyTorch reference.

| kernel family                           | replaces (same name and arguments)           |
|-----------------------------------------|----------------------------------------------|
| flash_attention.attention               | mistral_ref.attention.attention              |
|   flash_attention.prefill_attention     |   (T > 1: chunked prefill, windows, GQA)     |
|   flash_decoding.decode_attention       |   (T == 1: split-K over the KV cache)        |
| latent_decode.latent_attention          | mistral_ref.mla.latent_attention             |
|   latent_decode.latent_decode_attention |   (T == 1: in latent space, over the latent  |
|                                         |   cache; T > 1: the "torch" form)            |
| moe.moe_forward                         | mistral_ref.moe.moe_forward                  |
| moe.mix_experts                         | mistral_ref.moe.mix_experts (fine_moe.py)    |
| norm.rms_norm                           | mistral_ref.norm.rms_norm                    |
| rope.apply_rotary_emb                   | mistral_ref.rope.apply_rotary_emb            |

The model uses them through ``Transformer.set_backend("triton")`` (or per family, e.g.
``set_backend("torch", attention="triton", moe="triton")``): this package registers the backend "triton"
(triton_kernels/backend.py) when imported, and its entry point lets mistral_ref find it without an import.  On a
machine without a CUDA GPU the kernels run on Triton's CPU interpreter (chosen in _common.py, no environment
variable changed).

Note: this package's import name, ``triton_kernels``, is also used by a directory in Triton's own repository
and by an unrelated PyPI project; tests assert that ``import triton_kernels`` resolves to this repository.
"""

from __future__ import annotations

from mistral_ref.backends import register_backend
from triton_kernels import _common  # noqa: F401  (first: chooses the interpreter before Triton is imported)
from triton_kernels.backend import BACKEND
from triton_kernels.flash_attention import attention, prefill_attention
from triton_kernels.flash_decoding import decode_attention
from triton_kernels.latent_decode import latent_attention, latent_decode_attention
from triton_kernels.moe import mix_experts, moe_align_block_size, moe_forward, moe_tiles
from triton_kernels.norm import rms_norm
from triton_kernels.rope import apply_rotary_emb

register_backend(BACKEND)

__all__ = ["attention", "prefill_attention", "decode_attention", "latent_attention", "latent_decode_attention",
           "moe_forward",
           "mix_experts", "moe_tiles", "moe_align_block_size", "rms_norm", "apply_rotary_emb"]
