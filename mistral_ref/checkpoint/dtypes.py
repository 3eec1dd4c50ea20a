"""The dtype helpers: a dtype the user names, the dtype a checkpoint is stored in, and a float32 read back as
the decimal it was written from."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Protocol

import numpy as np
import torch

_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def float32_decimal(value: float) -> float:
    """The shortest decimal of `value` as a float32: a file that stores float32 (GGUF) gives 1e-6 back as
    9.99999997e-07 and 0.1 as 0.100000001; this returns 1e-6 and 0.1 (what was written)."""
    return float(str(np.float32(value)))


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """"bf16" / "bfloat16" / "torch.bfloat16" / torch.bfloat16 -> torch.bfloat16 (likewise fp16 / half /
    float16 and fp32 / float / float32).  None stays None: "keep the checkpoint's dtype".

    Raises ValueError naming the accepted names.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _NAMES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(_NAMES)}")
    return _NAMES[name]


class _Sized(Protocol):
    dtype: torch.dtype
    nbytes: int


def dominant_dtype(tensors: Iterable[_Sized]) -> torch.dtype:
    """The dtype that holds most of the bytes of `tensors` (anything with .dtype and .nbytes: TensorInfo,
    torch.Tensor): what a checkpoint "is stored in" even when, say, its norms are fp32 and its matrices bf16."""
    nbytes = Counter[torch.dtype]()
    for t in tensors:
        nbytes[t.dtype] += t.nbytes
    if not nbytes:
        raise ValueError("no tensors: a dtype holding most bytes needs at least one")
    return nbytes.most_common(1)[0][0]
