"""Triton kernels for the hot paths of mistral_ref, each computing the same function as a PyTorch reference.

| kernel family                        | replaces (same name and arguments)          |
|--------------------------------------|---------------------------------------------|
| flash_attention.attention            | mistral_ref.attention.attention             |
|   flash_attention.prefill_attention  |   (T > 1: chunked prefill, windows, GQA)    |
|   flash_decoding.decode_attention    |   (T == 1: split-K over the KV cache)       |
| moe.moe_forward                      | mistral_ref.moe.moe_forward                 |
| norm.rms_norm                        | mistral_ref.model.RMSNorm.forward           |
| rope.apply_rotary_emb                | mistral_ref.rope.apply_rotary_emb           |

The model uses them through ``Transformer.set_backend(attention="triton", moe="triton")``.  On a machine
without a CUDA GPU Triton can only run kernels with its numpy interpreter; importing this package then turns
it on (TRITON_INTERPRET=1, unless the variable is already set) before any kernel is defined.

Note: this package's import name, ``triton_kernels``, is also used by a directory in Triton's own repository
and by an unrelated PyPI project; tests assert that ``import triton_kernels`` resolves to this repository.
"""

from __future__ import annotations

import os

if "TRITON_INTERPRET" not in os.environ:  # must precede the @triton.jit definitions below
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

from triton_kernels.flash_attention import attention, prefill_attention  # noqa: E402
from triton_kernels.flash_decoding import decode_attention  # noqa: E402
from triton_kernels.moe import moe_align_block_size, moe_forward  # noqa: E402
from triton_kernels.norm import rms_norm  # noqa: E402
from triton_kernels.rope import apply_rotary_emb  # noqa: E402

__all__ = ["attention", "prefill_attention", "decode_attention", "moe_forward", "moe_align_block_size",
           "rms_norm", "apply_rotary_emb"]
