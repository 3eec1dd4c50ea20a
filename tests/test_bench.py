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
    prefill = model["prefill_128"]  # with the compute ceiling: FLOPs per token against a matmul measured alongside
    assert prefill["gemm_GFLOPs"] > 0 and prefill["ceiling_tok_s"] > 0
    assert re.search(r"\| tiny-gqa \| fp32 \| 128 \| .* \| \d+ \(\d+\) \| \d+% / \d+% \|", text), text
    # llama.cpp: its tables where llama-cpp-python is installed, else one line that says why not
    try:
        import llama_cpp  # noqa: F401
    except Exception:
        assert re.search(r"^llama\.cpp peer skipped: .+", text, re.M), text
        assert "## llama.cpp" not in text
    else:
        assert re.search(r"\| tiny-gqa \| fp32 \| F32 \| .* \| \d+\.\d+ \[.*\]x \| \d+/8 \|", text), text
        assert re.search(r"\| tiny-gqa \| fp32 \| 128 \| \d+ \[.*\] \| \d+ \[.*\] \|", text), text
        assert "fp32 greedy tokens identical to llama.cpp's in every model: True" in text
        peer = result["models"]["tiny-gqa"]["llama_cpp"]["fp32"]
        assert peer["decode_b1"]["llama_cpp"]["median"] > 0 and peer["prefill_128"]["llama_cpp"]["median"] > 0


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


def test_prefill_flops_counts_two_per_active_weight_plus_attention():
    """The compute ceiling's FLOP count: 2 per multiplied weight (k experts of E, router included, no vocabulary
    projection) plus 4 x n_heads x head_dim per visible key, on average (T+1)/2 keys or the window."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from bench import prefill_flops
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    from mistral_ref.config import ModelArgs, MoeArgs
    from mistral_ref.model import Transformer

    dense = ModelArgs(dim=64, n_layers=2, hidden_dim=96, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=100,
                      norm_eps=1e-5, rope_theta=1e4)
    model = Transformer(dense)
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "layers." in n)
    assert prefill_flops(dense, 1) == 2 * matrices + 2 * 4 * 4 * 32 * 1
    assert prefill_flops(dense, 9) == 2 * matrices + 2 * 4 * 4 * 32 * 5
    windowed = ModelArgs(**{**dense.__dict__, "sliding_window": 3})
    assert prefill_flops(windowed, 9) == 2 * matrices + 2 * 4 * 4 * 32 * 3
    moe = ModelArgs(**{**dense.__dict__, "moe": MoeArgs(4, 2)})
    experts = 3 * 64 * 96
    assert prefill_flops(moe, 1) == prefill_flops(dense, 1) + 2 * 2 * (experts + 64 * 4)


def _peer():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import peer_llamacpp
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return peer_llamacpp


def test_llamacpp_gguf_files_hold_the_bench_weights(tmp_path):
    """The llama.cpp peer's files: one GGUF per dtype row, written by mistral_ref's writer with a tokenizer
    llama.cpp can load, and loading back (our reader) to the very weights; a model whose vocabulary cannot hold
    the tokenizer gets a reason instead."""
    pytest.importorskip("gguf")
    import torch
    from model_helpers import random_model

    from mistral_ref.checkpoint import load_model
    from mistral_ref.checkpoint.gguf import open_gguf
    from mistral_ref.config import ModelArgs

    peer = _peer()
    args = ModelArgs(dim=64, n_layers=1, hidden_dim=96, n_heads=4, n_kv_heads=2, head_dim=16,
                     vocab_size=peer.TOKENIZER_SIZE, norm_eps=1e-5, rope_theta=1e6)
    model = random_model(args)
    files = peer.write_gguf(model, tmp_path, ["fp32", "bf16"])
    assert set(files) == {"fp32", "bf16"}
    assert open_gguf(files["bf16"]).fields["tokenizer.ggml.model"].contents() == "llama"
    for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        loaded = load_model(files[dname])
        assert loaded.dtype == dtype
        assert all(torch.equal(a, b.to(dtype)) for a, b in zip(loaded.state_dict().values(),
                                                                 model.state_dict().values()))
    small = peer.write_gguf(random_model(ModelArgs(**{**args.__dict__, "vocab_size": 1024})), tmp_path, ["fp32"])
    assert isinstance(small, str) and "vocabulary (1024)" in small


def test_llamacpp_tables_and_agreement():
    """peer_llamacpp.print_tables: decode rows for each dtype and quantized scheme, prefill rows, agreement."""
    peer = _peer()
    s = {"median": 2.0, "min": 1.0, "max": 3.0}
    dec = {"ours": s, "llama_cpp": s, "ratio": s, "agreement": 8}
    results = {"m": {"fp32": {"decode_b1": dec, "prefill_512": {"ours": s, "llama_cpp": s, "ratio": s}},
                     "int4": {**dec, "agreement": 3, "qtype": "Q4_0", "agreement_ours_fp32": 5,
                              "agreement_llama_cpp_fp32": 4}},
               "skipped-model": {"skipped": "why"}}
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        peer.print_tables(results, 8, 32)
    text = out.getvalue()
    assert "| m | fp32 | F32 | 2.0 [1.0-3.0] | 2.0 [1.0-3.0] | 2.00 [1.00-3.00]x | 8/8 |" in text
    assert "| m | int4 | Q4_0 | 2.0 [1.0-3.0] | 2.0 [1.0-3.0] | 2.00 [1.00-3.00]x | 3/8 (fp32: 5 / 4) |" in text
    assert "| m | fp32 | 512 | 2 [1-3] | 2 [1-3] | 2.00 [1.00-3.00]x |" in text
    assert "fp32 greedy tokens identical to llama.cpp's in every model: True" in text
    assert "skipped-model" not in text
    assert peer.agreement([1, 2, 3, 4], [1, 2, 5, 4]) == 2 and peer.agreement([1], [1, 2]) == 1


@pytest.mark.slow
def test_llamacpp_int_rows_against_q8_0_and_q4_0(tmp_path):
    """mistral_ref int8/int4 (quantize_model) against llama.cpp's Q8_0/Q4_0 of the same F32 file: both decode and
    print their agreement with the fp32 tokens.  Needs llama_cpp and issue 21's mistral_ref.quantize_model."""
    import mistral_ref

    if not hasattr(mistral_ref, "quantize_model"):
        pytest.skip("mistral_ref.quantize_model is not in this tree (issue 21's quantization branch)")
    peer = _peer()
    if peer.unavailable():
        pytest.skip(f"llama_cpp is not importable ({peer.unavailable()}): pip install 'mistral-ref[bench]'")
    from model_helpers import random_model

    from mistral_ref.config import ModelArgs

    args = ModelArgs(dim=64, n_layers=2, hidden_dim=128, n_heads=4, n_kv_heads=2, head_dim=16,
                     vocab_size=peer.TOKENIZER_SIZE, norm_eps=1e-5, rope_theta=1e6)
    files = peer.write_gguf(random_model(args), tmp_path, ["fp32"])
    out = peer.bench_quantized("tiny", files, 1, 2, 16, 8, reference=None)
    assert set(out) == {"int8", "int4"}
    for scheme, qtype in (("int8", "Q8_0"), ("int4", "Q4_0")):
        assert out[scheme]["qtype"] == qtype and (tmp_path / f"{qtype}.gguf").is_file()
        assert out[scheme]["ours"]["median"] > 0 and out[scheme]["llama_cpp"]["median"] > 0
        assert 0 <= out[scheme]["agreement"] <= 8
