"""backends/heap.py: glibc keeps freed memory for reuse, so that a long prompt's forward faults no pages in anew."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from mistral_ref.backends import heap

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# a 2-layer fp32 model over a 2048-token prompt, four forwards: the page faults of each (the process's minor faults)
_PROBE = """
import json, resource, torch
from mistral_ref.backends import heap
from mistral_ref.cache import KVCache
from mistral_ref.config import ModelArgs
from mistral_ref.model import Transformer
torch.manual_seed(0)
args = ModelArgs(dim=256, n_layers=2, hidden_dim=1024, n_heads=4, n_kv_heads=2, head_dim=64, vocab_size=512,
                 norm_eps=1e-5)
model, T = Transformer(args).eval(), 2048
ids, positions = torch.randint(0, 512, (1, T)), torch.arange(T)[None]
faults = []
with torch.inference_mode():
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(ids, positions, KVCache(args, 1, T), logits_at=torch.tensor([T - 1]))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults, "state": heap.keep_freed_memory()}))
"""


def _probe(switch: str | None) -> dict:
    settings = {heap.SWITCH, "GLIBC_TUNABLES", *(variable for variable, _ in heap._GLIBC_SETTINGS)}
    env = {k: v for k, v in os.environ.items() if k not in settings}  # glibc's defaults, whatever ran the suite
    if switch is not None:
        env[heap.SWITCH] = switch
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_a_long_prompt_faults_no_pages_in_anew():
    kept, left = _probe(None), _probe("0")
    assert kept["state"] is None and left["state"] == f"{heap.SWITCH}=0"
    # glibc's own thresholds: every forward maps its large temporaries anew (~16,000 faults here)
    assert min(left["faults"][1:]) > 2000, left
    # kept: the first forward grows the heap, the later ones reuse it
    assert max(kept["faults"][1:]) < 200, kept


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_the_setting_is_made_once_and_says_why_not(monkeypatch):
    import mistral_ref.backends.pytorch  # noqa: F401  (importing the default engine sets it)

    outcome = heap.keep_freed_memory()  # (the suite's environment may switch it off or set glibc's thresholds)
    assert outcome is None or outcome == f"{heap.SWITCH}=0" or outcome.startswith("the environment sets")
    assert heap.keep_freed_memory() is heap.keep_freed_memory()  # one outcome per process
    monkeypatch.setenv(heap.SWITCH, "0")
    assert heap._set_thresholds() == f"{heap.SWITCH}=0"  # switched off: mallopt is not called


@pytest.mark.parametrize("variable, value", [("MALLOC_MMAP_THRESHOLD_", "65536"),
                                             ("MALLOC_TRIM_THRESHOLD_", "131072"),
                                             ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")])
def test_thresholds_the_environment_sets_are_left_alone(monkeypatch, variable, value):
    monkeypatch.delenv(heap.SWITCH, raising=False)
    monkeypatch.setenv(variable, value)
    assert heap._set_thresholds().startswith("the environment sets MALLOC_")
