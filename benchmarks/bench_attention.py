"""A prompt's causal attention on the CPU: backends/prompt_attention.py (two GEMMs a block of queries, the softmax
in C) against F.scaled_dot_product_attention's causal kernel (what sdpa.py runs), same process, same run.

    python benchmarks/bench_attention.py [--rounds 5] [--tokens 512,2048,4096] [--models mistral-125m,...]
                                         [--parts 1,2,3,4,5,6,7,8]

Part 1, the attention alone: the bench models' attention shapes (and Mistral 7B's: 32 query heads over 8, head_dim
128), bf16 and fp32, each prompt length; the two paths alternate, each round starting with the other one.  Prints
GFLOP/s (causal: 2 x 2 x T^2 / 2 x head_dim x heads) median [min-max] and the per-round time ratio SDPA / GEMMs
(> 1: the GEMMs are faster); then a ragged bf16 batch of two prompts, the second 100 tokens shorter and padded
(prompt_rows, row by row: each row by the GEMMs, or by SDPA's causal kernel where prompt_attention.FLASH_FIRST,
against SDPA's masked kernel on the batch).  Part 2, a bf16 prefill of each bench model (one forward pass into a
fresh cache, greedy first token), the "torch" backend with prompt_attention taking the prompt and with it switched
off (SDPA), alternating (latent-attention models, e.g. small4-130m, in this part only: their expanded form calls
prompt_attention).  Part 3, a bf16 prefill of each model with experts, a new random prompt every call, the same
sequence on both sides: the experts' rows in buckets (backends/moe.py) on and off; then a decode at batch 8 with
the few rows an expert gets there left exact (bucketed_rows: the C kernels take them) against padded to buckets
like a prompt's.  Part 4, the same prefills of
every model: the "torch" backend's elementwise C kernels (cpu_gemv.rms_norm, rope, swiglu) on and off (off: F.rms_norm,
the complex product, F.silu(gate) * up, as before them).  Part 5, on a CPU with AMX tiles: bf16 prefills and a
decode at batch 8 of each model with experts, their rows on the tiles in one call a layer (cpu_gemv.experts_rows)
against the loop an expert.  Part 6: bf16 products of 1-31 rows, the C kernels against F.linear (oneDNN), by rows:
what sets cpu_gemv.MAX_ROWS["bf16"].  Part 7, on a CPU with AMX tiles: a bf16 prompt's attention by the flash
kernel on the tiles (cpu_gemv.prompt_attention_amx) against SDPA's causal mode, alone and in bf16 prefills (parts
1 and 2 run with it off).  Part 8, on a CPU with AMX tiles: bf16 products of 9-512 rows by cpu_gemv.linear_amx
against F.linear (oneDNN), by rows, then the dense models' short prefills and decoding batches of 16 and 32 rows
with it on and off (what sets cpu_gemv.AMX_LINEAR_MIN_ROWS and AMX_LINEAR_MAX_ROWS).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench import MODELS, QUICK_MODELS, random_model  # noqa: E402

from mistral_ref.backends import cpu_gemv, get_backend, prompt_attention  # noqa: E402
from mistral_ref.backends import moe as grouped  # noqa: E402
from mistral_ref.backends.pytorch import rms_norm_torch  # noqa: E402
from mistral_ref.backends.rope import apply_rotary_emb_complex  # noqa: E402
from mistral_ref.backends.sdpa import sdpa_attention  # noqa: E402
from mistral_ref.generation import generate  # noqa: E402
from mistral_ref.moe import swiglu  # noqa: E402

ALL_MODELS = {**MODELS, **QUICK_MODELS}
PADS_ROWS = grouped.pads_rows
BUCKETED_ROWS = grouped.bucketed_rows


def every_count_bucketed(counts: list[int], x: torch.Tensor, w1) -> list[int]:
    """bucketed_rows before it left the C kernels' few rows exact: every count padded where pads_rows."""
    return [grouped.row_bucket(n) for n in counts] if grouped.pads_rows(x, w1) else counts
SHAPES = {name: (a.n_heads, a.n_kv_heads, a.head_dim) for name, a in ALL_MODELS.items() if a.mla is None}
SHAPES["mistral-7b"] = (32, 8, 128)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                          enable_gqa=True).transpose(1, 2)


def summary(values: list[float], digits: int = 0) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def alternate(first, second, rounds: int) -> tuple[list[float], list[float]]:
    """Seconds of each call, alternating, each round starting with the other function (one warm-up call each)."""
    first(), second()
    times: tuple[list[float], list[float]] = ([], [])
    for r in range(rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for i in order:
            t = time.perf_counter()
            (first, second)[i]()
            times[i].append(time.perf_counter() - t)
    return times


def table_header(*columns: str) -> None:
    """A markdown table's first two lines."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))


def random_qkv(B: int, T: int, shape: tuple[int, int, int], dtype: torch.dtype, g: torch.Generator):
    """Random queries (B, T, heads, head_dim) and keys, values (B, T, kv_heads, head_dim); shape: (heads, kv_heads,
    head_dim)."""
    H, K, D = shape
    q = torch.randn(B, T, H, D, generator=g).to(dtype)
    return (q, *(torch.randn(B, T, K, D, generator=g).to(dtype) for _ in range(2)))


def attention_rows(shapes: list[str], tokens: list[int], rounds: int) -> None:
    print("## A prompt's causal attention: GEMMs (prompt_attention) vs SDPA, GFLOP/s median [min-max]")
    table_header("shape (heads / kv / head_dim)", "dtype", "tokens", "GEMMs", "SDPA", "ratio (SDPA time / GEMMs time)")
    g = torch.Generator().manual_seed(0)
    for name in shapes:
        H, K, D = SHAPES[name]
        for T in tokens:
            for dtype in (torch.bfloat16, torch.float32):
                q, k, v = random_qkv(1, T, (H, K, D), dtype, g)
                gemms, fused = alternate(partial(prompt_attention.prompt_attention, q, k, v), partial(sdpa, q, k, v),
                                         rounds)
                flops = 2 * 2 * T * T / 2 * D * H
                ratio = [s / p for p, s in zip(gemms, fused)]
                ours, theirs = ([flops / t / 1e9 for t in ts] for ts in (gemms, fused))
                print(f"| {name} ({H} / {K} / {D}) | {str(dtype)[6:]} | {T} | {summary(ours, 1)} | "
                      f"{summary(theirs, 1)} | {summary(ratio, 2)}x |", flush=True)


def ragged_rows(shapes: list[str], tokens: list[int], rounds: int) -> None:
    print("\n## A ragged bf16 batch (the server's prefill of two requests, the second 100 tokens shorter, padded): "
          "prompt_rows vs SDPA, ms")
    table_header("shape (heads / kv / head_dim)", "tokens", "prompt_rows", "SDPA",
                 "ratio (SDPA time / prompt_rows time)")
    g = torch.Generator().manual_seed(1)
    for name in shapes:
        H, K, D = SHAPES[name]
        for T in tokens:
            q, k, v = random_qkv(2, T, (H, K, D), torch.bfloat16, g)
            pos = torch.arange(T).repeat(2, 1)
            pos[1, max(1, T - 100):] = -1
            ours, theirs = alternate(partial(prompt_attention.prompt_rows, q, k, v, pos, pos, None),
                                     partial(sdpa_attention, q, k, v, pos, pos, None), rounds)
            ratio = [s / p for p, s in zip(ours, theirs)]
            print(f"| {name} ({H} / {K} / {D}) | {T} | {summary([t * 1e3 for t in ours], 2)} | "
                  f"{summary([t * 1e3 for t in theirs], 2)} | {summary(ratio, 2)}x |", flush=True)


def prefill(model, prompt: list[list[int]], gemms: bool) -> None:
    """One prefill and its first token, with prompt_attention taking the prompt (gemms: FLASH_FIRST off, as on a
    CPU without AMX) or with it switched off (SDPA)."""
    applies, flash_first = prompt_attention.applies, prompt_attention.FLASH_FIRST
    prompt_attention.applies = applies if gemms else (lambda *a: False)
    prompt_attention.FLASH_FIRST = flash_first and not gemms
    prompt_attention.AMX_ATTENTION = False  # (part 7 times the AMX kernel)
    try:
        generate(model, prompt, 1, temperature=0.0)
    finally:
        prompt_attention.applies, prompt_attention.FLASH_FIRST = applies, flash_first
        prompt_attention.AMX_ATTENTION = True


def prefill_rows(models: list[str], tokens: list[int], rounds: int) -> None:
    print("\n## bf16 prefill (one forward pass into a fresh cache): the prompt by the GEMMs (prompt_attention, "
          "FLASH_FIRST off) vs SDPA, ms")
    table_header("model", "tokens", "GEMMs", "SDPA", "ratio (SDPA time / GEMMs time)")
    for name in models:
        model = random_model(ALL_MODELS[name]).to(torch.bfloat16)
        for T in tokens:
            prompt = [list(range(1, T + 1))]
            ours, theirs = alternate(partial(prefill, model, prompt, True), partial(prefill, model, prompt, False),
                                     rounds)
            ratio = [s / p for p, s in zip(ours, theirs)]
            print(f"| {name} | {T} | {summary([t * 1e3 for t in ours])} | {summary([t * 1e3 for t in theirs])} | "
                  f"{summary(ratio, 2)}x |", flush=True)


def prefill_part(model, on: bool, prompts: torch.Generator, vocab: int, T: int) -> None:
    """One prefill and its first token of a new random T-token prompt, the experts' row buckets on or off."""
    grouped.pads_rows = PADS_ROWS if on else (lambda *a: False)
    try:
        generate(model, [torch.randint(1, vocab, (T,), generator=prompts).tolist()], 1, temperature=0.0)
    finally:
        grouped.pads_rows = PADS_ROWS


def decode_part(model, exact: bool, prompts: list[list[int]]) -> None:
    """A greedy decode of 16 tokens after the batch's prompts, the C kernels' few rows exact or padded."""
    grouped.bucketed_rows = BUCKETED_ROWS if exact else every_count_bucketed
    try:
        generate(model, prompts, 16, temperature=0.0)
    finally:
        grouped.bucketed_rows = BUCKETED_ROWS


def expert_models(models: list[str]):
    """(name, args, bf16 random model) of each of `models` that has experts."""
    for name in models:
        args = ALL_MODELS[name]
        if args.moe is not None or args.fine_moe is not None:
            yield name, args, random_model(args).to(torch.bfloat16)


def bucket_rows(models: list[str], tokens: list[int], rounds: int) -> None:
    """Part 3: a bf16 prefill of each model with experts, a new prompt every call (the same sequence on both
    sides), the experts' rows in buckets (backends/moe.py: pads_rows, row_bucket) on and off.  Off, each new row
    count compiles new oneDNN kernels where bf16 products are native."""
    print("\n## bf16 prefill, a new prompt every call: the experts' rows in buckets on vs off, ms")
    table_header("model", "tokens", "buckets", "exact row counts", "ratio (exact time / buckets time)")
    for name, args, model in expert_models(models):
        for T in tokens:
            same = [torch.Generator().manual_seed(T) for _ in range(2)]  # on, off: the same sequence of prompts
            on, off = alternate(partial(prefill_part, model, True, same[0], args.vocab_size, T),
                                partial(prefill_part, model, False, same[1], args.vocab_size, T), rounds)
            ratio = [b / a for a, b in zip(on, off)]
            print(f"| {name} | {T} | {summary([t * 1e3 for t in on])} | {summary([t * 1e3 for t in off])} | "
                  f"{summary(ratio, 2)}x |", flush=True)
    print("\n## bf16 greedy decode at batch 8 (16 tokens after 8 prompts of 64): an expert's few rows exact (the C "
          "kernels take them) vs padded to buckets, ms")
    table_header("model", "exact", "padded", "ratio (padded time / exact time)")
    for name, args, model in expert_models(models):
        prompts = torch.randint(1, args.vocab_size, (8, 64), generator=torch.Generator().manual_seed(8)).tolist()
        exact, padded = alternate(partial(decode_part, model, True, prompts), partial(decode_part, model, False,
                                                                                       prompts), rounds)
        ratio = [b / a for a, b in zip(exact, padded)]
        print(f"| {name} | {summary([t * 1e3 for t in exact])} | {summary([t * 1e3 for t in padded])} | "
              f"{summary(ratio, 2)}x |", flush=True)


def prefill_with(model, ops, prompts: torch.Generator, vocab: int, T: int) -> None:
    """One prefill and its first token of a new random T-token prompt, computed with the functions of `ops`."""
    model.ops = ops
    generate(model, [torch.randint(1, vocab, (T,), generator=prompts).tolist()], 1, temperature=0.0)


def elementwise_rows(models: list[str], tokens: list[int], rounds: int) -> None:
    """Part 4: a bf16 prefill of each model, a new prompt every call (the same sequence on both sides), the "torch"
    backend with its elementwise C kernels (RMSNorm, RoPE, SwiGLU's silu(gate) * up: cpu_gemv.py) and with torch's
    own functions for those three families instead."""
    print("\n## bf16 prefill, a new prompt every call: RMSNorm, RoPE and SwiGLU by the C kernels vs by torch's "
          "kernels, ms")
    table_header("model", "tokens", "C kernels", "torch's", "ratio (torch's time / C kernels' time)")
    ops = get_backend("torch")
    without = replace(ops, name="torch without the elementwise C kernels", rms_norm=rms_norm_torch,
                      rope=apply_rotary_emb_complex, swiglu=swiglu)
    for name in models:
        args = ALL_MODELS[name]
        model = random_model(args).to(torch.bfloat16)
        for T in tokens:
            same = [torch.Generator().manual_seed(T) for _ in range(2)]
            on, off = alternate(partial(prefill_with, model, ops, same[0], args.vocab_size, T),
                                partial(prefill_with, model, without, same[1], args.vocab_size, T), rounds)
            model.ops = ops
            ratio = [b / a for a, b in zip(on, off)]
            print(f"| {name} | {T} | {summary([t * 1e3 for t in on])} | {summary([t * 1e3 for t in off])} | "
                  f"{summary(ratio, 2)}x |", flush=True)


def experts_part(model, amx: bool, run) -> None:
    """run() with the experts' rows on AMX tiles (cpu_gemv.experts_rows, one call a layer) or in the loop an
    expert (backends/moe.py: AMX_EXPERTS)."""
    grouped.AMX_EXPERTS = amx
    try:
        run()
    finally:
        grouped.AMX_EXPERTS = True


def amx_expert_rows(models: list[str], tokens: list[int], rounds: int) -> None:
    """Part 5: bf16 prefills (a new prompt every call, the same sequence on both sides) and a decode at batch 8 of
    each model with experts, their rows on AMX tiles in one call a layer (backends/moe.py: mix_experts_grouped)
    against the loop an expert."""
    if not (cpu_gemv.library() is not None and cpu_gemv.library().cpu_gemv_amx()):
        print("\n## the experts on AMX tiles: skipped, this CPU (or build) has none")
        return
    print("\n## bf16, the experts' rows on AMX tiles in one call vs the loop an expert, ms")
    table_header("model", "run", "AMX tiles", "loop", "ratio (loop time / tiles time)")
    for name, args, model in expert_models(models):
        prompts = torch.randint(1, args.vocab_size, (8, 64), generator=torch.Generator().manual_seed(8)).tolist()
        runs = {f"prefill {T}": [partial(prefill_part, model, True, torch.Generator().manual_seed(T),
                                         args.vocab_size, T) for _ in range(2)] for T in tokens}
        runs["decode batch 8"] = [partial(generate, model, prompts, 16, temperature=0.0)] * 2
        for label, (first, second) in runs.items():
            tiles, loop = alternate(partial(experts_part, model, True, first), partial(experts_part, model, False,
                                                                                          second), rounds)
            ratio = [b / a for a, b in zip(tiles, loop)]
            print(f"| {name} | {label} | {summary([t * 1e3 for t in tiles])} | {summary([t * 1e3 for t in loop])} | "
                  f"{summary(ratio, 2)}x |", flush=True)


def c_kernels(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return cpu_gemv.gemv_float(x, w, torch.get_num_threads())


def twenty(product, x: torch.Tensor, weights: list[torch.Tensor], turn) -> None:
    """20 products of x, by the next 20 weights in turn."""
    for _ in range(20):
        product(x, weights[next(turn) % len(weights)])


def product_rows(rounds: int) -> None:
    """Part 6: bf16 products of a few rows, the C kernels (cpu_gemv.gemv_float) against torch's F.linear (oneDNN),
    by rows: where the CPU multiplies bf16 natively (AMX tiles) F.linear's time hardly grows with the rows, which
    sets cpu_gemv.MAX_ROWS["bf16"].  Weights as in the bench models, 40 of each, taken in turn (not all cached)."""
    print(f"\n## bf16 products of a few rows: the C kernels vs F.linear (oneDNN), us (cpu_gemv.MAX_ROWS['bf16'] = "
          f"{cpu_gemv.MAX_ROWS['bf16']}: the C kernels take fewer rows than that)")
    table_header("weight (out x in)", "rows", "C kernels", "F.linear", "ratio (F.linear time / C time)")
    for out, inp in [(2048, 768), (768, 2048), (80, 512), (512, 80)]:
        weights = [torch.randn(out, inp).bfloat16() for _ in range(40)]
        for rows in (1, 4, 8, 12, 16, 31):
            x, turn = torch.randn(rows, inp).bfloat16(), iter(range(10 ** 9))
            c, t = alternate(partial(twenty, c_kernels, x, weights, turn),
                             partial(twenty, F.linear, x, weights, turn), rounds)
            ratio = [b / a for a, b in zip(c, t)]
            print(f"| {out} x {inp} | {rows} | {summary([v / 20 * 1e6 for v in c])} | "
                  f"{summary([v / 20 * 1e6 for v in t])} | {summary(ratio, 2)}x |", flush=True)


def amx_part(model, on: bool, prompts: torch.Generator, vocab: int, T: int) -> None:
    """One prefill and its first token of a new random T-token prompt, the AMX flash kernel on or off (off: SDPA's
    causal mode, the default on such CPUs before it)."""
    prompt_attention.AMX_ATTENTION = on
    try:
        generate(model, [torch.randint(1, vocab, (T,), generator=prompts).tolist()], 1, temperature=0.0)
    finally:
        prompt_attention.AMX_ATTENTION = True


def amx_attention_rows(shapes: list[str], models: list[str], tokens: list[int], rounds: int) -> None:
    """Part 7, on a CPU with AMX tiles: a bf16 prompt's causal attention by the flash kernel on the tiles
    (cpu_gemv.prompt_attention_amx) against SDPA's causal mode, alone (GFLOP/s) and in bf16 prefills of each model
    (new prompts, the same sequence on both sides)."""
    lib = cpu_gemv.library()
    if not (lib is not None and lib.cpu_gemv_amx()):
        print("\n## the AMX flash attention: skipped, this CPU (or build) has none")
        return
    print("\n## A bf16 prompt's causal attention: the flash kernel on AMX tiles vs SDPA, GFLOP/s median [min-max]")
    table_header("shape (heads / kv / head_dim)", "tokens", "AMX tiles", "SDPA", "ratio (SDPA time / tiles time)")
    g = torch.Generator().manual_seed(0)
    for name in shapes:
        H, K, D = SHAPES[name]
        for T in tokens:
            q, k, v = random_qkv(1, T, (H, K, D), torch.bfloat16, g)
            if not cpu_gemv.prompt_attention_amx_applies(q, k, v):
                continue
            tiles, fused = alternate(partial(cpu_gemv.prompt_attention_amx, q, k, v), partial(sdpa, q, k, v), rounds)
            flops = 2 * 2 * T * T / 2 * D * H
            ratio = [s / p for p, s in zip(tiles, fused)]
            ours, theirs = ([flops / t / 1e9 for t in ts] for ts in (tiles, fused))
            print(f"| {name} ({H} / {K} / {D}) | {T} | {summary(ours, 1)} | {summary(theirs, 1)} | "
                  f"{summary(ratio, 2)}x |", flush=True)
    print("\n## bf16 prefill, a new prompt every call: the attention on AMX tiles vs SDPA's causal mode, ms")
    table_header("model", "tokens", "AMX tiles", "SDPA", "ratio (SDPA time / tiles time)")
    for name in models:
        args = ALL_MODELS[name]
        model = random_model(args).to(torch.bfloat16)
        for T in tokens:
            if T > 2048:
                continue
            same = [torch.Generator().manual_seed(T) for _ in range(2)]
            on, off = alternate(partial(amx_part, model, True, same[0], args.vocab_size, T),
                                partial(amx_part, model, False, same[1], args.vocab_size, T), rounds)
            ratio = [b / a for a, b in zip(on, off)]
            print(f"| {name} | {T} | {summary([t * 1e3 for t in on])} | {summary([t * 1e3 for t in off])} | "
                  f"{summary(ratio, 2)}x |", flush=True)


def amx_linear_rows(models: list[str], rounds: int) -> None:
    """Part 8, on a CPU with AMX tiles: bf16 products of 9-512 rows by cpu_gemv.linear_amx against F.linear
    (oneDNN), by rows (weights as in the bench models, 40 of each, taken in turn), then bf16 prefills of 32-512
    tokens (new prompts) and decoding batches of 16 and 32 rows (64-token prompts, 16 new tokens) of the dense
    models with it on and off (off: AMX_LINEAR_MAX_ROWS = 0, F.linear as before it)."""
    lib = cpu_gemv.library()
    if not (lib is not None and lib.cpu_gemv_amx()):
        print("\n## bf16 products on AMX tiles: skipped, this CPU (or build) has none")
        return
    print(f"\n## bf16 products of 9-512 rows: linear_amx on the tiles vs F.linear (oneDNN), us (the tiles take "
          f"cpu_gemv.AMX_LINEAR_MIN_ROWS = {cpu_gemv.AMX_LINEAR_MIN_ROWS} to AMX_LINEAR_MAX_ROWS = "
          f"{cpu_gemv.AMX_LINEAR_MAX_ROWS} rows)")
    table_header("weight (out x in)", "rows", "linear_amx", "F.linear", "ratio (F.linear time / linear_amx time)")
    for out, inp in [(768, 768), (256, 768), (2048, 768), (768, 2048), (1792, 640), (640, 1792)]:
        weights = [torch.randn(out, inp).bfloat16() for _ in range(40)]
        for rows in (9, 16, 32, 64, 128, 256, 512):
            x, turn = torch.randn(rows, inp).bfloat16(), iter(range(10 ** 9))
            tiles, one = alternate(partial(twenty, cpu_gemv.linear_amx, x, weights, turn),
                                   partial(twenty, F.linear, x, weights, turn), rounds)
            ratio = [b / a for a, b in zip(tiles, one)]
            print(f"| {out} x {inp} | {rows} | {summary([v / 20 * 1e6 for v in tiles])} | "
                  f"{summary([v / 20 * 1e6 for v in one])} | {summary(ratio, 2)}x |", flush=True)
    limit = cpu_gemv.AMX_LINEAR_MAX_ROWS
    print("\n## bf16 short prefills (a new prompt every call) and decoding batches: linear_amx on vs off, ms")
    table_header("model", "call", "on", "off", "ratio (off time / on time)")
    g = torch.Generator().manual_seed(0)
    for name in models:
        args = ALL_MODELS[name]
        if args.moe is not None or args.fine_moe is not None:
            continue  # (experts' products go to the experts' kernels)
        model = random_model(args).to(torch.bfloat16)
        calls = [(f"prefill {T}", 1, T, 1) for T in (32, 128, 256, 512)]
        calls += [(f"batch {B}: 64 + 16 tokens", B, 64, 16) for B in (16, 32)]
        for label, batch, T, new in calls:
            on, off = alternate(partial(linear_amx_call, model, limit, g, batch, T, new),
                                partial(linear_amx_call, model, 0, g, batch, T, new), rounds)
            ratio = [b / a for a, b in zip(on, off)]
            print(f"| {name} | {label} | {summary([v * 1e3 for v in on], 1)} | {summary([v * 1e3 for v in off], 1)} | "
                  f"{summary(ratio, 2)}x |", flush=True)


def linear_amx_call(model, limit: int, g: torch.Generator, batch: int, T: int, new: int) -> None:
    """`batch` new random prompts of T tokens, `new` tokens each, with cpu_gemv.AMX_LINEAR_MAX_ROWS = limit."""
    prompts = [torch.randint(1, model.args.vocab_size, (T,), generator=g).tolist() for _ in range(batch)]
    kept, cpu_gemv.AMX_LINEAR_MAX_ROWS = cpu_gemv.AMX_LINEAR_MAX_ROWS, limit
    try:
        generate(model, prompts, new, temperature=0.0)
    finally:
        cpu_gemv.AMX_LINEAR_MAX_ROWS = kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", default="512,2048,4096")
    p.add_argument("--models", default="mistral-125m,mixtral-140m,nemo-80m,small4-130m")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--parts", default="1,2,3,4,5,6,7,8", help="which parts to run (default all)")
    args = p.parse_args()
    if cpu_gemv.library() is None:
        raise SystemExit(f"prompt_attention needs the C kernels: {cpu_gemv.status()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = [int(t) for t in args.tokens.split(",")]
    models = args.models.split(",")
    unknown = [m for m in models if m not in ALL_MODELS]
    if unknown:
        raise SystemExit(f"--models: {', '.join(unknown)} not among {', '.join(ALL_MODELS)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds; C kernels: "
          f"{cpu_gemv.status()}")
    amx = bool(cpu_gemv.library().cpu_gemv_amx())
    default = ("the C flash kernel on AMX tiles (up to prompt_attention.AMX_MAX_KEYS keys)" if amx else
               "SDPA" if prompt_attention.FLASH_FIRST else "the GEMMs")
    print(f"prompt_attention.FLASH_FIRST (AMX tiles): {prompt_attention.FLASH_FIRST}, the tiles usable here: {amx} "
          f"— by default a plain causal prompt takes {default}; the ragged batch rows run that default\n")
    shapes = [*(m for m in models if m in SHAPES), "mistral-7b"]  # (latent attention: the prefill rows only)
    parts = {int(part) for part in args.parts.split(",")}
    if 1 in parts:
        attention_rows(shapes, tokens, args.rounds)
        ragged_rows(shapes, [t for t in tokens if t <= 2048], args.rounds)
    if 2 in parts:
        prefill_rows(models, [t for t in tokens if t <= 2048], args.rounds)
    if 3 in parts:
        bucket_rows(models, [t for t in tokens if t <= 2048], args.rounds)
    if 4 in parts:
        elementwise_rows(models, [t for t in tokens if t <= 2048], args.rounds)
    if 5 in parts:
        amx_expert_rows(models, [t for t in tokens if t <= 2048], args.rounds)
    if 6 in parts:
        product_rows(args.rounds)
    if 7 in parts:
        amx_attention_rows(shapes, models, tokens, args.rounds)
    if 8 in parts:
        amx_linear_rows(models, args.rounds)


if __name__ == "__main__":
    main()
