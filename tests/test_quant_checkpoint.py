"""Quantized checkpoints (checkpoint/quantized.py): save, load without quantizing again, load_model(quantize=),
`mistral-ref quantize`, and the errors of bad input."""

from __future__ import annotations

import json

import pytest
import torch

from mistral_ref import CheckpointError, load_embedded, load_model, quantize_model, save_checkpoint
from mistral_ref.cli import main
from mistral_ref.embedded import EMBEDDED_MODEL_DIR
from mistral_ref.quantize import QuantizationError, QuantizedWeight

pytestmark = pytest.mark.usefixtures("one_thread")
TOKENS = torch.tensor([[1, 17, 230, 5, 901, 42, 7]])


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_saved_quantized_model_loads_identical(tmp_path, scheme):
    model = quantize_model(load_embedded(dtype="bfloat16")[0], scheme)
    save_checkpoint(model, tmp_path)
    entry = json.loads((tmp_path / "params.json").read_text())["quantization"]
    assert entry["scheme"] == scheme and entry["dtype"] == "bfloat16"
    loaded = load_model(tmp_path)
    assert loaded.quantization == model.quantization and loaded.dtype == torch.bfloat16
    assert isinstance(loaded.layers[2].feed_forward.experts[5].w2.weight, QuantizedWeight)
    state = loaded.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(loaded(TOKENS), model(TOKENS))
    assert load_model(tmp_path, quantize=scheme).quantization == model.quantization  # the same scheme: fine
    with pytest.raises(CheckpointError, match=f"is already quantized \\({scheme}\\).*quantize='int"):
        load_model(tmp_path, quantize="int4" if scheme == "int8" else "int8")
    with pytest.raises(CheckpointError, match="native format only"):
        save_checkpoint(loaded, tmp_path / "hf", format="hf")


def test_load_model_quantize_equals_quantize_model():
    loaded = load_model(EMBEDDED_MODEL_DIR, dtype="float32", quantize="int4", group_size=64)
    by_hand = quantize_model(load_embedded()[0], "int4", group_size=64)
    assert loaded.quantization == {"scheme": "int4", "group_size": 64}
    assert torch.equal(loaded(TOKENS), by_hand(TOKENS))
    with pytest.raises(QuantizationError, match="scheme must be one of int8, int4, got 'int2'"):
        load_model(EMBEDDED_MODEL_DIR, quantize="int2")
    with pytest.raises(QuantizationError, match=r"layers\.0\.attention\.wo\.weight: in_features 192 is not a "
                                                r"multiple of group_size 128"):
        load_model(EMBEDDED_MODEL_DIR, quantize="int4", group_size=128)


def test_tampered_quantized_checkpoint_is_a_clear_error(tmp_path):
    save_checkpoint(quantize_model(load_embedded()[0], "int4"), tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    params["quantization"]["group_size"] = 64  # the stored scales are for groups of 32
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match=r"scales_and_zeros' has shape \[4, 192, 2\], expected \[2, 192, 2\]"):
        load_model(tmp_path)
    params["quantization"]["group_size"] = 33
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match=r"params\.json: quantization: group_size must be one of"):
        load_model(tmp_path)
    params["quantization"].update(group_size=32, scheme="int8")
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match=r"missing .* tensor\(s\) of the quantized model.*wq\.weight\.scales"):
        load_model(tmp_path)


def test_cli_quantize(tmp_path, capsys):
    dst = tmp_path / "q8"
    assert main(["quantize", str(EMBEDDED_MODEL_DIR), str(dst), "--scheme", "int8", "--threads", "1"]) == 0
    assert "wrote int8 checkpoint to" in capsys.readouterr().out
    assert (dst / "tokenizer.model.v3").exists()
    loaded = load_model(dst)
    assert loaded.quantization == {"scheme": "int8"} and loaded.dtype == torch.bfloat16  # the files' dtype
    assert main(["quantize", str(EMBEDDED_MODEL_DIR), str(tmp_path / "bad"), "--scheme", "int4",
                 "--group-size", "100", "--threads", "1"]) == 2
    assert "group_size must be one of 32, 64, 128, 256 for int4, got 100" in capsys.readouterr().err
    assert main(["quantize", str(dst), str(tmp_path / "again"), "--scheme", "int4", "--threads", "1"]) == 2
    assert "is already quantized (int8)" in capsys.readouterr().err


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_latent_attention_model_saves_mistral_names(tmp_path, scheme):
    """A quantized Small-4-shaped model is written with Mistral's native names (codes and scales follow their
    weight's name: attention.wkv_b.weight.qweight) and loads back bit for bit."""
    from dataclasses import replace

    from safetensors import safe_open
    from test_mla import tiny

    from mistral_ref.model import Transformer
    torch.manual_seed(0)
    args = tiny(dim=64, hidden_dim=64, vocab_size=64)  # widths multiples of 32: what the int4 kernel takes
    args = replace(args, mla=replace(args.mla, kv_lora_rank=32, qk_nope_head_dim=8, qk_rope_head_dim=16,
                                     v_head_dim=8, q_lora_rank=32),
                   fine_moe=replace(args.fine_moe, moe_intermediate_size=32))
    model = quantize_model(Transformer(args).eval(), scheme)
    save_checkpoint(model, tmp_path)
    with safe_open(tmp_path / "consolidated.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "layers.0.attention.wkv_b.weight.qweight" in keys and "layers.0.attention.kv_a_norm.weight" in keys
    assert not any("kv_b_proj" in k or "layernorm" in k for k in keys)
    loaded = load_model(tmp_path)
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6]])
    assert torch.equal(loaded(tokens), model(tokens))
