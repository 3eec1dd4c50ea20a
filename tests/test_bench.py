"""Smoke test of the benchmark harness: `benchmarks/bench.py --quick` runs end to end and prints its ratios.

No timing is asserted (the machine may be shared); the figures are only checked to be present and positive.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def benchmark_module(name: str):
    """A module of benchmarks/ (bench, peer_llamacpp), imported with that directory on the path."""
    import importlib

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


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
    walk = result["machine"]["cpu_walk"]  # which walk the C kernels' one-row products took in this run
    assert walk in ("four rows at a time, prefetching", "one row at a time") or walk.startswith("off")
    assert f"one-row products walk {walk}" in text
    prefill = model["prefill_128"]  # with the compute ceiling: FLOPs per token against a matmul measured alongside
    assert prefill["gemm_GFLOPs"] > 0 and prefill["ceiling_tok_s"] > 0
    row = r"\| tiny-gqa \| fp32 \| 128 \| .* \| \d+ \(\d+\) \| \d+% / \d+% \| \d+% \| [\d.]+x \| \d+% \| [\d.]+x \|"
    assert re.search(row, text), text
    # the bound the matrix products put on the ratio: transformers' seconds over our seconds in products
    assert 0 < prefill["products_s"] < prefill["profiled_s"]
    assert prefill["ratio_bound"] == pytest.approx(prefill["transformers_s"] / prefill["products_s"])
    assert prefill["attention_s"] >= 0 and prefill["kernels_bound"] == pytest.approx(
        prefill["transformers_s"] / (prefill["products_s"] + prefill["attention_s"]))
    # the Small-4-shaped row's path: latent attention + fine-grained experts against transformers' Mistral4, same run
    small4 = result["models"]["tiny-small4"]["fp32"]
    assert small4["parity"]["logits_rel_err"] < 1e-5 and small4["parity"]["greedy_tokens_equal"]
    assert small4["decode_b1"]["same_tokens"] and small4["decode_b1"]["ratio"]["median"] > 0
    assert small4["prefill_128"]["ratio"]["median"] > 0
    assert re.search(r"\| tiny-small4 \| fp32 \| 1 \| .*x \|", text) and "| tiny-small4 | fp32 | 128 |" in text
    if "## llama.cpp" in text:  # llama-cpp-python installed: the small4 shape runs there as "mistral4" too
        peer = result["models"]["tiny-small4"]["llama_cpp"]
        assert peer["fp32"]["decode_b1"]["agreement"] == 8 and peer["fp32"]["decode_b1"]["ratio"]["median"] > 0
        assert re.search(r"\| tiny-small4 \| fp32 \| F32 \| .* \| 8/8 \|", text)
        assert peer["int4"]["skipped"].startswith("layers.0.")  # its shapes take no int4: the tensor is named


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
    prefill_flops = benchmark_module("bench").prefill_flops
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


def test_product_seconds_count_the_matrix_products_and_nothing_else():
    """The prefill ratio's bounds: the profiled seconds in matrix products (mm, addmm, addmm_, bmm) and in SDPA's
    CPU kernel, not in other work."""
    import torch
    import torch.nn.functional as F

    product_seconds = benchmark_module("bench").product_seconds
    a, b, x = torch.randn(256, 256), torch.randn(256, 256), torch.randn(1 << 20)
    products, attention, whole, own = product_seconds(lambda: (x.exp(), x.sin()))
    assert products == 0.0 and attention == 0.0 and own == 0.0 and whole > 0
    products, attention, whole, own = product_seconds(
        lambda: (a @ b, torch.addmm(a, a, b), torch.bmm(a[None], b[None]), x.exp()))
    assert 0 < products < whole and attention == 0.0 == own
    assert product_seconds(lambda: [a @ b for _ in range(8)])[0] > product_seconds(lambda: a @ b)[0]
    c = a.clone()  # the in-place form (the engine's prompt pass adds a residual inside its wo and w2 products)
    assert product_seconds(lambda: [c.addmm_(a, b) for _ in range(8)])[0] > 0
    q = torch.randn(1, 4, 256, 32)
    products, attention, whole, own = product_seconds(
        lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True))
    assert products == 0.0 and 0 < attention < whole and own == 0.0
    from mistral_ref.backends import cpu_gemv

    if cpu_gemv.library() is not None and cpu_gemv.library().cpu_gemv_amx():  # the AMX flash kernel: its own seconds
        qb = q.transpose(1, 2).bfloat16()
        products, attention, whole, own = product_seconds(lambda: cpu_gemv.prompt_attention_amx(qb, qb, qb))
        assert products == 0.0 == attention and 0 < own <= whole


def test_small4_row_counts_latent_cache_bytes_and_active_experts():
    """The Small-4-shaped row's floor and ceiling, counted on the module tree: decode reads the active weights (k of
    E routed experts, the shared one, the router; one embedding row) and the latent cache; prefill does 2 FLOPs per
    active matrix weight (no embedding / vocabulary projection) plus 2 x H x (qk + v) per visible key."""
    import torch

    bench = benchmark_module("bench")
    MODELS, QUICK_MODELS, decode_bytes, prefill_flops = (bench.MODELS, bench.QUICK_MODELS, bench.decode_bytes,
                                                         bench.prefill_flops)
    from mistral_ref.cache import KVCache
    from mistral_ref.family import parameter_counts
    from mistral_ref.model import Transformer

    for name, args in MODELS.items():  # each row's name says its size: "-125m" 124.7M parameters, ...
        assert abs(parameter_counts(args)["total"] / (float(name.rsplit("-", 1)[1][:-1]) * 1e6) - 1) < 0.05, name
    small, wider = MODELS["small4-130m"], MODELS["small4-150m"]  # the same but for the experts' width
    assert dataclasses.replace(wider, fine_moe=small.fine_moe) == small
    assert wider.fine_moe.moe_intermediate_size % 32 == 0 != small.fine_moe.moe_intermediate_size % 32
    a = QUICK_MODELS["tiny-small4"]
    model = Transformer(a)
    fm, m = a.fine_moe, a.mla
    expert = sum(p.numel() for p in model.layers[0].feed_forward.experts[0].parameters())
    idle = a.n_layers * (fm.num_experts - fm.num_experts_per_tok) * expert
    params = sum(p.numel() for p in model.parameters())
    cache = KVCache(a, 1, 40, dtype=torch.float32).nbytes()
    assert decode_bytes(a, 4, 40) == (params - idle - (a.vocab_size - 1) * a.dim) * 4 + cache
    weights = params - idle - 2 * a.vocab_size * a.dim
    per_key = 2 * a.n_heads * (m.qk_head_dim + m.v_head_dim)
    assert prefill_flops(a, 9) == 2 * weights + a.n_layers * per_key * 5


@pytest.mark.slow  # a compiled decode step (dynamo, ~10 s)
def test_step_profile_counts_the_c_kernel_calls_of_a_decode_step():
    """peer_llamacpp.step_profile (printed under each compiled llama.cpp row): a bf16 decode step of a dense model
    calls the C kernels once for q/k/v, once for the attention, once each for wo, w1/w3 and w2 per layer, and once
    for the vocabulary;
    their time is part of the step's.  (Compiled with dynamo's "eager" backend: the graph's operator calls without
    inductor's code generation.)"""
    import torch

    from mistral_ref.backends import cpu_gemv
    from mistral_ref.config import ModelArgs
    from mistral_ref.model import Transformer

    if cpu_gemv.library() is None:
        pytest.skip(f"C kernels: {cpu_gemv.status()}")
    step_profile = benchmark_module("peer_llamacpp").step_profile
    args = ModelArgs(dim=64, n_layers=3, hidden_dim=96, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=100,
                     norm_eps=1e-5, rope_theta=1e4)
    torch.manual_seed(0)
    model = Transformer(args).eval().to(torch.bfloat16).compile_decode(mode="full", backend="eager")
    model.compiled_decode.warm_up(1, 8 + 5)
    assert cpu_gemv.operators(wait=True) == "C++"  # the 8-token prompt calls the operators too: not counted
    prof = step_profile(model, prompt_len=8, new=5)
    assert prof["calls"] == 5 * args.n_layers + 1
    assert 0 < prof["products_s"] < prof["step_s"]


@pytest.mark.slow
def test_operators_benchmark_compares_python_and_cpp_operators():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_operators.py"), "--rounds", "1",
                           "--new", "4", "--threads", "1", "--cases", "tiny-gqa:int8"], capture_output=True, text=True,
                          timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = re.search(r"tiny-gqa int8 round 1: Python (\d+\.\d+) .* C\+\+ (\d+\.\d+) .* ratio (\d+\.\d+)", proc.stdout)
    assert row and all(float(v) > 0 for v in row.groups()), proc.stdout


def test_attention_benchmark_compares_prompt_attention_and_sdpa():
    from mistral_ref.backends import cpu_gemv

    if cpu_gemv.library() is None:
        pytest.skip(f"C kernels: {cpu_gemv.status()}")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_attention.py"), "--rounds", "1",
                           "--tokens", "70", "--models", "tiny-gqa", "--threads", "1"], capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for shape in (r"tiny-gqa \(4 / 2 / 32\)", r"mistral-7b \(32 / 8 / 128\)"):
        for dtype in ("bfloat16", "float32"):
            row = re.search(rf"\| {shape} \| {dtype} \| 70 \| (\d+\.\d) .* \| (\d+\.\d) .* \| (\d+\.\d+) .*x \|",
                            proc.stdout)
            assert row and all(float(v) > 0 for v in row.groups()), proc.stdout
    row = re.search(r"\| tiny-gqa \| 70 \| (\d+) .* \| (\d+) .* \| (\d+\.\d+) .*x \|", proc.stdout)
    assert row and float(row.group(3)) > 0, proc.stdout  # (milliseconds: a few)
    row = re.search(r"\| tiny-gqa \(4 / 2 / 32\) \| 70 \| (\d+\.\d+) .* \| (\d+\.\d+) .* \| (\d+\.\d+) .*x \|",
                    proc.stdout)  # the ragged batch
    assert row and all(float(v) > 0 for v in row.groups()), proc.stdout
    part3, part4 = proc.stdout.split("rows in buckets on vs off")[1].split("SwiGLU by the C kernels vs")
    assert "| tiny-gqa | 70 | " not in part3  # part 3: models with experts only (tiny-small4 below)
    row = re.search(r"\| tiny-gqa \| 70 \| (\d+) .* \| (\d+) .* \| (\d+\.\d+) .*x \|", part4)  # every model
    assert row and float(row.group(3)) > 0, proc.stdout
    if cpu_gemv.library().cpu_gemv_amx():  # part 7: the AMX flash attention vs SDPA, alone and in a prefill
        part7 = proc.stdout.split("the flash kernel on AMX tiles vs SDPA")[1]
        row = re.search(r"\| tiny-gqa \(4 / 2 / 32\) \| 70 \| (\d+\.\d) .* \| (\d+\.\d) .* \| (\d+\.\d+) .*x \|", part7)
        assert row and all(float(v) > 0 for v in row.groups()), part7
        row = re.search(r"\| tiny-gqa \| 70 \| (\d+) .* \| (\d+) .* \| (\d+\.\d+) .*x \|", part7)
        assert row and float(row.group(3)) > 0, part7
    else:
        assert "the AMX flash attention: skipped" in proc.stdout
    part6 = proc.stdout.split("products of a few rows: the C kernels vs F.linear")[1]  # part 6: C vs oneDNN by rows
    for shape in ("2048 x 768", "512 x 80"):
        for rows in (1, 8, 31):
            row = re.search(rf"\| {shape} \| {rows} \| (\d+) .* \| (\d+) .* \| (\d+\.\d+) .*x \|", part6)
            assert row and float(row.group(3)) > 0, part6
    if cpu_gemv.library().cpu_gemv_amx():  # part 8: linear_amx vs F.linear by rows, and in the dense models
        part8 = proc.stdout.split("linear_amx on the tiles vs F.linear")[1]
        row = re.search(r"\| 256 x 768 \| 64 \| (\d+) .* \| (\d+) .* \| (\d+\.\d+) .*x \|", part8)
        assert row and float(row.group(3)) > 0, part8
        for call in ("prefill 128", "batch 32: 64 \\+ 16 tokens"):
            row = re.search(rf"\| tiny-gqa \| {call} \| (\d+\.\d) .* \| (\d+\.\d) .* \| (\d+\.\d+) .*x \|", part8)
            assert row and float(row.group(3)) > 0, part8
    else:
        assert "bf16 products on AMX tiles: skipped" in proc.stdout


@pytest.mark.slow
def test_attention_benchmark_times_the_experts_row_buckets():
    from mistral_ref.backends import cpu_gemv

    if cpu_gemv.library() is None:
        pytest.skip(f"C kernels: {cpu_gemv.status()}")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_attention.py"), "--rounds", "1",
                           "--tokens", "70", "--models", "tiny-small4", "--threads", "1"], capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    part3 = proc.stdout.split("rows in buckets on vs off")[1].split("SwiGLU by the C kernels vs")[0]
    row = re.search(r"\| tiny-small4 \| 70 \| (\d+) .* \| (\d+) .* \| (\d+\.\d+) .*x \|", part3)
    assert row and float(row.group(3)) > 0, proc.stdout
    decode = part3.split("greedy decode at batch 8")[1]  # the C kernels' few rows exact vs padded
    row = re.search(r"\| tiny-small4 \| (\d+) .* \| (\d+) .* \| (\d+\.\d+) .*x \|", decode)
    assert row and float(row.group(3)) > 0, proc.stdout
    part5 = proc.stdout.split("the experts on AMX tiles")[1] if "the experts on AMX tiles" in proc.stdout else \
        proc.stdout.split("experts' rows on AMX tiles in one call")[1]
    if cpu_gemv.library().cpu_gemv_amx():  # part 5: the experts on AMX tiles vs the loop, prefill and decode
        for run in ("prefill 70", "decode batch 8"):
            row = re.search(rf"\| tiny-small4 \| {run} \| (\d+) .* \| (\d+) .* \| (\d+\.\d+) .*x \|", part5)
            assert row and float(row.group(3)) > 0, proc.stdout
    else:
        assert part5.startswith(": skipped, this CPU (or build) has none"), proc.stdout


def test_cpu_builds_benchmark_compares_the_kernel_builds():
    from mistral_ref.backends import cpu_gemv

    if cpu_gemv.library() is None:
        pytest.skip(f"C kernels: {cpu_gemv.status()}")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_cpu_builds.py"), "--mb", "16",
                           "--rounds", "1", "--threads", "1", "--decode", "tiny-gqa"], capture_output=True, text=True,
                          timeout=600, cwd=REPO,
                          env={**os.environ, cpu_gemv.WALK_SWITCH: "one"})  # (else timed: either walk)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "native: the walk cpu_gemv chose here, one row at a time" in proc.stdout
    for scheme in ("bf16", "int8", "int4"):
        for build in ("native", "no prefetch", "native, four rows at a time, prefetching"):
            row = re.search(rf"{scheme} {build}: (\d+\.\d+) .* per round: (\d+\.\d+)", proc.stdout)
            assert row and all(float(v) > 0 for v in row.groups()), proc.stdout
    # eager decode with either walk, the chosen one marked
    assert re.search(r"decode tiny-gqa bf16 b1, one row at a time \(chosen\): (\d+\.\d+)", proc.stdout), proc.stdout
    assert re.search(r"decode tiny-gqa bf16 b1, four rows at a time, prefetching: (\d+\.\d+)", proc.stdout)
    row = re.search(r"decode tiny-gqa: chosen walk's tok/s / the other's per round: (\d+\.\d+)", proc.stdout)
    assert row and float(row.group(1)) > 0, proc.stdout


def test_a_llamacpp_probe_that_crashes_runs_llamacpp_without_its_extra_buffer_types(tmp_path, monkeypatch):
    """peer_llamacpp.extra_bufts_fail runs llama.cpp's default weight layouts in a child process first (they died
    with SIGSEGV on an AMX Xeon): a crash or an error is a line saying so, success None; one probe per file."""
    peer = benchmark_module("peer_llamacpp")
    monkeypatch.setattr(peer, "_extra_bufts", {})
    probes = {"crash": "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)",
              "error": "import sys; sys.exit('llama_decode failed')", "fine": "pass"}
    for name, probe in probes.items():
        monkeypatch.setattr(peer, "_PROBE", probe)
        assert peer.extra_bufts_fail(tmp_path / f"{name}.gguf", 2) == {
            "crash": "killed by SIGSEGV", "error": "exit status 1: llama_decode failed", "fine": None}[name]
    monkeypatch.setattr(peer, "_PROBE", "raise SystemExit(3)")
    assert peer.extra_bufts_fail(tmp_path / "crash.gguf", 2) == "killed by SIGSEGV"  # remembered, not run again


def test_llamacpp_tables_label_the_long_context_rows(capsys):
    """bench.py --long-context N: peer_llamacpp.bench_model's rows after an N-token prompt (eager and compiled) are
    printed in the decode table, labelled with the prompt's length, beside the usual rows."""
    peer = benchmark_module("peer_llamacpp")

    def row(ours: float, theirs: float, **extra) -> dict:
        s = {"median": ours, "min": ours, "max": ours}
        t = {"median": theirs, "min": theirs, "max": theirs}
        r = {"median": ours / theirs, "min": ours / theirs, "max": ours / theirs}
        return {"ours": s, "llama_cpp": t, "ratio": r, "agreement": 8, **extra}

    compiled = {"mode": "full", "compile_s": 12.0, "compile_what": "loaded"}
    results = {"nemo": {"bf16": {"decode_b1": row(80.0, 100.0), "decode_b1_ctx2048": row(60.0, 50.0),
                                 "decode_b1_ctx2048_compiled": row(75.0, 50.0, **compiled)}}}
    peer.print_tables(results, 8, 128)
    out = capsys.readouterr().out
    assert "| nemo | bf16 | BF16 | 80.0 [80.0-80.0] | 100.0 [100.0-100.0] | 0.80 [0.80-0.80]x | 8/8 |" in out
    assert "| nemo | bf16, 2048-token prompt | BF16 | 60.0 [60.0-60.0] | 50.0 [50.0-50.0] | 1.20 [1.20-1.20]x |" in out
    assert ("| nemo | bf16, 2048-token prompt compiled (full, 12 s: loaded) | BF16 | 75.0 [75.0-75.0] | 50.0 "
            "[50.0-50.0] | 1.50 [1.50-1.50]x |") in out


@pytest.mark.oracle
def test_quantized_rows_measure_quality_against_the_fp32_logits(capsys):
    """peer_llamacpp's quantized rows: each side's logits one decode step a token (stepwise_logits equals a fp32
    prefill's logits), scored against the fp32 reference (top-1, KL(fp32 || side)); the row prints both sides."""
    peer = benchmark_module("peer_llamacpp")
    from mistral_ref.model import ModelArgs, Transformer

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, hidden_dim=128, n_heads=4, n_kv_heads=2, head_dim=16,
                                  vocab_size=97, norm_eps=1e-5, rope_theta=1e4, sliding_window=5))
    tokens = torch.randint(0, 97, (12,)).tolist()  # beyond the window
    with torch.inference_mode():
        full = model(torch.tensor([tokens]))[0]
    steps = peer.stepwise_logits(model, tokens)
    assert steps.shape == (12, 97) and torch.allclose(steps, full, rtol=1e-5, atol=1e-5)
    noisy = full + 0.5 * torch.randn_like(full)
    q = peer.quality(full, steps, noisy)
    assert q["ours"]["top1"] == 1.0 and q["ours"]["kl_mean"] < 1e-9
    assert 0.0 < q["llama_cpp"]["top1"] <= 1.0 and q["llama_cpp"]["kl_mean"] > 1e-3
    assert q["llama_cpp"]["kl_max"] >= q["llama_cpp"]["kl_mean"]

    def row(ours: float, theirs: float) -> dict:
        summary = lambda v: {"median": v, "min": v, "max": v}  # noqa: E731
        return {"ours": summary(ours), "llama_cpp": summary(theirs), "ratio": summary(ours / theirs),
                "agreement": 3, "qtype": "Q4_0", "quality": q}

    peer.print_tables({"m": {"int4 g64": row(90.0, 100.0)}}, 8, 128)
    out = capsys.readouterr().out
    assert "| m | int4 g64 | Q4_0 | 90.0 [90.0-90.0] | 100.0 [100.0-100.0] | 0.90 [0.90-0.90]x | 3/8; " in out
    assert f"top-1 1.000 / {q['llama_cpp']['top1']:.3f}" in out and "mean KL " in out


@pytest.mark.slow
def test_chat_start_is_timed_beside_its_floor(tmp_path, monkeypatch):
    """bench_compile's start measurement on a tiny bf16 checkpoint: `chat` without --compile replies and its first
    character is timed, the floor (`python -c "import torch"` to its first output) is timed too, and the starts run
    without PYTHONDONTWRITEBYTECODE (bytecode kept, as a default Python does)."""
    import dataclasses

    import torch

    from mistral_ref.checkpoint import load_model

    bc = benchmark_module("bench_compile")
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    assert "PYTHONDONTWRITEBYTECODE" not in bc.start_env() and bc.start_env()["PATH"]
    vocab = bc.load_tokenizer(bc.tokenizer_file()).vocab_size
    args = dataclasses.replace(bc.QUICK_MODELS["tiny-gqa"], vocab_size=vocab)
    bc.write_checkpoint(args, tmp_path / "ckpt", torch.bfloat16)
    assert {t.dtype for t in load_model(tmp_path / "ckpt").state_dict().values()} == {torch.bfloat16}
    floor = bc.import_torch()
    start = bc.first_token(tmp_path / "ckpt", "bf16", 1, None)
    assert floor > 0 and 0 < start["first_token_s"] <= start["exit_s"] and start["reply_bytes"] > 0, (floor, start)
