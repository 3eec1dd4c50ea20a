"""backends/linear.py: the CPU products (split per thread, bf16 upcast, multiply-and-sum) equal F.linear."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from mistral_ref.backends import cpu_gemv
from mistral_ref.backends import linear as linear_module
from mistral_ref.backends.linear import (
    UPCAST_MIN_ROWS,
    join_projections,
    joined,
    linear,
    multiply_sum_linear,
    split_linear,
    split_pays,
    upcast_on_cpu,
)
from mistral_ref.cache import KVCache
from mistral_ref.checkpoint import load_model, save_checkpoint
from mistral_ref.config import ModelArgs
from mistral_ref.model import Transformer

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


JOIN = ModelArgs(dim=48, n_layers=2, hidden_dim=64, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=61,
                 norm_eps=1e-5, rope_theta=1e4)  # q 64, k and v 32 outputs each


def _qkv(model: Transformer, layer: int = 0) -> list[torch.Tensor]:
    a = model.layers[layer].attention
    return [a.wq.weight, a.wk.weight, a.wv.weight]


def test_join_projections_keeps_names_values_and_memory(make_model):
    """join_projections lays each layer's wq, wk, wv out one after another in one tensor: the parameters are views
    of it (one storage, nothing copied twice), the state dict has the same names and values, and joined() gives the
    (q + k + v, dim) whole; a second call changes nothing; converting the model gives each its own tensor again."""
    model = make_model(JOIN)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = sum(p.numel() for p in model.parameters())
    assert joined(_qkv(model)) is None
    assert join_projections(model) is model
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert sum(p.numel() for p in model.parameters()) == params
    for layer in range(JOIN.n_layers):
        ws = _qkv(model, layer)
        assert len({w.untyped_storage().data_ptr() for w in ws}) == 1
        assert ws[0].untyped_storage().nbytes() == sum(w.numel() for w in ws) * 4
        whole = joined(ws)
        assert whole.shape == (128, 48) and torch.equal(whole, torch.cat([w.detach() for w in ws]))
    ptrs = [w.data_ptr() for w in _qkv(model)]
    join_projections(model)
    assert [w.data_ptr() for w in _qkv(model)] == ptrs
    model.to(torch.bfloat16)
    assert joined(_qkv(model)) is None  # (three tensors again: three products, the same values)
    assert joined([_qkv(model)[0], _qkv(model)[2]]) is None  # not adjacent
    w = torch.randn(8, 4)
    assert joined([w[:4], w[4:]]) is not None and joined([w[4:], w[:4]]) is None
    assert joined([w[:4], w[4:].bfloat16()]) is None and joined([w[:4, :2], w[4:, :2]]) is None


@pytest.mark.parametrize("rows", [1, 5, 40, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linears_of_joined_weights_is_one_product_equal_to_three(rows, dtype, monkeypatch, make_model):
    """linears on joined weights: one product (a prompt's rows; a few rows keep the C kernels' one call), whose
    split output equals the three products' (the same sums: bitwise here), as views of one tensor; with gradients
    wanted, three products (autograd reaches each parameter)."""
    model = join_projections(make_model(JOIN).to(dtype))
    ws = _qkv(model)
    x = torch.randn(rows, 48, generator=torch.Generator().manual_seed(rows)).to(dtype)
    calls = []
    real = linear_module.linear
    monkeypatch.setattr(linear_module, "linear", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    with torch.inference_mode():
        out = linear_module.linears(x, ws)
        separate = tuple(real(x, w) for w in ws)
        in_c = cpu_gemv.applies_many(x, ws) and cpu_gemv.library() is not None
    if in_c:
        assert calls == []  # the C kernels' one call for all three
    else:
        assert calls == [(128, 48)]
        assert out[0].untyped_storage().data_ptr() == out[2].untyped_storage().data_ptr()
    assert [o.shape for o in out] == [(rows, 64), (rows, 32), (rows, 32)]
    for got, want in zip(out, separate):
        assert torch.equal(got, want)
    calls.clear()
    xg = x.float().requires_grad_()
    with torch.enable_grad():
        fmodel = join_projections(make_model(JOIN))
        outs = linear_module.linears(xg, _qkv(fmodel))
        sum(o.sum() for o in outs).backward()
    assert len(calls) == 3 or (rows < 32 and cpu_gemv.applies_many(xg, _qkv(fmodel)))
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in _qkv(fmodel))
    calls.clear()
    with torch.enable_grad():  # an input without gradient (a frozen embedding), weights with: still three
        outs = linear_module.linears(x.float(), _qkv(fmodel))
        sum(o.sum() for o in outs).backward()
    assert len(calls) == 3 or (rows < 32 and cpu_gemv.applies_many(x.float(), _qkv(fmodel)))
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in _qkv(fmodel))


def test_joined_model_prefills_and_decodes_as_before(make_model, tmp_path):
    """A model with joined projections: the same logits (fp32 within 1e-6; bf16 bitwise here) for a prompt into a
    cache, the same greedy continuation through the one-call decode step, the same gradients, and a checkpoint that
    saves and loads to the same weights."""
    model = make_model(JOIN)
    prompt = torch.randint(0, JOIN.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))

    def run(m):
        with torch.inference_mode():
            cache = KVCache(m.args, 2, 48, dtype=m.dtype)
            pos = torch.arange(40).expand(2, 40)
            logits = [m(prompt, pos, cache, logits_at=torch.tensor([39, 20]))]
            token = logits[0][:, -1].argmax(-1, keepdim=True)
            for t in range(40, 46):
                logits.append(m(token, torch.full((2, 1), t), cache))
                token = logits[-1][:, -1].argmax(-1, keepdim=True)
            return torch.cat(logits, 1)

    for dtype in (torch.float32, torch.bfloat16):
        plain = make_model(JOIN).to(dtype)
        joint = join_projections(make_model(JOIN).to(dtype))
        want, got = run(plain), run(joint)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        assert rel_err(got, want) < (1e-6 if dtype == torch.float32 else 1e-2)
    joint = join_projections(make_model(JOIN))
    for m in (model, joint):
        m.zero_grad()
        m(prompt[:, :9]).logsumexp(-1).sum().backward()
    for (name, p), q in zip(model.named_parameters(), joint.parameters()):
        assert rel_err(q.grad, p.grad) < 1e-5, name
    save_checkpoint(joint, tmp_path / "joined", format="native")
    loaded = load_model(tmp_path / "joined")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 5, 40, 200, 600])
def test_add_linear_adds_into_h_within_one_rounding(rows, dtype):
    """add_linear(h, x, w) is h + linear(x, w) written into h: the same bits where linear's own path runs (C
    kernels, splits, upcasts: h.add_), else one product that adds h (plain_product: torch.addmm_), whose one
    rounding is no farther from the float64 sum than the separate sum's two (+ fp32's sums' order)."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=g).to(dtype)
    w = (torch.randn(64, 96, generator=g) / 10).to(dtype)
    h = (torch.randn(rows, 64, generator=g) * 3).to(dtype)
    with torch.inference_mode():
        separate = h + linear(x, w)
        mine = h.clone()
        got = linear_module.add_linear(mine, x, w)
    assert got.data_ptr() == mine.data_ptr() and got.dtype == dtype and got.shape == h.shape
    exact = h.double() + x.double() @ w.double().T
    if not linear_module.plain_product(x, w):
        assert torch.equal(got, separate)
    elif dtype == torch.float32:
        assert rel_err(got, exact) < 1e-6
    else:
        assert (got.double() - exact).abs().max() <= (separate.double() - exact).abs().max() + 1e-6


def test_add_linear_takes_the_product_where_f_linear_would_run(monkeypatch):
    """plain_product mirrors linear's choice: quantized weights, the C kernels' rows and fp32's split rows are not
    plain; a prompt's fp32 rows are; bf16 where upcast is not needed."""
    from mistral_ref.quantize import quantize_weight

    x, w = torch.randn(600, 64), torch.randn(32, 64)
    assert linear_module.plain_product(x, w)
    assert not linear_module.plain_product(x[:4], w)  # split rows (fp32, < SPLIT_MAX_ROWS)
    assert not linear_module.plain_product(x, quantize_weight(w, "int8"))
    monkeypatch.setattr(cpu_gemv, "handles", lambda *a: True)
    assert not linear_module.plain_product(x, w)
    monkeypatch.setattr(cpu_gemv, "handles", lambda *a: False)
    monkeypatch.setattr(cpu_gemv, "linear_amx_applies", lambda *a: False)
    monkeypatch.setattr(linear_module, "upcast_on_cpu", lambda t: True)
    assert not linear_module.plain_product(x.bfloat16(), w.bfloat16())
    assert linear_module.plain_product(x[:2].bfloat16(), w.bfloat16())  # (fewer than UPCAST_MIN_ROWS: F.linear)
