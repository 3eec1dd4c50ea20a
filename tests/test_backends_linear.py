"""backends/linear.py: the CPU products (split per thread, bf16 upcast, multiply-and-sum) equal F.linear."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from mistral_ref.backends import cpu_gemv
from mistral_ref.backends import linear as linear_module
from mistral_ref.backends.linear import (
    UPCAST_MIN_ROWS,
    linear,
    multiply_sum_linear,
    split_linear,
    split_pays,
    upcast_on_cpu,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_linear_matches_the_native_product(rows):
    """bf16 products with more than one row run in fp32 on CPUs without native bf16: same values up to the
    final rounding; fp32 is F.linear itself, or for one row (the C kernels) its sums in another order."""
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 64, generator=g), torch.randn(32, 64, generator=g)
    if rows == 1 and cpu_gemv.handles(x, w):
        assert rel_err(linear(x, w), torch.nn.functional.linear(x.double(), w.double())) < 1e-6
    else:
        assert torch.equal(linear(x, w), torch.nn.functional.linear(x, w))
    out = linear(x.bfloat16(), w.bfloat16())
    assert out.dtype == torch.bfloat16
    exact = torch.nn.functional.linear(x.bfloat16().double(), w.bfloat16().double())
    assert rel_err(out, exact) < 1e-2
    if upcast_on_cpu(out) and rows >= UPCAST_MIN_ROWS:  # computed in fp32, rounded once: within 1 ulp
        assert rel_err(out, exact) < 4e-3
    w_big = torch.randn(5000, 512, generator=g).bfloat16()  # upcast in two blocks of rows
    x_big = torch.randn(rows, 512, generator=g).bfloat16()
    exact = torch.nn.functional.linear(x_big.double(), w_big.double())
    assert rel_err(linear(x_big, w_big), exact) < 1e-2


def test_multiply_sum_linear_is_the_product_accumulated_in_fp32():
    """What a compiled bf16 decode step multiplies with: F.linear's product, summed in fp32, rounded once."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(40, 64, generator=g)
    for x in (torch.randn(1, 64, generator=g), torch.randn(2, 1, 64, generator=g)):
        assert rel_err(multiply_sum_linear(x, w), torch.nn.functional.linear(x, w)) < 1e-6
        out = multiply_sum_linear(x.bfloat16(), w.bfloat16())
        exact = torch.nn.functional.linear(x.bfloat16().double(), w.bfloat16().double())
        assert out.dtype == torch.bfloat16 and out.shape == (*x.shape[:-1], 40)
        assert rel_err(out, exact) < 4e-3  # one bf16 rounding of an fp32 sum


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("rows", [1, 2, 8, 31, 32])
def test_split_linear_equals_f_linear(threads, rows, monkeypatch):
    """The weight split into one block of rows per thread gives F.linear's products (fp32: the same dot products;
    asserted within 1e-6), for any leading shape, whether or not the rows divide evenly (then: F.linear)."""
    monkeypatch.setitem(linear_module._split_measured, threads, True)  # the split, whatever this machine measures
    g = torch.Generator().manual_seed(rows)
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for out_features in (96, 100, 3000):
            w = torch.randn(out_features, 64, generator=g)
            for x in (torch.randn(rows, 64, generator=g), torch.randn(1, rows, 64, generator=g)):
                out = split_linear(x, w)
                assert out.shape == (*x.shape[:-1], out_features)
                assert rel_err(out, torch.nn.functional.linear(x, w)) < 1e-6
                assert rel_err(linear(x, w), torch.nn.functional.linear(x, w)) < 1e-6
                bf = linear(x.bfloat16(), w.bfloat16())  # the bf16 upcast path splits its fp32 products too
                exact = torch.nn.functional.linear(x.bfloat16().double(), w.bfloat16().double())
                assert bf.dtype == torch.bfloat16 and rel_err(bf, exact) < 1e-2
        w = torch.randn(64, 96, generator=g).t()  # a non-contiguous view: no block view of it, F.linear instead
        x = torch.randn(rows, 64, generator=g)
        assert rel_err(split_linear(x, w), torch.nn.functional.linear(x, w)) < 1e-6
    finally:
        torch.set_num_threads(n)


def test_split_pays_is_measured_once_per_thread_count(monkeypatch):
    """split_pays times the split against F.linear once per thread count and keeps the answer; one thread never
    splits; compiled code reads the measured answer (compiled_backend measures before tracing)."""
    monkeypatch.setattr(linear_module, "_split_measured", {})
    assert split_pays(1) is False and linear_module._split_measured == {}
    first = split_pays(2)
    assert isinstance(first, bool) and linear_module._split_measured == {2: first}
    linear_module._split_measured[2] = not first  # a second call reads, it does not time again
    assert split_pays(2) is (not first)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert split_pays(2) is (not first) and split_pays(5) is True  # nothing measured for 5: the split
    assert 5 not in linear_module._split_measured
