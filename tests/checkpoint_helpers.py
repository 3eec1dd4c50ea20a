"""Shared helpers of the test_checkpoint_*.py modules (not collected): a tiny Nemo-shaped model and checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_helpers import random_model

from mistral_ref.checkpoint import save_checkpoint
from mistral_ref.config import ModelArgs
from mistral_ref.model import Transformer


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


def save_tiny(directory: Path, fmt: str) -> Path:
    """random_model(tiny_args()) saved in `fmt` ("native" or "hf") to `directory`; returns it."""
    save_checkpoint(random_model(tiny_args()), directory, format=fmt)
    return directory
