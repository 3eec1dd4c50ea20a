"""GGUF Q4_0 / Q8_0 tensors onto the weight-only kernels (checkpoint/gguf_quant.py), on files the gguf package
quantized (save_gguf writes through gguf.quantize)."""

from __future__ import annotations

import pytest
import torch
from conftest import FP32_RTOL, rel_err
from model_helpers import random_model

from mistral_ref import load_model
from mistral_ref.checkpoint import save_gguf
from mistral_ref.checkpoint.gguf_quant import maps_exactly
from mistral_ref.config import ModelArgs, MoeArgs
from mistral_ref.quantize import QuantizationError, QuantizedWeight

pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")

MOE = ModelArgs(dim=64, n_layers=2, hidden_dim=64, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=80,
                moe=MoeArgs(num_experts=4, num_experts_per_tok=2))
TOKENS = torch.tensor([[3, 17, 40, 5, 61, 42, 7, 0, 79]])


def _quantized(model):
    return {n: m.weight for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), QuantizedWeight)}


def test_q4_0_becomes_int4_groups_of_32_without_requantizing(tmp_path):
    path = save_gguf(random_model(MOE), tmp_path / "q4.gguf", "Q4_0")
    dequantized = load_model(path)  # what the file means, in fp32
    model = load_model(path, quantize="int4")
    weights = dict(dequantized.named_parameters())
    quantized = _quantized(model)
    assert len(quantized) == 2 * (4 + 4 * 3) + 1  # attention, experts, output
    for name, qw in quantized.items():
        assert torch.equal(qw.dequantize(), weights[f"{name}.weight"]), name  # the file's weights, exactly
        assert (qw.scales_and_zeros[..., 1] == 0).all()  # Q4_0: zero point 0
    with torch.no_grad():
        for backend in ("torch", "reference"):
            model.set_backend(backend)
            assert rel_err(model(TOKENS), dequantized(TOKENS)) < FP32_RTOL
        bf16 = load_model(path, quantize="int4", dtype="bfloat16")  # through the bf16 kernels
        assert rel_err(bf16(TOKENS), dequantized(TOKENS)) < 5e-2


@pytest.mark.parametrize("qtype,scheme,group_size", [("Q8_0", "int8", 32), ("Q4_0", "int4", 64),
                                                     ("Q8_0", "int4", 32), ("F16", "int8", 32)])
def test_other_types_are_dequantized_then_quantized(tmp_path, qtype, scheme, group_size):
    """No exact mapping (Q8_0's per-block scales vs int8's per-channel ones; another group size): the file's
    weights are quantized like any other, within half a step."""
    assert not maps_exactly(qtype, scheme, group_size)
    path = save_gguf(random_model(MOE), tmp_path / "m.gguf", qtype)
    weights = dict(load_model(path).named_parameters())
    model = load_model(path, quantize=scheme, group_size=group_size)
    assert model.quantization["scheme"] == scheme
    for name, qw in _quantized(model).items():
        w = weights[f"{name}.weight"].detach().float()
        err = (qw.dequantize(torch.float32) - w).abs().amax(dim=1)
        if scheme == "int8":
            assert (err <= qw.scales.float() * 0.5001).all(), name
        else:
            assert (err <= qw.scales_and_zeros[..., 0].float().amax(0) * 0.5001).all(), name


def test_bad_quantize_on_gguf_is_a_clear_error(tmp_path):
    path = save_gguf(random_model(MOE), tmp_path / "q4.gguf", "Q4_0")
    with pytest.raises(QuantizationError, match="scheme must be one of int8, int4, got 'q4_0'"):
        load_model(path, quantize="q4_0")
    with pytest.raises(QuantizationError, match=r"in_features 64 is not a multiple of group_size 128"):
        load_model(path, quantize="int4", group_size=128)
