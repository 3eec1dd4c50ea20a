"""Loading (mistral_ref.checkpoint.load): device and dtype of every tensor, memory-map views vs private copies,
the progress bar, and peak memory."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from checkpoint_helpers import assert_same_weights
from safetensors import safe_open

from mistral_ref.checkpoint import load_model, save_checkpoint
from mistral_ref.config import ModelArgs
from mistral_ref.model import Transformer


def test_progress_bar_only_when_asked_or_big_on_a_terminal(native_dir, capsys):
    load_model(native_dir)  # small and not a terminal: silent
    assert capsys.readouterr().err == ""
    load_model(native_dir, progress=True)
    assert "loading native" in capsys.readouterr().err


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
