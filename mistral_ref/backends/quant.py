"""Products with quantized weights (mistral_ref/quantize.py) on PyTorch's CPU weight-only kernels.

Equals: F.linear(x, weight.dequantize()) (backend "reference"), tested in tests/test_quant.py.
(Decode-sized products go to the C kernels of backends/cpu_gemv.py first, where they can be built: see linear.py.)
* int8 (per output channel): torch.ops.aten._weight_int8pack_mm(x, qweight, scales), which reads the int8
  weight and applies each row's scale to the dot product.
* int4 (groups of 32..256 inputs): torch.ops.aten._weight_int4pack_mm_for_cpu(x, qweight, group_size,
  scales_and_zeros), which reads two codes a byte and computes (q - 8) * scale + zero as it streams.
Both want x and the scales in the same dtype (bf16, fp16 or fp32) and accumulate in fp32.

When each is used, measured on an AVX2 EPYC without bf16 instructions (torch 2.13, one thread, a 3072 x 768
weight, a shared machine: ratios, not times):
* bf16 / fp16, fewer than DEQUANTIZE_MIN_ROWS rows (decode): the kernels, ~2x faster than the dense bf16 product
  at 1-16 rows (the product is bound by reading the weight: 1/2 or 1/4 of bf16's bytes);
* bf16 / fp16 from DEQUANTIZE_MIN_ROWS rows (prefill): the kernels' cost grows with the rows (1.4-1.5x the dense
  product at 64 rows, 1.5x at 256), so the weight is dequantized to fp32 block by block (8 MB at a time,
  :func:`dequantize_rows`) and multiplied with the `dense` fp32 product: ~1x the dense product;
* fp32: the kernels have no fast fp32 path (int8 6x, int4 30x slower than the dense fp32 product at one row), so
  fp32 products always dequantize.  Quantized models are meant to compute in bf16 (or fp16).
* int4 where torch's kernel reads another layout than quantize.pack_int4's (:func:`torch_int4_layout_matches`:
  torch packs for the CPU it runs on, and on an AVX-512 CPU its blocks differ from the AVX2 layout this project
  stores and its C kernels read): always dequantize, since the kernel would read our bytes as other rows.
* int8 with in_features not a multiple of INT8_KERNEL_IN: always dequantize.  torch 2.13's
  _weight_int8pack_mm returns wrong values for one row and crashes the process (SIGSEGV) for more on an AVX-512
  / AMX Xeon when in_features % 16 != 0 (8, 24, 40, ... 130; found with Mistral Small 4's tiny test shapes,
  tests/test_quant.py); int8 is per output channel, so any width is a valid weight.
Off the CPU the weight is dequantized whole (the kernels here are CPU kernels).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mistral_ref.quantize import QuantizedWeight, pack_int4

DEQUANTIZE_MIN_ROWS = 64  # bf16 / fp16 products of this many rows or more dequantize (see the module docstring)
INT8_KERNEL_IN = 16  # torch's int8 kernel takes in_features that are multiples of this (module docstring)
_BLOCK_ELEMENTS = 2 << 20  # dequantize <= 8 MB of fp32 weight at once


def quantized_linear(x: torch.Tensor, weight: QuantizedWeight,
                     dense: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear) -> torch.Tensor:
    """x @ weight.dequantize().T.  x: (..., in) in weight.dtype -> (..., out) in x's dtype.

    dense: the fp32 product of the dequantizing path, dense(x, w) = x @ w.T (backends/linear.py passes its
    split_linear)."""
    out_features, in_features = weight.shape
    rows = x.numel() // max(1, in_features)
    if x.device.type != "cpu":
        return F.linear(x, weight.dequantize())
    if x.dtype != weight.dtype:
        raise RuntimeError(f"quantized linear: input dtype {x.dtype} does not match the weight's {weight.dtype}")
    if (x.dtype == torch.float32 or rows >= DEQUANTIZE_MIN_ROWS
            or (weight.scheme == "int4" and not torch_int4_layout_matches())
            or (weight.scheme == "int8" and in_features % INT8_KERNEL_IN)):
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


_int4_layout_matches: bool | None = None


def torch_int4_layout_matches() -> bool:
    """Whether torch's int4 CPU kernel reads the layout of quantize.pack_int4 on this CPU: torch's own packing of
    one small weight compared with pack_int4's, once per process."""
    global _int4_layout_matches
    if _int4_layout_matches is None:
        codes = torch.randint(0, 16, (64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
        theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        _int4_layout_matches = theirs.shape == (64, 32) and torch.equal(pack_int4(codes), theirs)
    return _int4_layout_matches


def dequantize_rows(weight: QuantizedWeight, start: int, stop: int) -> torch.Tensor:
    """Rows start..stop of weight.dequantize() in fp32, not rounded to the compute dtype (as in the kernels);
    for int4, start is a multiple of 32 (pack_int4 stores rows in blocks of 32).

    The same formula as QuantizedWeight.dequantize, in fewer passes over memory: int8 multiplies the codes by
    their scales in one pass; int4 writes the low and high nibbles of each 32-row block into a transposed
    (in, rows) buffer, then applies scale and zero in place, broadcasting them over each group (no copies).
    Returns (stop - start, in), a transposed view of that buffer for int4."""
    if weight.scheme == "int8":
        return torch.mul(weight.qweight[start:stop], weight.scales[start:stop, None].float())
    stop = min(stop, weight.shape[0])
    n, inp, group = stop - start, weight.shape[1], weight.group_size
    if n % 32:  # a last block of 16 rows: the plain formula
        part = QuantizedWeight("int4", weight.qweight[start:stop], weight.scales_and_zeros[:, start:stop], group)
        return part.dequantize(torch.float32)
    packed = weight.qweight[start:stop].reshape(n // 32, inp, 16).permute(1, 0, 2)  # (in, blocks, 16) bytes
    wt = torch.empty(inp, n // 32, 32)  # (in, blocks, 32): row b * 32 + j of the weight is wt[:, b, j]
    wt[..., :16] = packed & 15  # rows 0..15 of each block
    wt[..., 16:] = packed >> 4  # rows 16..31
    sz = weight.scales_and_zeros[:, start:stop].float()  # (groups, n, 2)
    grouped = wt.view(inp // group, group, n)  # (groups, G, n)
    grouped.sub_(8).mul_(sz[:, None, :, 0]).add_(sz[:, None, :, 1])
    return wt.view(inp, n).t()
