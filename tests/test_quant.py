"""Weight-only quantization (mistral_ref/quantize.py, backends/quant.py): the int4 layout, the quantization error,
the CPU kernels against the plain math, and quantized models: backend "torch" equals backend "reference".

Tolerances: fp32 activations compute with the dequantized weight on both backends (backends/quant.py), so the
logits agree within FP32_RTOL (1e-5, relative to the largest logit); the bf16 kernels accumulate in fp32 and
round once: within 1e-2 of an fp64 product of the same dequantized values.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import FP32_RTOL, rel_err
from model_helpers import random_model

from mistral_ref import quantize_model
from mistral_ref.backends import quant
from mistral_ref.backends.linear import linear
from mistral_ref.backends.quant import DEQUANTIZE_MIN_ROWS
from mistral_ref.cache import KVCache
from mistral_ref.config import FineMoeArgs, MlaArgs, ModelArgs, MoeArgs
from mistral_ref.quantize import (
    QuantizationError,
    QuantizedWeight,
    pack_int4,
    quantize_weight,
    unpack_int4,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DENSE = ModelArgs(dim=64, n_layers=2, hidden_dim=128, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=80,
                  sliding_window=6)
MIXTRAL = ModelArgs(dim=64, n_layers=2, hidden_dim=64, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=80,
                    moe=MoeArgs(num_experts=4, num_experts_per_tok=2))
LATENT = ModelArgs(dim=64, n_layers=2, hidden_dim=64, n_heads=4, n_kv_heads=4, head_dim=32, vocab_size=80,
                   mla=MlaArgs(kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                               q_lora_rank=64),
                   fine_moe=FineMoeArgs(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                                        first_k_dense_replace=1, n_shared_experts=1))
SCHEMES = [("int8", 32), ("int4", 32), ("int4", 64)]


@pytest.mark.parametrize("out", [32, 48, 96, 16])
def test_pack_int4_is_the_layout_of_torchs_cpu_kernel(out):
    """pack_int4 writes what torch's own packing writes on an AVX2 CPU (if a torch release changes it, this fails
    there); torch packs for the CPU it runs on (otherwise on AVX-512), and quant.torch_int4_layout_matches, which
    decides whether torch's int4 kernel may read our bytes, says which."""
    q = torch.randint(0, 16, (out, 64), generator=torch.Generator().manual_seed(out), dtype=torch.int32)
    packed = pack_int4(q)
    theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    if torch.backends.cpu.get_cpu_capability() == "AVX2":
        assert quant.torch_int4_layout_matches()
    if quant.torch_int4_layout_matches():
        assert torch.equal(packed, theirs)
    else:  # (on AVX-512 a lone block of 16 rows happens to be packed alike)
        assert out == 16 or not torch.equal(packed, theirs)
    assert torch.equal(unpack_int4(packed), q.to(torch.uint8))


@pytest.mark.parametrize("matches", [True, False], ids=["torch-kernel", "other-layout"])
def test_int4_products_of_a_few_rows_where_torch_packs_otherwise(matches, monkeypatch):
    """2-63 bf16 rows of an int4 product go to torch's kernel only where it reads pack_int4's layout; elsewhere
    they dequantize (an AVX-512 CPU): the dequantized product either way."""
    if matches and not quant.torch_int4_layout_matches():
        pytest.skip("torch's int4 kernel reads another layout on this CPU")
    monkeypatch.setattr(quant, "_int4_layout_matches", matches)
    qw = quantize_weight(torch.randn(48, 128, generator=torch.Generator().manual_seed(1)), "int4", 32).to(
        torch.bfloat16)
    x = torch.randn(3, 128).bfloat16()
    expected = F.linear(x.float(), qw.dequantize(torch.float32))
    assert rel_err(quant.quantized_linear(x, qw), expected) < 1e-2


@pytest.mark.parametrize("scheme,group_size", SCHEMES + [("int4", 128)])
def test_quantization_error_is_half_a_step(scheme, group_size):
    """Every dequantized weight is within half a quantization step (+ rounding) of the original."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 64)[:, None]
    qw = quantize_weight(w, scheme, group_size)
    assert qw.shape == w.shape and qw.dtype == torch.float32
    err = (qw.dequantize() - w).abs()
    if scheme == "int8":
        step = qw.scales[:, None]  # (out, 1)
    else:
        step = qw.scales_and_zeros[..., 0].t().repeat_interleave(group_size, dim=1)  # (out, in)
    assert (err <= step * (0.5 + 1e-4)).all()
    assert err.max() > 0  # it is lossy


def test_zero_rows_and_groups_quantize_to_zero():
    w = torch.randn(32, 64)
    w[3] = 0
    for scheme in ("int8", "int4"):
        assert torch.equal(quantize_weight(w, scheme).dequantize()[3], torch.zeros(64))


@pytest.mark.parametrize("scheme,group_size", SCHEMES + [("int4", 128)])
@pytest.mark.parametrize("rows", [1, 3, 9, DEQUANTIZE_MIN_ROWS])
def test_bf16_kernels_equal_the_dequantized_product(scheme, group_size, rows):
    """backends.linear.linear with a quantized bf16 weight runs torch's int8 / int4 kernels (from
    DEQUANTIZE_MIN_ROWS rows: the dequantized fp32 product)."""
    g = torch.Generator().manual_seed(rows)
    qw = quantize_weight(torch.randn(96, 256, generator=g).bfloat16(), scheme, group_size)
    x = torch.randn(2, rows, 256, generator=g).bfloat16()
    out = linear(x, qw)
    assert out.shape == (2, rows, 96) and out.dtype == torch.bfloat16
    exact = F.linear(x.double(), qw.dequantize(torch.float32).double())
    assert rel_err(out, exact) < 1e-2


@pytest.mark.parametrize("in_features", [8, 24, 40, 100])
@pytest.mark.parametrize("rows", [1, 4, 33])
def test_int8_products_of_any_width(in_features, rows, one_thread):
    """int8 weights are per output channel, so any width is valid; torch's int8 kernel is wrong (one row) or
    crashes the process (more) where in_features % 16 != 0 on an AVX-512 / AMX Xeon, so those products take the
    dequantized path (quant.INT8_KERNEL_IN): equal to the dequantized product (Mistral Small 4's tiny shapes, a
    q_lora_rank of 24, crashed the bench's int8 row)."""
    g = torch.Generator().manual_seed(in_features + rows)
    qw = quantize_weight(torch.randn(48, in_features, generator=g).bfloat16(), "int8")
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    exact = F.linear(x.double(), qw.dequantize(torch.float32).double())
    assert rel_err(linear(x, qw), exact) < 1e-2


@pytest.mark.parametrize("scheme,group_size", SCHEMES)
def test_fp32_products_equal_the_dequantized_product(scheme, group_size):
    """fp32 activations: dequantized in blocks (8 MB), then the fp32 product; the weight spans two blocks, the
    second of 48 rows (int4: one block of 32 rows and a last one of 16)."""
    g = torch.Generator().manual_seed(1)
    qw = quantize_weight(torch.randn(8240, 256, generator=g), scheme, group_size)
    x = torch.randn(3, 256, generator=g)
    assert rel_err(linear(x, qw), F.linear(x, qw.dequantize())) < FP32_RTOL


@torch.no_grad()
def _logits_both_ways(model, tokens):
    """(reference, torch) logits of a prefill and of one decode step after it."""
    outs = []
    for backend in ("reference", "torch"):
        model.set_backend(backend)
        cache = KVCache(model.args, batch_size=tokens.shape[0], max_seq_len=16, dtype=model.dtype)
        prefill = model(tokens[:, :-1], cache=cache)
        T = tokens.shape[1] - 1
        step = model(tokens[:, -1:], positions=torch.full((tokens.shape[0], 1), T), cache=cache)
        outs.append(torch.cat([prefill, step], dim=1))
    return outs


@pytest.mark.parametrize("args", [DENSE, MIXTRAL, LATENT], ids=["dense", "mixtral", "latent-fine-moe"])
@pytest.mark.parametrize("scheme,group_size", SCHEMES)
def test_quantized_model_torch_equals_reference_fp32(args, scheme, group_size):
    model = random_model(args)
    tokens = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(tokens)
    quantize_model(model, scheme, group_size=group_size)
    ref, fast = _logits_both_ways(model, tokens)
    assert rel_err(fast, ref) < FP32_RTOL
    assert 0 < rel_err(ref[:, :-1], plain[:, :-1])  # the weights did change
    # every linear weight is quantized except the routers; embeddings and norms stay
    kinds = {name: type(m.weight).__name__ for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {k for k, v in kinds.items() if v == "Parameter"} == {k for k in kinds if k.endswith(".gate")}
    assert model.quantization["scheme"] == scheme


@pytest.mark.parametrize("group_size", [128, 256])
def test_wide_groups_torch_equals_reference_fp32(group_size):
    args = ModelArgs(dim=256, n_layers=1, hidden_dim=512, n_heads=4, n_kv_heads=2, head_dim=64, vocab_size=96)
    model = quantize_model(random_model(args), "int4", group_size=group_size)
    tokens = torch.randint(0, args.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    ref, fast = _logits_both_ways(model, tokens)
    assert rel_err(fast, ref) < FP32_RTOL


@pytest.mark.parametrize("args", [DENSE, MIXTRAL], ids=["dense", "mixtral"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_bf16_model_torch_close_to_reference(args, scheme):
    """bf16: the kernels (torch) against dequantize-then-F.linear (reference, bf16 weights and products)."""
    model = quantize_model(random_model(args).bfloat16(), scheme)
    tokens = torch.randint(0, args.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    ref, fast = _logits_both_ways(model, tokens)
    assert rel_err(fast, ref) < 5e-2
    assert (fast.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.85


def test_state_dict_names_and_conversion():
    model = quantize_model(random_model(MIXTRAL), "int4", group_size=32)
    names = model.state_dict()
    assert "layers.0.attention.wq.weight.qweight" in names
    assert names["layers.0.attention.wq.weight.scales_and_zeros"].shape == (64 // 32, 64, 2)
    assert names["layers.1.feed_forward.experts.3.w2.weight.qweight"].dtype == torch.uint8
    assert "layers.0.feed_forward.gate.weight" in names and "output.weight.qweight" in names
    model.bfloat16()  # scales follow the model's dtype, integers stay
    wq = model.layers[0].attention.wq.weight
    assert isinstance(wq, QuantizedWeight) and wq.dtype == torch.bfloat16 and wq.qweight.dtype == torch.uint8
    assert torch.equal(wq.float(), wq.dequantize(torch.float32)) and wq.dtype == torch.bfloat16  # a tensor's .float()
    model.float()
    assert wq.dtype == torch.float32
    int8 = quantize_model(random_model(DENSE), "int8")
    assert int8.state_dict()["layers.0.attention.wk.weight.qweight"].dtype == torch.int8
    assert int8.state_dict()["layers.0.attention.wk.weight.scales"].shape == (32,)


def test_bad_input_is_a_clear_error():
    model = random_model(replace(DENSE, hidden_dim=96))
    with pytest.raises(QuantizationError, match="scheme must be one of int8, int4, got 'int3'"):
        quantize_model(model, "int3")
    with pytest.raises(QuantizationError, match="group_size must be one of 32, 64, 128, 256 for int4, got 48"):
        quantize_model(model, "int4", group_size=48)
    with pytest.raises(QuantizationError, match="group_size must be one of .* got -1"):
        quantize_model(model, "int4", group_size=-1)
    # hidden_dim 96: w2's in_features is not a multiple of 64; nothing was changed
    with pytest.raises(QuantizationError, match=r"layers\.0\.feed_forward\.w2\.weight: in_features 96 is not a "
                                                r"multiple of group_size 64"):
        quantize_model(model, "int4", group_size=64)
    assert all(isinstance(m.weight, torch.nn.Parameter) for m in model.modules() if isinstance(m, torch.nn.Linear))
    odd = random_model(ModelArgs(dim=64, n_layers=1, hidden_dim=64, n_heads=2, n_kv_heads=1, head_dim=24,
                                 vocab_size=80))
    with pytest.raises(QuantizationError, match=r"attention\.wk\.weight: out_features 24 is not a multiple of 16"):
        quantize_model(odd, "int4")
    quantize_model(odd, "int8")  # int8 takes any shape
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_model(odd, "int8")
    with pytest.raises(QuantizationError, match="non-finite"):
        quantize_weight(torch.full((16, 32), float("nan")), "int8", name="w")
