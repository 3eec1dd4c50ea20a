"""The C kernels of backends/cpu_gemv.py against the plain products they replace (F.linear on the dequantized
weight, computed in fp32), in every build (the native one: AVX-512 or AVX2 intrinsics; the portable loops; the AVX2
loops alone on an AVX-512 CPU), with the shapes that exercise their edges: inputs not a multiple of 32, 1-5 rows
(tiles of 4 and the rest), int4's last block of 16 rows, out not a multiple of 4 (the AVX-512 four-row tiles)."""

from __future__ import annotations

import ctypes
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from mistral_ref.attention import attention, attention_mask
from mistral_ref.backends import cpu_gemv, prompt_attention
from mistral_ref.backends import pytorch as pytorch_backend
from mistral_ref.backends.linear import linear
from mistral_ref.backends.moe import mix_one_token_gemv
from mistral_ref.moe import mix_experts
from mistral_ref.quantize import QuantizedExperts, QuantizedWeight, quantize_weight

pytestmark = pytest.mark.skipif(cpu_gemv.library() is None, reason=f"C kernels: {cpu_gemv.status()}")

BF16_RTOL = 2 ** -8  # one rounding of the result to bf16 (relative to the largest magnitude)
INT16_RTOL = 1e-4  # the integer path's rounding of each row of bf16 activations to int16 (2^-16 of its maximum)


#: The builds besides -march=native: their compiler flag and the loops they must have (cpu_gemv_isa()).
OTHER_BUILDS = {"portable": (("-DCPU_GEMV_PORTABLE",), 1), "avx2": (("-DCPU_GEMV_NO_AVX512",), 2),
                "no-prefetch": (("-DCPU_GEMV_NO_PREFETCH",), None), "no-bf16-dot": (("-DCPU_GEMV_NO_BF16",), None)}


def other_build(name: str, monkeypatch) -> None:
    """Make cpu_gemv use the build `name` of OTHER_BUILDS."""
    flags, isa = OTHER_BUILDS[name]
    lib = cpu_gemv.load(cpu_gemv.build(flags))
    assert lib.cpu_gemv_isa() == (isa or cpu_gemv.library().cpu_gemv_isa())
    monkeypatch.setattr(cpu_gemv, "_lib", lib)
    # the operators' C++ kernels hold their own (native) build: calls go to the Python functions and this _lib
    monkeypatch.setattr(cpu_gemv, "_ops_status", f"Python (testing the {name} build)")


@pytest.fixture(params=["native", "portable", "avx2"])
def build(request, monkeypatch):
    """Run a test with the -march=native build, the portable loops, and (on a CPU with AVX-512, where the native
    build has the AVX-512 loops) the AVX2 loops alone."""
    if request.param == "avx2" and cpu_gemv.library().cpu_gemv_isa() != 3:
        pytest.skip("the native build is the AVX2 one on this CPU")
    if request.param != "native":
        other_build(request.param, monkeypatch)
    return request.param


def _weight(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * 0.05


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("shape", [(48, 64), (40, 100), (16, 7), (42, 100)],
                         ids=["even", "in-remainder", "short", "out-remainder"])
def test_bf16_equals_the_fp32_product_rounded_once(build, rows, shape):
    w = _weight(*shape).bfloat16()
    x = torch.randn(rows, shape[1]).bfloat16()
    y = cpu_gemv.gemv(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, shape[0])
    assert rel_err(y, F.linear(x.float(), w.float())) <= BF16_RTOL


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("shape", [(48, 64), (40, 100), (16, 7), (42, 100)],
                         ids=["even", "in-remainder", "short", "out-remainder"])
def test_fp32_equals_the_fp32_product(build, rows, shape):
    """fp32 weights (an fp32 model's one-row decode products; the C function takes any rows) within fp32 rounding
    of the product in float64: the sums of another order than the BLAS's."""
    w = _weight(*shape)
    x = torch.randn(rows, shape[1])
    y = cpu_gemv.gemv(x, w)
    assert y.dtype == torch.float32 and y.shape == (rows, shape[0])
    assert rel_err(y, F.linear(x.double(), w.double())) <= 1e-6


@pytest.mark.parametrize("rows", [1, 3, 5])
@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("out", [64, 48], ids=["blocks", "int4-tail-16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_quantized_equals_the_dequantized_product(build, rows, scheme, group, out, dtype):
    inp = 256
    qw = quantize_weight(_weight(out, inp).to(dtype), scheme, group or 32)
    x = torch.randn(rows, inp, dtype=dtype)
    y = cpu_gemv.gemv(x, qw)
    assert y.dtype == dtype and y.shape == (rows, out)
    expected = F.linear(x.float(), qw.dequantize(torch.float32))
    assert rel_err(y, expected) <= (1e-5 if dtype == torch.float32 else BF16_RTOL + INT16_RTOL)


@pytest.mark.parametrize("out", [45, 3], ids=["tiles-and-rest", "rest-only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int8_with_rows_not_a_multiple_of_four(build, out, dtype):
    """The AVX-512 loops multiply one row of x by four weight rows at a time: the last out % 4 rows too."""
    qw = quantize_weight(_weight(out, 1100).to(dtype), "int8")
    x = torch.randn(1, 1100, dtype=dtype)
    expected = F.linear(x.float(), qw.dequantize(torch.float32))
    assert rel_err(cpu_gemv.gemv(x, qw), expected) <= (1e-5 if dtype == torch.float32 else BF16_RTOL + INT16_RTOL)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_the_integer_path_is_far_finer_than_bf16_rounding(scheme):
    """bf16 activations (the int16 path): each result is the fp32 product rounded once to bf16, so the mean
    relative error stays below bf16's half ulp (a path that lost precision would show here)."""
    qw = quantize_weight(_weight(256, 512).bfloat16(), scheme, 32)
    x = torch.randn(3, 512).bfloat16()
    y = cpu_gemv.gemv(x, qw).float()
    expected = F.linear(x.float(), qw.dequantize(torch.float32))
    relative = ((y - expected).abs() / expected.abs().clamp(min=1e-3)).mean()
    assert relative < 2 ** -9


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e-38], ids=["nan", "inf", "tiny"])
def test_activations_the_integer_path_cannot_scale_take_the_float_path(scheme, bad):
    """A row holding NaN or inf (or values whose int16 scale would underflow) is computed in fp32: non-finite
    results exactly where F.linear's are (never a finite number made up by the scaling; an inf input may give NaN
    rather than inf, as int4's group sums subtract 8 x sum(x)), the tiny row as the fp32 product."""
    qw = quantize_weight(_weight(64, 128).bfloat16(), scheme, 32)
    x = torch.randn(2, 128).bfloat16()
    x[0, 5] = bad
    if bad == 1e-38:
        x[0] = torch.full((128,), 1e-38).bfloat16()
    y = cpu_gemv.gemv(x, qw).float()
    expected = F.linear(x.float(), qw.dequantize(torch.float32))
    finite = expected[0].isfinite()
    assert torch.equal(y[0].isfinite(), finite)
    assert torch.allclose(y[0][finite], expected[0][finite], rtol=BF16_RTOL, atol=1e-40)
    assert rel_err(y[1], expected[1]) <= BF16_RTOL + INT16_RTOL


def test_leading_dimensions_are_kept():
    w = _weight(32, 64).bfloat16()
    x = torch.randn(2, 1, 64).bfloat16()  # (B, T, dim) as the layers call it
    assert cpu_gemv.gemv(x, w).shape == (2, 1, 32)


@pytest.mark.parametrize("scheme,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32), ("int8", torch.bfloat16),
                                          ("int8", torch.float32), ("int4", torch.bfloat16), ("int4", torch.float32)],
                         ids=["bf16", "fp32", "int8-bf16", "int8-fp32", "int4-bf16", "int4-fp32"])
def test_many_products_of_one_input_equal_each_product_alone(build, scheme, dtype):
    """gemv_many (q, k, v or w1, w3 in one call) gives exactly the separate products, for parts of different sizes
    (int4's 16-row tail included)."""
    shapes = [(96, 64), (32, 64), (48, 64)]
    weights = [_weight(*shape, seed=i).to(dtype) for i, shape in enumerate(shapes)]
    if scheme not in ("bf16", "fp32"):
        weights = [quantize_weight(w, scheme, 32) for w in weights]
    for rows in range(1, cpu_gemv.MAX_ROWS[scheme] if scheme in ("int4", "fp32") else 4):
        x = torch.randn(2, rows, 64, dtype=dtype)[:1]  # (1, rows, 64): leading dimensions kept
        assert cpu_gemv.applies_many(x, weights)
        together = cpu_gemv.gemv_many(x, weights, threads=2)
        assert [tuple(y.shape) for y in together] == [(1, rows, out) for out, _ in shapes]
        for y, w in zip(together, weights):
            torch.testing.assert_close(y, cpu_gemv.gemv(x, w, threads=2), rtol=0, atol=0)


@pytest.mark.parametrize("four_rows", [False, True], ids=["one-row-walk", "four-row-walk"])
def test_many_float_products_cut_anywhere_give_each_product_bitwise(build, four_rows):
    """gemv_many runs float products in one parallel region, the rows of all weights end to end cut among the
    threads: shares that begin inside a weight and in the middle of four rows give bitwise each product alone."""
    shapes = [(7, 64), (33, 64), (5, 64)]
    before = cpu_gemv.walk() == cpu_gemv.WALKS[1]
    cpu_gemv.set_walk(four_rows)
    try:
        for dtype, row_counts in ((torch.bfloat16, (1, 3)), (torch.float32, (1,))):
            weights = [_weight(*shape, seed=i).to(dtype) for i, shape in enumerate(shapes)]
            for rows in row_counts:
                x = torch.randn(rows, 64, dtype=dtype)
                alone = [cpu_gemv.gemv(x, w, threads=1) for w in weights]
                for threads in (1, 2, 3):
                    for y, expected in zip(cpu_gemv.gemv_many(x, weights, threads=threads), alone):
                        torch.testing.assert_close(y, expected, rtol=0, atol=0)
    finally:
        cpu_gemv.set_walk(before)


@pytest.mark.parametrize("four_rows", [False, True], ids=["one-row-walk", "four-row-walk"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_products_in_one_region_give_each_product_bitwise(build, scheme, four_rows):
    """Quantized products of bf16 rows run in one parallel region (quantized_products), their units (int8: output
    rows; int4: blocks of 32 rows and a last 16) end to end cut among 1-5 threads: bitwise each product computed
    alone in its own region (cpu_gemv_set_fuse(0)); likewise the chosen experts of a stack, x shared or a row each."""
    lib = cpu_gemv.library()
    shapes = [(7, 64), (33, 64), (5, 64)] if scheme == "int8" else [(48, 64), (96, 64), (16, 64)]
    weights = [quantize_weight(_weight(*shape, seed=i).bfloat16(), scheme, 32) for i, shape in enumerate(shapes)]
    experts = QuantizedExperts([quantize_weight(_weight(*shapes[0], seed=10 + e).bfloat16(), scheme, 32)
                                for e in range(4)])
    index = torch.tensor([2, 0, 3])
    before = cpu_gemv.walk() == cpu_gemv.WALKS[1]
    cpu_gemv.set_walk(four_rows)
    try:
        for rows in (1, 3):
            x = torch.randn(rows, 64).bfloat16()
            lib.cpu_gemv_set_fuse(0)
            try:
                alone = [cpu_gemv.gemv(x, w, threads=2) for w in weights]
                chosen = {r: cpu_gemv.experts_gemv(x[:r], experts, index, threads=2) for r in (1, 3) if r <= rows}
            finally:
                lib.cpu_gemv_set_fuse(1)
            for threads in (1, 2, 3, 5):
                for y, expected in zip(cpu_gemv.gemv_many(x, weights, threads=threads), alone):
                    torch.testing.assert_close(y, expected, rtol=0, atol=0)
                for r, expected in chosen.items():
                    torch.testing.assert_close(cpu_gemv.experts_gemv(x[:r], experts, index, threads=threads),
                                               expected, rtol=0, atol=0)
    finally:
        cpu_gemv.set_walk(before)


@pytest.mark.parametrize("switch", ["cpu_gemv_set_fuse", "cpu_gemv_set_scale_prefetch", "cpu_gemv_set_bf16_dot"])
def test_the_comparison_switches_change_no_result(build, switch):
    """The C switches kept for same-process comparisons give the same bits switched off: cpu_gemv_set_fuse(0) (one
    parallel region a product), cpu_gemv_set_scale_prefetch(0) (int4 scales asked for only where the walk
    prefetches: a prefetch changes no arithmetic) and cpu_gemv_set_bf16_dot(0) (vdpbf16ps's arithmetic in fp32
    fused multiply-adds); bf16 and int4 products."""
    lib = cpu_gemv.library()
    bf16 = [_weight(*shape, seed=i).bfloat16() for i, shape in enumerate([(7, 64), (33, 64), (5, 64)])]
    int4 = [quantize_weight(_weight(out, 256, seed=out).bfloat16(), "int4", 32) for out in (96, 48)]
    cases = [(torch.randn(1, 64).bfloat16(), bf16), (torch.randn(1, 256).bfloat16(), int4)]
    expected = [cpu_gemv.gemv_many(x, weights, threads=2) for x, weights in cases]
    getattr(lib, switch)(0)
    try:
        for (x, weights), before in zip(cases, expected):
            for y, e in zip(cpu_gemv.gemv_many(x, weights, threads=2), before):
                torch.testing.assert_close(y, e, rtol=0, atol=0)
    finally:
        getattr(lib, switch)(1)


def test_many_products_need_one_kernel_for_all():
    w = _weight(32, 64).bfloat16()
    x = torch.randn(1, 64).bfloat16()
    int8, int4 = quantize_weight(w, "int8"), quantize_weight(w, "int4", 32)
    assert cpu_gemv.applies_many(x, [w, w]) and cpu_gemv.applies_many(x, [int4, int4])
    assert not cpu_gemv.applies_many(x, [w, int8])
    assert not cpu_gemv.applies_many(x, [w, w.float()]) and not cpu_gemv.applies_many(x.float(), [w.float(), w])
    assert not cpu_gemv.applies_many(x, [int8, int4])
    assert not cpu_gemv.applies_many(x, [int4, quantize_weight(w, "int4", 64)])  # another group size
    assert not cpu_gemv.applies_many(x, [])
    with pytest.raises(ValueError, match="one scheme"):
        cpu_gemv.gemv_quantized_many(x, [int8.qweight, int4.qweight], [int8.scales, int4.scales_and_zeros], 32, 1)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_gemv.gemv_float_many(torch.randn(1, 65).bfloat16(), [w, w], 1)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_gemv.gemv_quantized_many(torch.randn(1, 66).bfloat16(), [int4.qweight], [int4.scales_and_zeros], 32, 1)


def test_experts_multiply_each_row_by_its_expert(build):
    stack = _weight(4 * 24, 64).view(4, 24, 64).bfloat16()  # (E, out, in)
    index = torch.tensor([3, 0])
    x = torch.randn(2, 64).bfloat16()
    y = cpu_gemv.gemv_bf16_experts(x, stack, index, threads=1)
    for s, e in enumerate(index.tolist()):
        assert rel_err(y[s], F.linear(x[s].float(), stack[e].float())) <= BF16_RTOL
    shared = cpu_gemv.gemv_bf16_experts(x[:1], stack, index, threads=1)  # one row for every expert
    assert rel_err(shared[1], F.linear(x[0].float(), stack[0].float())) <= BF16_RTOL


def test_an_expert_index_out_of_range_is_an_error_not_a_read():
    stack = _weight(2 * 16, 32).view(2, 16, 32).bfloat16()
    with pytest.raises(IndexError, match="out of range"):
        cpu_gemv.gemv_bf16_experts(torch.randn(1, 32).bfloat16(), stack, torch.tensor([0, 2]), threads=1)


def test_mix_one_token_gemv_equals_the_reference_experts():
    dim, hidden, n = 64, 96, 4
    w1, w3 = (_weight(n * hidden, dim, s).view(n, hidden, dim).bfloat16() for s in (1, 2))
    w2 = _weight(n * dim, hidden, 3).view(n, dim, hidden).bfloat16()
    x = torch.randn(1, dim).bfloat16()
    weights, experts = torch.tensor([[0.7, 0.3]]), torch.tensor([[2, 1]])
    expected = mix_experts(x, weights, experts, list(w1), list(w2), list(w3))
    got = mix_one_token_gemv(x, weights, experts, w1, w2, w3, threads=1)
    assert rel_err(got, expected) <= 2 * BF16_RTOL


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mix_one_token_gemv_with_quantized_experts(scheme, dtype):
    dim, hidden, n = 64, 96, 4
    w1, w3 = ([quantize_weight(_weight(hidden, dim, 10 * s + e).to(dtype), scheme, 32) for e in range(n)]
              for s in (1, 2))
    w2 = [quantize_weight(_weight(dim, hidden, 30 + e).to(dtype), scheme, 32) for e in range(n)]
    x = torch.randn(1, dim, dtype=dtype)
    weights, experts = torch.tensor([[0.6, 0.4]]), torch.tensor([[3, 0]])
    expected = mix_experts(x, weights, experts, w1, w2, w3)  # the reference loop on the dequantized weights
    assert not cpu_gemv.quantized_experts(x, w1)  # a list: the kernels take stacked experts
    w1, w2, w3 = (QuantizedExperts(w) for w in (w1, w2, w3))
    assert cpu_gemv.quantized_experts(x, w1) and not cpu_gemv.quantized_experts(x.to(torch.float16), w1)
    got = mix_one_token_gemv(x, weights, experts, w1, w2, w3, threads=1)
    # bf16: the reference also rounds the dequantized weights to bf16, and three products are chained
    assert rel_err(got, expected) <= (1e-5 if dtype == torch.float32 else 4 * BF16_RTOL)
    with pytest.raises(IndexError, match="out of range"):
        cpu_gemv.experts_gemv(x, w1, torch.tensor([0, 4]), threads=1)


def _stacked_experts(kind, dtype, n, dim, hidden):
    """w1, w3 (n, hidden, dim) and w2 (n, dim, hidden) stacked: bf16 tensors, or QuantizedExperts of `kind`."""
    if kind in ("bf16", "fp32"):
        w1, w3 = (_weight(n * hidden, dim, s).view(n, hidden, dim).to(dtype) for s in (1, 2))
        return w1, w3, _weight(n * dim, hidden, 3).view(n, dim, hidden).to(dtype)
    w1, w3 = (QuantizedExperts([quantize_weight(_weight(hidden, dim, 10 * s + e).to(dtype), kind, 32)
                                for e in range(n)]) for s in (1, 2))
    return w1, w3, QuantizedExperts([quantize_weight(_weight(dim, hidden, 30 + e).to(dtype), kind, 32)
                                     for e in range(n)])


def _three_products(x, weights, index, w1, w2, w3):
    """experts_swiglu as three experts_gemv calls and torch's operations between them, rounded in x's dtype as
    the reference rounds (what mix_one_token_gemv ran before the fused operator)."""
    if isinstance(w1, torch.Tensor) and w1.dtype == torch.float32:  # torch's products (experts_gemv: not fp32)
        gate, up = torch.stack([x[0] @ w1[e].T for e in index]), torch.stack([x[0] @ w3[e].T for e in index])
        h = F.silu(gate) * up
        y = torch.stack([h[s] @ w2[e].T for s, e in enumerate(index)])
    else:
        gate, up = cpu_gemv.experts_gemv(x, w1, index, 1), cpu_gemv.experts_gemv(x, w3, index, 1)
        y = cpu_gemv.experts_gemv(F.silu(gate) * up, w2, index, 1)
    return (y * weights[:, None].to(x.dtype)).float().sum(0, keepdim=True).to(x.dtype)


def _swiglu_op(kind, x, w1, w3, w2, index, weights):
    ops = torch.ops.mistral_ref
    if kind in ("bf16", "fp32"):
        return ops.swiglu_float_experts(x, w1, w3, w2, index, weights, 1)
    return ops.swiglu_quantized_experts(x, w1.qweight, w1.scales, w3.qweight, w3.scales, w2.qweight, w2.scales,
                                        index, weights, 32 if kind == "int4" else 0, 1)


def _moe_op(kind, x, gate, w1, w3, w2, top_k):
    ops = torch.ops.mistral_ref
    if kind in ("bf16", "fp32"):
        return ops.moe_float_experts(x, gate, w1, w3, w2, top_k, 1)
    return ops.moe_quantized_experts(x, gate, w1.qweight, w1.scales, w3.qweight, w3.scales, w2.qweight, w2.scales,
                                     top_k, 32 if kind == "int4" else 0, 1)


@pytest.mark.parametrize("kind,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32), ("int8", torch.bfloat16),
                                        ("int8", torch.float32), ("int4", torch.bfloat16), ("int4", torch.float32)],
                         ids=["bf16", "fp32", "int8-bf16", "int8-fp32", "int4-bf16", "int4-fp32"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_experts_swiglu_is_the_three_products(build, kind, dtype, k):
    """The fused MoE layer of one token (one C call: gate, up, SiLU, down, the weighted sum) against the three
    expert products with torch's operations between them, in every build: within fp32 rounding in fp32, and in
    bf16 mostly bitwise (the C exp and torch's may round SiLU's last bits apart, which can move a hidden activation
    by one bf16 step); its C++ kernel gives the Python function's result bitwise (the same C function)."""
    dim, n = 64, 4
    w1, w3, w2 = _stacked_experts(kind, dtype, n, dim, hidden=96)
    x = torch.randn(1, dim, generator=torch.Generator().manual_seed(k)).to(dtype)
    index, weights = torch.tensor([3, 0, 2][:k]), torch.tensor([0.5, 0.3, 0.2][:k])
    expected = _three_products(x, weights, index, w1, w2, w3)
    got = cpu_gemv.experts_swiglu(x, w1, w3, w2, index, weights, 1)
    assert got.shape == (1, dim) and got.dtype == dtype
    if dtype == torch.float32:
        assert rel_err(got, expected) <= 1e-6
    else:
        assert rel_err(got, expected) <= BF16_RTOL and (got == expected).float().mean() >= 0.9
    if build == "native" and cpu_gemv.operators(wait=True) == "C++":
        torch.testing.assert_close(_swiglu_op(kind, x, w1, w3, w2, index, weights), got, rtol=0, atol=0)
        if kind == "bf16":
            with pytest.raises(ValueError, match="one row"):
                torch.ops.mistral_ref.swiglu_float_experts(x.expand(2, dim), w1, w3, w2, index, weights, 1)
    with pytest.raises(ValueError, match="fp32"):
        cpu_gemv.experts_swiglu(x, w1, w3, w2, index, weights.double(), 1)
    with pytest.raises(IndexError, match="out of range"):
        cpu_gemv.experts_swiglu(x, w1, w3, w2, torch.tensor([n] * k), weights, 1)


def test_experts_swiglu_rounds_as_the_reference_layer():
    """In bf16 the C function rounds where the reference's torch operations round (gate, up, SiLU, the hidden
    activations, each expert's output, the fp32 sum once): with products the C loops and torch compute alike (one
    expert, weights exactly representable), a layer whose SiLU values are rounding-insensitive gives bitwise
    the reference composition on those products."""
    dim, hidden, n = 32, 32, 2
    w1, w3, w2 = _stacked_experts("bf16", torch.bfloat16, n, dim, hidden)
    x = torch.zeros(1, dim, dtype=torch.bfloat16)
    x[0, 0] = 1.0  # each product reads one weight column: the products are exact
    index, weights = torch.tensor([1]), torch.tensor([1.0])
    gate, up = w1[1, :, 0].float()[None], w3[1, :, 0].float()[None]  # (1, hidden): exact products
    h = (F.silu(gate.bfloat16()) * up.bfloat16())  # (1, hidden) bf16, rounded twice like the reference
    expected = (h.float() @ w2[1].float().T).bfloat16()
    got = cpu_gemv.experts_swiglu(x, w1, w3, w2, index, weights, 1)
    assert rel_err(got, expected) <= BF16_RTOL


@pytest.mark.parametrize("kind,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32), ("int8", torch.bfloat16),
                                        ("int4", torch.float32)], ids=["bf16", "fp32", "int8-bf16", "int4-fp32"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_experts_moe_is_the_router_then_experts_swiglu(build, kind, dtype, top_k):
    """The whole MoE layer of one token in one C call: moe.route's logits (within fp32 rounding: the C loop sums
    in another order), its choice of experts and weights, then experts_swiglu of those; the C++ kernel gives the
    Python function's result bitwise."""
    from mistral_ref.moe import route

    dim, n = 64, 4
    w1, w3, w2 = _stacked_experts(kind, dtype, n, dim, hidden=96)
    gate = _weight(n, dim, 7).to(dtype)
    for seed in range(3):
        x = torch.randn(1, dim, generator=torch.Generator().manual_seed(seed)).to(dtype)
        weights, experts, logits = route(x, gate, top_k)
        expected = cpu_gemv.experts_swiglu(x, w1, w3, w2, experts[0], weights[0], 1)
        got, got_logits = cpu_gemv.experts_moe(x, gate, w1, w3, w2, top_k, 1)
        assert got_logits.dtype == torch.float32 and rel_err(got_logits, logits) <= 1e-6
        # the same experts; their weights equal within fp32 rounding, which in bf16 rounds alike or one step apart
        assert rel_err(got, expected) <= (1e-6 if dtype == torch.float32 else BF16_RTOL)
        if build == "native" and cpu_gemv.operators(wait=True) == "C++":
            got_op, logits_op = _moe_op(kind, x, gate, w1, w3, w2, top_k)
            torch.testing.assert_close(got_op, got, rtol=0, atol=0)
            torch.testing.assert_close(logits_op, got_logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="top_k"):
        cpu_gemv.experts_moe(x, gate, w1, w3, w2, n + 1, 1)
    with pytest.raises(ValueError, match="router"):
        cpu_gemv.experts_moe(x, gate[:, :-1], w1, w3, w2, top_k, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_route_one_token_is_moe_route(dtype):
    """The C router against moe.route: logits within fp32 rounding, the same experts in the same order, the
    softmax weights within fp32 rounding; equal logits go to the lower expert first; a NaN logit counts as the
    largest, as in torch.topk."""
    from mistral_ref.moe import route

    lib, n, dim = cpu_gemv.library(), 8, 100

    def c_route(x, gate, k):
        logits, index, weights = torch.empty(n), torch.empty(k, dtype=torch.int64), torch.empty(k)
        assert lib.route_one_token(x.data_ptr(), int(x.dtype == torch.bfloat16), gate.data_ptr(),
                                   int(gate.dtype == torch.bfloat16), n, dim, k, logits.data_ptr(),
                                   index.data_ptr(), weights.data_ptr()) == 0
        return weights, index, logits

    gate = _weight(n, dim, 5).to(dtype)
    for seed in range(20):
        x = torch.randn(1, dim, generator=torch.Generator().manual_seed(seed)).to(dtype)
        for k in (1, 2, 3):
            weights, experts, logits = route(x, gate, k)
            got_w, got_e, got_l = c_route(x, gate, k)
            assert rel_err(got_l, logits[0]) <= 1e-6 and got_e.tolist() == experts[0].tolist()
            assert rel_err(got_w, weights[0]) <= 1e-6
    tied = gate.clone()
    tied[6] = tied[2]  # experts 2 and 6 give equal logits
    x = tied[2:3].clone()  # the largest logit: |row 2|^2
    assert c_route(x, tied, 2)[1].tolist() == [2, 6]
    assert c_route(x, tied, 1)[0].tolist() == [1.0]
    poisoned = gate.clone()
    poisoned[5, 0] = float("nan")  # expert 5's logit is NaN
    assert c_route(x, poisoned, 1)[1].tolist() == [5] == torch.topk(x.float() @ poisoned.float().T, 1)[1][0].tolist()
@pytest.mark.parametrize("scheme,dtype", [("int8", torch.bfloat16), ("int8", torch.float32), ("int4", torch.bfloat16),
                                          ("int4", torch.float32)], ids=["int8-bf16", "int8-fp32", "int4-bf16",
                                                                         "int4-fp32"])
@pytest.mark.parametrize("out", [64, 48], ids=["blocks", "int4-tail-16"])
def test_stacked_quantized_experts_equal_each_expert_alone(build, scheme, dtype, out):
    """gemv_quantized_experts (the k chosen experts of stacked codes and scales, one call) gives exactly the
    products of each expert's QuantizedWeight, with one input row per expert or one shared row."""
    experts = QuantizedExperts([quantize_weight(_weight(out, 128, seed=e).to(dtype), scheme, 64) for e in range(5)])
    for index in (torch.tensor([4, 1, 2]), torch.tensor([4, 1]), torch.tensor([4, 1, 2, 0])):
        k = len(index)  # threads=2 takes whole experts a thread where k is even, else shares each one's rows
        for x in (torch.randn(k, 128, dtype=dtype), torch.randn(1, 128, dtype=dtype)):
            y = cpu_gemv.experts_gemv(x, experts, index, threads=2)
            assert y.shape == (k, out) and y.dtype == dtype
            for s, e in enumerate(index.tolist()):
                alone = cpu_gemv.gemv(x[s if len(x) > 1 else 0][None], experts[e], threads=2)[0]
                torch.testing.assert_close(y[s], alone, rtol=0, atol=0)


@pytest.mark.skipif(cpu_gemv.library() is None or cpu_gemv.library().cpu_gemv_isa() != 3,
                    reason="the AVX-512 loops: a CPU with AVX-512 BW and VNNI")
@pytest.mark.parametrize("scheme,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32), ("int8", torch.bfloat16),
                                          ("int8", torch.float32), ("int4", torch.bfloat16)],
                         ids=["bf16", "fp32", "int8-bf16", "int8-fp32", "int4-bf16"])
def test_avx512_loops_give_the_avx2_loops_bits(scheme, dtype, monkeypatch):
    """Each 512-bit register of the AVX-512 loops holds two of the AVX2 loops' registers lane for lane: one
    product, several products of one input, and stacked experts give bitwise the AVX2 build's results, for 1-5
    rows, inputs that are not a multiple of 32 or span more than one 1024-input int32 block, outputs not a multiple
    of 4, and int4's tail; fp32 weights too.  (bf16 results round the fp32 sums, which hides most one-ulp
    differences: the bf16 weights are also compared with fp32 x and y, and int8 with fp32 x; the int16 path of int8
    ends in bf16.)"""
    monkeypatch.setattr(cpu_gemv, "_ops_status", "Python (comparing builds)")  # calls go to cpu_gemv._lib
    inp = {"bf16": 1100, "fp32": 1100, "int8": 1100, "int4": 1152}[scheme]  # int4: a multiple of its group (64)
    weights = [_weight(out, inp, seed=out).to(dtype) for out in (64, 48 if scheme == "int4" else 45)]
    if scheme not in ("bf16", "fp32"):
        weights = [quantize_weight(w, scheme, 64) for w in weights]
    rows = range(1, 6) if scheme != "int4" else range(1, cpu_gemv.MAX_ROWS["int4"])
    xs = [torch.randn(r, inp, dtype=dtype) for r in rows]
    index = torch.tensor([1, 0, 1])

    def results() -> list[torch.Tensor]:
        out = [cpu_gemv.gemv(x, w, threads=2) for x in xs for w in weights]
        out += [y for x in xs for y in cpu_gemv.gemv_many(x, weights, threads=2)]
        if scheme not in ("bf16", "fp32"):
            experts = QuantizedExperts([weights[0], quantize_weight(_weight(64, inp, 7).to(dtype), scheme, 64)])
            out += [cpu_gemv.experts_gemv(xs[0][:1].expand(3, inp).contiguous(), experts, index, threads=2)]
        return out

    def fp32_results() -> list[torch.Tensor]:  # bf16 weights, fp32 x and y through the C entry point: the sums
        out = []                                   # before any bf16 rounding of the result, compared bitwise too
        for x in xs:
            for w in (weights if scheme == "bf16" else []):
                y = torch.empty(x.shape[0], w.shape[0])
                assert cpu_gemv._lib.gemv_float(x.float().data_ptr(), w.data_ptr(), 0, y.data_ptr(), 0, x.shape[0],
                                                w.shape[0], inp, 2) == 0
                out.append(y)
        return out

    native = results() + fp32_results()
    other_build("avx2", monkeypatch)
    for a, b in zip(native, results() + fp32_results(), strict=True):
        assert torch.equal(a, b)


def _sums(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, threads: int = 2) -> torch.Tensor:
    """bf16 x (rows, in) times bf16 w (out, in) through gemv_float with io_bf16 = 2: the fp32 sums, unrounded."""
    y = torch.empty(x.shape[0], w.shape[0])
    assert lib.gemv_float(x.data_ptr(), w.data_ptr(), 0, y.data_ptr(), 2, x.shape[0], w.shape[0], x.shape[1],
                          threads) == 0
    return y


def _pair_order(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The sums in the order cpu_gemv.c documents for bf16 weights (CPU_GEMV_BF16_DOT), with torch's fp32
    operations: a product of two bf16 values is exact in fp32, so each of the kernel's fused multiply-adds is this
    product and one rounded addition.  (rows, in) x (out, in) -> (rows, out)"""
    xf, wf = x.float(), w.float()
    (rows, n), out = xf.shape, wf.shape[0]
    sums = torch.zeros(2, rows, out, 16)  # sums[h]: the 16 lanes of chunks c % 2 == h
    for c in range(n // 32):
        xc, wc = xf[:, 32 * c:32 * c + 32].view(rows, 1, 16, 2), wf[:, 32 * c:32 * c + 32].view(1, out, 16, 2)
        sums[c % 2] = sums[c % 2] + xc[..., 1] * wc[..., 1]  # lane j: input 2j + 1 first,
        sums[c % 2] = sums[c % 2] + xc[..., 0] * wc[..., 0]  # then input 2j
    v = sums[0] + sums[1]
    u = v[..., :8] + v[..., 8:]
    s4 = u[..., :4] + u[..., 4:]  # hsum: the two 128-bit halves, then lanes (0, 2) and (1, 3), then the two
    s2 = s4[..., :2] + s4[..., 2:]
    s = s2[..., 0] + s2[..., 1]
    for j in range(n // 32 * 32, n):  # the inputs after the last whole chunk, one by one
        s = s + xf[:, j, None] * wf[None, :, j]
    return s


@pytest.mark.parametrize("build", ["native", "avx2", "no-bf16-dot"])
def test_bf16_products_add_in_the_documented_order(build, restore_walk, monkeypatch):
    """Every intrinsic build multiplies bf16 weights in "pairs" (cpu_gemv.c, CPU_GEMV_BF16_DOT): its fp32 sums are
    bitwise the documented order computed with torch, for inputs with 0-2 whole chunks of 32 and a remainder, an
    odd and an even number of chunks, 1-5 rows of x, outputs not a multiple of 4, both walks; with vdpbf16ps (where
    the CPU has it) and with its fp32 form (the same build, switched off)."""
    isa = cpu_gemv.library().cpu_gemv_isa()
    if isa == 1 or (build == "avx2" and isa != 3):
        pytest.skip("the intrinsic loops (and, for this build, AVX-512)")
    if build != "native":
        other_build(build, monkeypatch)
    lib = cpu_gemv._lib
    g = torch.Generator().manual_seed(5)
    walk_before = lib.cpu_gemv_walk()
    try:
        for inp in (7, 32, 45, 64, 96, 100, 1100):
            w = (torch.randn(13, inp, generator=g) * 0.05).bfloat16()
            for rows in (1, 2, 5):
                x = torch.randn(rows, inp, generator=g).bfloat16()
                expected = _pair_order(x, w)
                for walk, dot in ((0, 1), (1, 1), (0, 0), (1, 0)):
                    lib.cpu_gemv_set_walk(walk)
                    lib.cpu_gemv_set_bf16_dot(dot)
                    assert torch.equal(_sums(lib, x, w), expected), (inp, rows, walk, dot)
    finally:
        lib.cpu_gemv_set_walk(walk_before)
        lib.cpu_gemv_set_bf16_dot(1)


def test_the_bf16_dot_instruction_reads_denormals_as_zero_and_nothing_else_differs():
    """vdpbf16ps reads a denormal bf16 (below 2^-126) as zero; the fp32 form of the same loop does not.  That is
    the one difference (cpu_gemv.c): with a few denormal activations the two give sums within fp32 rounding of each
    other, and bitwise equal sums once the denormals are zeroed."""
    lib = cpu_gemv.library()
    if not lib.cpu_gemv_bf16_dot():
        pytest.skip("this CPU or build has no vdpbf16ps")
    w = _weight(16, 96).bfloat16()
    x = torch.randn(2, 96).bfloat16()
    x[:, ::7] = torch.tensor(1e-39).bfloat16()  # denormal in bf16 as in fp32
    assert x.float()[0, 0] != 0 and x.float()[0, 0].abs() < torch.finfo(torch.float32).tiny
    with_dot = _sums(lib, x, w)
    lib.cpu_gemv_set_bf16_dot(0)
    try:
        fp32_form = _sums(lib, x, w)
        zeroed = _sums(lib, torch.where(x.float().abs() < torch.finfo(torch.float32).tiny, 0, x.float()).bfloat16(), w)
    finally:
        lib.cpu_gemv_set_bf16_dot(1)
    torch.testing.assert_close(with_dot, fp32_form, rtol=1e-6, atol=1e-30)
    assert torch.equal(with_dot, zeroed)


@pytest.fixture
def restore_walk():
    """The walk cpu_gemv chose for this machine, restored after the test (which may set the other)."""
    before = cpu_gemv.library().cpu_gemv_walk()
    yield
    cpu_gemv.set_walk(bool(before))


@pytest.mark.parametrize("path", ["ctypes", "operators"])
@pytest.mark.parametrize("scheme,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32), ("int8", torch.bfloat16),
                                          ("int8", torch.float32), ("int4", torch.bfloat16)],
                         ids=["bf16", "fp32", "int8-bf16", "int8-fp32", "int4-bf16"])
def test_both_walks_give_the_same_bits(scheme, dtype, path, restore_walk, monkeypatch):
    """One-row products walk their weight four rows at a time (prefetching) or one row at a time, whichever reads
    faster here (cpu_gemv.choose_walk): the same bits either way, one product and several of one input, outputs not
    a multiple of 4, inputs not a multiple of 32 or over one 1024-input int32 block; through the C kernels and
    through the operators' own copy of them (set_walk sets both)."""
    if path == "ctypes":
        monkeypatch.setattr(cpu_gemv, "_ops_status", "Python (comparing walks)")  # calls go to cpu_gemv._lib
    else:
        assert cpu_gemv.operators(wait=True) == "C++"
    inp = {"bf16": 1100, "fp32": 1100, "int8": 1100, "int4": 1152}[scheme]
    weights = [_weight(out, inp, seed=out).to(dtype) for out in (64, 48 if scheme == "int4" else 45)]
    if scheme not in ("bf16", "fp32"):
        weights = [quantize_weight(w, scheme, 64) for w in weights]
    x = torch.randn(1, inp, dtype=dtype)

    def results() -> list[torch.Tensor]:
        return [cpu_gemv.gemv(x, w, threads=2) for w in weights] + cpu_gemv.gemv_many(x, weights, threads=2)

    cpu_gemv.set_walk(True)
    assert cpu_gemv.walk() == "four rows at a time, prefetching"
    four = results()
    cpu_gemv.set_walk(False)
    assert cpu_gemv.walk() == "one row at a time"
    for a, b in zip(four, results(), strict=True):
        assert torch.equal(a, b)


def test_the_walk_is_timed_or_set_by_the_environment(restore_walk, monkeypatch):
    """choose_walk times both walks (and leaves the library's walk as it was) unless MISTRAL_REF_CPU_WALK names
    one; another value is an error that says what it expects."""
    lib = cpu_gemv.library()
    for before in (0, 1):
        lib.cpu_gemv_set_walk(before)
        assert cpu_gemv.choose_walk(lib, threads=2) in (0, 1)
        assert lib.cpu_gemv_walk() == before
    monkeypatch.setenv(cpu_gemv.WALK_SWITCH, "one")
    assert cpu_gemv.choose_walk(lib) == 0
    monkeypatch.setenv(cpu_gemv.WALK_SWITCH, "four")
    assert cpu_gemv.choose_walk(lib) == 1
    monkeypatch.setenv(cpu_gemv.WALK_SWITCH, "fast")
    with pytest.raises(cpu_gemv.CpuKernelError, match="MISTRAL_REF_CPU_WALK='fast': expected 'four' or 'one'"):
        cpu_gemv.choose_walk(lib)


def test_the_walks_probe_is_sized_past_the_largest_cache(tmp_path):
    """choose_walk's weights are twice the largest cache sysfs reports (K / M / G suffixes, unreadable entries
    skipped), within PROBE_BYTES; 0 where nothing is reported."""
    for name, size in {"index0": "48K", "index2": "2048K", "index3": "480M", "index4": "junk"}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "size").write_text(size + "\n")
    (tmp_path / "index5").mkdir()  # no size file
    assert cpu_gemv.largest_cache_bytes(tmp_path) == 480 << 20
    assert cpu_gemv.largest_cache_bytes(tmp_path / "missing") == 0
    low, high = cpu_gemv.PROBE_BYTES
    assert low >= 48 << 20 and high >= 2 * low


@pytest.mark.parametrize("scheme", ["bf16", "int8", "int4"])
def test_prefetching_changes_no_result(scheme, monkeypatch, restore_walk):
    """The loops' prefetches of the next weight rows (past the last row too) change no bit of any product."""
    monkeypatch.setattr(cpu_gemv, "_ops_status", "Python (comparing builds)")  # calls go to cpu_gemv._lib
    cpu_gemv.set_walk(True)  # the walk that prefetches
    w = _weight(96, 320).bfloat16()
    w = w if scheme == "bf16" else quantize_weight(w, scheme, 32)
    xs = [torch.randn(rows, 320).bfloat16() for rows in (1, 3)] + [torch.randn(1, 320)] * (scheme != "bf16")
    native = [cpu_gemv.gemv(x, w, threads=2) for x in xs if scheme != "int4" or len(x) == 1]
    other_build("no-prefetch", monkeypatch)
    for a, b in zip(native, [cpu_gemv.gemv(x, w, threads=2) for x in xs if scheme != "int4" or len(x) == 1],
                    strict=True):
        assert torch.equal(a, b)


def test_quantized_experts_stack_into_views():
    """QuantizedExperts stacks the codes and scales and leaves each expert's buffers as views of its slice."""
    experts = [quantize_weight(_weight(32, 64, seed=e).bfloat16(), "int4", 32) for e in range(3)]
    codes = [e.qweight.clone() for e in experts]
    stacked = QuantizedExperts(experts)
    assert stacked.qweight.shape == (3, 32, 32) and stacked.scales.shape == (3, 2, 32, 2) and len(stacked) == 3
    for i, e in enumerate(stacked):
        assert e is experts[i] and e.qweight.data_ptr() == stacked.qweight[i].data_ptr()
        assert torch.equal(e.qweight, codes[i]) and e.scales_and_zeros.data_ptr() == stacked.scales[i].data_ptr()
    assert not QuantizedExperts.stackable([experts[0], quantize_weight(_weight(32, 64).bfloat16(), "int8")])
    assert not QuantizedExperts.stackable([experts[0], quantize_weight(_weight(48, 64).bfloat16(), "int4", 32)])


@pytest.mark.parametrize("bad", ["in-features", "dtype", "int4-scales"])
def test_arguments_that_do_not_fit_are_refused(bad):
    w = _weight(32, 64).bfloat16()
    if bad == "in-features":
        with pytest.raises(ValueError, match="do not fit"):
            cpu_gemv.gemv_float(torch.randn(1, 65).bfloat16(), w, 1)
    elif bad == "dtype":
        with pytest.raises(ValueError, match="do not fit"):
            cpu_gemv.gemv_float(torch.randn(1, 64), w, 1)
    else:
        qw = quantize_weight(w, "int4", 32)
        with pytest.raises(ValueError, match="do not fit"):
            cpu_gemv.gemv_quantized(torch.randn(1, 64).bfloat16(), qw.qweight, qw.scales_and_zeros[:1], 32, 1)


def test_empty_input_gives_an_empty_result():
    w = _weight(32, 64).bfloat16()
    assert cpu_gemv.gemv(torch.randn(0, 64).bfloat16(), w).shape == (0, 32)


def test_linear_sends_few_row_products_here_and_the_rest_elsewhere(monkeypatch):
    calls = []
    real = cpu_gemv.gemv
    monkeypatch.setattr(cpu_gemv, "gemv", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    w = _weight(32, 64).bfloat16()
    linear(torch.randn(1, 64).bfloat16(), w)
    linear(torch.randn(cpu_gemv.MAX_ROWS["bf16"], 64).bfloat16(), w)  # a GEMM's size: not here
    linear(torch.randn(1, 64), w.float())  # fp32, one row (a decode step of batch 1): here
    linear(torch.randn(2, 64), w.float())  # fp32, more rows: the BLAS
    linear(torch.randn(1, 64), quantize_weight(w.float(), "int8"))  # quantized in fp32: here
    assert calls == [(1, 64), (1, 64), (1, 64)]


def test_products_that_need_a_gradient_keep_pytorch():
    w = _weight(32, 64).bfloat16().requires_grad_()
    y = linear(torch.randn(1, 64).bfloat16(), w)
    y.float().sum().backward()  # the C kernels have no backward: linear must not send this product there
    assert w.grad is not None and w.grad.shape == w.shape
    with torch.no_grad():
        assert cpu_gemv.applies(torch.randn(1, 64).bfloat16(), w)


def test_compiled_code_calls_the_operators():
    w = _weight(32, 64).bfloat16()
    qw = quantize_weight(w, "int4", 32)
    x = torch.randn(1, 64).bfloat16()

    def f(x):
        a, b = cpu_gemv.gemv_many(x, [w, w], threads=1)
        c, d = cpu_gemv.gemv_many(x, [qw, qw], threads=1)
        return cpu_gemv.gemv(x, w, threads=1) + cpu_gemv.gemv(x, qw, threads=1) + a + b + c + d

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)  # the fake functions give the shapes
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)
    args = _attention_case(2, 16, 4, 2, 32, [7, 20], torch.bfloat16)
    attend = torch.compile(lambda *a: cpu_gemv.attention(*a, 8, threads=1), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(attend(*args), cpu_gemv.attention(*args, 8, threads=1), rtol=0, atol=0)


# ---- attention of one query per row ------------------------------------------------------------------------

def _attention_case(batch: int, slots: int, heads: int, kv_heads: int, head_dim: int, newest: list[int],
                    dtype: torch.dtype, seed: int = 0):
    """q (B, 1, H, D), a cache k, v (B, S, KV, D) whose row b holds positions 0 .. newest[b] in slots p % S (a
    rolling buffer once newest >= S; empty slots -1), q_pos = newest (-1: a padding row, which sees no key)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 1, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(batch, slots, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(batch, slots, kv_heads, head_dim, generator=g).to(dtype)
    k_pos = torch.full((batch, slots), -1, dtype=torch.long)
    for b, p in enumerate(newest):
        held = torch.arange(max(0, p - slots + 1), p + 1)
        k_pos[b, held % slots] = held
    return q, k, v, torch.tensor(newest)[:, None], k_pos


ATTENTION_CASES = {  # (batch, slots, heads, kv_heads, head_dim, newest per row, window)
    "gqa-128": (1, 64, 8, 2, 128, [40], None),  # Nemo's head_dim, part of the cache filled
    "window-rolling": (2, 16, 4, 4, 32, [50, 9], 16),  # a rolling buffer past its window, a row not yet full
    "window-in-full-cache": (1, 96, 6, 3, 64, [90], 24),  # keys in the cache the window hides
    "ragged-with-padding": (3, 32, 6, 2, 40, [10, -1, 31], None),  # 40: 32 + 8 (a short chunk of values)
    "head-dim-72-odd-count": (2, 48, 4, 1, 72, [6, 46], None),  # 7 and 47 keys: not a multiple of 4
    "head-dim-not-multiple-of-8": (1, 20, 4, 2, 20, [19], None),  # the plain loops in every build
    # the AVX-512 build's grouped loops: 6 heads a key / value head (groups of 4 and 2), 291 keys (not a multiple of
    # 16: the softmax's tail); one head a key / value head, head_dim 48 (no pair products: 48 % 32); 8 heads on one
    # key / value head, head_dim 80 (a pass of 64 outputs, then 16) in a rolling buffer past its window
    "long-gqa-6-heads-a-group": (1, 300, 12, 2, 64, [290], None),
    "mha-head-dim-48": (2, 40, 3, 3, 48, [39, 17], None),
    "head-dim-80-rolling-window": (1, 200, 8, 1, 80, [500], 100),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=list(ATTENTION_CASES))
def test_attend_one_equals_the_reference_attention(build, case, dtype):
    """cpu_gemv.attention == attention.attention for one query per row: fp32 within fp32 rounding (sums in another
    order), bf16 within one bf16 rounding of the output; a padding row (no key) gets the reference's uniform average."""
    *shape, newest, window = ATTENTION_CASES[case]
    q, k, v, q_pos, k_pos = _attention_case(*shape, newest, dtype)
    got = cpu_gemv.attention(q, k, v, q_pos, k_pos, window, threads=2)
    want = attention(q, k, v, q_pos, k_pos, window)
    assert got.shape == want.shape and got.dtype == dtype
    assert rel_err(got, want) < (1e-6 if dtype == torch.float32 else BF16_RTOL)
    exact = attention(q.double(), k.double(), v.double(), q_pos, k_pos, window)  # the same inputs, float64
    if dtype == torch.float32:
        assert rel_err(got, exact) < 1e-6
    else:  # about as far from the exact result as the reference's own bf16 roundings take it
        assert rel_err(got, exact) <= 1.5 * rel_err(want, exact) + 2 ** -9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attend_one_propagates_a_nan_it_sees_as_the_reference(build, dtype):
    """A NaN in a key the query sees makes that query's heads NaN (the softmax of a NaN score), as in the
    reference; the heads of the other key / value head and the other row stay finite."""
    q, k, v, q_pos, k_pos = _attention_case(2, 40, 8, 2, 64, [35, 30], dtype)
    k[0, 7, 1, 5] = float("nan")
    got = cpu_gemv.attention(q, k, v, q_pos, k_pos, None, threads=2)
    want = attention(q, k, v, q_pos, k_pos, None)
    assert torch.equal(got.isnan(), want.isnan()) and got[0, 0, 4:].isnan().all() and not got[0, 0, :4].isnan().any()
    assert rel_err(got[1], want[1]) < (1e-6 if dtype == torch.float32 else BF16_RTOL)


def test_attend_one_of_an_empty_batch_is_empty():
    q, k, v, q_pos, k_pos = (t[:0] for t in _attention_case(1, 8, 4, 2, 16, [5], torch.bfloat16))
    assert cpu_gemv.attention(q, k, v, q_pos, k_pos, None, threads=2).shape == (0, 1, 4, 16)


def test_attend_one_skips_what_the_query_does_not_see():
    """Keys and values the mask hides (future slots, outside the window, empty) cannot change the result, even
    when they are huge or NaN: they are skipped, not multiplied by zero."""
    q, k, v, q_pos, k_pos = _attention_case(1, 32, 4, 2, 64, [20], torch.float32)
    want = cpu_gemv.attention(q, k, v, q_pos, k_pos, 8, threads=1)
    hidden = (k_pos > 20) | (k_pos <= 20 - 8) | (k_pos < 0)
    k[hidden[..., None, None].expand_as(k)] = float("nan")
    v[hidden[..., None, None].expand_as(v)] = 1e30
    torch.testing.assert_close(cpu_gemv.attention(q, k, v, q_pos, k_pos, 8, threads=1), want, rtol=0, atol=0)


@pytest.mark.parametrize("bad", ["heads", "no-kv-heads", "dtype", "q-pos", "k-pos", "window"])
def test_attend_one_refuses_arguments_that_do_not_fit(bad):
    q, k, v, q_pos, k_pos = _attention_case(1, 8, 4, 2, 16, [5], torch.float32)
    window = None
    if bad == "heads":
        q = q[:, :, :3]
    elif bad == "no-kv-heads":
        k, v = k[:, :, :0], v[:, :, :0]
    elif bad == "dtype":
        k = k.bfloat16()
    elif bad == "q-pos":
        q_pos = q_pos.int()
    elif bad == "k-pos":
        k_pos = k_pos[:, :4]
    else:
        window = -5
    assert not (bad in ("heads", "no-kv-heads", "dtype") and cpu_gemv.attention_applies(q, k, v))
    with pytest.raises(ValueError, match="do not fit"):
        cpu_gemv.attend_one(q, k, v, q_pos, k_pos, -1 if window is None else window, 1)


# ---- a prompt's causal attention (backends/prompt_attention.py: GEMMs + softmax_causal) --------------------------

PROMPT_CASES = {  # (batch, T, heads, kv_heads, head_dim, block, offset: keys of earlier chunks, window)
    "gqa-6-over-2-blocks-of-16": (1, 75, 6, 2, 24, 16, 0, None),  # 4 blocks of 16 + 11; head_dim 24 (no lane multiple)
    "mha-batch-2": (2, 40, 3, 3, 48, 16, 0, None),
    "nemo-head-dim-128": (1, 150, 8, 2, 128, 128, 0, None),  # a block of 128, then 22
    "one-block-odd-keys": (1, 37, 4, 1, 64, 128, 0, None),  # every softmax row ends in a tail of LANES
    "chunk-after-50-keys": (1, 40, 6, 2, 24, 16, 50, None),  # a later chunk: 50 earlier keys, then its own 40
    "chunk-batch-2-after-100": (2, 70, 4, 2, 32, 128, 100, None),
    "window-7-blocks-of-16": (1, 75, 6, 2, 24, 16, 0, 7),  # a window shorter than a block
    "window-40-blocks-of-16": (2, 75, 4, 2, 32, 16, 0, 40),  # blocks whose first keys the window hides
    "chunk-after-50-window-20": (1, 40, 6, 2, 24, 16, 50, 20),
    "window-over-every-key": (1, 30, 4, 2, 16, 16, 0, 64),  # (a window longer than the prompt: none)
}


def _prompt(batch, T, heads, kv_heads, head_dim, dtype, seed=0, offset=0):
    """Queries at positions offset .. offset + T - 1 and the keys / values of positions 0 .. offset + T - 1."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(batch, T, heads, head_dim, generator=g) * 2).to(dtype)  # scores of a few units: real softmaxes
    k = torch.randn(batch, offset + T, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(batch, offset + T, kv_heads, head_dim, generator=g).to(dtype)
    return q, k, v, torch.arange(offset, offset + T).repeat(batch, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", PROMPT_CASES, ids=list(PROMPT_CASES))
def test_prompt_attention_equals_the_reference_attention(build, case, dtype, monkeypatch):
    """prompt_attention == attention.attention for a prompt attending to itself, or a later chunk of it to its own
    keys and the earlier ones, block by block, with and without a window: fp32 within fp32 rounding; bf16 as close
    to the reference as one bf16 rounding of the output (the same roundings: the GEMMs' fp32 sums in another
    order), and no farther from the exact result than the reference is."""
    batch, T, heads, kv_heads, head_dim, block, offset, window = PROMPT_CASES[case]
    monkeypatch.setattr(prompt_attention, "BLOCK", block)
    q, k, v, pos = _prompt(batch, T, heads, kv_heads, head_dim, dtype, offset=offset)
    k_pos = torch.arange(offset + T).repeat(batch, 1)
    assert prompt_attention.applies(q, k, v) and prompt_attention.causal_span(pos, k_pos) == (0, offset)
    got = prompt_attention.prompt_attention(q, k, v, threads=2, window=window)
    want = attention(q, k, v, pos, k_pos, window)
    assert got.shape == want.shape and got.dtype == dtype
    assert rel_err(got, want) < (1e-6 if dtype == torch.float32 else BF16_RTOL)
    exact = attention(q.double(), k.double(), v.double(), pos, k_pos, window)
    if dtype == torch.float32:
        assert rel_err(got, exact) < 1e-6
    else:
        assert rel_err(got, exact) <= 1.5 * rel_err(want, exact) + 2 ** -9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prompt_attention_with_latent_attentions_scale_and_value_size(build, dtype, monkeypatch):
    """The form latent attention's expanded prompts call (backends/mla.py): a scale of their own, the scaled scores
    left in fp32 (mla.latent_attention's `scores.float() * scale`), values of another head size than the keys;
    against that reference's softmax written out here, over blocks and after 30 earlier keys."""
    monkeypatch.setattr(prompt_attention, "BLOCK", 16)
    q, k, _, pos = _prompt(1, 45, 4, 4, 20, dtype, offset=30)
    v = torch.randn(1, 75, 4, 12, generator=torch.Generator().manual_seed(3)).to(dtype)
    k_pos = torch.arange(75)[None]
    got = prompt_attention.prompt_attention(q, k, v, threads=2, scale=0.3, scaled_fp32=True)
    scores = torch.einsum("bthd,bshd->bhts", q, k)  # in q's dtype, as mla.latent_attention's einsums
    mask = attention_mask(pos, k_pos, None)[:, None]
    probs = torch.softmax((scores.float() * 0.3).masked_fill(~mask, torch.finfo(torch.float32).min), -1).to(dtype)
    want = torch.einsum("bhts,bshd->bthd", probs, v)
    assert got.shape == (1, 45, 4, 12) and got.dtype == dtype
    assert rel_err(got, want) < (1e-6 if dtype == torch.float32 else BF16_RTOL)


def _ragged_batch(rows: int):
    """A batch as the server's scheduler prefills it: row 0 a whole chunk of MIN_TOKENS + 8 queries, row 1 a later
    chunk after 30 cached keys then 6 padding queries, the other rows only padding (bf16, 6 heads over 2 of 32)."""
    T, S, H, K, D = prompt_attention.MIN_TOKENS + 8, 110, 6, 2, 32
    g = torch.Generator().manual_seed(9)
    q = (torch.randn(rows, T, H, D, generator=g) * 2).bfloat16()
    k, v = (torch.randn(rows, S, K, D, generator=g).bfloat16() for _ in range(2))
    q_pos, k_pos = torch.full((rows, T), -1), torch.full((rows, S), -1)
    q_pos[0], k_pos[0, :T] = torch.arange(T), torch.arange(T)
    q_pos[1, :T - 6], k_pos[1, :30 + T - 6] = torch.arange(30, 30 + T - 6), torch.arange(30 + T - 6)
    return q, k, v, q_pos, k_pos


def test_prompt_rows_takes_a_ragged_batch_row_by_row(monkeypatch):
    """A batch as the server's scheduler prefills it: row 0 a whole chunk, row 1 a later chunk after 30 cached keys
    then 6 padding queries, row 2 a prompt shorter than MIN_TOKENS then padding, row 3 only padding (SDPA, each
    row alone).  Rows 0 and 1 go through prompt_attention (as on a CPU without AMX: FLASH_FIRST and AMX_ATTENTION
    off; test_amx_flash_attention_takes_the_ragged_rows: with them); every row
    equals the reference, the padding queries included (the reference's uniform average of every slot)."""
    monkeypatch.setattr(prompt_attention, "FLASH_FIRST", False)
    monkeypatch.setattr(prompt_attention, "AMX_ATTENTION", False)
    calls = []
    real = prompt_attention.prompt_attention
    monkeypatch.setattr(prompt_attention, "prompt_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, q_pos, k_pos = _ragged_batch(4)
    T = q.shape[1]
    q_pos[2, :20], k_pos[2, :20] = torch.arange(20), torch.arange(20)
    got = prompt_attention.prompt_rows(q, k, v, q_pos, k_pos, None)
    want = attention(q, k, v, q_pos, k_pos, None)
    assert len(calls) == 2 and got.shape == want.shape and got.dtype == torch.bfloat16
    for b in (0, 1, 3):
        assert rel_err(got[b], want[b]) < BF16_RTOL, b
    assert rel_err(got[2], want[2]) < 3e-2  # (SDPA's own roundings)
    assert torch.equal(got[1, T - 6:], want[1, T - 6:])  # row 1's padding: the reference's uniform average, bitwise
    assert prompt_attention.prompt_rows(q[2:], k[2:], v[2:], q_pos[2:], k_pos[2:], None) is None  # no row qualifies


def test_prompt_attention_sees_no_later_key(monkeypatch):
    """A query's result depends on keys 0 .. its own position only: a NaN key at position 20 makes the queries at
    20 and after NaN on its key / value head (as in the reference) and leaves every earlier query unchanged, in
    its own block (16 .. 31: the GEMM computes the NaN's score there, the softmax must not use it) and before."""
    monkeypatch.setattr(prompt_attention, "BLOCK", 16)
    q, k, v, pos = _prompt(1, 40, 4, 2, 32, torch.bfloat16)
    clean = prompt_attention.prompt_attention(q, k, v, threads=2)
    k[0, 20, 1, 3] = float("nan")
    got = prompt_attention.prompt_attention(q, k, v, threads=2)
    want = attention(q, k, v, pos, pos, None)
    assert torch.equal(got.isnan(), want.isnan())
    assert got[0, 20:, 2:].isnan().all() and not got[0, :20].isnan().any() and not got[0, :, :2].isnan().any()
    assert torch.equal(got[0, :20], clean[0, :20]) and torch.equal(got[0, :, :2], clean[0, :, :2])


def test_prompt_attention_blocks_shrink_for_long_prompts():
    """The scores of a block stay under SCORE_BYTES: fewer queries a block as the prompt grows, never below
    MIN_BLOCK."""
    assert prompt_attention.block_size(4, 3, 512, 2) == prompt_attention.BLOCK
    sizes = [prompt_attention.block_size(8, 4, keys, 2) for keys in (2048, 8192, 16384)]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < prompt_attention.BLOCK
    for keys, block in zip((2048, 8192, 16384), sizes):
        assert 8 * 4 * block * keys * 2 <= prompt_attention.SCORE_BYTES or block == prompt_attention.MIN_BLOCK


SPANS = {  # q_pos (B, T) and k_pos (B, S) rows, window -> causal_span's (start, offset) or None
    "no-cache": ([[0, 1, 2]], [[0, 1, 2]], None, (0, 0)),
    "empty-full-cache": ([[0, 1, 2]] * 2, [[0, 1, 2, -1, -1]] * 2, None, (0, 0)),
    "empty-rolling-cache": ([[0, 1, 2]], [[-1, -1, -1, -1, 0, 1, 2]], 4, (4, 0)),
    "later-chunk": ([[3, 4, 5]] * 2, [[0, 1, 2, 3, 4, 5, -1]] * 2, None, (0, 3)),
    "later-chunk-window-long-enough": ([[3, 4, 5]], [[0, 1, 2, 3, 4, 5]], 6, (0, 3)),
    "window-shorter": ([[3, 4, 5]], [[0, 1, 2, 3, 4, 5]], 2, (0, 3)),  # (the window: prompt_attention's to apply)
    "long-prompt-into-empty-rolling-buffer": ([[0, 1, 2, 3, 4]], [[-1, -1, 0, 1, 2, 3, 4]], 2, (2, 0)),
    "rows-at-other-offsets": ([[3, 4, 5], [0, 1, 2]], [[0, 1, 2, 3, 4, 5], [0, 1, 2, -1, -1, -1]], None, None),
    "padded-query": ([[-1, 4, 5]], [[0, 1, 2, 3, 4, 5]], None, None),
    "rolling-buffer-wrapped": ([[6, 7]], [[4, 5, 6, 7]], None, None),  # positions 0-3 overwritten
    "a-key-missing": ([[3, 4, 5]], [[0, 1, -1, 3, 4, 5]], None, None),
    "keys-out-of-order": ([[2, 3]], [[1, 0, 2, 3]], None, None),
}


@pytest.mark.parametrize("path", ["C", "tensors"])
@pytest.mark.parametrize("case", SPANS, ids=list(SPANS))
def test_causal_span_finds_exactly_the_prompts_that_see_their_own_keys(case, path, monkeypatch):
    """causal_span says where a chunk's queries see their prompt's keys and nothing else (then prompt_attention's
    "query offset + i sees keys 0 .. offset + i, the last `window` of them" is attention_mask's answer), and None
    anywhere else: in one C call (cpu_gemv.causal_span) and in tensor operations (without the kernels)."""
    q_pos, k_pos, window, want = SPANS[case]
    q_pos, k_pos = torch.tensor(q_pos), torch.tensor(k_pos)
    assert cpu_gemv.positions_apply(q_pos, k_pos)
    if path == "tensors":
        monkeypatch.setattr(cpu_gemv, "positions_apply", lambda *a: False)
    assert prompt_attention.causal_span(q_pos, k_pos) == want
    if want is not None:
        start, offset = want
        T = q_pos.shape[1]
        expected = torch.zeros(k_pos.shape[1], dtype=torch.bool).repeat(*q_pos.shape, 1)
        for i in range(T):
            first = 0 if window is None else max(0, offset + i - window + 1)
            expected[:, i, start + first:start + offset + i + 1] = True
        assert torch.equal(attention_mask(q_pos, k_pos, window), expected)


def test_host_position_tests_in_c_answer_as_the_tensor_tests(monkeypatch):
    """cpu_gemv.causal_span and consecutive_rows (the prompt path's checks of positions, once a layer) give the
    answers of their tensor forms (prompt_attention.causal_span, pytorch.consecutive without the kernels) on 3,000
    random positions near the cases they look for: prompts, chunks, caches with empty slots, one changed value;
    views and other dtypes go to the tensor forms."""
    g = torch.Generator().manual_seed(21)

    def rnd(n: int) -> int:
        return int(torch.randint(0, n, (), generator=g))

    def answers(q_pos, k_pos):
        return prompt_attention.causal_span(q_pos, k_pos), pytorch_backend.consecutive(q_pos)

    found = {"span": 0, "rows": 0}
    for _ in range(3000):
        B, T, offset, start, tail = 1 + rnd(3), 1 + rnd(6), rnd(4), rnd(3), rnd(3)
        q_pos = (torch.arange(T) + offset).repeat(B, 1)
        k_pos = torch.cat([torch.full((start,), -1), torch.arange(offset + T), torch.full((tail,), -1)]).repeat(B, 1)
        for t in ((q_pos, k_pos)[rnd(2)] for _ in range(rnd(3))):  # zero to two values changed
            t[rnd(t.shape[0]), rnd(t.shape[1])] = rnd(8) - 2
        with_c = answers(q_pos, k_pos)
        with monkeypatch.context() as m:
            m.setattr(cpu_gemv, "positions_apply", lambda *a: False)
            assert answers(q_pos, k_pos) == with_c, (q_pos, k_pos)
        found["span"] += with_c[0] is not None
        found["rows"] += with_c[1] is not None
    assert min(found.values()) > 500  # (both answers seen often, and None too)
    assert found["span"] < 2900
    wide = torch.arange(12).view(2, 6)
    assert not cpu_gemv.positions_apply(wide[:, :3]) and not cpu_gemv.positions_apply(wide.int())
    assert pytorch_backend.consecutive(wide[:1, 2:5]) == 2 and pytorch_backend.consecutive(wide[:, :3]) is None


@pytest.mark.parametrize("bad", ["one-query", "fp16", "heads", "fewer-keys", "grad"])
def test_prompt_attention_refuses_what_it_does_not_take(bad):
    q, k, v, _ = _prompt(1, 8, 4, 2, 16, torch.float32)
    if bad == "one-query":
        q, k, v = q[:, :1], k[:, :1], v[:, :1]
    elif bad == "fp16":
        q, k, v = q.half(), k.half(), v.half()
    elif bad == "heads":
        q = q[:, :, :3]
    elif bad == "fewer-keys":  # fewer keys than queries: no prompt's
        k, v = k[:, :6], v[:, :6]
    else:
        q.requires_grad_(True)
    assert not prompt_attention.applies(q, k, v)
    with pytest.raises(ValueError, match="not one prompt"):
        prompt_attention.prompt_attention(q, k, v)


@pytest.mark.parametrize("flash_first", [False, True], ids=["gemms-first", "flash-first"])
@pytest.mark.parametrize("case", ["bf16-prompt", "second-chunk", "windowed-prompt", "fp32-prompt", "short-prompt",
                                  "ragged-rows", "kernels-off"])
def test_the_torch_backend_sends_bf16_prompts_to_prompt_attention(case, flash_first, monkeypatch):
    """backends/pytorch.py's attention: a bf16 prompt of MIN_TOKENS attending to itself (in an empty cache: the
    keys after it are empty slots), or a second chunk of it (earlier keys in the cache), or one under a window
    shorter than itself goes to prompt_attention, and rows at different positions row by row (prompt_rows);
    fp32 prompts, shorter ones and a machine without the C kernels go to SDPA.  With FLASH_FIRST (a CPU with
    AMX) the plain causal ones (the prompt in an empty cache, the ragged batch's row without earlier keys) take
    SDPA's causal kernel instead, the others still prompt_attention.  Every one equals the reference."""
    monkeypatch.setattr(prompt_attention, "FLASH_FIRST", flash_first)
    calls, causal = [], []
    real = prompt_attention.prompt_attention
    monkeypatch.setattr(prompt_attention, "prompt_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    real_causal = prompt_attention.causal_sdpa
    monkeypatch.setattr(prompt_attention, "causal_sdpa", lambda *a: causal.append(1) or real_causal(*a))
    dtype = torch.float32 if case == "fp32-prompt" else torch.bfloat16
    T = prompt_attention.MIN_TOKENS  # (shorter prompts go to SDPA)
    q, k, v, pos = _prompt(1, T, 4, 2, 16, dtype)
    k_pos = torch.cat([pos, torch.full((1, 4), -1)], 1)  # a cache of T + 4 slots, the prompt in the first T
    k, v = (torch.cat([t, torch.randn(1, 4, 2, 16).to(dtype)], 1) for t in (k, v))
    if case == "second-chunk":  # the chunk at positions 4 .. T + 3 after 4 keys in the cache
        pos, k_pos = pos + 4, torch.arange(T + 4)[None]
    if case == "kernels-off":
        monkeypatch.setattr(cpu_gemv, "library", lambda: None)
    if case == "short-prompt":  # the last T - 1 queries and their keys: a prompt one query short
        q, pos, k, v, k_pos = q[:, 1:], pos[:, 1:] - 1, k[:, 1:], v[:, 1:], torch.cat([pos[:, 1:] - 1, k_pos[:, T:]], 1)
    if case == "ragged-rows":  # a second row 4 positions behind the first, its last 4 slots empty
        q, k, v = (torch.cat([t, t.flip(1)]) for t in (q, k, v))
        pos = torch.cat([pos + 4, pos])
        k_pos = torch.cat([torch.arange(T + 4)[None], torch.cat([torch.arange(T), torch.full((4,), -1)])[None]])
    window = 9 if case == "windowed-prompt" else None
    got = pytorch_backend.attention(q, k, v, pos, k_pos, window)
    expected_calls = {"bf16-prompt": 1, "second-chunk": 1, "windowed-prompt": 1, "ragged-rows": 2}  # (rows: one each)
    # (ragged: the row without earlier keys; without the C kernels the causal kernel all the same)
    flash = {"bf16-prompt": 1, "ragged-rows": 1, "kernels-off": 1} if flash_first else {}
    assert len(calls) == max(0, expected_calls.get(case, 0) - flash.get(case, 0))
    assert len(causal) == flash.get(case, 0)
    want = attention(q, k, v, pos, k_pos, window)
    assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 3e-2)


# ---- building and loading -------------------------------------------------------------------------------------

@pytest.fixture
def fresh_state(monkeypatch):
    """cpu_gemv as if not loaded yet in this process (restored after the test)."""
    monkeypatch.setattr(cpu_gemv, "_lib", None)
    monkeypatch.setattr(cpu_gemv, "_status", None)


def test_switched_off_by_the_environment(fresh_state, monkeypatch):
    monkeypatch.setenv(cpu_gemv.ENV_SWITCH, "0")
    assert cpu_gemv.library() is None
    assert cpu_gemv.status() == f"off ({cpu_gemv.ENV_SWITCH}=0)"
    w = _weight(32, 64).bfloat16()
    x = torch.randn(1, 64).bfloat16()
    assert not cpu_gemv.handles(x, w)
    torch.testing.assert_close(linear(x, w), F.linear(x, w))  # PyTorch's product instead


def test_a_missing_compiler_is_a_warning_that_names_it(fresh_state, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    with pytest.warns(UserWarning, match="no-such-compiler-xyz"):
        assert cpu_gemv.library() is None
    assert cpu_gemv.status().startswith("off (no C compiler")


def test_a_library_others_can_write_is_not_loaded(tmp_path):
    path = cpu_gemv.build()
    copy = tmp_path / "cpu_gemv.so"
    copy.write_bytes(path.read_bytes())
    os.chmod(copy, 0o770)
    with pytest.raises(cpu_gemv.CpuKernelError, match="not loaded"):
        cpu_gemv.load(copy)


def test_the_library_is_built_once_and_named_by_what_it_depends_on():
    path = cpu_gemv.build()
    assert path.exists() and path.parent.name == "cpu_gemv"
    assert cpu_gemv.build() == path  # found, not rebuilt
    assert cpu_gemv.build(("-DCPU_GEMV_PORTABLE",)) != path
    assert os.stat(path).st_mode & 0o077 == 0


def test_the_quantized_weight_module_is_not_a_copy():
    qw = quantize_weight(_weight(32, 64), "int8")
    assert isinstance(qw, QuantizedWeight) and cpu_gemv.kind(qw) == "int8"
    assert cpu_gemv.kind(qw.qweight) is None  # an int8 tensor alone is not a weight the kernels know


# ---- the operators' C++ kernels (cpu_gemv_ops.cpp) -------------------------------------------------------------

@pytest.fixture(scope="module")
def cpp_operators():
    """The operators with their C++ kernels loaded (built once per compile cache; this machine has g++)."""
    assert cpu_gemv.operators(wait=True) == "C++"
    return torch.ops.mistral_ref


def test_set_bf16_dot_reaches_the_operators_library(cpp_operators):
    """cpu_gemv.set_bf16_dot switches the C kernels and the operators' own copy of them: denormal activations,
    which vdpbf16ps reads as zero and the fp32 form does not, show which arithmetic ran where."""
    if not cpu_gemv.library().cpu_gemv_bf16_dot():
        pytest.skip("this CPU or build has no vdpbf16ps")
    x, w = torch.full((1, 64), 1e-39).bfloat16(), torch.ones(8, 64).bfloat16()  # 64 x 1e-39: a normal bf16
    zero = torch.zeros(1, 8, dtype=torch.bfloat16)
    assert torch.equal(cpp_operators.gemv_float(x, w, 2), zero) and torch.equal(cpu_gemv.gemv_float(x, w, 2), zero)
    cpu_gemv.set_bf16_dot(False)
    try:
        in_fp32 = cpp_operators.gemv_float(x, w, 2), cpu_gemv.gemv_float(x, w, 2)
    finally:
        cpu_gemv.set_bf16_dot(True)
    assert (in_fp32[0] > 0).all() and torch.equal(*in_fp32)
    assert torch.equal(cpp_operators.gemv_float(x, w, 2), zero)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cpp_operators_equal_the_python_functions(cpp_operators, dtype):
    """Every operator's C++ kernel returns exactly what the Python function of the same name returns (the same
    C products behind both): dense bf16, int8 and int4 (with its 16-row tail), several products, experts."""
    ops, g = cpp_operators, torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=g).to(dtype)
    same = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0)  # noqa: E731
    if dtype == torch.bfloat16:
        w = _weight(48, 64).bfloat16()
        same(ops.gemv_float(x, w, 2), cpu_gemv.gemv_float(x, w, 2))
        for a, b in zip(ops.gemv_float_many(x, [w, w[:16]], 2), cpu_gemv.gemv_float_many(x, [w, w[:16]], 2)):
            same(a, b)
        stack, index = _weight(4 * 32, 64).view(4, 32, 64).bfloat16(), torch.tensor([2, 0, 3])
        same(ops.gemv_bf16_experts(x, stack, index, 2), cpu_gemv.gemv_bf16_experts(x, stack, index, 2))
    else:
        w = _weight(48, 64)
        same(ops.gemv_float(x, w, 2), cpu_gemv.gemv_float(x, w, 2))
        for a, b in zip(ops.gemv_float_many(x, [w, w[:16]], 2), cpu_gemv.gemv_float_many(x, [w, w[:16]], 2)):
            same(a, b)
    for scheme in ("int8", "int4"):
        qws = [quantize_weight(_weight(out, 64, seed=out).to(dtype), scheme, 32) for out in (48, 32, 64)]
        qs, ss = [q.qweight for q in qws], [q._scales() for q in qws]
        same(ops.gemv_quantized(x, qs[0], ss[0], 32, 2), cpu_gemv.gemv_quantized(x, qs[0], ss[0], 32, 2))
        for a, b in zip(ops.gemv_quantized_many(x, qs, ss, 32, 2), cpu_gemv.gemv_quantized_many(x, qs, ss, 32, 2)):
            same(a, b)
        experts = QuantizedExperts([quantize_weight(_weight(32, 64, seed=e).to(dtype), scheme, 32) for e in range(4)])
        index = torch.tensor([3, 1, 2])
        for xs in (x, x[:1]):
            same(ops.gemv_quantized_experts(xs, experts.qweight, experts.scales, index, 32, 2),
                 cpu_gemv.gemv_quantized_experts(xs, experts.qweight, experts.scales, index, 32, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cpp_attend_one_equals_the_python_function(cpp_operators, dtype):
    for case in ("gqa-128", "window-rolling", "ragged-with-padding"):
        *shape, newest, window = ATTENTION_CASES[case]
        args = _attention_case(*shape, newest, dtype)
        w = -1 if window is None else window
        torch.testing.assert_close(cpp_operators.attend_one(*args, w, 2), cpu_gemv.attend_one(*args, w, 2),
                                   rtol=0, atol=0)
    q, k, v, q_pos, k_pos = _attention_case(1, 8, 4, 2, 16, [5], dtype)
    with pytest.raises(ValueError, match="do not fit"):
        cpp_operators.attend_one(q[:, :, :3], k, v, q_pos, k_pos, -1, 1)
    with pytest.raises(ValueError, match="do not fit"):
        cpp_operators.attend_one(q, k, v, q_pos.int(), k_pos, -1, 1)


def test_cpp_operators_refuse_what_the_python_functions_refuse(cpp_operators):
    ops, x = cpp_operators, torch.randn(1, 64).bfloat16()
    w, q4 = _weight(32, 64).bfloat16(), quantize_weight(_weight(32, 64).bfloat16(), "int4", 32)
    with pytest.raises(ValueError, match="do not fit"):
        ops.gemv_float(torch.randn(1, 65).bfloat16(), w, 1)
    with pytest.raises(ValueError, match="do not fit"):
        ops.gemv_float(x.float(), w, 1)
    with pytest.raises(ValueError, match="do not fit"):
        ops.gemv_float_many(x.float(), [w.float(), w], 1)
    with pytest.raises(ValueError, match="do not fit"):
        ops.gemv_quantized(x, q4.qweight, q4.scales_and_zeros[:1], 32, 1)
    with pytest.raises(ValueError, match="one scheme"):
        q8 = quantize_weight(w, "int8")
        ops.gemv_quantized_many(x, [q8.qweight, q4.qweight], [q8.scales, q4.scales_and_zeros], 32, 1)
    with pytest.raises(IndexError, match="out of range"):
        ops.gemv_bf16_experts(x, w.view(2, 16, 64), torch.tensor([0, 2]), 1)
    experts = QuantizedExperts([quantize_weight(w, "int8") for _ in range(2)])
    with pytest.raises(IndexError, match="out of range"):
        ops.gemv_quantized_experts(x, experts.qweight, experts.scales, torch.tensor([-1]), 0, 1)
    with pytest.raises(ValueError, match="1 or 2 rows"):
        ops.gemv_quantized_experts(torch.randn(3, 64).bfloat16(), experts.qweight, experts.scales,
                                   torch.tensor([0, 1]), 0, 1)
    with pytest.raises(RuntimeError, match="bf16 or fp32"):
        ops.gemv_quantized(x.half(), experts.qweight[0], experts.scales[0], 0, 1)


def test_without_a_cpp_compiler_the_operators_stay_in_python(tmp_path):
    """A C++ build that fails leaves the operators to the Python functions, says why, and products still run."""
    import subprocess
    import sys

    code = ("import torch; from mistral_ref.backends import cpu_gemv\n"
            "state = cpu_gemv.operators(wait=True)\n"
            "w = torch.randn(32, 64).bfloat16(); x = torch.randn(1, 64).bfloat16()\n"
            "y = cpu_gemv.gemv(x, w)\n"
            "assert torch.equal(torch.ops.mistral_ref.gemv_float(x, w, 1), y)\n"
            "print(state)")
    env = {**os.environ, "CXX": "false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith("Python (building cpu_gemv_ops.cpp failed (false)"), done.stdout


@pytest.mark.slow
def test_the_operators_build_outlives_the_process_that_started_it(tmp_path):
    """A process that exits right after the C kernels load (a short chat) leaves the operators' build running in a
    process of its own: the library appears in the cache, whole, with nothing else left behind, and the next
    start loads it without building."""
    import subprocess
    import sys
    import time

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    start = "from mistral_ref.backends import cpu_gemv; print(cpu_gemv.status())"  # starts the build, then exits
    done = subprocess.run([sys.executable, "-c", start], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("on ("), done.stderr[-2000:]
    cache = tmp_path / "cpu_gemv"
    deadline = time.monotonic() + 300
    while not list(cache.glob("cpu_gemv_ops-*.so")) and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(0.5)  # (the builder's temporary directory goes right after the rename)
    assert sorted(p.suffix for p in cache.iterdir()) == [".lock", ".so", ".so"], sorted(cache.iterdir())
    code = ("import time; from mistral_ref.backends import cpu_gemv\n"
            "t = time.perf_counter(); state = cpu_gemv.operators(wait=True)\n"
            "print(state, time.perf_counter() - t)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    state, seconds = done.stdout.split()
    assert state == "C++" and float(seconds) < 5, done.stdout + done.stderr[-2000:]  # loaded, not built (~15 s)


def _separate(kind, stack, e):
    """Expert e of a stack as a weight of its own (a copy: memory the stack does not hold)."""
    if kind in ("bf16", "fp32"):
        return stack[e].clone()
    w = stack[e]
    return QuantizedWeight(w.scheme, w.qweight.clone(), w._scales().clone(), w.group_size)


@pytest.mark.parametrize("kind,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32), ("int8", torch.bfloat16),
                                        ("int8", torch.float32), ("int4", torch.bfloat16), ("int4", torch.float32)],
                         ids=["bf16", "fp32", "int8-bf16", "int8-fp32", "int4-bf16", "int4-fp32"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_swiglu_chosen_is_experts_swiglu_of_a_stack(build, kind, dtype, k):
    """Experts kept as separate tensors (a model whose experts are not stacked): swiglu_chosen of the k chosen
    experts' own weights gives experts_swiglu of the stack bitwise (the same C function, handed the weights'
    addresses instead of finding them in a stack), in every build; chosen_apply says so."""
    dim, n = 64, 4
    w1, w3, w2 = _stacked_experts(kind, dtype, n, dim, hidden=96)
    x = torch.randn(1, dim, generator=torch.Generator().manual_seed(k)).to(dtype)
    index, weights = torch.tensor([3, 0, 2][:k]), torch.tensor([0.5, 0.3, 0.2][:k])
    chosen = [[_separate(kind, w, e) for e in index.tolist()] for w in (w1, w3, w2)]
    assert cpu_gemv.chosen_apply(x, *chosen)
    got = cpu_gemv.swiglu_chosen(x, *chosen, weights, 1)
    assert got.dtype == dtype and got.shape == (1, dim)
    torch.testing.assert_close(got, cpu_gemv.experts_swiglu(x, w1, w3, w2, index, weights, 1), rtol=0, atol=0)
    for threads in (2, 3):  # whole experts a thread where k (or 2k: w1 and w3) divides by the threads, else rows
        torch.testing.assert_close(cpu_gemv.swiglu_chosen(x, *chosen, weights, threads), got, rtol=0, atol=0)


def test_swiglu_chosen_refuses_what_it_cannot_read():
    """chosen_apply says no (the caller keeps its loop) and swiglu_chosen raises for experts of mixed kinds,
    shapes or dtypes, non-contiguous ones, an expert of zero width, and weights that are not k fp32 values."""
    dim, hidden = 32, 48
    x = torch.randn(1, dim).bfloat16()
    w1, w3, w2 = ([_weight(a, b, s).bfloat16() for s in range(2)] for a, b in ((hidden, dim), (hidden, dim),
                                                                               (dim, hidden)))
    weights = torch.tensor([0.6, 0.4])
    assert cpu_gemv.chosen_apply(x, w1, w3, w2)
    int8 = quantize_weight(w1[1].float(), "int8", 32)
    cases = {
        "mixed kinds": (x, [w1[0], int8.to(torch.bfloat16)], w3, w2),
        "mixed dtypes": (x, [w1[0], w1[1].float()], w3, w2),
        "another hidden": (x, w1, [w3[0], w3[1][:40]], w2),
        "transposed": (x, w1, w3, [w2[0], w2[1].T.contiguous().T]),
        "zero width": (x, [torch.zeros(0, dim).bfloat16()] * 2, [torch.zeros(0, dim).bfloat16()] * 2,
                       [torch.zeros(dim, 0).bfloat16()] * 2),
        "two rows": (x.expand(2, dim), w1, w3, w2),
    }
    for name, args in cases.items():
        assert not cpu_gemv.chosen_apply(*args), name
        with pytest.raises(ValueError, match="swiglu_chosen"):
            cpu_gemv.swiglu_chosen(*args, weights, 1)
    with pytest.raises(ValueError, match="fp32 weights"):
        cpu_gemv.swiglu_chosen(x, w1, w3, w2, weights.double(), 1)
    with pytest.raises(ValueError, match="w1, w3 and w2 each"):
        cpu_gemv.swiglu_chosen(x, w1, w3, w2[:1], weights, 1)
    with torch.enable_grad():  # the kernels have no backward: training keeps the loop
        assert not cpu_gemv.chosen_apply(x, [w1[0].requires_grad_(), w1[1]], w3, w2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 1, 640), (3, 1, 100), (2, 5, 33), (7,)], ids=str)
def test_rms_norm_is_the_reference_norm(build, dtype, shape):
    """The C RMSNorm of a few rows against norm.rms_norm: fp32 within 1e-6 (the sum of squares in another
    order), bf16 within one rounding and mostly bitwise (the same roundings: the normalised row, then the
    weight's product), in every build; dims that are not multiples of 16; rows scaled by 1e4 and 1e-4."""
    from mistral_ref.backends.pytorch import rms_norm as torch_backend_rms_norm
    from mistral_ref.norm import rms_norm

    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    weight = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(dtype)
    if x.ndim == 3:
        x[0, 0] *= 1e4  # a row far from 1 in each direction
        x[-1, -1] *= 1e-4
    assert cpu_gemv.rms_norm_applies(x, weight) == (dtype == torch.bfloat16)  # fp32: F.rms_norm, bitwise
    got, expected = cpu_gemv.rms_norm(x, weight, 1e-5), rms_norm(x, weight, 1e-5)
    assert got.shape == x.shape and got.dtype == dtype
    if dtype == torch.float32:
        assert rel_err(got, expected) <= 1e-6
    else:
        assert rel_err(got, expected) <= BF16_RTOL and (got == expected).float().mean() >= 0.95
    if build == "native":  # the "torch" backend sends a decode step's bf16 norm here, fp32 to F.rms_norm
        torch.testing.assert_close(torch_backend_rms_norm(x, weight, 1e-5), got if dtype == torch.bfloat16 else
                                   expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_prompts_rms_norm_split_among_threads_is_the_row_loop_bitwise(build, dtype):
    """More than RMS_NORM_ROWS rows (a prompt) go to rms_norm_prompt, rows shared among threads: bitwise the
    one-thread loop of a few rows at a time, for any thread count, and the reference norm within bf16's rounding;
    the "torch" backend sends a bf16 prompt's norm there."""
    from mistral_ref.backends.pytorch import rms_norm as torch_backend_rms_norm
    from mistral_ref.norm import rms_norm

    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 75, 200, generator=g) * 3).to(dtype)
    x[1, 3] *= 1e4
    weight = (1 + 0.2 * torch.randn(200, generator=g)).to(dtype)
    rows = x.reshape(-1, 200)
    few = torch.cat([cpu_gemv.rms_norm(part, weight, 1e-5) for part in rows.split(cpu_gemv.RMS_NORM_ROWS)])
    for threads in (1, 2, 3):
        got = cpu_gemv.rms_norm(x, weight, 1e-5, threads=threads)
        assert got.shape == x.shape and torch.equal(got.reshape(-1, 200), few)
    expected = rms_norm(x, weight, 1e-5)
    assert rel_err(got, expected) <= (1e-6 if dtype == torch.float32 else BF16_RTOL)
    if build == "native":
        assert cpu_gemv.rms_norm_applies(x, weight) == (dtype == torch.bfloat16)
        if dtype == torch.bfloat16:
            assert torch.equal(torch_backend_rms_norm(x, weight, 1e-5), got)


def test_rms_norm_refuses_what_it_cannot_read():
    """Mixed dtypes, a weight of another width, fp16, autograd: rms_norm_applies says no (the "torch" backend keeps
    F.rms_norm) and rms_norm raises."""
    x, w = torch.randn(1, 1, 64).bfloat16(), torch.randn(64).bfloat16()
    cases = {"mixed dtypes": (x, w.float()), "another width": (x, w[:32]), "fp16": (x.half(), w.half()),
             "empty dim": (x[..., :0], w[:0])}
    for name, args in cases.items():
        assert not cpu_gemv.rms_norm_applies(*args), name
        with pytest.raises(ValueError, match="rms_norm"):
            cpu_gemv.rms_norm(*args, 1e-5)
    with torch.enable_grad():
        assert not cpu_gemv.rms_norm_applies(x, w.requires_grad_())


def plain_rotation(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """(a, b) (c, s) = (a c - b s, a s + b c) with each product, difference and sum rounded to fp32 (float64
    products of fp32 values are exact), then to x's dtype.  x (B, T, H, D), rotations (B, T, D/2) complex64"""
    a, b = x[..., 0::2].double(), x[..., 1::2].double()
    c, s = rotations.real[:, :, None].double(), rotations.imag[:, :, None].double()

    def f32(t):
        return t.float().double()

    re, im = f32(f32(a * c) - f32(b * s)), f32(f32(a * s) + f32(b * c))
    return torch.stack([re, im], -1).flatten(-2).float().to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 33, 4, 64), (1, 7, 3, 128), (1, 5, 2, 32), (2, 9, 3, 8), (1, 6, 2, 40)],
                         ids=str)
def test_rope_is_the_complex_rotation_with_torchs_roundings(build, dtype, shape):
    """cpu_gemv.rope (a prompt's or a step's heads, tokens shared among threads) against backends/rope.py's complex
    product: bitwise the plain formula's roundings in every build and for any thread count (the vector loops and
    the one-pair tail alike: no fused multiply-add), and so bitwise torch's complex product wherever torch runs its
    vector loop (head_dim / 2 a multiple of 8 pairs); with YaRN's longer rotations, NaN and inf."""
    from mistral_ref.backends.rope import apply_rotary_emb_complex, rope_rotations
    from mistral_ref.config import YarnArgs

    B, T, H, D = shape
    g = torch.Generator().manual_seed(D + T)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    x[0, 1, 0, 3], x[-1, -1, -1, 0] = float("nan"), float("inf")
    positions = torch.arange(T).expand(B, T) * 37
    yarn = YarnArgs(factor=4.0, original_max_position_embeddings=64) if D == 128 else None
    rotations = rope_rotations(positions, D, 1e6, yarn)
    expected = plain_rotation(x, rotations)
    for threads in (1, 2, 3):
        got = cpu_gemv.rope(x, rotations, threads=threads)
        assert got.dtype == dtype and torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0))
    if (D // 2) % 8 == 0:
        assert torch.equal(got.nan_to_num(7.0), apply_rotary_emb_complex(x, rotations).nan_to_num(7.0))
    if build == "native":
        assert torch.equal(pytorch_backend.rope(x, rotations).nan_to_num(7.0), got.nan_to_num(7.0))
    # the queries and keys of a joint product's output (rows H x D wide, more values between them): the same bits
    joint = torch.cat([torch.randn(B, T, 5, generator=g).to(dtype), x.flatten(2), torch.randn(B, T, 3).to(dtype)], -1)
    inner = joint[..., 5:5 + H * D].view(B, T, H, D)
    assert not inner.is_contiguous() and cpu_gemv.rope_applies(inner, rotations)
    assert torch.equal(cpu_gemv.rope(inner, rotations, threads=2).nan_to_num(7.0), expected.nan_to_num(7.0))


def test_rope_refuses_what_it_cannot_read():
    """A view with gaps, fp16, another table's shape or dtype, autograd: rope_applies says no (the "torch" backend
    keeps the complex product) and rope raises."""
    from mistral_ref.backends.rope import rope_rotations

    x = torch.randn(1, 4, 2, 16).bfloat16()
    rot = rope_rotations(torch.arange(4)[None], 16, 1e4)
    cases = {"a view with gaps": (x[..., :8], rot[..., :4]), "fp16": (x.half(), rot), "another shape": (x, rot[:, :3]),
             "tokens unevenly apart": (torch.randn(2, 5, 32).bfloat16()[:, :4].view(2, 4, 2, 16), rot.expand(2, 4, 8)),
             "heads apart": (torch.randn(1, 4, 2, 20).bfloat16()[..., :16], rot),
             "a real table": (x, torch.view_as_real(rot)), "three dims": (x[0], rot)}
    for name, args in cases.items():
        assert not cpu_gemv.rope_applies(*args), name
        with pytest.raises(ValueError, match="rope"):
            cpu_gemv.rope(*args)
    with torch.enable_grad():
        assert not cpu_gemv.rope_applies(x.float().requires_grad_(), rot)


def test_swiglu_is_silu_times_up_with_torchs_roundings(build):
    """cpu_gemv.swiglu (the feed-forward's silu(gate) * up in one pass) against moe.swiglu in bf16: within one
    rounding and mostly bitwise (the C exp may round SiLU's last fp32 bit apart from torch's), large and tiny
    activations included; in_place writes gate's memory; the "torch" backend's ops.swiglu sends bf16 there and
    keeps torch's kernels for fp32 (bitwise)."""
    from mistral_ref.moe import swiglu

    g = torch.Generator().manual_seed(11)
    gate = (torch.randn(3, 37, 300, generator=g) * 4).bfloat16()
    gate[0, 0, :4] = torch.tensor([90.0, -90.0, 1e-30, -1e-30])
    up = torch.randn(3, 37, 300, generator=g).bfloat16()
    expected = swiglu(gate, up)
    got = cpu_gemv.swiglu(gate, up)
    assert got.shape == gate.shape and rel_err(got, expected) <= BF16_RTOL
    assert (got == expected).float().mean() >= 0.99
    same = gate.clone()
    assert cpu_gemv.swiglu(same, up, in_place=True).data_ptr() == same.data_ptr() and torch.equal(same, got)
    assert torch.equal(cpu_gemv.swiglu(gate, up, threads=1), got)
    if build == "native":
        assert torch.equal(pytorch_backend.swiglu(gate, up), got)
        assert torch.equal(pytorch_backend.swiglu(gate.float(), up.float()), swiglu(gate.float(), up.float()))


def test_swiglu_refuses_what_it_cannot_read():
    gate = torch.randn(4, 8).bfloat16()
    cases = {"fp32": (gate.float(), gate.float()), "shapes": (gate, gate[:2]), "a view with gaps": (gate[:, ::2],
             gate[:, ::2]), "mixed dtypes": (gate, gate.float())}
    for name, args in cases.items():
        assert not cpu_gemv.swiglu_applies(*args), name
        with pytest.raises(ValueError, match="swiglu"):
            cpu_gemv.swiglu(*args)


def test_a_forked_child_exits_without_waiting_for_the_parents_builder(tmp_path):
    """The wait at exit for the operators' builder to start is the starting process's: a child forked while the
    build was being handed off (its thread not copied) exits at once instead of waiting for it."""
    import subprocess
    import sys

    code = ("import os, time\n"
            "from mistral_ref.backends import cpu_gemv\n"
            "cpu_gemv._ops_handed_off.clear()\n"  # as if the build were being handed off right now
            "cpu_gemv.atexit.register(cpu_gemv._wait_for_builder, os.getpid())\n"
            "t = time.perf_counter()\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    raise SystemExit(0)\n"  # the child exits through the interpreter: atexit runs
            "os.waitpid(pid, 0)\n"
            "print(time.perf_counter() - t)\n"
            "cpu_gemv._ops_handed_off.set()\n")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "MISTRAL_REF_CPU_KERNELS": "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout) < 10, done.stdout  # the parent's own wait would be 30 s


def _silu_mul(lib, gate: torch.Tensor, up: torch.Tensor, threads: int) -> torch.Tensor:
    """cpu_gemv.c's silu_mul (called by the C kernels only: SwiGLU's silu(gate) * up) through ctypes."""
    fn = lib.silu_mul
    fn.argtypes, fn.restype = [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_int64, ctypes.c_int], None
    out = torch.empty_like(gate)
    fn(gate.data_ptr(), up.data_ptr(), out.data_ptr(), int(gate.dtype == torch.bfloat16), gate.numel(), threads)
    return out


def test_silu_gives_every_build_the_same_bits_and_torchs_within_a_few_ulp():
    """SiLU's e^-g in the C kernels is a polynomial whose vector lanes and scalar form run the same operations:
    every build, thread count and position of a value gives the same bits.  In fp32 within 4 ulp of torch's F.silu
    over the activations' range (|g| <= 80) and past it (where expf takes over: overflow, denormals), its
    infinities and NaN; on bf16 activations torch's bf16 results."""
    g = torch.cat([torch.randn(20000, generator=torch.Generator().manual_seed(s)) * s for s in (1, 4, 30)]
                  + [torch.linspace(-120, 120, 4001), torch.tensor(
                      [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-40, 79.99, 80.0, 80.01,
                       -80.0, -80.01, 88.5, -88.5, 104.0, -104.0])])
    up = torch.ones_like(g)
    libs = {"native": cpu_gemv.library()}
    for name in ("portable", "avx2"):
        if name == "portable" or cpu_gemv.library().cpu_gemv_isa() == 3:
            libs[name] = cpu_gemv.load(cpu_gemv.build(OTHER_BUILDS[name][0]))
    first = _silu_mul(libs["native"], g, up, 1)
    for name, lib in libs.items():
        for threads in (1, 3):
            assert torch.equal(_silu_mul(lib, g, up, threads).view(torch.int32), first.view(torch.int32)), name
            assert torch.equal(_silu_mul(lib, g[5:], up[5:], threads).view(torch.int32), first[5:].view(torch.int32))
    expected = F.silu(g)
    finite = torch.isfinite(expected)
    ulp = (first[finite].view(torch.int32).long() - expected[finite].view(torch.int32).long()).abs()
    assert ulp.max() <= 4
    assert (finite & (g.abs() > 80)).sum() > 1000  # (expf's range, in that bound too)
    assert torch.equal(first[~finite].isnan(), expected[~finite].isnan())
    assert torch.equal(first[torch.isinf(expected)], expected[torch.isinf(expected)])
    gb = (torch.randn(50000, generator=torch.Generator().manual_seed(5)) * 3).bfloat16()
    ub = torch.randn(50000, generator=torch.Generator().manual_seed(6)).bfloat16()
    assert torch.equal(_silu_mul(libs["native"], gb, ub, 2), F.silu(gb) * ub)


AMX = cpu_gemv.library() is not None and bool(cpu_gemv.library().cpu_gemv_amx())
needs_amx = pytest.mark.skipif(not AMX, reason="no AMX tiles here (cpu_gemv.prompt_attention_amx runs where there are)")


@needs_amx
@pytest.mark.parametrize("B, T, S, H, K, D, Dv, window", [
    (1, 100, 100, 4, 2, 64, 64, None),  # GQA, a prompt not a multiple of 32
    (2, 70, 200, 4, 1, 32, 48, None),  # a later chunk after 130 keys, value heads of their own size (MLA)
    (1, 300, 300, 8, 2, 128, 128, 50),  # head_dim 128, a window shorter than the prompt
    (1, 33, 90, 2, 2, 64, 64, 20),  # a later chunk with a window
    (1, 1, 17, 2, 2, 64, 64, None),  # one query
])
def test_amx_flash_attention_equals_the_reference(B, T, S, H, K, D, Dv, window):
    """cpu_gemv.prompt_attention_amx (flash attention on AMX tiles, the roundings of a fused kernel): within bf16
    rounding of attention.attention, and no farther from the exact result (float64) than the bf16 reference is;
    the same bits for any number of threads (a block of queries is one thread's)."""
    g = torch.Generator().manual_seed(T * S)
    q = (torch.randn(B, T, H, D, generator=g) * 2).bfloat16()
    k, v = torch.randn(B, S, K, D, generator=g).bfloat16(), torch.randn(B, S, K, Dv, generator=g).bfloat16()
    q_pos, k_pos = torch.arange(S - T, S).expand(B, T), torch.arange(S).expand(B, S)
    got = cpu_gemv.prompt_attention_amx(q, k, v, window, threads=1)
    want = attention(q, k, v, q_pos, k_pos, window)
    exact = attention(q.double(), k.double(), v.double(), q_pos, k_pos, window)
    assert got.shape == want.shape == (B, T, H, Dv) and got.dtype == torch.bfloat16
    assert rel_err(got, want) < 2e-2  # (the reference's roundings and a fused kernel's: SDPA's tests allow 3e-2)
    assert rel_err(got, exact) <= 1.5 * rel_err(want, exact) + 2 ** -9
    assert torch.equal(cpu_gemv.prompt_attention_amx(q, k, v, window, threads=3), got)


@needs_amx
@pytest.mark.parametrize("growth", [0.0, 0.02, 0.3], ids=["flat", "slow", "steep"])
def test_amx_flash_attention_follows_growing_scores(growth):
    """Scores that grow along the keys make the kernel raise its exponent's offset at later steps, some with the
    previous step's probabilities still held for the values' product (slow: now and then; steep: every step),
    which must go into the output at the old offset first: within 1e-2 of float64 either way (the bf16 reference
    rounds such scores to bf16 and is 4e-2 / 0.5 away from it at the two growths), and no farther than it."""
    g = torch.Generator().manual_seed(11)
    T, H, K, D = 200, 4, 2, 32
    q = (torch.randn(1, T, H, D, generator=g) * 0.5 + 1.0).bfloat16()
    k = (torch.randn(1, T, K, D, generator=g) + growth * torch.arange(T)[None, :, None, None]).bfloat16()
    v = torch.randn(1, T, K, D, generator=g).bfloat16()
    pos = torch.arange(T)[None]
    got = cpu_gemv.prompt_attention_amx(q, k, v)
    want = attention(q, k, v, pos, pos, None)
    exact = attention(q.double(), k.double(), v.double(), pos, pos, None)
    assert rel_err(got, exact) < 1e-2
    assert rel_err(got, exact) <= 1.5 * rel_err(want, exact) + 2 ** -9


@needs_amx
def test_amx_flash_attention_sees_no_later_key():
    """A NaN key at position 20 makes the queries at 20 and after NaN on its key / value head (as in the
    reference) and leaves every earlier query, and the other heads, bitwise unchanged: its block of keys is
    multiplied for the earlier queries too, the softmax must not use it."""
    q, k, v, pos = _prompt(1, 70, 4, 2, 32, torch.bfloat16)
    clean = cpu_gemv.prompt_attention_amx(q, k, v)
    k[0, 20, 1, 3] = float("nan")
    got = cpu_gemv.prompt_attention_amx(q, k, v)
    assert torch.equal(got.isnan(), attention(q, k, v, pos, pos, None).isnan())
    assert got[0, 20:, 2:].isnan().all() and not got[0, :20].isnan().any() and not got[0, :, :2].isnan().any()
    assert torch.equal(got[0, :20], clean[0, :20]) and torch.equal(got[0, :, :2], clean[0, :, :2])


@needs_amx
def test_amx_flash_attention_takes_the_ragged_rows(monkeypatch):
    """prompt_rows on a CPU with AMX tiles: the whole chunk and the later chunk of a ragged batch go to the AMX
    flash kernel (with AMX_ATTENTION on), within bf16 rounding of the reference, padding rows included; the
    kernel refuses shapes it does not take (head_dim not a multiple of 32) and prompt_rows keeps its other paths."""
    calls = []
    real = cpu_gemv.prompt_attention_amx
    monkeypatch.setattr(cpu_gemv, "prompt_attention_amx", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, q_pos, k_pos = _ragged_batch(3)
    got = prompt_attention.prompt_rows(q, k, v, q_pos, k_pos, None)
    want = attention(q, k, v, q_pos, k_pos, None)
    assert len(calls) == 2
    for b in range(3):
        assert rel_err(got[b], want[b]) < 2e-2, b
    assert not cpu_gemv.prompt_attention_amx_applies(q[..., :16], k[..., :16], v[..., :16])
    with pytest.raises(ValueError, match="not bf16 queries"):
        cpu_gemv.prompt_attention_amx(q.float(), k.float(), v.float())


def test_amx_flash_attention_stops_at_its_measured_limits(monkeypatch):
    """prompt_attention.amx_takes: up to AMX_MAX_KEYS keys and AMX_MAX_KV_BYTES of a row's keys and values (past
    them SDPA's kernel was as fast), and only with AMX_ATTENTION on; the kernel's own checks besides."""
    monkeypatch.setattr(cpu_gemv, "prompt_attention_amx_applies", lambda *a: True)  # (the limits alone, any CPU)
    q = torch.empty(1, 64, 8, 128, dtype=torch.bfloat16)
    kv = [torch.empty(1, S, K, 128, dtype=torch.bfloat16) for S, K in ((2048, 8), (4096, 2), (4096, 8), (8192, 1))]
    assert [prompt_attention.amx_takes(q, k, k) for k in kv] == [True, True, False, False]
    monkeypatch.setattr(prompt_attention, "AMX_ATTENTION", False)
    assert not prompt_attention.amx_takes(q, kv[0], kv[0])


@needs_amx
@pytest.mark.parametrize("rows, out, inp", [(1, 32, 32), (9, 768, 768), (37, 256, 640), (100, 2048, 768),
                                            (256, 640, 1792), (513, 96, 544)])
def test_amx_linear_equals_f_linear(rows, out, inp):
    """cpu_gemv.linear_amx (bf16 products on AMX tiles, fp32 sums rounded once): within one bf16 rounding of
    F.linear (which rounds its own fp32 sums once, in another order), no farther from the float64 product than
    F.linear, the same bits for any thread count; rows past the last whole 32 (a zero-padded block) and more rows
    than one pass (AMX_LINEAR_ROWS, 512) included."""
    g = torch.Generator().manual_seed(rows + out)
    x = torch.randn(rows, inp, generator=g).bfloat16()
    w = (torch.randn(out, inp, generator=g) / inp ** 0.5).bfloat16()
    got = cpu_gemv.linear_amx(x, w, threads=1)
    want = F.linear(x, w)
    exact = x.double() @ w.double().T
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out)
    assert torch.allclose(got.float(), want.float(), rtol=2 ** -7, atol=2 ** -7 * float(exact.abs().max()))
    assert (got.double() - exact).abs().max() <= 1.01 * (want.double() - exact).abs().max() + 1e-30
    assert torch.equal(cpu_gemv.linear_amx(x, w, threads=3), got)
    assert torch.equal(cpu_gemv.linear_amx(x.view(1, rows, inp), w, threads=2), got.view(1, rows, out))


@needs_amx
def test_amx_linear_keeps_a_nan_in_its_row():
    x = torch.randn(40, 64).bfloat16()
    w = torch.randn(64, 64).bfloat16()
    clean = cpu_gemv.linear_amx(x, w)
    x[7, 3] = float("nan")
    got = cpu_gemv.linear_amx(x, w)
    assert got[7].isnan().all() and not got[torch.arange(40) != 7].isnan().any()
    assert torch.equal(got[torch.arange(40) != 7], clean[torch.arange(40) != 7])


@needs_amx
def test_amx_linear_takes_what_linear_sends_it(monkeypatch):
    """backends/linear.py's linear sends bf16 products of AMX_LINEAR_MIN_ROWS to AMX_LINEAR_MAX_ROWS rows to it
    (the result: linear_amx's bits), and no others: fewer rows (the C row kernels, or oneDNN), more rows, fp32,
    inputs or outputs not multiples of 32, autograd; linear_amx itself refuses what it cannot take."""
    from mistral_ref.backends.linear import linear

    w = torch.randn(64, 96).bfloat16()
    calls = []
    real = cpu_gemv.linear_amx
    monkeypatch.setattr(cpu_gemv, "linear_amx", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    for rows in (cpu_gemv.AMX_LINEAR_MIN_ROWS, cpu_gemv.AMX_LINEAR_MAX_ROWS):
        x = torch.randn(rows, 96).bfloat16()
        assert torch.equal(linear(x, w), real(x, w))
    assert len(calls) == 2
    for x, weight in [(torch.randn(cpu_gemv.AMX_LINEAR_MIN_ROWS - 1, 96).bfloat16(), w),
                      (torch.randn(cpu_gemv.AMX_LINEAR_MAX_ROWS + 1, 96).bfloat16(), w),
                      (torch.randn(64, 96), w.float()),
                      (torch.randn(64, 80).bfloat16(), torch.randn(64, 80).bfloat16()),
                      (torch.randn(64, 96).bfloat16(), torch.randn(48, 96).bfloat16())]:
        linear(x, weight)
        assert not cpu_gemv.linear_amx_applies(x, weight)
    assert len(calls) == 2
    x = torch.randn(64, 96).bfloat16().requires_grad_()
    assert not cpu_gemv.linear_amx_applies(x, w)
    with pytest.raises(ValueError, match="not a bf16 product it takes"):
        real(torch.randn(64, 80).bfloat16(), torch.randn(64, 80).bfloat16())
