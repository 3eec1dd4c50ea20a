"""Smoke test of the benchmark harness: `benchmarks/bench.py --quick` runs end to end and prints its ratios.

No timing is asserted (the machine may be shared); the figures are only checked to be present and positive.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.oracle
def test_quick_benchmark_prints_ratios(tmp_path):
    out_json = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), "--quick", "--threads", "1",
                           "--json", str(out_json)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    for heading in ("## Decode", "## Time to first token", "## Prefill"):
        assert heading in text
    # every table row ends with a ratio "median [min-max]x"
    ratios = re.findall(r"\| (\d+\.\d+) \[(\d+\.\d+)-(\d+\.\d+)\]x \|", text)
    assert len(ratios) >= 3, text
    assert all(float(lo) <= float(med) <= float(hi) and float(med) > 0 for med, lo, hi in ratios)
    assert "fp32 greedy tokens identical to transformers' in every decode run: True" in text
    result = json.loads(out_json.read_text())
    model = result["models"]["tiny-gqa"]["fp32"]
    assert model["parity"]["logits_rel_err"] < 1e-5 and model["parity"]["greedy_tokens_equal"]
    decode = model["decode_b1"]
    assert decode["ours"]["median"] > 0 and decode["transformers"]["median"] > 0
    assert 0 < decode["fraction_of_floor"]
    assert result["machine"]["read_bandwidth_GBs"]["median"] > 0


@pytest.mark.slow
@pytest.mark.oracle  # reads the tokenizer files shipped in the mistral-common wheel
def test_json_mode_benchmark_reports_the_processor_overhead():
    """`benchmarks/bench_json_mode.py` (issue 5: JSON mode's per-token overhead) runs for both vocabularies."""
    pytest.importorskip("mistral_common")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_json_mode.py"), "--tokens", "8",
                           "--rows", "1"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # per tokenizer: | mode | rows | tokens generated | model + sampling ms/token | JSON processor ms/token | ...
    rows = re.findall(r"\| (greedy|sampled|sampled \+ structure) \| \d+ \| (\d+) \| (\d+\.\d+) \| (\d+\.\d+) \|",
                      proc.stdout)
    assert [mode for mode, *_ in rows] == ["greedy", "sampled", "sampled + structure"] * 2, proc.stdout
    assert all(int(n) > 0 and float(model_ms) > 0 and float(json_ms) > 0 for _, n, model_ms, json_ms in rows)
    for vocab in ("32768 tokens", "131072 tokens"):
        assert vocab in proc.stdout
