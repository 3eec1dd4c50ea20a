"""Products with quantized weights (mistral_ref/quantize.py) on PyTorch's CPU weight-only kernels.

Equals: F.linear(x, weight.dequantize()) (backend "reference"), tested in tests/test_quant.py.
* int8 (per output channel): torch.ops.aten._weight_int8pack_mm(x, qweight, scales), which reads the int8
  weight and applies each row's scale to the dot product.
* int4 (groups of 32..256 inputs): torch.ops.aten._weight_int4pack_mm_for_cpu(x, qweight, group_size,
  scales_and_zeros), which reads two codes a byte and computes (q - 8) * scale + zero as it streams.
Both want x and the scales in the same dtype (bf16, fp16 or fp32) and accumulate in fp32.

Measured on an AVX2 EPYC without bf16 instructions (torch 2.13, one thread, a 3072 x 768 weight): in bf16 the
kernels take 0.6 ms for one row where the dense bf16 product takes 1.1 ms (int8 and int4 alike: the product is
bound by reading the weight), and stay at or below the dense product up to 32 rows; in fp32 they have no fast
path at all (int8 6x, int4 30x slower than the dense fp32 product at one row, 13-70x at 32 rows).  So fp32
products dequantize the weight block by block (8 MB of fp32 at a time) and multiply in fp32 with the `dense`
product; quantized models are meant to compute in bf16 (or fp16).  Off the CPU the weight is dequantized whole
(the kernels here are CPU kernels).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mistral_ref.quantize import QuantizedWeight

_BLOCK_ELEMENTS = 2 << 20  # dequantize <= 8 MB of fp32 weight at once


def quantized_linear(x: torch.Tensor, weight: QuantizedWeight,
                     dense: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear) -> torch.Tensor:
    """x @ weight.dequantize().T.  x: (..., in) in weight.dtype -> (..., out) in x's dtype.

    dense: the fp32 product of the dequantizing path (backends/linear.py passes its split_linear)."""
    out_features, in_features = weight.shape
    rows = x.numel() // max(1, in_features)
    if x.device.type != "cpu":
        return F.linear(x, weight.dequantize())
    if x.dtype != weight.dtype:
        raise RuntimeError(f"quantized linear: input dtype {x.dtype} does not match the weight's {weight.dtype}")
    if x.dtype == torch.float32:
        xf = x.float()
        block = max(32, _BLOCK_ELEMENTS // in_features // 32 * 32)  # rows of weight per block (int4: 32s)
        parts = [dense(xf, dequantize_rows(weight, start, start + block))
                 for start in range(0, out_features, block)]
        return torch.cat(parts, dim=-1).to(x.dtype)
    x2 = x.reshape(rows, in_features)
    if weight.scheme == "int8":
        y = torch.ops.aten._weight_int8pack_mm(x2, weight.qweight, weight.scales)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weight.qweight, weight.group_size,
                                                       weight.scales_and_zeros)
    return y.view(*x.shape[:-1], out_features)


def dequantize_rows(weight: QuantizedWeight, start: int, stop: int) -> torch.Tensor:
    """Rows start..stop of weight.dequantize(), in fp32 and not rounded to the compute dtype (as the kernels).
    int4: start a multiple of 32 (pack_int4 stores rows in blocks of 32)."""
    if weight.scheme == "int8":
        part = QuantizedWeight("int8", weight.qweight[start:stop], weight.scales[start:stop])
    else:
        part = QuantizedWeight("int4", weight.qweight[start:stop], weight.scales_and_zeros[:, start:stop],
                               weight.group_size)
    return part.dequantize(torch.float32)
