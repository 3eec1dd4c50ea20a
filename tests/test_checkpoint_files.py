"""Finding a checkpoint's files and checking them against the config (mistral_ref.checkpoint.files): formats,
shards and index.json, and every kind of bad input (each error must name the file and the key at fault)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import assert_same_weights, error_text, tiny_args
from model_helpers import random_model
from safetensors import safe_open
from safetensors.torch import save_file

from mistral_ref.checkpoint import (
    CheckpointError,
    load_model,
    meta_model,
    read_safetensors_header,
    save_checkpoint,
)
from mistral_ref.config import ConfigError, ModelArgs


def test_directory_with_both_formats_loads_native_only(tmp_path, caplog):
    native, other = random_model(tiny_args(), seed=0), random_model(tiny_args(), seed=1)
    save_checkpoint(native, tmp_path, format="native")
    save_checkpoint(other, tmp_path, format="hf")  # different weights: we can tell which set was read
    with caplog.at_level(logging.DEBUG, logger="mistral_ref.checkpoint"):
        loaded = load_model(tmp_path)
    assert loaded.checkpoint_files.format == "native"
    assert [p.name for p in loaded.checkpoint_files.ignored] == ["model.safetensors"]
    assert "loading native checkpoint" in caplog.text and "ignoring 1 file(s) of the other format" in caplog.text
    assert_same_weights(native, loaded)


@pytest.mark.parametrize("fmt,name", [("native", "consolidated.safetensors"), ("hf", "model.safetensors")])
def test_single_file_next_to_its_config(tmp_path, fmt, name):
    model = random_model(tiny_args())
    save_checkpoint(model, tmp_path, format=fmt)
    loaded = load_model(tmp_path / name)
    assert loaded.checkpoint_files.format == fmt
    assert_same_weights(model, loaded)


def _rewrite_without(path: Path, drop: set[str], add: dict[str, torch.Tensor] | None = None) -> None:
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k).clone() for k in f.keys() if k not in drop}
    tensors.update(add or {})
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_keys_are_listed_with_count(hf_dir):
    f = hf_dir / "model.safetensors"
    drop = {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in "qkvo"}
    _rewrite_without(f, drop)
    with pytest.raises(CheckpointError) as e:
        load_model(hf_dir)
    msg = error_text(e)
    assert str(f) in msg and "missing 8 tensor(s)" in msg and "config.json" in msg
    assert "layers.0.attention.wq.weight" in msg and "(+3 more)" in msg


def test_unexpected_keys_error_unless_not_strict(hf_dir):
    f = hf_dir / "model.safetensors"
    _rewrite_without(f, set(), {"model.layers.0.mlp.extra_proj.weight": torch.zeros(2, 2),
                                "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)})
    with pytest.raises(CheckpointError) as e:
        load_model(hf_dir)
    msg = error_text(e)
    assert "1 unexpected tensor(s)" in msg and "model.layers.0.mlp.extra_proj.weight" in msg and str(f) in msg
    assert "inv_freq" not in msg  # the RoPE buffer of old HF checkpoints is known and skipped
    with pytest.warns(UserWarning, match="extra_proj"):
        model = load_model(hf_dir, strict=False)
    assert_same_weights(model, random_model(tiny_args()))


@pytest.mark.parametrize("change,key,hint", [
    ({"n_kv_heads": 4}, "layers.0.attention.wk.weight", "n_kv_heads"),
    ({"head_dim": 12}, "layers.0.attention.wq.weight", "head_dim"),
    ({"vocab_size": 100}, "tok_embeddings.weight", "vocab_size"),
    ({"hidden_dim": 60}, "layers.0.feed_forward.w1.weight", "hidden_dim"),
])
def test_shape_mismatch_names_key_shapes_and_config_field(native_dir, change, key, hint):
    params = json.loads((native_dir / "params.json").read_text())
    params.update(change)
    (native_dir / "params.json").write_text(json.dumps(params))
    expected = tuple(_meta_shape(ModelArgs(**params), key))
    found = tuple(read_safetensors_header(native_dir / "consolidated.safetensors")[key].shape)
    with pytest.raises(CheckpointError) as e:
        load_model(native_dir)
    msg = error_text(e)
    assert f"key {key!r} has shape {list(found)}, expected {list(expected)}" in msg
    assert "consolidated.safetensors" in msg and "params.json" in msg
    assert re.search(rf"{re.escape(key)}' has shape [^\n]*: check [^\n]*{hint}", msg), msg


def _meta_shape(args: ModelArgs, key: str) -> torch.Size:
    return meta_model(args).state_dict()[key].shape


def test_moe_config_for_a_dense_checkpoint_is_explained(native_dir):
    params = json.loads((native_dir / "params.json").read_text())
    params["moe"] = {"num_experts": 4, "num_experts_per_tok": 2}
    (native_dir / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match="describes experts .* but the checkpoint is dense"):
        load_model(native_dir)


def test_index_naming_a_missing_shard(tmp_path):
    files = save_checkpoint(random_model(tiny_args()), tmp_path, format="hf", max_shard_bytes=20_000)
    files.shards[2].unlink()
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path)
    msg = error_text(e)
    assert "model.safetensors.index.json" in msg and files.shards[2].name in msg and "incomplete" in msg


def test_index_disagreeing_with_its_shards(tmp_path):
    files = save_checkpoint(random_model(tiny_args()), tmp_path, format="hf", max_shard_bytes=20_000)
    index = json.loads(files.index.read_text())
    index["weight_map"]["model.norm.weight"] = files.shards[0].name
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = files.shards[0].name
    files.index.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path)
    assert "'model.norm.weight' is stored in" in error_text(e) and "index.json" in error_text(e)


def test_sharded_set_without_index_must_be_complete(tmp_path):
    files = save_checkpoint(random_model(tiny_args()), tmp_path, format="native", max_shard_bytes=20_000)
    files.index.unlink()
    # complete: loads from the shard names alone
    assert_same_weights(load_model(tmp_path), random_model(tiny_args()))
    files.shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"do not form one complete set of {len(files.shards)}"):
        load_model(tmp_path)


def test_one_shard_alone_is_explained(tmp_path):
    files = save_checkpoint(random_model(tiny_args()), tmp_path, format="hf", max_shard_bytes=20_000)
    with pytest.raises(CheckpointError, match="one shard of a sharded checkpoint: pass the directory"):
        load_model(files.shards[0])


def test_directories_without_config_or_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no params.json .* or config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny_args().to_hf_config()))
    with pytest.raises(CheckpointError, match="has config.json but no weights"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "nope")


def test_bad_config_is_a_config_error_naming_the_file(native_dir):
    params = json.loads((native_dir / "params.json").read_text())
    del params["n_heads"]
    (native_dir / "params.json").write_text(json.dumps(params))
    with pytest.raises(ConfigError, match=r"params\.json: required key 'n_heads' is missing"):
        load_model(native_dir)


def test_integer_tensors_are_refused(hf_dir):
    f = hf_dir / "model.safetensors"
    _rewrite_without(f, {"model.norm.weight"}, {"model.norm.weight": torch.zeros(48, dtype=torch.int8)})
    with pytest.raises(CheckpointError, match="'model.norm.weight' has dtype torch.int8"):
        load_model(hf_dir)


def test_native_checkpoints_get_the_trained_context_of_their_preset(native_dir, monkeypatch):
    """params.json omits max_seq_len: loading fills it from the preset of the same architecture."""
    from dataclasses import replace

    from mistral_ref import family
    from mistral_ref.checkpoint import find_checkpoint, read_model_args

    monkeypatch.setitem(family.PRESETS, "tiny-test", replace(tiny_args(), max_seq_len=4096))
    assert read_model_args(find_checkpoint(native_dir)).max_seq_len == 4096
    monkeypatch.delitem(family.PRESETS, "tiny-test")
    assert read_model_args(find_checkpoint(native_dir)).max_seq_len is None
