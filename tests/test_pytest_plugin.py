"""The pytest plugin (parity_oracles/pytest_plugin.py), run as another project runs it: pytest in a subprocess, in an
empty directory, on a tiny random checkpoint that carries the embedded model's tokenizer."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from model_helpers import random_model

import parity_oracles.pytest_plugin
from mistral_ref.checkpoint import copy_tokenizer_files, save_checkpoint
from mistral_ref.config import ModelArgs
from mistral_ref.embedded import EMBEDDED_MODEL_DIR

REPO = Path(__file__).resolve().parents[1]
PLUGIN = Path(parity_oracles.pytest_plugin.__file__)
pytestmark = [pytest.mark.oracle, pytest.mark.slow]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """HF files of a random 2-layer model with the embedded tokenizer's 3,072-token vocabulary."""
    args = ModelArgs(dim=64, n_layers=2, hidden_dim=96, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=3072,
                     norm_eps=1e-5, rope_theta=1e4, sliding_window=9, max_seq_len=512)
    directory = save_checkpoint(random_model(args), tmp_path_factory.mktemp("ckpt"), format="hf").config.parent
    copy_tokenizer_files(EMBEDDED_MODEL_DIR, directory)
    return directory


def run_pytest(cwd: Path, *args: str) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("PYTEST_ADDOPTS", None)
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "parity_oracles.pytest_plugin",
                          "-p", "no:cacheprovider", "-rA", *args],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    return out.returncode, out.stdout + out.stderr


def outcomes(text: str) -> dict[str, str]:
    """{test name: PASSED/FAILED} from pytest's -rA summary."""
    return {m[2]: m[1] for m in re.finditer(r"^(PASSED|FAILED)\s+\S*?::(\w+)", text, re.M)}


SUITE = ["test_logits_match_transformers", "test_greedy_tokens_match_transformers",
         "test_cached_decode_matches_full_forward", "test_chunked_prefill_matches_full_forward",
         "test_chat_template_matches_mistral_common"]


def test_the_suite_passes_on_a_checkpoint(checkpoint, tmp_path):
    code, text = run_pytest(tmp_path, "--mistral-checkpoint", str(checkpoint))
    assert code == 0, text[-4000:]
    assert outcomes(text) == dict.fromkeys(SUITE, "PASSED"), text[-4000:]
    assert re.search(r"^=+ 5 passed", text, re.M)


def test_the_suite_fails_when_the_model_is_wrong(checkpoint, tmp_path):
    """A conftest that scales every attention output by 1.001: transformers' logits no longer match, while the
    cache tests (which compare mistral-ref with itself) still pass."""
    (tmp_path / "conftest.py").write_text(
        "from mistral_ref.attention import Attention\n"
        "forward = Attention.forward\n"
        "Attention.forward = lambda self, *a, **k: forward(self, *a, **k) * 1.001\n")
    code, text = run_pytest(tmp_path, "--mistral-checkpoint", str(checkpoint), "-k", "logits or cached")
    assert code == 1, text[-4000:]
    got = outcomes(text)
    assert got["test_logits_match_transformers"] == "FAILED"
    assert got["test_cached_decode_matches_full_forward"] == "PASSED"
    assert "FAIL: logits max_rel" in text  # the failure shows the parity table


def test_without_a_checkpoint_the_suite_is_skipped_and_not_added(tmp_path):
    code, text = run_pytest(tmp_path, str(PLUGIN))
    assert code == 0 and re.search(r"^=+ 5 skipped", text, re.M), text[-3000:]
    assert text.count("no checkpoint: run with --mistral-checkpoint PATH") >= 1
    (tmp_path / "test_other.py").write_text("def test_other():\n    pass\n")
    code, text = run_pytest(tmp_path, "--help")
    assert "--mistral-checkpoint=PATH" in text and "--mistral-dtype" in text
    code, text = run_pytest(tmp_path)  # another project's own tests: the suite is not added to them
    assert code == 0 and re.search(r"^=+ 1 passed in", text, re.M), text[-3000:]


def test_registered_as_a_pytest11_entry_point():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    plugin = "parity_oracles.pytest_plugin"
    assert meta["project"]["entry-points"]["pytest11"] == {plugin: plugin}
    sides = meta["project"]["entry-points"]["mistral_ref.parity_sides"]
    assert sides == {"transformers": "parity_oracles.transformers_side:run_transformers"}
