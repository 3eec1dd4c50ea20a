"""Checkpoints of the 2024-2026 models without an oracle: tied embeddings (no output weight in either format) through
load, save and convert; multimodal checkpoints (a vision tower next to the language model, in both formats and both
HF layouts) load their language model and say that image inputs are not supported.  Parity with transformers for
the same paths is in test_parity_ministral.py."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import TOKENS, tiny_args
from model_helpers import random_model
from safetensors.torch import load_file, save_file

from mistral_ref.checkpoint import CheckpointError, convert_checkpoint, load_model, save_checkpoint
from mistral_ref.config import Llama4Scaling, YarnArgs
from mistral_ref.model import Transformer, meta_model

pytestmark = pytest.mark.usefixtures("one_thread")

# Ministral-3-3B-like: tied, YaRN + query scaling (a window too: HF's Ministral3 has one for every layer or none)
TIED = tiny_args(tied_embeddings=True, sliding_window=5, yarn=YarnArgs(4.0, 4, beta=1.0, alpha=0.1), max_seq_len=64,
                 llama_4_scaling=Llama4Scaling(4, 0.1))


def logits(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).float()


def test_a_tied_model_has_no_output_weight():
    model = meta_model(TIED)
    assert model.output is None and "output.weight" not in model.state_dict()
    assert model.output_weight is model.tok_embeddings.weight
    untied = meta_model(tiny_args())
    assert untied.output_weight is untied.output.weight
    # the logits are those of the untied model whose output.weight is a copy of the embedding
    tied = random_model(TIED)
    copy = Transformer(replace(TIED, tied_embeddings=False)).eval()
    copy.load_state_dict({**tied.state_dict(), "output.weight": tied.tok_embeddings.weight.clone()})
    assert torch.equal(logits(tied), logits(copy))
    with torch.no_grad():
        tied.tok_embeddings.weight[7] += 1.0  # one embedding row moves logit 7 (and the inputs that are token 7)
    assert not torch.equal(logits(tied)[..., 7], logits(copy)[..., 7])


@pytest.mark.parametrize("fmt", ["native", "hf"])
def test_tied_embeddings_save_load_convert(tmp_path, fmt):
    model = random_model(TIED)
    ref = logits(model)
    files = save_checkpoint(model, tmp_path / fmt, format=fmt)
    keys = set(load_file(files.shards[0]))
    assert not keys & {"output.weight", "lm_head.weight"}
    config = json.loads(files.config.read_text())
    assert config["tied_embeddings" if fmt == "native" else "tie_word_embeddings"] is True
    loaded = load_model(tmp_path / fmt)
    assert loaded.args == TIED and torch.equal(logits(loaded), ref)
    other = "hf" if fmt == "native" else "native"
    converted = convert_checkpoint(tmp_path / fmt, tmp_path / other, format=other)
    assert not set(load_file(converted.shards[0])) & {"output.weight", "lm_head.weight"}
    assert torch.equal(logits(load_model(tmp_path / other)), ref)


def test_an_output_weight_in_a_tied_checkpoint_is_ignored_with_a_warning(tmp_path):
    """transformers ties lm_head to the embeddings whatever the file holds; so do we, and say so."""
    model = random_model(TIED)
    files = save_checkpoint(model, tmp_path, format="hf")
    tensors = load_file(files.shards[0])
    tensors["lm_head.weight"] = torch.randn(TIED.vocab_size, TIED.dim)
    save_file(tensors, files.shards[0])
    with pytest.warns(UserWarning, match="ignoring 'lm_head.weight': config.json ties the output projection"):
        loaded = load_model(tmp_path)
    assert torch.equal(logits(loaded), logits(model))


def test_a_missing_output_weight_hints_at_tied_embeddings(tmp_path):
    save_checkpoint(random_model(TIED), tmp_path, format="native")
    params = json.loads((tmp_path / "params.json").read_text())
    del params["tied_embeddings"]
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*output\.weight.* ties its output projection"):
        load_model(tmp_path)


# ---- multimodal checkpoints ---------------------------------------------------------------------------------------
def _hf_multimodal(tmp_path: Path, layout: str, shards: int = 1) -> tuple[Path, torch.Tensor]:
    """A Mistral3ForConditionalGeneration-style directory around a random text model: the hub's layout
    (language_model.model.*, language_model.lm_head.weight, vision_tower.*, multi_modal_projector.*) or
    transformers 5's (model.language_model.*, lm_head.weight, model.vision_tower.*, ...)."""
    args = tiny_args(sliding_window=None)
    model = random_model(args)
    text_dir = tmp_path / "text"
    save_checkpoint(model, text_dir, format="hf")
    text = load_file(text_dir / "model.safetensors")
    outer = "" if layout == "hub" else "model."
    tensors = {}
    for key, value in text.items():
        if key == "lm_head.weight":
            tensors["language_model.lm_head.weight" if layout == "hub" else key] = value
        elif layout == "hub":  # model.layers.0... -> language_model.model.layers.0...
            tensors["language_model." + key] = value
        else:  # model.layers.0... -> model.language_model.layers.0...
            tensors[key.replace("model.", "model.language_model.", 1)] = value
    tensors[f"{outer}vision_tower.transformer.layers.0.attention.q_proj.weight"] = torch.randn(8, 8)
    tensors[f"{outer}vision_tower.ln_pre.weight"] = torch.randn(8)
    tensors[f"{outer}multi_modal_projector.linear_1.weight"] = torch.randn(8, 8)
    directory = tmp_path / f"mm-{layout}"
    directory.mkdir()
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, directory / "model.safetensors")
    else:
        weight_map = {}
        for k in range(shards):
            part = {n: tensors[n] for n in names[k::shards]}
            file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, directory / file)
            weight_map.update(dict.fromkeys(part, file))
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    text_config = json.loads((text_dir / "config.json").read_text())
    config = {"architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
              "text_config": text_config, "vision_config": {"model_type": "pixtral", "hidden_size": 8},
              "image_token_index": 10, "spatial_merge_size": 2, "tie_word_embeddings": False}
    (directory / "config.json").write_text(json.dumps(config))
    return directory, logits(model)


@pytest.mark.parametrize("layout,shards", [("hub", 1), ("transformers5", 1), ("hub", 3)])
def test_hf_multimodal_checkpoint_loads_its_language_model(tmp_path, layout, shards):
    directory, ref = _hf_multimodal(tmp_path, layout, shards)
    with pytest.warns(UserWarning, match="loading its language model .*image inputs are not supported yet"):
        model = load_model(directory)
    assert torch.equal(logits(model), ref)
    # converting keeps the language model only: a text checkpoint that loads without a word about images
    with pytest.warns(UserWarning, match="image inputs"):
        convert_checkpoint(directory, tmp_path / "native", format="native")
    assert not any(k.startswith(("vision", "multi_modal")) for k in load_file(tmp_path / "native" /
                                                                              "consolidated.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(logits(load_model(tmp_path / "native")), ref)


def test_native_multimodal_checkpoint_loads_its_language_model(tmp_path):
    """params.json with a vision_encoder section; consolidated.safetensors with the Pixtral tower's tensors."""
    model = random_model(tiny_args())
    save_checkpoint(model, tmp_path, format="native")
    params = json.loads((tmp_path / "params.json").read_text())
    params["vision_encoder"] = {"hidden_size": 8, "num_hidden_layers": 1, "image_token_id": 10}
    (tmp_path / "params.json").write_text(json.dumps(params))
    tensors = load_file(tmp_path / "consolidated.safetensors")
    for name in ("vision_encoder.transformer.layers.0.attention.wq.weight", "vision_language_adapter.w_in.weight",
                 "patch_merger.merging_layer.weight", "pre_mm_projector_norm.weight"):
        tensors[name] = torch.randn(4, 4) if name.endswith("wq.weight") else torch.randn(4)
    save_file(tensors, tmp_path / "consolidated.safetensors")
    with pytest.warns(UserWarning, match="'vision_encoder'.*image inputs are not supported yet"):
        loaded = load_model(tmp_path)
    assert torch.equal(logits(loaded), logits(model))


def test_other_unexpected_tensors_are_still_errors(tmp_path):
    """Only the vision tower's names are skipped: anything else unexpected stays an error."""
    directory, _ = _hf_multimodal(tmp_path, "hub")
    tensors = load_file(directory / "model.safetensors")
    tensors["language_model.model.layers.0.self_attn.rotary_scale"] = torch.ones(2)
    save_file(tensors, directory / "model.safetensors")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="rotary_scale"):
        load_model(directory)
