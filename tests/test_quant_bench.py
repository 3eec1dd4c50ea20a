"""Smoke test of benchmarks/bench_quant.py --quick: quality rows and decode rates for every variant, in the JSON.

No speed is asserted (the machine may be shared); quality is checked only for order: int8 within reach of bf16.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_quant_benchmark(tmp_path):
    out_json = tmp_path / "quant.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_quant.py"), "--quick", "--threads", "1",
                           "--json", str(out_json)], capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out_json.read_text())
    assert set(results) == {"embedded", "tiny-gqa"}
    embedded = results["embedded"]
    assert "not a multiple of group_size 128" in embedded["quality"]["int4-g128"]  # wo has 192 inputs
    assert embedded["quality"]["int8"]["top1"] >= 0.9 and embedded["quality"]["int8"]["kl_mean"] < 1e-2
    for name, result in results.items():
        assert set(result["decode_tok_s"]) >= {"bf16", "int8", "int4-g32", "int4-g64"}, name
        assert all(row["median"] > 0 for row in result["decode_tok_s"].values())
    assert "decode tokens/s" in proc.stdout and "quality against bf16" in proc.stdout
