"""Checkpoint I/O: names and the q/k permutation, format detection, load/save/convert in both formats,
memory, and every kind of bad input (each error must name the file and the key at fault).  No oracle here:
parity against transformers lives in test_parity.py."""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from model_helpers import random_model
from safetensors import safe_open
from safetensors.torch import save_file

from mistral_ref.checkpoint import (
    CheckpointError,
    convert_checkpoint,
    find_checkpoint,
    hf_to_native_name,
    load_model,
    meta_model,
    native_to_hf_name,
    permute_to_hf,
    permute_to_native,
    read_safetensors_header,
    save_checkpoint,
    to_hf_tensor,
    to_native_tensor,
)
from mistral_ref.config import ConfigError, ModelArgs, MoeArgs
from mistral_ref.model import Transformer


# ---- helpers -----------------------------------------------------------------------------------------------
def tiny_args(**overrides) -> ModelArgs:
    """Nemo-shaped toy: head_dim 16 != dim / n_heads = 12, GQA 2, a window shorter than the test sequences."""
    kw = dict(dim=48, n_layers=2, hidden_dim=64, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=96,
              norm_eps=1e-6, rope_theta=1e4, sliding_window=5)
    kw.update(overrides)
    return ModelArgs(**kw)


TOKENS = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(1))


def assert_same_weights(a: Transformer, b: Transformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].float(), sb[k].float()), k


def error_text(excinfo: pytest.ExceptionInfo) -> str:
    return str(excinfo.value)


@pytest.fixture
def native_dir(tmp_path) -> Path:
    d = tmp_path / "native"
    save_checkpoint(random_model(tiny_args()), d, format="native")
    return d


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    d = tmp_path / "hf"
    save_checkpoint(random_model(tiny_args()), d, format="hf")
    return d


# ---- names and the q/k permutation -------------------------------------------------------------------------
@pytest.mark.parametrize("moe", [False, True])
def test_every_parameter_name_maps_both_ways(moe):
    args = tiny_args(moe=MoeArgs(4, 2) if moe else None)
    names = list(Transformer(args).state_dict())
    hf = [native_to_hf_name(n) for n in names]
    assert len(set(hf)) == len(names)
    assert [hf_to_native_name(n) for n in hf] == names
    assert "model.layers.1.self_attn.q_proj.weight" in hf and "lm_head.weight" in hf
    if moe:
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in hf
    with pytest.raises(KeyError, match="layers.0.attention.wz.weight"):
        native_to_hf_name("layers.0.attention.wz.weight")
    with pytest.raises(KeyError, match="model.layers.0.mlp.experts.gate_up_proj"):
        hf_to_native_name("model.layers.0.mlp.experts.gate_up_proj")


@pytest.mark.parametrize("n_heads,head_dim,dim", [(4, 16, 48), (2, 128, 40), (8, 4, 32), (1, 2, 3)])
def test_permutation_round_trip_and_layout(n_heads, head_dim, dim):
    w = torch.randn(n_heads * head_dim, dim)
    hf = permute_to_hf(w, n_heads, head_dim)
    assert torch.equal(permute_to_native(hf, n_heads, head_dim), w)
    assert torch.equal(permute_to_hf(permute_to_native(w, n_heads, head_dim), n_heads, head_dim), w)
    # Within each head, native row 2i + j (pair i, component j) becomes HF row j * head_dim/2 + i.
    for h in range(n_heads):
        for i in range(head_dim // 2):
            for j in range(2):
                assert torch.equal(hf[h * head_dim + j * head_dim // 2 + i], w[h * head_dim + 2 * i + j])


def test_permutation_uses_head_dim_and_kv_heads():
    # Nemo-like: head_dim (16) != dim / n_heads (12) and 2 kv heads for 4 query heads.
    args = tiny_args()
    wq, wk = torch.randn(4 * 16, 48), torch.randn(2 * 16, 48)
    _, hq = to_hf_tensor("layers.0.attention.wq.weight", wq, args)
    _, hk = to_hf_tensor("layers.0.attention.wk.weight", wk, args)
    assert torch.equal(hq, permute_to_hf(wq, 4, 16)) and torch.equal(hk, permute_to_hf(wk, 2, 16))
    assert not torch.equal(hk, permute_to_hf(wk, 1, 32))  # the wrong grouping really differs
    assert torch.equal(to_native_tensor("model.layers.0.self_attn.k_proj.weight", hk, args)[1], wk)
    wv = torch.randn(32, 48)
    assert to_hf_tensor("layers.0.attention.wv.weight", wv, args)[1] is wv  # wv is never permuted


# ---- load / save in both formats ---------------------------------------------------------------------------
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


def test_progress_bar_only_when_asked_or_big_on_a_terminal(native_dir, capsys):
    load_model(native_dir)  # small and not a terminal: silent
    assert capsys.readouterr().err == ""
    load_model(native_dir, progress=True)
    assert "loading native" in capsys.readouterr().err


@pytest.mark.parametrize("fmt,name", [("native", "consolidated.safetensors"), ("hf", "model.safetensors")])
def test_single_file_next_to_its_config(tmp_path, fmt, name):
    model = random_model(tiny_args())
    save_checkpoint(model, tmp_path, format=fmt)
    loaded = load_model(tmp_path / name)
    assert loaded.checkpoint_files.format == fmt
    assert_same_weights(model, loaded)


def test_meta_load_places_every_tensor_on_the_requested_device_and_dtype(native_dir, hf_dir):
    for d in (native_dir, hf_dir):
        for dtype in (None, torch.float32, torch.bfloat16, "float16"):
            for mmap in (True, False):
                m = load_model(d, dtype=dtype, device="cpu", mmap=mmap)
                want = {None: torch.float32, "float16": torch.float16}.get(dtype, dtype)
                tensors = [*m.parameters(), *m.buffers()]
                assert not any(t.is_meta for t in tensors)
                assert {t.dtype for t in tensors} == {want}
                assert {t.device.type for t in tensors} == {"cpu"}
                assert all(p.requires_grad for p in m.parameters())
                assert not m.training


def test_mmap_false_copies_out_of_the_file(tmp_path, native_dir):
    """mmap=True keeps untouched tensors as views of the file; mmap=False makes private copies."""
    mapped, copied = load_model(native_dir), load_model(native_dir, mmap=False)
    with safe_open(native_dir / "consolidated.safetensors", "pt") as f:
        size = f.get_tensor("norm.weight").untyped_storage().nbytes()
    # the mapped model's norm weight lives in a storage covering just its bytes of a file mapping
    assert mapped.norm.weight.untyped_storage().nbytes() == size
    copied.norm.weight.data.add_(1)  # a private copy: writable, independent of the file and the other model
    assert not torch.equal(copied.norm.weight, mapped.norm.weight)
    assert_same_weights(mapped, load_model(native_dir))


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


# ---- bad input ---------------------------------------------------------------------------------------------
def test_pickles_are_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):  # would create `marker` if anything unpickled the file
            return (Path.touch, (marker,))

    (tmp_path / "params.json").write_text(json.dumps(tiny_args().to_params_json()))
    torch.save({"w": Boom()}, tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path)
    msg = error_text(e)
    assert "consolidated.00.pth" in msg and "pickle" in msg and "torch.load" in msg
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(tmp_path / "consolidated.00.pth")
    # a pickle wearing a .safetensors name is recognised by its bytes
    (tmp_path / "consolidated.00.pth").rename(tmp_path / "consolidated.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path)
    assert "consolidated.safetensors" in error_text(e) and "pickle" in error_text(e)
    assert not marker.exists()


def test_hf_pytorch_model_bin_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_args().to_hf_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: this is a pickle"):
        load_model(tmp_path)


def test_git_lfs_pointer(native_dir):
    f = native_dir / "consolidated.safetensors"
    f.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123456\n")
    with pytest.raises(CheckpointError) as e:
        load_model(native_dir)
    assert str(f) in error_text(e) and "git-lfs pointer" in error_text(e) and "git lfs pull" in error_text(e)


def test_truncated_file_names_file_and_key(native_dir):
    f = native_dir / "consolidated.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-1000])
    last_key = max(read_header_raw(data).items(), key=lambda kv: kv[1]["data_offsets"][1])[0]
    with pytest.raises(CheckpointError) as e:
        load_model(native_dir)
    msg = error_text(e)
    assert str(f) in msg and repr(last_key) in msg and "truncated" in msg
    assert str(len(data) - 1000) in msg  # the size found


def read_header_raw(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    return header


def test_header_length_beyond_the_file(native_dir):
    f = native_dir / "consolidated.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 10**7) + data[8:])
    with pytest.raises(CheckpointError) as e:
        load_model(native_dir)
    assert str(f) in error_text(e) and "10000000" in error_text(e) and "truncated" in error_text(e)


def test_corrupt_header_json(native_dir):
    f = native_dir / "consolidated.safetensors"
    data = bytearray(f.read_bytes())
    data[9:14] = b"#####"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(native_dir)


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


def test_hf_cannot_express_per_layer_windows(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: .*per-layer"):
        save_checkpoint(random_model(tiny_args(sliding_window=[5, None])), tmp_path, format="hf")
    save_checkpoint(random_model(tiny_args(sliding_window=[5, None])), tmp_path, format="native")
    assert load_model(tmp_path).args.sliding_window == (5, None)


def test_integer_tensors_are_refused(hf_dir):
    f = hf_dir / "model.safetensors"
    _rewrite_without(f, {"model.norm.weight"}, {"model.norm.weight": torch.zeros(48, dtype=torch.int8)})
    with pytest.raises(CheckpointError, match="'model.norm.weight' has dtype torch.int8"):
        load_model(hf_dir)


# ---- memory ------------------------------------------------------------------------------------------------
_RSS_SCRIPT = """
import gc, sys, torch
from safetensors.torch import load_file
from mistral_ref import checkpoint
def status(field):  # kB
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])
def naive_fp32_load(path):  # the counterfactual: the whole file in memory, then converted copies
    return {k: v.float() for k, v in load_file(path + "/model.safetensors").items()}
loads = [lambda: checkpoint.load_model(sys.argv[1], dtype="float32"),
         lambda: checkpoint.load_model(sys.argv[1], dtype="bfloat16", mmap=False),
         lambda: checkpoint.load_model(sys.argv[1], dtype="bfloat16"),
         lambda: naive_fp32_load(sys.argv[1])]
for load in loads:
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current resident size
    base = status("VmRSS:")
    model = load()
    print((status("VmHWM:") - base) * 1024)  # peak growth during this load, bytes
    del model
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_loads_peak_at_about_one_copy_of_the_weights(tmp_path):
    """Peak resident memory of loads that copy every tensor stays ~1x the model: a bf16 file -> fp32 model,
    and a bf16 file copied into private memory (mmap=False); a memory-mapped load stays near 0 until used.
    A naive load (whole file, then converted copies) is measured too, to show the measurement would see it."""
    # ~64 MB of 2 MB tensors: the per-worker scratch buffers (one tensor or 16 MiB each) stay small beside it
    args = ModelArgs(dim=512, n_layers=8, hidden_dim=2048, n_heads=8, n_kv_heads=2, vocab_size=2048)
    save_checkpoint(Transformer(args).to(torch.bfloat16), tmp_path, format="hf")
    file_bytes = (tmp_path / "model.safetensors").stat().st_size
    # a fixed malloc threshold: every tensor is its own mapping, returned to the system when freed
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         check=True, env=env)
    to_fp32, copied, mapped, naive = (int(x) / file_bytes for x in out.stdout.split())
    assert 1.9 < to_fp32 < 2.2  # the fp32 model is 2x the bf16 file
    assert 0.95 < copied < 1.1
    assert mapped < 0.25  # views of the file, read lazily (only the permuted q/k, 9%, are copies)
    assert naive > 2.8  # the fp32 copies plus the whole file


def test_no_warnings_on_a_clean_load(native_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(native_dir)
