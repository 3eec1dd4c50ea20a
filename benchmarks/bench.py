"""CPU speed of mistral_ref against transformers, measured in the same process on the same random weights.

    .venv/bin/python benchmarks/bench.py [--quick] [--json out.json] [--runs 5] [--threads N] [--models a,b]
                                         [--compile] [--no-load]

For each model shape (a Mistral-shaped ~125M, a Mixtral-shaped ~140M with 8 experts, a Nemo-shaped one whose
head_dim is not dim / n_heads, a Mistral-Small-4-shaped ~130M with latent attention and 128 fine-grained experts
top-4 + a shared expert) the script builds one random-weight model, writes it as a Hugging Face checkpoint
with mistral_ref.checkpoint (name map + q/k permutation; Small 4's experts fused as transformers writes them) and
loads that into transformers' MistralForCausalLM / MixtralForCausalLM / Mistral4ForCausalLM, then checks that both
give the same logits and greedy tokens before timing anything.

Measured, alternating mistral_ref and transformers run by run (the order flips every round), in fp32 and bf16:
* decode tokens/s, greedy, 64 new tokens after a 128-token prompt, batch 1 and 8, through both libraries' own
  generate(): a forward hook timestamps every forward pass; rate = batch / mean time between decode passes;
* time to first token: from calling generate() to the end of the prompt's forward pass (same runs);
* prefill tokens/s at 512 and 2048 tokens: one forward pass into a fresh KV cache, logits of the last token only,
  a new random prompt every call (the same sequence of prompts for both libraries), as users send them: a MoE
  model's experts then get new row counts each time, which costs where the BLAS compiles a kernel per shape;
* the memory-bandwidth floor of decode: bytes of weights and KV cache one token must read, over this machine's
  read bandwidth measured now (a large tensor sum), and how close the measured decode rate comes to it;
* the compute ceiling of prefill: FLOPs per prompt token over the FLOP/s of the fastest of 9 runs of a 512-row
  matrix product measured next to the row, and how close each library comes to it; and the bound on the prefill
  ratio that the matrix products set: the seconds mistral_ref's prefill spends in them (profiled), against
  transformers' seconds (both libraries call the same BLAS for them); and the bound that they and PyTorch's
  attention kernel (SDPA's, which both libraries call for a plain causal prompt) set together;
* with --compile (as `make bench` runs it): batch-1 decode again after Transformer.compile_decode();
* loading: benchmarks/bench_load.py (>= 1 GB bf16 checkpoint, fresh subprocesses), run as it is;
* llama.cpp (benchmarks/peer_llamacpp.py, where llama-cpp-python is installed; --no-llamacpp skips it): the same
  weights written by mistral_ref's GGUF writer, decode batch 1 and prefill against llama.cpp at each dtype with
  greedy agreement, and mistral_ref int8/int4 against llama.cpp's own Q8_0/Q4_0.

Every figure is a median over --runs rounds with its [min-max] spread; ratios are per-round ratios (ours / theirs).
The machine may be shared: the load average is printed before and after.  A benchmark, not a test: nothing here
asserts a speed.  `--quick` runs one tiny model for a few rounds (the smoke test in tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from mistral_ref.backends.linear import join_projections
from mistral_ref.backends.moe import stack_all_experts
from mistral_ref.cache import KVCache
from mistral_ref.checkpoint import save_checkpoint
from mistral_ref.config import FineMoeArgs, Llama4Scaling, MlaArgs, ModelArgs, MoeArgs, YarnArgs
from mistral_ref.family import kv_cache_bytes, parameter_counts
from mistral_ref.generation import generate
from mistral_ref.model import Transformer

MODELS = {
    # 124.7M parameters: 12 layers of dim 768, GQA 12/4 heads.
    "mistral-125m": ModelArgs(dim=768, n_layers=12, hidden_dim=2048, n_heads=12, n_kv_heads=4, head_dim=64,
                              vocab_size=32000, norm_eps=1e-5, rope_theta=1e6),
    # 138.7M parameters (8 layers x 8 experts, top-2), 47M of them active per token.
    "mixtral-140m": ModelArgs(dim=512, n_layers=8, hidden_dim=1024, n_heads=8, n_kv_heads=2, head_dim=64,
                              vocab_size=32000, norm_eps=1e-5, rope_theta=1e6, moe=MoeArgs(8, 2)),
    # 82.9M parameters, head_dim 128 != 640 / 8 as in Mistral Nemo.
    "nemo-80m": ModelArgs(dim=640, n_layers=8, hidden_dim=1792, n_heads=8, n_kv_heads=2, head_dim=128,
                          vocab_size=32768, norm_eps=1e-5, rope_theta=1e6),
    # 133.3M parameters, 41.9M active: Mistral Small 4 scaled down (6 layers of dim 512; latent attention with
    # q 256 / kv 128, 32 + 32 qk and 64 v per head, 8 heads; 128 experts of 80 top-4 + 1 shared; Small 4's YaRN
    # 128x over 8k with the softmax-scale correction and its query scaling), against Mistral4ForCausalLM.
    "small4-130m": ModelArgs(dim=512, n_layers=6, hidden_dim=1024, n_heads=8, n_kv_heads=8, head_dim=64,
                             vocab_size=32768, norm_eps=1e-6, rope_theta=1e4,
                             yarn=YarnArgs(factor=128.0, original_max_position_embeddings=8192, apply_scale=False),
                             llama_4_scaling=Llama4Scaling(original_max_position_embeddings=8192, beta=0.1),
                             mla=MlaArgs(kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64,
                                         q_lora_rank=256, mscale_all_dim=1.0),
                             fine_moe=FineMoeArgs(num_experts=128, num_experts_per_tok=4, moe_intermediate_size=80)),
}
# 152.3M parameters, 42.6M active: small4-130m with experts 96 wide, which int4's groups of 32 divide (80: no int4
# row), as they divide the published models' (Small 4: 2048)
MODELS["small4-150m"] = dataclasses.replace(
    MODELS["small4-130m"], fine_moe=dataclasses.replace(MODELS["small4-130m"].fine_moe, moe_intermediate_size=96))
QUICK_MODELS = {
    "tiny-gqa": ModelArgs(dim=128, n_layers=2, hidden_dim=256, n_heads=4, n_kv_heads=2, head_dim=32,
                          vocab_size=3072, norm_eps=1e-5, rope_theta=1e6),  # 3072: llama.cpp's GGUF tokenizer
    # the small4 row's path (latent attention, 16 fine-grained experts top-4 + shared, Mistral4ForCausalLM; 3072:
    # llama.cpp's "mistral4" GGUF with the tokenizer), tiny
    "tiny-small4": ModelArgs(dim=64, n_layers=2, hidden_dim=96, n_heads=4, n_kv_heads=4, head_dim=16,
                             vocab_size=3072, norm_eps=1e-6, rope_theta=1e4,
                             yarn=YarnArgs(factor=128.0, original_max_position_embeddings=8192, apply_scale=False),
                             llama_4_scaling=Llama4Scaling(original_max_position_embeddings=8192, beta=0.1),
                             mla=MlaArgs(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                                         q_lora_rank=24, mscale_all_dim=1.0),
                             fine_moe=FineMoeArgs(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=16)),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---- machine --------------------------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def physical_cores() -> int:
    """Cores this process may run on, counting hyper-threads of one core once (sysfs topology; else cpu_count)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def read_bandwidth(nbytes: int, runs: int) -> list[float]:
    """Bytes per second of summing a tensor much larger than the caches (what decode does to its weights)."""
    x = torch.ones(nbytes // 4)
    x.sum()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        x.sum()
        out.append(nbytes / (time.perf_counter() - t0))
    return out


# ---- models ---------------------------------------------------------------------------------------------------------
def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    """fp32 model with N(0, 0.02) matrices and unit norms (as transformers initialises), built without a
    throw-away default initialisation."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model


def transformers_model(args: ModelArgs, directory: Path, dtype: torch.dtype):
    """The HF checkpoint written by mistral_ref.checkpoint.save_checkpoint, loaded by transformers."""
    import transformers
    from transformers import MistralForCausalLM, MixtralForCausalLM

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cls = MixtralForCausalLM if args.moe else MistralForCausalLM
    if args.fine_moe is not None:  # latent attention + fine-grained experts (config.json says which class)
        cls = getattr(transformers, args.to_hf_config()["architectures"][0])
    hf = cls.from_pretrained(directory, dtype=dtype).eval()
    gc = hf.generation_config
    gc.do_sample, gc.temperature, gc.top_p, gc.top_k = False, None, None, None
    gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = None, 0, None
    return hf


def check_parity(ours: Transformer, hf, vocab: int) -> tuple[float, bool]:
    """fp32 logits relative error and whether 8 greedy tokens agree (mistral_ref.generation vs HF generate)."""
    prompt = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a = ours(prompt)
        b = hf(prompt).logits.float()
        err = float((a - b).abs().max() / b.abs().max())
        hf_tokens = hf.generate(prompt, max_new_tokens=8)[0, 32:].tolist()
    our_tokens = generate(ours, prompt.tolist(), 8, temperature=0.0)[0].tokens
    return err, our_tokens == hf_tokens


def decode_bytes(args: ModelArgs, elem: int, context: int) -> int:
    """Bytes one decode step at batch 1 must read: every weight it multiplies (the embedding table only one row;
    of the experts only the top_k chosen) plus the keys and values of `context` cached positions.  Latent attention
    / fine-grained experts: the active parameters (family.parameter_counts) less the embedding table but one row,
    plus the latent cache (family.kv_cache_bytes)."""
    if args.mla is not None or args.fine_moe is not None:
        tables = (0 if args.tied_embeddings else 1) * (args.vocab_size - 1) * args.dim
        return (parameter_counts(args)["active"] - tables) * elem + kv_cache_bytes(args, context, elem)
    per_layer_attn = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads) + 2 * args.dim
    ffn = 3 * args.dim * args.hidden_dim
    if args.moe:
        ffn = ffn * args.moe.num_experts_per_tok + args.dim * args.moe.num_experts
    weights = args.n_layers * (per_layer_attn + ffn) + args.dim * (args.vocab_size + 2)
    kv = 0
    for layer in range(args.n_layers):
        window = args.window_for_layer(layer)
        kv += 2 * min(context, window or context) * args.n_kv_heads * args.head_dim
    return (weights + kv) * elem


def prefill_flops(args: ModelArgs, T: int) -> float:
    """Floating-point operations per token of a T-token prefill: 2 per weight multiplied (the active experts only;
    no vocabulary projection, prefill needs the last token's logits only) plus the attention products
    (2 x 2 x n_heads x head_dim per key, over the T/2 keys a causal query sees on average, or its window).
    Latent attention / fine-grained experts: 2 per active parameter but the embeddings and the output projection
    (kv_b_proj expands each token's latent once), plus 2 x n_heads x (qk_head_dim + v_head_dim) per visible key."""
    if args.mla is not None or args.fine_moe is not None:
        weights = parameter_counts(args)["active"] - (1 if args.tied_embeddings else 2) * args.vocab_size * args.dim
        m = args.mla
        per_key = 2 * args.n_heads * ((m.qk_head_dim + m.v_head_dim) if m else 2 * args.head_dim)
        return 2 * weights + args.n_layers * per_key * (T + 1) / 2
    per_layer = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)
    k = args.moe.num_experts_per_tok if args.moe else 1
    per_layer += 3 * args.dim * args.hidden_dim * k + (args.dim * args.moe.num_experts if args.moe else 0)
    keys = sum(min((T + 1) / 2, args.window_for_layer(i) or T) for i in range(args.n_layers)) / args.n_layers
    return args.n_layers * (2 * per_layer + 4 * args.n_heads * args.head_dim * keys)


def gemm_flops(args: ModelArgs, runs: int) -> list[float]:
    """FLOP/s of this machine's best matrix product for a prefill: a 512 x dim x hidden_dim product, in fp32 and
    in bf16, the faster of the two (on CPUs without bf16 instructions fp32 is faster; mistral_ref upcasts).
    A ceiling, so the caller takes the fastest run: a shared machine only ever slows a run down."""
    best = []
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(512, args.dim).to(dtype), torch.randn(args.dim, args.hidden_dim).to(dtype)
        a @ b
        best.append([2 * 512 * args.dim * args.hidden_dim / timed(lambda a=a, b=b: a @ b) for _ in range(runs)])
    return max(best, key=max)


# Matrix products as the profiler names them: weight products (F.linear, the experts' grouped products) and any
# batched product outside SDPA's fused kernel.
PRODUCT_OPS = frozenset({"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm"})  # (addmm_: a residual added inside)
ATTENTION_OPS = frozenset({"aten::_scaled_dot_product_flash_attention_for_cpu"})  # SDPA's CPU kernel
OWN_ATTENTION = "mistral_ref::attention_amx"  # mistral_ref's flash kernel on AMX tiles, marked while profiled


def product_seconds(fn: Callable[[], object], runs: int = 3) -> tuple[float, float, float, float]:
    """Medians over `runs` profiled calls of fn: the seconds spent inside matrix products (PRODUCT_OPS, self time),
    inside PyTorch's attention kernel (ATTENTION_OPS, self time), of the whole profiled call (their shares are
    taken of this, all under the profiler's overhead), and inside mistral_ref's own flash kernel on AMX tiles
    (cpu_gemv.prompt_attention_amx, marked for the profiler while this runs).

    For a prefill of mistral_ref the products are the part of its time that the BLAS decides (oneDNN's GEMM, which
    transformers calls for the same products): transformers' time over them is the most a prefill of mistral_ref
    could gain on transformers with every other operation free, the bound printed beside the prefill ratio; over
    products and attention kernel together, the bound where SDPA's kernel is also the one both libraries call
    (where mistral_ref's attention runs in its own kernel instead, that kernel is not shared: its seconds are
    printed, and no second bound)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from mistral_ref.backends import cpu_gemv

    real = cpu_gemv.prompt_attention_amx

    def marked(*args, **kwargs):
        with record_function(OWN_ATTENTION):
            return real(*args, **kwargs)

    fn()
    products, attention, whole, own = [], [], [], []
    cpu_gemv.prompt_attention_amx = marked
    try:
        for _ in range(runs):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                whole.append(-time.perf_counter())
                fn()
                whole[-1] += time.perf_counter()
            events = prof.key_averages()
            products.append(sum(e.self_cpu_time_total for e in events if e.key in PRODUCT_OPS) / 1e6)
            attention.append(sum(e.self_cpu_time_total for e in events if e.key in ATTENTION_OPS) / 1e6)
            own.append(sum(e.cpu_time_total for e in events if e.key == OWN_ATTENTION) / 1e6)
    finally:
        cpu_gemv.prompt_attention_amx = real
    return (statistics.median(products), statistics.median(attention), statistics.median(whole),
            statistics.median(own))


# ---- timing ---------------------------------------------------------------------------------------------------------
def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(fns: dict[str, Callable[[], object]], runs: int, measure: Callable = timed,
              warmup: bool = True) -> dict[str, list]:
    """measure(fn) of each function for `runs` rounds, the order reversed every other round; one warm-up call
    each unless warmup=False.  measure defaults to the seconds one call takes."""
    for fn in fns.values() if warmup else ():
        fn()
    out: dict[str, list] = {name: [] for name in fns}
    for r in range(runs):
        for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            out[name].append(measure(fns[name]))
    return out


def summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def fmt(s: dict[str, float], digits: int = 1) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def ratios(ours: list[float], theirs: list[float]) -> dict[str, float]:
    """Per-round ratio of two rates (higher = ours faster)."""
    return summary([a / b for a, b in zip(ours, theirs)])


class StepClock:
    """A forward hook that records when each forward pass of a model ends (prefill, then one per decode step)."""

    def __init__(self, module: torch.nn.Module):
        self.ends: list[float] = []
        self.handle = module.register_forward_hook(lambda *_: self.ends.append(time.perf_counter()))

    def run(self, fn: Callable[[], object]) -> tuple[float, float]:
        """(seconds to the end of the first forward pass, seconds per later forward pass) of one call of fn."""
        self.ends.clear()
        t0 = time.perf_counter()
        fn()
        first, steps = self.ends[0] - t0, len(self.ends) - 1
        return first, (self.ends[-1] - self.ends[0]) / max(steps, 1)


def bench_decode(ours: Transformer, hf, batch: int, prompt_len: int, new: int, runs: int) -> dict:
    """Greedy decode through each library's own generate().  Both run one forward pass for the prompt and one per
    later token; a forward hook times each, so decode tokens/s = batch / (seconds between consecutive forward
    passes) — sampling included, prompt excluded — and time to first token = start to end of the prompt's pass."""
    prompts = torch.randint(0, ours.args.vocab_size, (batch, prompt_len),
                            generator=torch.Generator().manual_seed(batch))
    plist, mask = prompts.tolist(), torch.ones_like(prompts)
    tokens: dict[str, list] = {}

    def ours_fn():
        tokens["ours"] = [r.tokens for r in generate(ours, plist, new, temperature=0.0)]

    def hf_fn():
        with torch.inference_mode():
            out = hf.generate(prompts, attention_mask=mask, max_new_tokens=new, min_new_tokens=new)
        tokens["hf"] = out[:, prompt_len:].tolist()

    clocks = {"ours": StepClock(ours), "hf": StepClock(hf)}
    try:
        t = alternate({"ours": lambda: clocks["ours"].run(ours_fn), "hf": lambda: clocks["hf"].run(hf_fn)}, runs,
                      measure=lambda fn: fn())
    finally:
        for c in clocks.values():
            c.handle.remove()
    rate = {k: [batch / step for _, step in v] for k, v in t.items()}
    ttft = {k: [first for first, _ in v] for k, v in t.items()}
    return {
        "ours": summary(rate["ours"]), "transformers": summary(rate["hf"]), "ratio": ratios(rate["ours"], rate["hf"]),
        "ttft_ours_s": summary(ttft["ours"]), "ttft_transformers_s": summary(ttft["hf"]),
        "ttft_ratio": ratios(ttft["hf"], ttft["ours"]),
        "same_tokens": tokens["ours"] == tokens["hf"],
        "raw": {"ours_tok_s": rate["ours"], "transformers_tok_s": rate["hf"]},
    }


def bench_prefill(ours: Transformer, hf, T: int, runs: int, warmup: bool = True) -> dict:
    """One forward pass over a T-token prompt into a fresh KV cache; logits of the last position only; a new
    random prompt every call, each library drawing the same sequence of them.  Then the seconds of mistral_ref's
    prefill spent in matrix products (product_seconds) and the bound they put on the ratio: transformers' median
    seconds over them."""
    def prompts():  # (1, T) token ids, a new prompt each time, the same sequence for each caller
        g = torch.Generator().manual_seed(T)
        while True:
            yield torch.randint(0, ours.args.vocab_size, (1, T), generator=g)

    ours_prompts, hf_prompts = prompts(), prompts()
    positions = torch.arange(T)[None]
    last = torch.tensor([T - 1])

    @torch.inference_mode()
    def ours_fn():
        cache = KVCache(ours.args, 1, T + 1, dtype=ours.dtype)
        return ours(next(ours_prompts), positions, cache, logits_at=last)

    @torch.inference_mode()
    def hf_fn():
        return hf(next(hf_prompts), use_cache=True, logits_to_keep=1)

    t = alternate({"ours": ours_fn, "hf": hf_fn}, runs, warmup=warmup)
    rate = {k: [T / x for x in v] for k, v in t.items()}
    products, attention, profiled, own = product_seconds(ours_fn, 1 if T > 1024 else 3)
    return {"ours": summary(rate["ours"]), "transformers": summary(rate["hf"]),
            "ratio": ratios(rate["ours"], rate["hf"]), "raw": rate,
            "products_s": products, "profiled_s": profiled, "ours_s": statistics.median(t["ours"]),
            "transformers_s": statistics.median(t["hf"]),
            "ratio_bound": statistics.median(t["hf"]) / products if products > 0 else float("inf"),
            "attention_s": attention, "own_attention_s": own,
            "kernels_bound": statistics.median(t["hf"]) / (products + attention) if products + attention > 0
            else float("inf")}


# ---- the run --------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one tiny model, fp32, few rounds (smoke test)")
    p.add_argument("--json", type=Path, help="also write every figure and raw sample here")
    p.add_argument("--runs", type=int, help="alternating rounds per figure (default 5; quick 2)")
    p.add_argument("--threads", type=int, help="torch threads (default: physical cores)")
    p.add_argument("--models", help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    p.add_argument("--new", type=int, help="new tokens per decode run (default 64; quick 8)")
    p.add_argument("--prefill", default="512,2048", help="comma-separated prefill lengths")
    p.add_argument("--long-prefill-runs", type=int, default=1,
                   help="rounds for prefills over 1024 tokens (no warm-up: the shorter prefill warmed up)")
    p.add_argument("--compile", action="store_true",
                   help="also measure decode with Transformer.compile_decode() (compiling takes minutes)")
    p.add_argument("--llamacpp-compile", default="full", choices=["none", "regional", "full"],
                   help="with --compile: the compile mode of mistral_ref's compiled rows against llama.cpp "
                        "(default full)")
    p.add_argument("--long-context", type=int, metavar="TOKENS",
                   help="also decode against llama.cpp after a prompt of TOKENS tokens (e.g. 2048), eager and, "
                        "with --compile, compiled")
    p.add_argument("--no-load", action="store_true", help="skip the loading benchmark")
    p.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp peer")
    opts = p.parse_args(argv)
    warnings.filterwarnings("ignore")

    torch.set_num_threads(opts.threads or physical_cores())
    quick = opts.quick
    runs = opts.runs or (2 if quick else 5)
    models = QUICK_MODELS if quick else {k: MODELS[k] for k in (opts.models.split(",") if opts.models else MODELS)}
    dtypes = ["fp32"] if quick else opts.dtypes.split(",")
    prompt_len, new = (32, opts.new or 8) if quick else (128, opts.new or 64)
    batches = [1] if quick else [1, 8]
    prefill_lens = [128] if quick else [int(t) for t in opts.prefill.split(",")]

    import transformers

    result: dict = {
        "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "python": platform.python_version(),
                    "date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "load_average_before": load_average()},
        "settings": {"runs": runs, "prompt": prompt_len, "new_tokens": new},
        "models": {},
    }
    m = result["machine"]
    print(f"# mistral_ref vs transformers {m['transformers']} — {m['cpu']}, {m['threads']} threads, "
          f"torch {m['torch']}, {m['date']}")
    print(f"load average before: {m['load_average_before']} (a shared machine makes every figure noisier)")
    bw_bytes = (64 if quick else 512) << 20
    bw = read_bandwidth(bw_bytes, 3 if quick else 7)
    result["machine"]["read_bandwidth_GBs"] = summary([b / 1e9 for b in bw])
    print(f"read bandwidth (sum of a {bw_bytes >> 20} MiB tensor): "
          f"{fmt(result['machine']['read_bandwidth_GBs'])} GB/s")
    from mistral_ref.backends import cpu_gemv

    m["cpu_kernels"], m["cpu_operators"] = cpu_gemv.status(), cpu_gemv.operators(wait=True)  # built before timing
    m["cpu_walk"] = cpu_gemv.walk()  # timed at load (cpu_gemv.choose_walk), or MISTRAL_REF_CPU_WALK
    print(f"C kernels: {m['cpu_kernels']}; their operators: {m['cpu_operators']}; one-row products walk "
          f"{m['cpu_walk']}")
    print(f"medians [min-max] of {runs} alternating rounds; ratio = mistral_ref / transformers per round\n")

    decode_rows, prefill_rows = [], []
    import peer_llamacpp as llamacpp  # here, not at the top: it imports this module's helpers

    why_not = "--no-llamacpp" if opts.no_llamacpp else llamacpp.unavailable()
    if why_not:
        hint = "" if opts.no_llamacpp else " (`make bench` builds llama-cpp-python, the `bench` extra)"
        print(f"llama.cpp peer skipped: {why_not}{hint}\n")
    llamacpp_results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in models.items():
            base = random_model(args)
            hf_dir = Path(tmp) / name
            save_checkpoint(base, hf_dir, format="hf")  # fp32; transformers casts on load
            res = result["models"][name] = {"parameters": sum(q.numel() for q in base.parameters())}
            ggufs = None if why_not else llamacpp.write_gguf(base, Path(tmp) / f"{name}-gguf", dtypes)
            for dname in dtypes:
                dtype = DTYPES[dname]
                ours = base.to(dtype)  # in place: one copy of the weights per model
                stack_all_experts(ours)  # the experts laid out as the CLI lays them out (.to dropped the stacks),
                join_projections(ours)  # and wq, wk, wv in one tensor (a prompt's one product of the three)
                hf = transformers_model(args, hf_dir, dtype)
                entry = res[dname] = {}
                if dtype == torch.float32:
                    err, same = check_parity(ours, hf, args.vocab_size)
                    entry["parity"] = {"logits_rel_err": err, "greedy_tokens_equal": same}
                    print(f"{name} fp32 parity: logits rel err {err:.1e}, greedy tokens equal: {same}")
                for batch in batches:
                    near = read_bandwidth(bw_bytes, 3) if batch == 1 else []  # bandwidth now, before and after
                    d = entry[f"decode_b{batch}"] = bench_decode(ours, hf, batch, prompt_len, new, runs)
                    floor = None
                    if batch == 1:
                        near += read_bandwidth(bw_bytes, 3)
                        need = decode_bytes(args, dtype.itemsize, prompt_len + new // 2)
                        floor = statistics.median(near) / need
                        d["bandwidth_GBs"], d["bytes_per_token"] = statistics.median(near) / 1e9, need
                        d["floor_tok_s"], d["fraction_of_floor"] = floor, d["ours"]["median"] / floor
                        d["transformers_fraction_of_floor"] = d["transformers"]["median"] / floor
                    decode_rows.append((name, dname, batch, d, floor))
                    print(f"  decode {name} {dname} b{batch}: {fmt(d['ours'])} vs {fmt(d['transformers'])} tok/s, "
                          f"ratio {fmt(d['ratio'], 2)}", flush=True)
                    if opts.compile and batch == 1:
                        t0 = time.perf_counter()
                        ours.compile_decode()
                        generate(ours, [[1] * prompt_len], new, temperature=0.0)  # compiles (same cache shape)
                        compile_s = time.perf_counter() - t0
                        d = entry["decode_b1_compiled"] = bench_decode(ours, hf, 1, prompt_len, new, runs)
                        ours.compile_decode(False)
                        d["compile_s"] = compile_s
                        d["bandwidth_GBs"] = entry["decode_b1"]["bandwidth_GBs"]
                        d["floor_tok_s"], d["fraction_of_floor"] = floor, d["ours"]["median"] / floor
                        d["transformers_fraction_of_floor"] = d["transformers"]["median"] / floor
                        decode_rows.append((f"{name} compiled", dname, 1, d, floor))
                        print(f"  decode {name} {dname} b1 compiled ({compile_s:.0f} s to compile): "
                              f"{fmt(d['ours'])} vs {fmt(d['transformers'])} tok/s, ratio {fmt(d['ratio'], 2)}",
                              flush=True)
                for i, T in enumerate(prefill_lens):
                    long = T > 1024 and i > 0
                    pf = entry[f"prefill_{T}"] = bench_prefill(ours, hf, T, opts.long_prefill_runs if long else runs,
                                                               warmup=not long)
                    gemm = max(gemm_flops(args, 9))  # measured now, next to the row
                    pf["gemm_GFLOPs"], pf["ceiling_tok_s"] = gemm / 1e9, gemm / prefill_flops(args, T)
                    prefill_rows.append((name, dname, T, pf))
                    print(f"  prefill {name} {dname} {T}: {fmt(pf['ours'], 0)} vs {fmt(pf['transformers'], 0)} "
                          f"tok/s, ratio {fmt(pf['ratio'], 2)}; matrix products {1e3 * pf['products_s']:.0f} ms of "
                          f"{1e3 * pf['profiled_s']:.0f} profiled, bound {pf['ratio_bound']:.2f}x; "
                          + (f"with SDPA's kernel {1e3 * pf['attention_s']:.0f} ms, bound {pf['kernels_bound']:.2f}x"
                             if pf["attention_s"] > 0 or pf["own_attention_s"] == 0 else
                             f"attention in mistral_ref's AMX flash kernel {1e3 * pf['own_attention_s']:.0f} ms "
                             f"(not a kernel both call: no second bound)"), flush=True)
                del hf, ours
            if ggufs is not None:
                mode = opts.llamacpp_compile if opts.compile and opts.llamacpp_compile != "none" else None
                r = res["llama_cpp"] = llamacpp_results[name] = llamacpp.bench_model(
                    name, ggufs, dtypes, torch.get_num_threads(), runs, prompt_len, new, prefill_lens,
                    opts.long_prefill_runs, compile_mode=mode, long_context=opts.long_context)
                fp32_tokens = r.get("fp32", {}).get("decode_b1", {}).get("tokens", {}).get("ours")
                r.update(llamacpp.bench_quantized(name, ggufs, torch.get_num_threads(), runs, prompt_len, new,
                                                  fp32_tokens, compile_mode=mode))

    print(f"\n## Decode: tokens/s, greedy, {new} new tokens after a {prompt_len}-token prompt")
    print("floor = read bandwidth measured just before and after the row / bytes of weights and KV cache read per "
          "token (batch 1); 'of floor' for mistral_ref, then transformers")
    print("| model | dtype | batch | mistral_ref | transformers | ratio | floor tok/s (GB/s) | of floor |")
    print("|---|---|---|---|---|---|---|---|")
    for name, dname, batch, d, floor in decode_rows:
        fl = (f"{floor:.0f} ({d['bandwidth_GBs']:.1f}) | {100 * d['fraction_of_floor']:.0f}% / "
              f"{100 * d['transformers_fraction_of_floor']:.0f}%") if floor else "- | -"
        print(f"| {name} | {dname} | {batch} | {fmt(d['ours'])} | {fmt(d['transformers'])} | "
              f"{fmt(d['ratio'], 2)}x | {fl} |")
    print(f"\n## Time to first token ({prompt_len}-token prompt, batch 1), seconds")
    print("| model | dtype | mistral_ref | transformers | ratio (theirs / ours) |")
    print("|---|---|---|---|---|")
    for name, dname, batch, d, _ in decode_rows:
        if batch == 1:
            print(f"| {name} | {dname} | {fmt(d['ttft_ours_s'], 3)} | {fmt(d['ttft_transformers_s'], 3)} | "
                  f"{fmt(d['ttft_ratio'], 2)}x |")
    print("\n## Prefill: tokens/s, one forward pass into a fresh cache, a new prompt each call")
    print("ceiling = FLOP/s of the fastest of 9 runs of a 512-row matrix product (fp32 or bf16, the faster), "
          "measured next to the row / FLOPs per prompt token; 'of ceiling' for mistral_ref, then transformers")
    print("products = share of a profiled prefill of mistral_ref spent in matrix products (median of 3; one at 2048+); "
          "bound = transformers' seconds / those products' seconds: the ratio with every other operation free; "
          "+ SDPA: the same with PyTorch's attention kernel (which both libraries call for a plain causal prompt) "
          "counted beside the products; '-' where mistral_ref's attention ran in its own AMX flash kernel instead")
    print("| model | dtype | tokens | mistral_ref | transformers | ratio | ceiling tok/s (GFLOP/s) | of ceiling | "
          "products | bound | + SDPA | bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, dname, T, pf in prefill_rows:
        ceil = pf["ceiling_tok_s"]
        print(f"| {name} | {dname} | {T} | {fmt(pf['ours'], 0)} | {fmt(pf['transformers'], 0)} | "
              f"{fmt(pf['ratio'], 2)}x | {ceil:.0f} ({pf['gemm_GFLOPs']:.0f}) | "
              f"{100 * pf['ours']['median'] / ceil:.0f}% / {100 * pf['transformers']['median'] / ceil:.0f}% | "
              f"{100 * pf['products_s'] / pf['profiled_s']:.0f}% | {pf['ratio_bound']:.2f}x | "
              + (f"{100 * (pf['products_s'] + pf['attention_s']) / pf['profiled_s']:.0f}% | "
                 f"{pf['kernels_bound']:.2f}x |" if pf["attention_s"] > 0 or pf["own_attention_s"] == 0 else "- | - |"))
    same = all(d["same_tokens"] for _, dname, _, d, _ in decode_rows if dname == "fp32")
    print(f"\nfp32 greedy tokens identical to transformers' in every decode run: {same}")
    if llamacpp_results:
        llamacpp.print_tables(llamacpp_results, new, prompt_len)

    bench_load = Path(__file__).with_name("bench_load.py")
    if not quick and not opts.no_load:
        print("\n## Loading (benchmarks/bench_load.py)", flush=True)
        if bench_load.exists():
            out = subprocess.run([sys.executable, str(bench_load), "--runs", str(min(runs, 3)), "--dtypes",
                                  "bfloat16"], capture_output=True, text=True)
            print(out.stdout + (out.stderr[-2000:] if out.returncode else ""))
            result["loading"] = out.stdout
        else:
            print("benchmarks/bench_load.py not found: loading not measured")
    result["machine"]["load_average_after"] = load_average()
    print(f"load average after: {result['machine']['load_average_after']}")
    if opts.json:
        opts.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
