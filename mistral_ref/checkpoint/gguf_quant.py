"""GGUF tensors onto mistral-ref's weight-only kernels: what `load_model(x.gguf, quantize=...)` reads.

llama.cpp's Q4_0 block is 32 weights stored as one fp16 scale d and 32 4-bit codes q (0..15), meaning
w = (q - 8) * d: exactly int4 in groups of 32 (mistral_ref/quantize.py: w = (q - 8) * scale + zero) with
scale = d and zero = 0.  So with quantize="int4" and group_size 32 a Q4_0 tensor is repacked, not requantized:
its codes are the file's codes, its weights the file's weights (exactly in fp32 or fp16; a bf16 model rounds d
to bf16's 8 bits).

Q8_0 (32 int8 codes and one fp16 scale per block) has no exact counterpart here: the int8 kernel takes one scale
per output channel, and a row of Q8_0 blocks has one scale per 32 weights.  A Q8_0 tensor (like every other type)
is therefore dequantized exactly (in fp32) and then quantized with the requested scheme, a second rounding: per
channel for int8, at most half a step of the row's largest block scale.  Without `quantize`, a GGUF file loads
dequantized, as before (checkpoint/gguf.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from mistral_ref.quantize import QuantizedWeight, pack_int4, quantize_weight

Q4_0_BLOCK, Q4_0_BYTES = 32, 18  # weights per block; bytes per block: fp16 d, then 16 bytes of codes


def maps_exactly(type_name: str, scheme: str, group_size: int) -> bool:
    """True if a GGUF tensor of ggml type `type_name` becomes a QuantizedWeight without requantizing."""
    return type_name == "Q4_0" and scheme == "int4" and group_size == Q4_0_BLOCK


def q4_0_codes(data: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes (rows, cols) uint8 in 0..15 and scales d (rows, cols / 32) fp32 of Q4_0 bytes (rows, bytes).

    A block: d (fp16, 2 bytes), then 16 bytes whose low nibbles are weights 0..15 and high nibbles 16..31."""
    rows = data.shape[0]
    blocks = torch.from_numpy(np.ascontiguousarray(data)).view(rows, -1, Q4_0_BYTES)  # (rows, blocks, 18)
    d = blocks[..., :2].contiguous().view(torch.float16)[..., 0].float()  # (rows, blocks)
    qs = blocks[..., 2:]  # (rows, blocks, 16)
    codes = torch.cat([qs & 15, qs >> 4], dim=-1)  # (rows, blocks, 32): weights 0..15, then 16..31
    return codes.reshape(rows, -1), d


def gguf_quantized_weight(type_name: str, data: np.ndarray, read: Callable[[], torch.Tensor], scheme: str,
                          group_size: int, dtype: torch.dtype, name: str) -> QuantizedWeight:
    """The QuantizedWeight of one GGUF matrix: Q4_0 repacked for int4 groups of 32 (scale d, zero 0);
    anything else read dequantized (`read()`, in `dtype`) and quantized.

    data: the tensor's bytes (rows, bytes per row), a view of the file; dtype: the compute dtype (the scales')."""
    if not maps_exactly(type_name, scheme, group_size):
        return quantize_weight(read(), scheme, group_size, name)
    codes, d = q4_0_codes(data)  # (out, in), (out, in / 32)
    scales_and_zeros = torch.stack([d, torch.zeros_like(d)], dim=-1).transpose(0, 1).to(dtype).contiguous()
    return QuantizedWeight("int4", pack_int4(codes), scales_and_zeros, group_size)
