"""One .safetensors file (mistral_ref.checkpoint.safetensors_io): pickles and git-lfs pointers refused, truncated
and corrupt headers named with file and key."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import error_text, tiny_args
from safetensors.torch import save_file

from mistral_ref.checkpoint import (
    CheckpointError,
    TensorSlice,
    load_model,
    permute_qk,
    read_safetensors_header,
    read_tensor,
    safetensors_io,
)


# ---- headers: bad files are named with their key and refused before a byte is read --------------------------
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


# ---- reading one tensor, or a slice of it, into private memory ---------------------------------------------
@pytest.mark.parametrize("chunk_bytes", [16 << 20, 40])  # 40 bytes: every read goes through many chunks
def test_read_tensor_whole_rows_columns_and_casts(tmp_path, monkeypatch, chunk_bytes):
    monkeypatch.setattr(safetensors_io, "CHUNK_BYTES", chunk_bytes)
    w, v = torch.randn(12, 7).bfloat16(), torch.randn(5)
    save_file({"w": w, "v": v}, tmp_path / "t.safetensors")
    info = read_safetensors_header(tmp_path / "t.safetensors")
    with open(tmp_path / "t.safetensors", "rb") as f:
        assert torch.equal(read_tensor(f, info["w"], torch.bfloat16), w)
        assert torch.equal(read_tensor(f, info["w"], torch.float32), w.float())
        assert torch.equal(read_tensor(f, info["w"], torch.bfloat16, TensorSlice(0, 3, 9)), w[3:9])
        assert torch.equal(read_tensor(f, info["w"], torch.float32, TensorSlice(1, 2, 6)), w[:, 2:6].float())
        assert torch.equal(read_tensor(f, info["v"], torch.float32, TensorSlice(0, 1, 4)), v[1:4])
        assert read_tensor(f, info["w"], torch.bfloat16, TensorSlice(1, 0, 0)).shape == (12, 0)  # reads nothing
        assert read_tensor(f, info["w"], torch.bfloat16, TensorSlice(0, 5, 5)).shape == (0, 7)


@pytest.mark.parametrize("chunk_bytes", [16 << 20, 40])
def test_read_tensor_puts_hf_q_rows_in_native_order_by_whole_heads(tmp_path, monkeypatch, chunk_bytes):
    monkeypatch.setattr(safetensors_io, "CHUNK_BYTES", chunk_bytes)
    wq = torch.randn(4 * 8, 6)  # native order, 4 heads of 8
    save_file({"q": permute_qk(wq, 8, "hf")}, tmp_path / "t.safetensors")
    q = read_safetensors_header(tmp_path / "t.safetensors")["q"]
    with open(tmp_path / "t.safetensors", "rb") as f:
        assert torch.equal(read_tensor(f, q, torch.float32, qk_head_dim=8), wq)
        assert torch.equal(read_tensor(f, q, torch.bfloat16, qk_head_dim=8), wq.bfloat16())
        assert torch.equal(read_tensor(f, q, torch.float32, TensorSlice(0, 8, 24), qk_head_dim=8), wq[8:24])
        for bad, why in [(TensorSlice(0, 4, 12), "whole heads"), (TensorSlice(1, 0, 3), "whole heads"),
                         (TensorSlice(0, 0, 40), "out of bounds"), (TensorSlice(2, 0, 1), "rows or columns")]:
            with pytest.raises(ValueError, match=why) as e:
                read_tensor(f, q, torch.float32, bad, qk_head_dim=8)
            assert "t.safetensors: key 'q'" in str(e.value)
