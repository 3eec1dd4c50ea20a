"""Fast products x @ weight.T on a CPU: the same numbers as F.linear, faster where PyTorch's BLAS is slow.

Equals: F.linear(x, weight) (backend "reference"); tests/test_backends_linear.py checks it.
* bf16/fp16 products of at least UPCAST_MIN_ROWS rows run in fp32 where :func:`upcast_on_cpu` says the native
  product is slow (CPUs without AVX512-BF16/AMX: a bf16 GEMM ~10x slower than fp32 on an AVX2 EPYC).  Upcasting
  costs a pass over the weight: less than a slow GEMM, more than a product of 1-3 rows, which is bound by memory.
* fp32 products of fewer than SPLIT_MAX_ROWS rows (decode) go through :func:`split_linear`: where the BLAS runs a
  product of a few rows on one core (an AVX2 EPYC), splitting the weight into one block per thread uses them all;
  where it threads such products itself (an AVX-512 Xeon) the split only adds a cost, and :func:`split_pays`
  (measured once per thread count) turns it off.
* products of a few rows with a bf16 or quantized weight, and one-row fp32 products, go to the C kernels of
  backends/cpu_gemv.py (where they can be built: otherwise, and for more rows, the paths here; the fp32 split above
  then serves 2 to SPLIT_MAX_ROWS - 1 rows); :func:`linears`, several products of one input
  (q, k, v; w1, w3), is one call of those kernels;
* bf16 products of cpu_gemv.AMX_LINEAR_MIN_ROWS to AMX_LINEAR_MAX_ROWS rows (a prompt of 32-256 tokens) on a CPU
  with AMX tiles: cpu_gemv.linear_amx, instead of oneDNN's GEMM;
* quantized weights (mistral_ref/quantize.py: QuantizedWeight) go to backends/quant.py's weight-only kernels.
* :func:`multiply_sum_linear` writes a one-row product as multiply-and-sum, which inductor compiles into one loop
  that converts bf16 weights as they stream (used by compiled decoding only, backends/compiled.py).
Measured speeds are in README ("Speed on a CPU") and `make bench`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mistral_ref.backends import cpu_gemv
from mistral_ref.backends.quant import quantized_linear
from mistral_ref.quantize import QuantizedWeight

UPCAST_MIN_ROWS = 4  # see linear()
SPLIT_MAX_ROWS = 32  # see split_linear()

# CPUs without bf16/fp16 matrix instructions (AVX512-BF16, AMX) get slow reduced-precision matmuls from PyTorch.
_SLOW_CPU_MATMUL = {
    dtype for dtype, native in ((torch.bfloat16, torch.ops.mkldnn._is_mkldnn_bf16_supported),
                                (torch.float16, torch.ops.mkldnn._is_mkldnn_fp16_supported)) if not native()
}


def upcast_on_cpu(x: torch.Tensor) -> bool:
    """True if a matmul on `x` is faster in fp32 than in x's dtype: bf16/fp16 on a CPU without native support."""
    return x.device.type == "cpu" and x.dtype in _SLOW_CPU_MATMUL


def linear(x: torch.Tensor, weight: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """F.linear(x, weight) (no bias) with the CPU fast paths of the module docstring.

    x: (..., in); weight: (out, in) -> (..., out) in x's dtype.  threads: the split of split_linear (default:
    torch.get_num_threads()).  Equal to F.linear up to the rounding of the accumulation (upcast products round once).
    """
    path = route(x, weight)
    if path == "gemv":
        return cpu_gemv.gemv(x, weight, threads)
    if path == "amx":
        return cpu_gemv.linear_amx(x, weight, threads, checked=True)
    if path == "quantized":
        return quantized_linear(x, weight, functools.partial(split_linear, threads=threads))
    if path == "upcast":
        xf, block = x.float(), max(1, (2 << 20) // max(1, weight.shape[1]))  # upcast <= 8 MB of weight at once
        return torch.cat([split_linear(xf, _upcast(w), threads) for w in weight.split(block)], dim=-1).to(x.dtype)
    if path == "split":
        return split_linear(x, weight, threads)  # (F.linear itself where the split does not pay)
    return F.linear(x, weight)


def route(x: torch.Tensor, weight: object) -> str:
    """Which path of :func:`linear` takes x @ weight.T: "gemv" (bf16 / int8 / int4 weights, a few rows: the C
    kernels of cpu_gemv.py), "amx" (bf16, 32-256 rows, AMX tiles: cpu_gemv.linear_amx), "quantized" (int8 / int4
    weights, mistral_ref/quantize.py), "upcast" (bf16 / fp16 without fast products, UPCAST_MIN_ROWS rows or more),
    "split" (fp32 on a CPU, fewer than SPLIT_MAX_ROWS rows: split_linear) or "plain" (F.linear itself)."""
    if cpu_gemv.handles(x, weight):
        return "gemv"
    if cpu_gemv.linear_amx_applies(x, weight):
        return "amx"
    if isinstance(weight, QuantizedWeight):
        return "quantized"
    rows = x.numel() // max(1, x.shape[-1])
    if upcast_on_cpu(x):
        return "upcast" if rows >= UPCAST_MIN_ROWS else "plain"
    if x.dtype == torch.float32 and x.device.type == "cpu" and rows < SPLIT_MAX_ROWS:
        return "split"
    return "plain"


def linears(x: torch.Tensor, weights: Sequence[torch.Tensor], threads: int | None = None) -> tuple[torch.Tensor, ...]:
    """tuple(linear(x, w) for w in weights): one call of the C kernels for all of them where they take every
    product (cpu_gemv.gemv_many: x converted once, one call instead of several); else, where the weights lie one
    after another in one tensor (:func:`join_projections`), one product with all of them, its output split
    (views of one (..., sum of outs) tensor: a prompt's three products of wq, wk, wv as one wider GEMM); else
    one linear each."""
    if cpu_gemv.applies_many(x, weights) and cpu_gemv.library() is not None:
        return tuple(cpu_gemv.gemv_many(x, weights, threads))
    joint = joined(weights)
    if joint is not None and not (torch.is_grad_enabled() and (x.requires_grad
                                                                or any(w.requires_grad for w in weights))):
        return linear(x, joint, threads).split([w.shape[0] for w in weights], dim=-1)
    return tuple(linear(x, w, threads) for w in weights)


def joined(weights: Sequence[object]) -> torch.Tensor | None:
    """The weights (out_i, in) as one (sum of out_i, in) tensor where they lie one after another in one storage
    (:func:`join_projections` lays them out so), else None.  A view: no copy, no autograd link to the weights
    (:func:`linears` uses it only without gradients)."""
    if len(weights) < 2 or not all(isinstance(w, torch.Tensor) and w.dim() == 2 and w.is_contiguous()
                                   for w in weights):
        return None
    first = weights[0]
    at = first.data_ptr()
    for w in weights:
        if (w.data_ptr() != at or w.dtype != first.dtype or w.device != first.device or w.shape[1] != first.shape[1]
                or w.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()):
            return None
        at += w.numel() * w.element_size()
    return first.detach().as_strided((sum(w.shape[0] for w in weights), first.shape[1]), (first.shape[1], 1))


def join_projections(model: torch.nn.Module) -> torch.nn.Module:
    """Lay each attention layer's wq, wk and wv out one after another in one (q + k + v outputs, dim) tensor, the
    three parameters views of it (same names, values and memory), so that :func:`linears` multiplies a prompt by
    all three in one GEMM: a wider product runs faster than three (the key and value products are narrow: 256
    outputs in a Mistral-shaped 125M model; `make bench` times prefill with this layout).  A layer whose three
    weights differ in dtype, device or width, or are quantized, is left as it is.  Converting or moving the model
    afterwards (.to, .float, ...) gives each parameter its own tensor again: still correct, three products.
    Returns the model."""
    for module in model.modules():
        linears_ = [getattr(module, name, None) for name in ("wq", "wk", "wv")]
        if not all(isinstance(lin, torch.nn.Linear) for lin in linears_):
            continue
        ws = [lin.weight for lin in linears_]
        if (not all(type(w) is torch.nn.Parameter and w.dim() == 2 for w in ws) or joined(ws) is not None
                or len({(w.dtype, w.device, w.shape[1]) for w in ws}) > 1 or ws[0].device.type == "meta"):
            continue
        joint = torch.cat([w.detach() for w in ws])  # (q + k + v, dim)
        for lin, w, part in zip(linears_, ws, joint.split([w.shape[0] for w in ws])):
            lin.weight = torch.nn.Parameter(part, requires_grad=w.requires_grad)
    return model


def add_linear(h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """h + linear(x, weight), written into h and returned: a residual stream plus a block's last product (wo, w2).

    h: (..., out), contiguous; x: (..., in); weight: (out, in).  No autograd (h is written in place).  Where
    linear would run F.linear itself (:func:`plain_product`: a prompt's product, no C kernel, upcast or split
    taking it) the addition is inside that product, torch.addmm_ (oneDNN / the BLAS add h to the sums before
    their one rounding: in bf16 within one rounding of the separate sum, which rounds the product first); else
    h.add_(linear(x, weight)), the same numbers as h + linear(x, weight)."""
    if plain_product(x, weight) and h.is_contiguous() and h.dtype == x.dtype == weight.dtype:
        h.view(-1, h.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), weight.t())
        return h
    return h.add_(linear(x, weight, threads))


def plain_product(x: torch.Tensor, weight: object) -> bool:
    """Whether linear(x, weight) is F.linear itself here (:func:`route`): a weight tensor no other path takes."""
    return isinstance(weight, torch.Tensor) and route(x, weight) == "plain"


linear.many = linears  # type: ignore[attr-defined]  # Backend.linears: several products of one x in one call


def multiply_sum_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) written as an elementwise product summed over `in`, accumulated in fp32.

    x: (..., in); weight: (out, in) -> (..., out) in x's dtype.  Eagerly this materialises (..., out, in): only
    for compiled code, where it becomes one loop.
    """
    return (weight.float() * x.float()[..., None, :]).sum(-1).to(x.dtype)  # (..., out, in) -> (..., out)


_scratch = threading.local()  # per thread: one reused fp32 buffer for weight upcasts (see _upcast)


def _upcast(w: torch.Tensor) -> torch.Tensor:
    """w.float(), written into a reused per-thread buffer when no gradient is needed.

    A fresh multi-megabyte tensor is mapped anew by the allocator at every call, and on a VM touching its pages
    costs more than the conversion itself.  The buffer grows to the largest upcast block (8 MB).
    """
    if w.requires_grad and torch.is_grad_enabled():
        return w.float()  # differentiable (training): a plain copy
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < w.numel():
        with torch.inference_mode(False):  # a normal tensor: usable inside and outside inference mode
            buffer = _scratch.buffer = torch.empty(w.numel(), dtype=torch.float32)
    return buffer[: w.numel()].view(w.shape).copy_(w)


_split_measured: dict[int, bool] = {}  # split_pays: thread count -> does the split beat F.linear here


def split_pays(threads: int) -> bool:
    """Whether split_linear's one block of the weight per thread beats F.linear for a one-row fp32 product on this
    machine with `threads` threads: measured once per thread count (~20-50 ms: a 2048 x 2048 weight, 7 alternating
    timings of each, medians), True if the split is at least 10% faster.  Inside compiled code (where timing is
    impossible) the measured answer, or True if none: compiled_backend measures before tracing."""
    if threads <= 1:
        return False
    if torch.compiler.is_compiling():
        return _split_measured.get(threads, True)
    if threads not in _split_measured:
        import time

        with torch.inference_mode():
            weight = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(0))
            x, times = weight[:1].clone(), {"split": [], "blas": []}
            for _ in range(7):
                for name, fn in (("split", lambda: _split(x, weight, threads)), ("blas", lambda: F.linear(x, weight))):
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
        split, blas = (sorted(v)[3] for v in times.values())
        _split_measured[threads] = split <= 0.9 * blas
    return _split_measured[threads]


def _split(x: torch.Tensor, weight: torch.Tensor, parts: int) -> torch.Tensor:
    """x @ weight.T with weight viewed as `parts` blocks of rows, one bmm batch each (see split_linear)."""
    rows, (out_features, in_features) = x.numel() // max(1, x.shape[-1]), weight.shape
    blocks = weight.view(parts, out_features // parts, in_features)  # (P, out/P, in), no copy
    xs = x.reshape(1, rows, in_features).expand(parts, rows, in_features)  # (P, rows, in), no copy
    out = torch.bmm(xs, blocks.transpose(1, 2))  # (P, rows, out/P)
    return out.transpose(0, 1).reshape(*x.shape[:-1], out_features)


def split_linear(x: torch.Tensor, weight: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """fp32 F.linear(x, weight) for a few rows of x, with every thread reading its own block of the weight.

    x: (..., in); weight: (out, in) -> (..., out).  Viewing the weight as P blocks of out/P rows (P = threads,
    default torch.get_num_threads()), torch.bmm hands one block to each thread: the same dot products, in the same
    order.  Products of SPLIT_MAX_ROWS rows or more (prefill) are efficient GEMMs already, and where the BLAS
    threads few-row products itself the split does not pay (:func:`split_pays`): plain F.linear.
    """
    rows, out_features = x.numel() // max(1, x.shape[-1]), weight.shape[0]
    parts = torch.get_num_threads() if threads is None else threads  # one block per thread
    if (rows >= SPLIT_MAX_ROWS or parts == 1 or out_features % parts or not weight.is_contiguous()
            or x.device.type != "cpu" or not split_pays(parts)):
        return F.linear(x, weight)
    return _split(x, weight, parts)
