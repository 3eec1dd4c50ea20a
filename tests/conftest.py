"""Shared fixtures and helpers of the test suite.

* Tolerances: fp32 logits within FP32_RTOL (1e-5) of their oracle, relative to the largest magnitude (rel_err).
* Threads: the `one_thread` fixture runs a test on one torch thread (tiny shapes: threads only fight for the two
  cores of a CI machine); the Makefile also sets OMP_NUM_THREADS=1.
* Models: random_model(args, seed) gives weights with teeth (model_helpers.py), `make_model` the same as a fixture.
* Checkpoints: `native_dir` / `hf_dir`, a tiny Nemo-shaped random model saved in each format
  (checkpoint_helpers.py).
* Triton's mode: on a machine without a CUDA GPU, TRITON_INTERPRET defaults to 1 for the whole session, as the
  Makefile exports it. Triton fixes its mode when first imported, and torch.compile (the compiled-decode tests)
  imports it too: without this, a plain `pytest` that ran those tests first would leave the kernel tests a
  Triton without its interpreter.
* Compile caches: the session's compiled code and saved decode steps (TORCHINDUCTOR_CACHE_DIR) go to a temporary
  directory removed at exit, never the user's ~/.cache/mistral-ref/compile (subprocesses inherit it).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from checkpoint_helpers import save_tiny
from model_helpers import random_model

_COMPILE_CACHE = tempfile.mkdtemp(prefix="mistral-ref-tests-compile-")  # (see the module docstring)
os.environ["TORCHINDUCTOR_CACHE_DIR"] = _COMPILE_CACHE
atexit.register(shutil.rmtree, _COMPILE_CACHE, ignore_errors=True)

FP32_RTOL = 1e-5  # fp32 logits against an oracle, relative to the largest magnitude


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in fp32 (no gradient: a figure, not part of a graph)."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def make_model():
    """random_model as a fixture: make_model(args, seed=0) -> an eval-mode Transformer with random weights."""
    return random_model


@pytest.fixture
def native_dir(tmp_path) -> Path:
    return save_tiny(tmp_path / "native", "native")


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    return save_tiny(tmp_path / "hf", "hf")
