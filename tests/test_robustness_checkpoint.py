"""Corrupt checkpoints: safetensors headers whose tensors overlap, leave holes or trailing bytes, repeat a key
or point outside the data, and configs describing absurd models, are refused with the file (and the tensor or
field) named, before anything of their size is built; convert refuses them instead of writing aliased copies."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import error_text, save_tiny, tiny_args
from model_helpers import random_model

from mistral_ref.checkpoint import (
    CheckpointError,
    convert_checkpoint,
    load_model,
    read_safetensors_header,
    save_checkpoint,
)
from mistral_ref.checkpoint import files as checkpoint_files
from mistral_ref.config import ConfigError


def write_raw(path: Path, header: dict | str, data: bytes) -> Path:
    """A .safetensors file with exactly this header (a dict, or raw JSON text) and data."""
    blob = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def entry(begin: int, end: int, shape: list[int] | None = None, dtype: str = "F32") -> dict:
    return {"dtype": dtype, "shape": shape if shape is not None else [(end - begin) // 4],
            "data_offsets": [begin, end]}


# ---- safetensors headers -----------------------------------------------------------------------------------
def test_a_well_formed_file_is_read(tmp_path):
    f = write_raw(tmp_path / "ok.safetensors", {"a": entry(0, 8), "b": entry(8, 16), "z": entry(16, 16, [0])},
                  bytes(16))
    assert list(read_safetensors_header(f)) == ["a", "b", "z"]


@pytest.mark.parametrize("header, size, words", [
    ({"a": entry(0, 8), "b": entry(4, 12)}, 12, "key 'b': its bytes 4..12 overlap those of key 'a'"),
    ({"a": entry(0, 8), "b": entry(0, 8)}, 8, "overlap those of key 'a'"),  # aliases of one tensor
    ({"a": entry(0, 8), "b": entry(12, 20)}, 20, "key 'b': its bytes start at 12 but the tensors before it "
                                                 "end at 8"),
    ({"a": entry(4, 12)}, 12, "key 'a': its bytes start at 4"),
    ({"a": entry(0, 8)}, 12, "4 trailing bytes"),
    ({"a": entry(0, 8), "b": entry(8, 16)}, 12, "key 'b': its bytes end at offset 16 but the file holds only "
                                                "12"),
    ({"a": entry(8, 0, [2])}, 8, "needs 8 bytes, the header gives offsets 8..0"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, 8, "malformed header entry"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 0]}}, 0, "malformed header entry"),
    ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, 8, "malformed header entry"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, True]}}, 8, "malformed header entry"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 10**30]}}, 8, "needs 8 bytes"),
])
def test_corrupt_layouts_are_refused_with_file_and_key(tmp_path, header, size, words):
    f = write_raw(tmp_path / "bad.safetensors", header, bytes(size))
    with pytest.raises(CheckpointError) as e:
        read_safetensors_header(f)
    assert str(f) in error_text(e) and words in error_text(e)


@pytest.mark.parametrize("raw, words", [
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
     '"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}', "key 'a' appears twice"),
    ('{"a": {"dtype": "F32", "dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}', "key 'dtype' appears twice"),
    ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "not valid JSON"),
    ('{"a": {"dtype": "F32", "shape": [' + "1" * 5000 + '], "data_offsets": [0, 8]}}', "not valid JSON"),
])
def test_duplicate_keys_and_unparsable_headers(tmp_path, raw, words):
    f = write_raw(tmp_path / "bad.safetensors", raw, bytes(16))
    with pytest.raises(CheckpointError) as e:
        read_safetensors_header(f)
    assert str(f) in error_text(e) and words in error_text(e)


def alias_second_norm(directory: Path, name: str) -> tuple[str, str]:
    """Point one norm weight at the bytes of another of the same shape (a header-only edit)."""
    f = directory / name
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    norms = sorted(k for k in header if k.endswith("norm.weight") and k != "norm.weight")
    first, second = norms[0], norms[1]
    header[second]["data_offsets"] = header[first]["data_offsets"]
    write_raw(f, header, data[8 + n:])
    return first, second


@pytest.mark.parametrize("fmt, name", [("native", "consolidated.safetensors"), ("hf", "model.safetensors")])
def test_convert_and_load_refuse_aliased_tensors(tmp_path, fmt, name):
    src = save_tiny(tmp_path / "src", fmt)
    alias_second_norm(src, name)
    dst = tmp_path / "dst"
    with pytest.raises(CheckpointError) as e:
        convert_checkpoint(src, dst, "hf" if fmt == "native" else "native")
    assert str(src / name) in error_text(e) and "overlap" in error_text(e)
    assert not dst.exists() or not any(p.suffix == ".safetensors" for p in dst.iterdir())
    with pytest.raises(CheckpointError, match="overlap"):
        load_model(src)


# ---- configs describing absurd models: refused before a module is built ----------------------------------------
NATIVE_FIELDS = [("n_layers", 10**9), ("dim", 10**9), ("hidden_dim", 10**9), ("vocab_size", 10**9),
                 ("head_dim", 10**9), ("n_heads", 2 * 10**9), ("n_layers", 10**400)]
HF_FIELDS = [("num_hidden_layers", 10**9), ("hidden_size", 10**9), ("intermediate_size", 10**9),
             ("vocab_size", 10**9), ("num_local_experts", 10**9), ("num_key_value_heads", 10**9)]


@pytest.fixture
def no_model_building(monkeypatch):
    """Make any attempt to build the model (even on the meta device) fail the test."""
    def refuse(args):
        raise AssertionError("a model was built for an absurd config")
    monkeypatch.setattr(checkpoint_files, "meta_model", refuse)


def edit_config(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("field, value", NATIVE_FIELDS)
def test_absurd_native_config_is_refused_naming_file_and_field(tmp_path, no_model_building, field, value):
    src = save_tiny(tmp_path / "native", "native")
    if field == "n_heads":
        edit_config(src / "params.json", n_heads=value, n_kv_heads=value)
    else:
        edit_config(src / "params.json", **{field: value})
    start = time.perf_counter()
    for action in (load_model, lambda p: convert_checkpoint(p, tmp_path / "out", "hf")):
        with pytest.raises(CheckpointError) as e:
            action(src)
        msg = error_text(e)
        assert str(src / "params.json") in msg and "consolidated.safetensors" in msg and f"{field}=" in msg
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("field, value", HF_FIELDS)
def test_absurd_hf_config_is_refused_naming_file_and_field(tmp_path, no_model_building, field, value):
    src = save_tiny(tmp_path / "hf", "hf")
    extra = {"num_experts_per_tok": 2} if field == "num_local_experts" else {}
    if field == "num_key_value_heads":
        extra = {"num_attention_heads": value}
    edit_config(src / "config.json", **{field: value}, **extra)
    with pytest.raises(CheckpointError) as e:
        load_model(src)
    msg = error_text(e)
    assert str(src / "config.json") in msg and "model.safetensors" in msg and f"{field}=" in msg


def test_a_config_slightly_too_large_is_refused_without_blaming_one_field(tmp_path, no_model_building):
    src = save_tiny(tmp_path / "native", "native")
    edit_config(src / "params.json", n_layers=200, vocab_size=4000)  # 0.2 MB of weights; each alone would fit
    with pytest.raises(CheckpointError, match="the product of its sizes is too large"):
        load_model(src)


@pytest.mark.parametrize("n_layers", [1, 3])
def test_the_bound_holds_for_the_smallest_real_files(tmp_path, n_layers):
    # float8 weights of a very small model: about as few bytes per parameter and per tensor as a file can have
    args = tiny_args(n_layers=n_layers, dim=8, hidden_dim=8, n_heads=1, n_kv_heads=1, head_dim=8, vocab_size=4)
    save_checkpoint(random_model(args), tmp_path, dtype=torch.float8_e4m3fn)
    assert checkpoint_files.min_checkpoint_bytes(args) <= (tmp_path / "consolidated.safetensors").stat().st_size
    assert load_model(tmp_path, dtype="float32").args == args


@pytest.mark.parametrize("text", ['{"dim": ' + "9" * 5000 + "}", "[" * 100_000 + "]" * 100_000])
def test_unparsable_configs_are_config_errors_naming_the_file(tmp_path, text):
    src = save_tiny(tmp_path / "native", "native")
    (src / "params.json").write_text(text)
    with pytest.raises(ConfigError, match="params.json: not valid JSON"):
        load_model(src)
