"""The dtype helpers every loader shares (mistral_ref.checkpoint.dtypes)."""

from __future__ import annotations

import pytest
import torch

from mistral_ref.checkpoint import TensorInfo, dominant_dtype, parse_dtype


@pytest.mark.parametrize("name,dtype", [
    ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16),
    ("fp16", torch.float16), ("float16", torch.float16), ("half", torch.float16),
    ("fp32", torch.float32), ("float32", torch.float32), ("float", torch.float32),
    (torch.float16, torch.float16), (None, None),
])
def test_parse_dtype(name, dtype):
    assert parse_dtype(name) is dtype


def test_parse_dtype_names_what_it_accepts():
    with pytest.raises(ValueError, match=r"dtype 'int8' is not one of \['bf16', 'bfloat16', 'float'"):
        parse_dtype("int8")


def test_dominant_dtype_counts_bytes_not_tensors(tmp_path):
    # three fp32 norms (3 x 64 bytes) against one bf16 matrix (16 x 16 x 2 = 512 bytes)
    norms = [TensorInfo(tmp_path, f"n{i}", torch.float32, (16,), 0) for i in range(3)]
    assert dominant_dtype([*norms, TensorInfo(tmp_path, "w", torch.bfloat16, (16, 16), 0)]) == torch.bfloat16
    assert dominant_dtype([torch.zeros(4, dtype=torch.float16), torch.zeros(1)]) == torch.float16  # tensors too
    with pytest.raises(ValueError, match="no tensors"):
        dominant_dtype([])
