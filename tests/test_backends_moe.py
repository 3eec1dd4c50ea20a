"""backends/moe.py: grouped and one-token expert dispatch equal moe.moe_forward, and moe.mix_experts for the
fine-grained router (fine_moe.route_fine: 128 experts, top-4); stack_experts keeps names, values and outputs of
Mixtral's and of the fine-grained layer."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from mistral_ref.backends import cpu_gemv, get_backend
from mistral_ref.backends.moe import (
    mix_experts_grouped,
    mix_one_token,
    moe_forward_grouped,
    moe_one_token,
    stack_experts,
)
from mistral_ref.config import FineMoeArgs, ModelArgs, MoeArgs
from mistral_ref.fine_moe import FineMoeLayer, route_fine
from mistral_ref.moe import FeedForward, MoeLayer, mix_experts, moe_forward

pytestmark = pytest.mark.usefixtures("one_thread")
REFERENCE = get_backend("reference")


@pytest.mark.parametrize("N", [1, 2, 9, 64])
def test_grouped_moe_equals_reference(N):
    """One token (decode: only its k experts run), a few tokens (some experts idle), many tokens; one expert of
    zero width (how parallel.py places an expert held by another rank) contributes exact zeros in both."""
    g = torch.Generator().manual_seed(N)
    E, dim, hidden = 6, 16, 24
    x = torch.randn(N, dim, generator=g)
    gate = torch.randn(E, dim, generator=g)
    w1 = [torch.randn(hidden, dim, generator=g) * 0.3 for _ in range(E)]
    w3 = [torch.randn(hidden, dim, generator=g) * 0.3 for _ in range(E)]
    w2 = [torch.randn(dim, hidden, generator=g) * 0.3 for _ in range(E)]
    w1[3], w3[3], w2[3] = torch.zeros(0, dim), torch.zeros(0, dim), torch.zeros(dim, 0)
    ref, ref_logits = moe_forward(x, gate, w1, w2, w3, top_k=2)
    out, logits = moe_forward_grouped(x, gate, w1, w2, w3, top_k=2)
    assert torch.equal(logits, ref_logits)
    assert rel_err(out, ref) < 1e-6
    xb = x.bfloat16()
    ws = [[w.bfloat16() for w in ws] for ws in (w1, w2, w3)]
    out16 = moe_forward_grouped(xb, gate.bfloat16(), *ws, top_k=2)[0]
    assert out16.dtype == torch.bfloat16 and rel_err(out16, moe_forward(xb, gate.bfloat16(), *ws, top_k=2)[0]) < 2e-2


def test_grouped_moe_accepts_stacked_experts():
    g = torch.Generator().manual_seed(1)
    E, dim, hidden, N = 4, 8, 12, 10
    x, gate = torch.randn(N, dim, generator=g), torch.randn(E, dim, generator=g)
    w1, w3, w2 = (torch.randn(E, a, b, generator=g) for a, b in ((hidden, dim), (hidden, dim), (dim, hidden)))
    for n in (1, N):
        ref = moe_forward(x[:n], gate, w1, w2, w3, 2)[0]
        assert rel_err(moe_forward_grouped(x[:n], gate, w1, w2, w3, 2)[0], ref) < 1e-6


@pytest.mark.parametrize("scheme", ["bf16", "int8", "int4"])
def test_one_token_of_eager_decoding_is_one_fused_call(scheme, monkeypatch):
    """Eager decoding of one token with stacked experts the C kernels take: the grouped dispatch makes one
    experts_moe call (router and experts; not 3 products per expert), equal to the reference within bf16
    rounding (the router's logits within fp32 rounding: the C loop sums in another order), and falls back
    to the loop over experts where the kernels are off."""
    from mistral_ref.backends import cpu_gemv
    from mistral_ref.quantize import QuantizedExperts, quantize_weight

    if cpu_gemv.library() is None:
        pytest.skip(f"C kernels: {cpu_gemv.status()}")
    g = torch.Generator().manual_seed(3)
    E, dim, hidden = 6, 64, 96
    gate = torch.randn(E, dim, generator=g)
    ws = [torch.randn(E, a, b, generator=g).bfloat16() / 8 for a, b in ((hidden, dim), (dim, hidden), (hidden, dim))]
    if scheme != "bf16":
        ws = [QuantizedExperts([quantize_weight(e, scheme, 32) for e in w]) for w in ws]
    w1, w2, w3 = ws
    ref_w = [w if scheme == "bf16" else torch.stack([q.dequantize() for q in w.experts]) for w in ws]
    x = torch.randn(1, dim, generator=g).bfloat16()
    calls = []
    real = cpu_gemv.experts_moe
    monkeypatch.setattr(cpu_gemv, "experts_moe", lambda *a: calls.append(1) or real(*a))
    out, logits = moe_forward_grouped(x, gate, w1, w2, w3, 2)
    ref, ref_logits = moe_forward(x, gate, *ref_w, 2)
    assert calls == [1] and rel_err(logits, ref_logits) < 1e-6
    assert rel_err(out, ref) < 2 ** -7  # the kernels round each product to bf16 as the reference does
    monkeypatch.setattr(cpu_gemv, "_lib", None)  # kernels off: the loop over experts, not the fused call
    monkeypatch.setattr(cpu_gemv, "_status", "off (test)")
    if scheme == "bf16":
        assert rel_err(moe_forward_grouped(x, gate, w1, w2, w3, 2)[0], ref) < 2 ** -7 and calls == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_one_token_with_stacked_experts_equals_the_reference(dtype):
    """The single-token path a compiled decode step runs (experts gathered by index from stacked weights)."""
    g = torch.Generator().manual_seed(2)
    E, dim, hidden = 6, 16, 24
    gate = torch.randn(E, dim, generator=g)
    w1, w3 = torch.randn(E, hidden, dim, generator=g) / 4, torch.randn(E, hidden, dim, generator=g) / 4
    w2 = torch.randn(E, dim, hidden, generator=g) / 4
    for _ in range(20):
        x = torch.randn(1, dim, generator=g)
        for k in (1, 2, 3):
            ref, ref_logits = moe_forward(x.to(dtype), gate, w1.to(dtype), w2.to(dtype), w3.to(dtype), k)
            out, logits = moe_one_token(x.to(dtype), gate, w1.to(dtype), w2.to(dtype), w3.to(dtype), k)
            assert out.dtype == dtype and out.shape == (1, dim) and torch.equal(logits, ref_logits)
            assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 2e-2)


def test_stack_experts_keeps_parameters_names_and_outputs():
    """stack_experts moves the weights into (E, ...) tensors that the parameters view: same state dict, same
    outputs, no second copy; converting the module afterwards drops the (then stale) stacks."""
    args = ModelArgs(dim=32, n_layers=1, hidden_dim=48, n_heads=4, n_kv_heads=2, head_dim=8, vocab_size=64,
                     norm_eps=1e-5, rope_theta=1e4, moe=MoeArgs(4, 2))
    torch.manual_seed(0)
    layer = MoeLayer(args).eval()
    x = torch.randn(1, 5, 32)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    ref = layer(x, REFERENCE)[0]
    stack_experts(layer)
    after = layer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for name, stacked in zip(("w1", "w2", "w3"), layer.stacked):
        assert stacked.shape[0] == 4
        for i, e in enumerate(layer.experts):
            w = getattr(e, name).weight
            assert isinstance(w, torch.nn.Parameter) and w.data_ptr() == stacked[i].data_ptr()
    assert torch.equal(layer(x, REFERENCE)[0], ref)
    layer.to(torch.bfloat16)
    assert layer.stacked is None
    with warnings.catch_warnings():  # torch warns that initialising a zero-element tensor does nothing
        warnings.simplefilter("ignore")
        layer.experts[3] = FeedForward(32, 0)  # as on an expert-parallel rank: a remote expert is a placeholder
    stack_experts(layer)
    assert layer.stacked is None  # experts of different shapes cannot be stacked: the eager dispatch stays


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_stack_experts_stacks_quantized_experts_into_views(scheme):
    """Quantized experts are stacked too (codes and scales, QuantizedExperts): same state dict, each expert's
    buffers view its slice, same outputs."""
    from mistral_ref.quantize import QuantizedExperts, quantize_model
    args = ModelArgs(dim=32, n_layers=1, hidden_dim=64, n_heads=4, n_kv_heads=2, head_dim=8, vocab_size=64,
                     norm_eps=1e-5, rope_theta=1e4, moe=MoeArgs(4, 2))
    torch.manual_seed(0)
    layer = quantize_model(MoeLayer(args).eval(), scheme, group_size=32)
    x = torch.randn(1, 3, 32)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    ref = layer(x, REFERENCE)[0]
    stack_experts(layer)
    after = layer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for name, stacked in zip(("w1", "w2", "w3"), layer.stacked):
        assert isinstance(stacked, QuantizedExperts) and stacked.qweight.shape[0] == 4
        for i, e in enumerate(layer.experts):
            assert getattr(e, name).weight.qweight.data_ptr() == stacked.qweight[i].data_ptr()
    assert torch.equal(layer(x, REFERENCE)[0], ref)


# Mistral Small 4's routing shape (128 experts, top-4) with Large 3's group limit and sigmoid scoring
FINE = FineMoeArgs(num_experts=128, num_experts_per_tok=4, moe_intermediate_size=12, n_group=8, topk_group=4,
                   scoring_func="sigmoid", routed_scaling_factor=2.5)


def fine_experts(dim: int, hidden: int, seed: int, E: int = 128):
    g = torch.Generator().manual_seed(seed)
    w1, w3 = torch.randn(E, hidden, dim, generator=g) / 4, torch.randn(E, hidden, dim, generator=g) / 4
    w2 = torch.randn(E, dim, hidden, generator=g) / 4
    return w1, w2, w3, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [1, 3, 40])
def test_fast_mixes_of_fine_grained_routing_equal_the_reference(N, dtype):
    """route_fine's choice (group-limited, sigmoid + correction bias, scaled weights), mixed by the grouped
    dispatch (stacked and listed experts) and, for one token, by the gather of compiled decoding."""
    dim = 16
    w1, w2, w3, g = fine_experts(dim, FINE.moe_intermediate_size, seed=N)
    x, gate, bias = torch.randn(N, dim, generator=g), torch.randn(128, dim, generator=g), torch.rand(128, generator=g)
    weights, experts, _ = route_fine(x, gate, FINE, bias)
    assert experts.shape == (N, 4) and len(experts.unique()) > (N > 1)
    x, w1, w2, w3 = (t.to(dtype) for t in (x, w1, w2, w3))
    ref = mix_experts(x, weights, experts, w1, w2, w3)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    for ws in ((w1, w2, w3), (list(w1), list(w2), list(w3))):
        out = mix_experts_grouped(x, weights, experts, *ws)
        assert out.dtype == dtype and rel_err(out, ref) < tol
    if N == 1:
        assert rel_err(mix_one_token(x, weights, experts, w1, w2, w3), ref) < tol
    assert rel_err(mix_experts_grouped(x, weights, experts.flip(1), w1, w2, w3), ref) > 1e-2  # slots matter


def test_fine_grained_layer_with_stacked_experts_and_the_torch_backend():
    """stack_experts on a FineMoeLayer: same state dict, parameters view the stacks; the layer's output with the
    "torch" backend equals the reference's, the shared expert included (removing it moves the output)."""
    args = ModelArgs(dim=16, n_layers=1, hidden_dim=24, n_heads=2, n_kv_heads=2, head_dim=8, vocab_size=64,
                     norm_eps=1e-5, rope_theta=1e4, fine_moe=FINE)
    torch.manual_seed(0)
    layer = FineMoeLayer(args).eval()
    with torch.no_grad():
        layer.gate.e_score_correction_bias.uniform_(0, 1)
    x = torch.randn(2, 5, 16)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    ref, ref_logits = layer(x, REFERENCE)
    stack_experts(layer)
    assert layer.stacked is not None and layer.stacked[0].shape == (128, 12, 16)
    assert all(e.w2.weight.data_ptr() == layer.stacked[1][i].data_ptr() for i, e in enumerate(layer.experts))
    after = layer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for n in (1, 5):  # a decode step (one token) and a chunk
        out, logits = layer(x[:1, :n], get_backend("torch"))
        assert rel_err(logits, ref_logits[:n]) < 1e-6 and rel_err(out, ref[:1, :n]) < 1e-6
    shared = layer.shared_experts(x, REFERENCE)
    assert rel_err(ref - shared, ref) > 1e-2
    layer.float()
    assert layer.stacked is None


@pytest.mark.parametrize("form", ["fp32", "bf16", "int8", "fine-bf16"])
def test_unstacked_experts_decode_through_one_c_call(form, make_model, monkeypatch):
    """A model whose experts are not stacked (load_model keeps each expert's parameters) sends an eager decode
    step's chosen experts to the C kernels in one call a layer (cpu_gemv.swiglu_chosen, the chosen experts' own
    tensors), and its logits equal the reference backend's: fp32 within 1e-5, bf16 and int8 within the
    reference's own bf16 rounding; Mixtral's experts, and the fine-grained ones of Small 4's layer."""
    from mistral_ref.backends import cpu_gemv
    from mistral_ref.cache import KVCache
    from mistral_ref.config import ModelArgs, MoeArgs
    from mistral_ref.quantize import quantize_model

    if cpu_gemv.library() is None:
        pytest.skip(f"C kernels: {cpu_gemv.status()}")
    experts = {"fine_moe": FINE} if form.startswith("fine") else {"moe": MoeArgs(num_experts=4, num_experts_per_tok=2)}
    args = ModelArgs(dim=64, n_layers=2, hidden_dim=96, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=80,
                     norm_eps=1e-5, rope_theta=1e4, **experts)
    model = make_model(args)
    if form != "fp32":
        model = model.to(torch.bfloat16)
    if form == "int8":
        quantize_model(model, "int8")
    calls = []
    real = cpu_gemv.swiglu_chosen
    monkeypatch.setattr(cpu_gemv, "swiglu_chosen", lambda *a: calls.append(1) or real(*a))
    tokens = torch.tensor([[3, 17, 42, 5, 60]])
    logits = {}
    for name in ("reference", "torch"):
        cache = KVCache(args, 1, 8, dtype=model.dtype)
        model.set_backend("reference")  # the same prompt in both caches: the step alone is compared
        with torch.no_grad():
            model(tokens[:, :4], torch.arange(4)[None], cache)
        model.set_backend(name)
        # the layers' step (the engine's whole step, backends/decode_step.py, would stack the experts first)
        model.ops = dataclasses.replace(model.ops, decode_step=None)
        with torch.no_grad():
            logits[name] = model(tokens[:, 4:], torch.tensor([[4]]), cache)  # one token: a decode step
    assert len(calls) == args.n_layers  # one call a MoE layer, in the "torch" backend's step only
    tol = 1e-5 if form == "fp32" else 3e-2
    assert rel_err(logits["torch"], logits["reference"]) < tol


def test_expert_weights_look_each_weight_up_when_indexed():
    """MoeLayer hands ops.moe its unstacked experts as ExpertWeights: a sequence of the E parameters, each looked up
    when indexed (the parameter object itself, never a stale copy: a replaced parameter is seen at once)."""
    from torch import nn

    from mistral_ref.moe import ExpertWeights

    layer = MoeLayer(ModelArgs(dim=8, n_layers=1, hidden_dim=12, n_heads=2, n_kv_heads=2, head_dim=4, vocab_size=16,
                               norm_eps=1e-5, rope_theta=1e4, moe=MoeArgs(num_experts=4, num_experts_per_tok=2)))
    w2 = ExpertWeights(layer.experts, "w2")
    assert len(w2) == 4 and w2[1] is layer.experts[1].w2.weight and w2[-1] is layer.experts[3].w2.weight
    assert [t.data_ptr() for t in w2] == [e.w2.weight.data_ptr() for e in layer.experts]
    assert [t.data_ptr() for t in w2[1:3]] == [e.w2.weight.data_ptr() for e in layer.experts[1:3]]
    layer.experts[2].w2.weight = nn.Parameter(torch.zeros(8, 12))
    assert w2[2] is layer.experts[2].w2.weight and not w2[2].any()
    x = torch.randn(3, 8)
    w1, w3 = ExpertWeights(layer.experts, "w1"), ExpertWeights(layer.experts, "w3")
    as_lists = [[getattr(e, n).weight for e in layer.experts] for n in ("w1", "w2", "w3")]
    with torch.no_grad():
        assert torch.equal(moe_forward(x, layer.gate.weight, w1, w2, w3, 2)[0],
                           moe_forward(x, layer.gate.weight, *as_lists, 2)[0])


def test_grouped_experts_multiply_whole_buckets_of_rows(monkeypatch):
    """Where pads_rows (bf16 products on a CPU that runs them natively, through oneDNN, which compiles a kernel per
    new shape), each expert multiplies row_bucket(n) rows: its own n, then rows of the experts after it (or spare
    copies past the end), whose outputs are dropped.  So the products' shapes recur from prompt to prompt.  The
    result stays the reference's within bf16 rounding and is the unpadded one's (an output row depends on its own
    input row only).  row_bucket: at least n, at most 1/8 more from 128 rows on, 48 shapes up to 4096 rows."""
    import mistral_ref.backends.moe as fast

    for n in range(1, 4097):
        b = fast.row_bucket(n)
        assert n <= b and b % 16 == 0 and (n < 128 or b <= n + n // 8), n
    assert len({fast.row_bucket(n) for n in range(1, 4097)}) == 48
    x16 = torch.randn(2, 8).bfloat16()
    assert not fast.pads_rows(x16.float(), []) and not fast.pads_rows(x16.to("meta"), [])
    g = torch.Generator().manual_seed(3)
    N, E, dim, hidden = 75, 4, 16, 24
    x = torch.randn(N, dim, generator=g).bfloat16()
    gate = torch.randn(E, dim, generator=g).bfloat16()
    w1, w3 = ([(torch.randn(hidden, dim, generator=g) * 0.3).bfloat16() for _ in range(E)] for _ in range(2))
    w2 = [(torch.randn(dim, hidden, generator=g) * 0.3).bfloat16() for _ in range(E)]
    products, real = [], fast.swiglu
    monkeypatch.setattr(fast, "swiglu", lambda rows, *w: products.append(rows.shape[0]) or real(rows, *w))
    monkeypatch.setattr(fast, "pads_rows", lambda x, w1: True)  # (on any machine)
    out, logits = moe_forward_grouped(x, gate, w1, w2, w3, top_k=2)
    counts = torch.bincount(logits.topk(2, dim=-1).indices.flatten(), minlength=E).tolist()
    few = cpu_gemv.MAX_ROWS["bf16"] if cpu_gemv.library() is not None else 0  # the C kernels' rows: never padded
    assert products == [n if n < few else fast.row_bucket(n) for n in counts if n] and sum(products) > 2 * N
    assert rel_err(out, moe_forward(x, gate, w1, w2, w3, top_k=2)[0]) < 2e-2
    monkeypatch.setattr(fast, "pads_rows", lambda x, w1: False)
    assert torch.equal(out, moe_forward_grouped(x, gate, w1, w2, w3, top_k=2)[0])
    monkeypatch.setattr(fast, "pads_rows", lambda x, w1: True)
    products.clear()  # a decode batch of 8 tokens: an expert gets a few rows, its exact count where C takes it
    out = moe_forward_grouped(x[:8], gate, w1, w2, w3, top_k=2)[0]
    counts = [n for n in torch.bincount(moe_forward(x[:8], gate, w1, w2, w3, top_k=2)[1].topk(2, dim=-1).indices
                                        .flatten(), minlength=E).tolist() if n]
    assert products == ([fast.row_bucket(n) for n in counts] if few == 0 else counts)
    assert rel_err(out, moe_forward(x[:8], gate, w1, w2, w3, top_k=2)[0]) < 2e-2



AMX = cpu_gemv.library() is not None and bool(cpu_gemv.library().cpu_gemv_amx())
needs_amx = pytest.mark.skipif(not AMX, reason="no AMX tiles here (cpu_gemv.experts_rows runs where there are)")


def _sorted_rows(experts: torch.Tensor, E: int) -> tuple[torch.Tensor, list[int]]:
    """The assignments grouped by expert, as mix_experts_grouped sorts them: (token of each, counts)."""
    flat = experts.flatten()
    order = flat.argsort(stable=True)
    return order // experts.shape[1], torch.bincount(flat, minlength=E).tolist()


def _per_expert(x, token, counts, w1, w3, w2):
    """The reference's rows expert by expert: moe.swiglu of F.linear products, in bf16."""
    from mistral_ref.moe import swiglu
    out, start = [], 0
    for e, n in enumerate(counts):
        rows = x[token[start:start + n]]
        out.append(F.linear(swiglu(F.linear(rows, w1[e]), F.linear(rows, w3[e])), w2[e]))
        start += n
    return torch.cat(out)


@needs_amx
@pytest.mark.parametrize("E, hidden, dim, N, k", [(8, 64, 128, 40, 2), (6, 80, 80, 150, 2), (16, 48, 512, 300, 4),
                                                 (3, 16, 32, 1, 1), (2, 32, 64, 300, 2)])
@pytest.mark.parametrize("stacked", [True, False])
def test_experts_rows_on_amx_tiles_equal_the_reference_rows(E, hidden, dim, N, k, stacked):
    """cpu_gemv.experts_rows: every expert's rows in one call on AMX tiles, each rounded as moe.swiglu rounds
    them (the products' fp32 sums in the tiles' order): within one bf16 rounding of the reference's rows, nearly
    all bitwise, the same for any threads.  Shapes: inputs past the last whole 32 (dim 80, hidden 48 / 80),
    experts without rows, more than 64 rows an expert (several blocks of tiles), 300 (two of a thread's chunks of
    256), one row; stacked experts and one tensor each."""
    g = torch.Generator().manual_seed(E * N)
    x = torch.randn(N, dim, generator=g).bfloat16()
    w1, w3 = ((torch.randn(E, hidden, dim, generator=g) * 0.1).bfloat16() for _ in range(2))
    w2 = (torch.randn(E, dim, hidden, generator=g) * 0.1).bfloat16()
    experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    if E > 4:
        experts[experts == 1] = 0  # (expert 1 gets no rows)
    token, counts = _sorted_rows(experts, E)
    weights = (w1, w3, w2) if stacked else tuple(list(w.unbind()) for w in (w1, w3, w2))
    assert cpu_gemv.experts_rows_apply(x, weights[0], weights[2], weights[1])
    ys = cpu_gemv.experts_rows(x, token, counts, *weights)
    assert torch.equal(cpu_gemv.experts_rows(x, token, counts, *weights, threads=3), ys)  # (experts a thread)
    ref = _per_expert(x, token, counts, w1, w3, w2)
    assert ys.shape == ref.shape == (N * k, dim) and ys.dtype == torch.bfloat16
    assert ((ys.float() - ref.float()).abs() <= ref.float().abs() * 2 ** -7 + 1e-6).all()
    assert (ys == ref).float().mean() > 0.99


@needs_amx
def test_experts_rows_keep_each_row_to_itself_and_refuse_other_experts():
    """An output row depends on its own input row only (the padding rows are zeros, never mixed in): a row's
    results are the same alone and among others, a NaN row spoils its own rows only.  An expert with rows whose
    weight is of another shape (an expert-parallel rank's zero-width placeholder) makes experts_rows return None,
    and mix_experts_grouped keeps its loop: the reference's result."""
    g = torch.Generator().manual_seed(7)
    E, hidden, dim, N = 4, 32, 64, 20
    x = torch.randn(N, dim, generator=g).bfloat16()
    w1, w3 = ([(torch.randn(hidden, dim, generator=g) * 0.1).bfloat16() for _ in range(E)] for _ in range(2))
    w2 = [(torch.randn(dim, hidden, generator=g) * 0.1).bfloat16() for _ in range(E)]
    token, counts = torch.arange(N), [N, 0, 0, 0]
    every = cpu_gemv.experts_rows(x, token, counts, w1, w3, w2)
    assert torch.equal(cpu_gemv.experts_rows(x, token[3:4], [1, 0, 0, 0], w1, w3, w2), every[3:4])
    x[5, 7] = float("nan")
    spoilt = cpu_gemv.experts_rows(x, token, counts, w1, w3, w2)
    assert spoilt[5].isnan().all() and torch.equal(spoilt[torch.arange(N) != 5], every[torch.arange(N) != 5])
    w1[2], w3[2], w2[2] = torch.empty(0, dim).bfloat16(), torch.empty(0, dim).bfloat16(), torch.empty(dim, 0).bfloat16()
    assert cpu_gemv.experts_rows(x, token[:2], [1, 0, 1, 0], w1, w3, w2) is None
    x[5, 7] = 0.0
    experts = torch.tensor([[0, 2], [1, 2], [0, 1]])
    weights = torch.rand(3, 2, generator=g)
    with torch.inference_mode():
        assert torch.equal(mix_experts_grouped(x[:3], weights, experts, w1, w2, w3),
                           mix_experts(x[:3], weights, experts, w1, w2, w3))


@needs_amx
@pytest.mark.parametrize("N", [8, 64])
def test_bf16_tokens_take_the_amx_experts(N, monkeypatch):
    """mix_experts_grouped sends several bf16 tokens to cpu_gemv.experts_rows (one call), and keeps its loop with
    AMX_EXPERTS off; both within bf16 rounding of moe.mix_experts (fine-grained routing: 16 experts, top-4, as
    Mistral Small 4 routes 128); one token keeps its one-token path."""
    import mistral_ref.backends.moe as fast

    g = torch.Generator().manual_seed(N)
    E, hidden, dim, k = 16, 32, 64, 4
    x = torch.randn(N, dim, generator=g).bfloat16()
    w1, w3 = ((torch.randn(E, hidden, dim, generator=g) * 0.1).bfloat16() for _ in range(2))
    w2 = (torch.randn(E, dim, hidden, generator=g) * 0.1).bfloat16()
    experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    weights = torch.rand(N, k, generator=g)
    calls, real = [], cpu_gemv.experts_rows
    monkeypatch.setattr(cpu_gemv, "experts_rows", lambda *a: calls.append(a[2]) or real(*a))
    with torch.inference_mode():
        ref = mix_experts(x, weights, experts, w1, w2, w3)
        out = mix_experts_grouped(x, weights, experts, w1, w2, w3)
        assert len(calls) == 1 and sum(calls[0]) == N * k and rel_err(out, ref) < 2e-2
        mix_experts_grouped(x[:1], weights[:1], experts[:1], w1, w2, w3)
        monkeypatch.setattr(fast, "AMX_EXPERTS", False)
        looped = mix_experts_grouped(x, weights, experts, w1, w2, w3)
    assert len(calls) == 1 and rel_err(looped, ref) < 2e-2


@pytest.mark.parametrize("N", [5, 40])
def test_fp32_tokens_of_stacked_experts_take_three_grouped_products(N, monkeypatch):
    """Several fp32 tokens with stacked experts: three torch._grouped_mm calls for the layer (gate, up, down),
    within 1e-6 of moe.mix_experts and of the loop an expert (GROUPED_MM off), with experts that get no token
    (16 experts, top-2, 5 tokens); experts kept as separate tensors, and tokens that need gradients, keep the
    loop."""
    import mistral_ref.backends.moe as fast

    if not fast.cpu_grouped_mm():
        pytest.skip("this torch's _grouped_mm does not run on the CPU")
    g = torch.Generator().manual_seed(N)
    E, hidden, dim, k = 16, 24, 32, 2
    x = torch.randn(N, dim, generator=g)
    w1, w3 = (torch.randn(E, hidden, dim, generator=g) * 0.2 for _ in range(2))
    w2 = torch.randn(E, dim, hidden, generator=g) * 0.2
    experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    weights = torch.rand(N, k, generator=g)
    calls, real = [], torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    ref = mix_experts(x, weights, experts, w1, w2, w3)
    with torch.inference_mode():
        out = mix_experts_grouped(x, weights, experts, w1, w2, w3)
        assert len(calls) == 3 and calls[0] == (N * k, dim) and rel_err(out, ref) < 1e-6
        if N == 5:
            assert len(experts.unique()) < E  # some experts got no token
        mix_experts_grouped(x, weights, experts, list(w1), list(w2), list(w3))
        monkeypatch.setattr(fast, "GROUPED_MM", False)
        looped = mix_experts_grouped(x, weights, experts, w1, w2, w3)
    assert len(calls) == 3 and rel_err(looped, out) < 1e-6
    monkeypatch.setattr(fast, "GROUPED_MM", True)
    trained = mix_experts_grouped(x, weights, experts, w1.requires_grad_(), w2, w3)
    assert len(calls) == 3 and trained.requires_grad
