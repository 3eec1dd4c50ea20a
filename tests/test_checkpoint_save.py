"""Saving and converting in both formats, sharded or not (mistral_ref.checkpoint.save), checked by loading the
result back and by an independent reader (safetensors.safe_open)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from checkpoint_helpers import TOKENS, assert_same_weights, tiny_args
from model_helpers import random_model
from safetensors import safe_open

from mistral_ref.checkpoint import (
    CheckpointError,
    convert_checkpoint,
    find_checkpoint,
    load_model,
    permute_to_hf,
    read_safetensors_header,
    save_checkpoint,
)
from mistral_ref.config import MoeArgs


# ---- save and convert in both formats: load the result back --------------------------------------------------
@pytest.mark.parametrize("fmt", ["native", "hf"])
@pytest.mark.parametrize("moe", [False, True])
def test_save_load_round_trip_is_exact(tmp_path, fmt, moe):
    model = random_model(tiny_args(moe=MoeArgs(4, 2) if moe else None))
    files = save_checkpoint(model, tmp_path, format=fmt)
    assert files.format == fmt
    assert (tmp_path / ("params.json" if fmt == "native" else "config.json")).is_file()
    single = "consolidated.safetensors" if fmt == "native" else "model.safetensors"
    assert [p.name for p in files.shards] == [single]
    loaded = load_model(tmp_path)
    assert loaded.checkpoint_files.format == fmt
    # HF configs always carry max_position_embeddings (written as 32768 when the model has no max_seq_len)
    assert loaded.args == (model.args if fmt == "native" else replace(model.args, max_seq_len=32768))
    assert_same_weights(model, loaded)
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS), model(TOKENS))


def test_hf_files_hold_permuted_q_and_k(hf_dir):
    model = random_model(tiny_args())
    with safe_open(hf_dir / "model.safetensors", framework="pt") as f:  # an independent reader
        q = f.get_tensor("model.layers.1.self_attn.q_proj.weight")
        v = f.get_tensor("model.layers.1.self_attn.v_proj.weight")
        assert f.metadata() == {"format": "pt"}
    assert torch.equal(q, permute_to_hf(model.layers[1].attention.wq.weight.detach(), 4, 16))
    assert torch.equal(v, model.layers[1].attention.wv.weight.detach())
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["head_dim"] == 16 and config["num_key_value_heads"] == 2 and config["sliding_window"] == 5
    assert config["dtype"] == "float32"


@pytest.mark.parametrize("fmt", ["native", "hf"])
def test_sharded_save_writes_index_and_loads(tmp_path, fmt):
    model = random_model(tiny_args(moe=MoeArgs(4, 2)))
    limit = 20_000
    files = save_checkpoint(model, tmp_path, format=fmt, max_shard_bytes=limit)
    n = len(files.shards)
    assert n > 3
    stem = "consolidated" if fmt == "native" else "model"
    names = [f"{stem}-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert [p.name for p in files.shards] == names
    index = json.loads(files.index.read_text())
    assert files.index.name == f"{stem}.safetensors.index.json"
    sizes = {}
    for shard in files.shards:
        header = read_safetensors_header(shard)
        assert sum(i.nbytes for i in header.values()) <= limit or len(header) == 1
        for key, info in header.items():
            assert index["weight_map"][key] == shard.name
            sizes[key] = info.nbytes
    assert index["metadata"]["total_size"] == sum(sizes.values())
    assert set(index["weight_map"]) == set(sizes)
    loaded = load_model(tmp_path)
    assert len(loaded.checkpoint_files.shards) == n
    assert_same_weights(model, loaded)


def test_resaving_with_fewer_shards_removes_stale_ones(tmp_path):
    model = random_model(tiny_args())
    save_checkpoint(model, tmp_path, format="hf", max_shard_bytes=20_000)
    save_checkpoint(model, tmp_path, format="hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert_same_weights(model, load_model(tmp_path))


@pytest.mark.parametrize("src_fmt,dst_fmt", [("native", "hf"), ("hf", "native"), ("hf", "hf")])
def test_convert_streams_and_round_trips_bit_exactly(tmp_path, src_fmt, dst_fmt):
    model = random_model(tiny_args(moe=MoeArgs(4, 2)))
    save_checkpoint(model, tmp_path / "src", format=src_fmt)
    files = convert_checkpoint(tmp_path / "src", tmp_path / "dst", format=dst_fmt, max_shard_bytes=30_000)
    assert files.format == dst_fmt and len(files.shards) > 1
    assert_same_weights(model, load_model(tmp_path / "dst"))
    back = convert_checkpoint(tmp_path / "dst", tmp_path / "back", format=src_fmt)
    original = find_checkpoint(tmp_path / "src").shards[0]
    with safe_open(back.shards[0], "pt") as a, safe_open(original, "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def test_convert_can_cast(tmp_path, native_dir):
    convert_checkpoint(native_dir, tmp_path / "bf16", format="hf", dtype="bf16")
    loaded = load_model(tmp_path / "bf16")
    assert loaded.dtype == torch.bfloat16
    ref = random_model(tiny_args())
    assert torch.equal(loaded.layers[0].attention.wq.weight, ref.layers[0].attention.wq.weight.bfloat16())


def test_saving_over_the_files_a_model_was_mapped_from(native_dir):
    """Files are written under a temporary name and renamed: a model mapping the old files keeps working."""
    model = load_model(native_dir)
    with torch.no_grad():
        before = model(TOKENS)
    save_checkpoint(random_model(tiny_args(), seed=5), native_dir, format="native")
    with torch.no_grad():
        assert torch.equal(model(TOKENS), before)
    assert_same_weights(random_model(tiny_args(), seed=5), load_model(native_dir))
    assert not [p for p in native_dir.iterdir() if ".tmp" in p.name]


def test_model_dtype_follows_the_checkpoint(tmp_path):
    model = random_model(tiny_args()).to(torch.bfloat16)
    save_checkpoint(model, tmp_path, format="hf")
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_model(tmp_path).dtype == torch.bfloat16


def test_hf_cannot_express_per_layer_windows(tmp_path):
    # one window interleaved with full layers is HF's "ministral" (layer_types, test_family_checkpoint.py); two
    # different windows have no HF spelling
    with pytest.raises(CheckpointError, match="config.json: .*per-layer"):
        save_checkpoint(random_model(tiny_args(sliding_window=[5, 7])), tmp_path, format="hf")
    save_checkpoint(random_model(tiny_args(sliding_window=[5, 7])), tmp_path, format="native")
    assert load_model(tmp_path).args.sliding_window == (5, 7)


# ---- convert carries the tokenizer across -------------------------------------------------------------------
def test_converted_embedded_model_chats_at_once(tmp_path):
    """native -> HF (convert_checkpoint) -> native (`mistral-ref convert`): each result holds the tokenizer,
    which encodes a chat exactly as the original, and the model gives the original's logits."""
    from mistral_ref.cli import main
    from mistral_ref.embedded import EMBEDDED_MODEL_DIR
    from mistral_ref.tokenizer import load_tokenizer

    convert_checkpoint(EMBEDDED_MODEL_DIR, tmp_path / "hf", format="hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "native"), "--to", "native"]) == 0
    # only the tokenizer travels with the weights (not DATA.md, heldout.json, train_log.json ...)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.model.v3"]
    original_tok, original = load_tokenizer(EMBEDDED_MODEL_DIR), load_model(EMBEDDED_MODEL_DIR, dtype="float32")
    prompt = original_tok.encode_chat([{"role": "user", "content": "What is 2 + 3?"}])
    tokens = torch.tensor([prompt])
    with torch.no_grad():
        want = original(tokens)
    for d in (tmp_path / "hf", tmp_path / "native"):
        copied = (d / "tokenizer.model.v3").read_bytes()
        assert copied == (EMBEDDED_MODEL_DIR / "tokenizer.model.v3").read_bytes()
        tok = load_tokenizer(d)
        assert (tok.kind, tok.version, tok.vocab_size) == (original_tok.kind, original_tok.version, 3072)
        assert tok.encode_chat([{"role": "user", "content": "What is 2 + 3?"}]) == prompt
        model = load_model(d, dtype="float32")
        assert model.args.vocab_size == tok.vocab_size
        with torch.no_grad():
            assert torch.equal(model(tokens), want)


def test_convert_carries_tekken_and_hugging_face_tokenizer_files(tmp_path, hf_dir):
    from mistral_ref.tokenizer import load_tokenizer, mistral_common_data_dir

    data = mistral_common_data_dir()
    if data is None:
        pytest.skip("mistral-common (the source of a real tekken.json) is not installed")
    shutil.copyfile(data / "tekken_240718.json", hf_dir / "tekken.json")
    hf_files = {"tokenizer.json": '{"model": {}}', "tokenizer_config.json": '{"bos_token": "<s>"}',
                "special_tokens_map.json": "{}"}
    for name, text in {**hf_files, "generation_config.json": "{}", "README.md": "# not a tokenizer"}.items():
        (hf_dir / name).write_text(text)
    dst = tmp_path / "native"
    convert_checkpoint(hf_dir, dst, format="native")
    assert sorted(p.name for p in dst.iterdir()) == sorted(
        ["params.json", "consolidated.safetensors", "tekken.json", *hf_files])
    for name in ["tekken.json", *hf_files]:
        assert (dst / name).read_bytes() == (hf_dir / name).read_bytes(), name
    assert load_tokenizer(dst).kind == "tekken"
    # converting in place (dst is src) adds the other format's files and leaves the tokenizer files alone
    convert_checkpoint(dst, dst, format="hf")
    assert sorted(p.name for p in dst.iterdir()) == sorted(
        ["params.json", "consolidated.safetensors", "config.json", "model.safetensors", "tekken.json", *hf_files])
    assert (dst / "tekken.json").read_bytes() == (hf_dir / "tekken.json").read_bytes()
