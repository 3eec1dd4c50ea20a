"""Benchmark harness for the kernels: `python -m triton_kernels.bench` (`make bench-kernels`).

On a CUDA GPU it times, at the shapes of Mistral-7B, Mixtral-8x7B / 8x22B and Nemo,
  * prefill attention (T = 512 .. 16k) and decode attention (batch 1 .. 64, context up to 32k): the PyTorch
    eager reference (mistral_ref.attention.attention), torch scaled_dot_product_attention, Triton;
  * the MoE layer (1 .. 4096 tokens): the loop-over-experts reference (mistral_ref.moe.moe_forward), Triton;
  * at Mistral Small 4's shapes: a latent-attention decode step (batch 1 .. 64, context up to 32k) in latent space,
    PyTorch's absorbed einsums (backends/mla.py) and Triton (triton_kernels/latent_decode.py), and the
    fine-grained experts given route_fine's choice (128 experts, top-4): mistral_ref.moe.mix_experts, Triton;
  * RMSNorm and RoPE: the PyTorch references, Triton;
and reports time, TFLOP/s, GB/s and the fraction of the device roofline (max(FLOPs / peak FLOP/s, bytes / peak
bandwidth) / time; peaks from a table of known GPUs or --peak-tflops / --peak-gbps, else "n/a") as a table, a
CSV and a plot (matplotlib, if installed).  FLOPs count only useful work (allowed query-key pairs, routed
tokens); bytes are the minimum traffic (each operand read once, each output written once).

Without a GPU there is nothing to time: it says so, prints no timing, and runs the correctness sweep instead —
every kernel against its fp32 PyTorch reference, under TRITON_INTERPRET=1, at small shapes with each model's
head ratio, head_dim, window and expert count — and exits non-zero if any kernel is out of tolerance.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from mistral_ref.attention import attention as torch_attention
from mistral_ref.attention import attention_mask
from mistral_ref.backends.mla import absorbed_latent_attention
from mistral_ref.config import ModelArgs
from mistral_ref.family import PRESETS
from mistral_ref.fine_moe import route_fine
from mistral_ref.mla import latent_attention as torch_latent_attention
from mistral_ref.mla import mla_softmax_scale
from mistral_ref.moe import mix_experts as torch_mix
from mistral_ref.moe import moe_forward as torch_moe
from mistral_ref.moe import route
from mistral_ref.norm import RMSNorm, rms_norm
from mistral_ref.rope import apply_rotary_emb as torch_rope
from mistral_ref.rope import rope_angles

MODELS = ("mistral-7b-v0.1", "mixtral-8x7b", "mixtral-8x22b", "mistral-nemo-12b")
LATENT_MODELS = ("mistral-small-4-2603",)  # latent attention + fine-grained experts
PREFILL_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
DECODE_BATCHES = (1, 8, 32, 64)
DECODE_CONTEXTS = (1024, 4096, 16384, 32768)
MOE_TOKENS = (1, 8, 64, 512, 4096)
# Vendor datasheet peaks: dense fp16/bf16 tensor-core TFLOP/s (no sparsity) and memory GB/s.  First match of
# the regular expression against torch.cuda.get_device_name() wins; unknown devices get no roofline.
DEVICE_PEAKS = [
    (r"H200", 989.0, 4800.0), (r"H100.*NVL", 835.0, 3900.0), (r"H100.*PCIe", 756.0, 2000.0),
    (r"H100", 989.0, 3350.0), (r"A100.*40GB", 312.0, 1555.0), (r"A100.*PCIe", 312.0, 1935.0),
    (r"A100", 312.0, 2039.0), (r"A10\b", 125.0, 600.0), (r"L40S", 362.0, 864.0), (r"L4\b", 121.0, 300.0),
    (r"RTX 4090", 165.0, 1008.0), (r"V100", 125.0, 900.0), (r"T4\b", 65.0, 320.0),
]
CSV_FIELDS = ["family", "model", "shape", "provider", "dtype", "ms", "tflops", "gbps", "roofline_frac",
              "max_err", "tolerance", "status"]


@dataclass
class Row:
    family: str
    model: str
    shape: str
    provider: str
    dtype: str
    ms: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    roofline_frac: float | None = None
    max_err: float | None = None
    tolerance: float | None = None
    status: str = ""
    extra: dict = field(default_factory=dict)


# ---- work counts -------------------------------------------------------------------------------------
def attention_pairs(T: int, S: int, window: int | None) -> int:
    """Allowed (query, key) pairs of one sequence: T queries at positions S-T .. S-1 over keys 0 .. S-1."""
    return sum(min(p + 1, window) if window else p + 1 for p in range(S - T, S))


def attention_work(B: int, T: int, S: int, H: int, H_kv: int, D: int, window: int | None,
                   elt: int) -> tuple[float, float]:
    """FLOPs (QK^T and PV: 4 * D per head and allowed pair), minimum bytes (q, o, visible k, v once each)."""
    flops = 4.0 * D * H * B * attention_pairs(T, S, window)
    keys_read = min(S, window + T - 1) if window else S
    return flops, float(elt * B * (2 * T * H * D + 2 * keys_read * H_kv * D))


def moe_work(N: int, dim: int, hidden: int, top_k: int, experts_used: int, elt: int) -> tuple[float, float]:
    """FLOPs of the three expert matmuls for N*k routed rows; bytes of the used experts' weights + x + out."""
    return 6.0 * N * top_k * dim * hidden, float(elt * (3 * experts_used * dim * hidden + 2 * N * dim))


def latent_decode_work(B: int, ctx: int, H: int, n: int, r: int, v: int, c: int, elt: int) -> tuple[float, float]:
    """One absorbed decode step (latent_decode.latent_attention): FLOPs of the query absorption (2 n c per head),
    the scores (2 (c + r)) and the latent output (2 c) per head and cached token, the output projection (2 v c per
    head); minimum bytes: the latent cache (c + r per token) and kv_b_proj read once, queries and output."""
    flops = 2.0 * B * H * ((n + v) * c + ctx * (2 * c + r))
    return flops, float(elt * (B * ctx * (c + r) + H * (n + v) * c + B * H * (n + r + v)))


# ---- the CPU path: correctness sweep under the interpreter -------------------------------------------------
def _scaled_window(args: ModelArgs, seq: int) -> int | None:
    """A model's window shrunk to fit the small sweep while staying smaller than the sequence."""
    return None if args.window_for_layer(0) is None else max(1, seq // 3)


def correctness_sweep(quick: bool = False, kernels=None, models: tuple[str, ...] | None = None,
                      device: str | None = None) -> list[Row]:
    """Every kernel vs its fp32 PyTorch reference at small shapes with each model's head layout.

    kernels: a namespace with the triton_kernels functions (default: the package); models: preset names;
    device: where the kernels run (default: the CPU under the interpreter, else "cuda"). Inputs and references
    are made on the CPU (one seeded generator, the same numbers on every machine); each kernel call moves its
    tensors to `device` and its result back.
    """
    import triton_kernels
    from triton_kernels._common import interpreting

    k = kernels or triton_kernels
    device = device or ("cpu" if interpreting() else "cuda")
    if device != "cpu":
        k = SimpleNamespace(**{name: _on_device(getattr(k, name), device) for name in triton_kernels.__all__})
    rows: list[Row] = []
    g = torch.Generator().manual_seed(0)
    models = models or (MODELS[:1] + MODELS[2:3] if quick else MODELS) + LATENT_MODELS

    def record(family, model, shape, dtype, out, ref, tol):
        err = (out.float() - ref.float()).abs().max().item()
        ok = bool(torch.isfinite(out).all()) and err <= tol
        rows.append(Row(family, model, shape, "triton", str(dtype).replace("torch.", ""), max_err=err,
                        tolerance=tol, status="pass" if ok else "FAIL"))

    for name in models:
        a = PRESETS[name]
        if a.mla is not None:
            _latent_sweep(name, a, k, g, record, quick)
            continue
        n_rep = a.n_heads // a.n_kv_heads
        H_kv = 1 if quick else 2
        H, D = H_kv * n_rep, a.head_dim
        for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 1e-2)):
            T = 40
            W = _scaled_window(a, T)
            q = torch.randn(1, T, H, D, generator=g).to(dtype)
            kk = torch.randn(1, T, H_kv, D, generator=g).to(dtype)
            v = torch.randn(1, T, H_kv, D, generator=g).to(dtype)
            pos = torch.arange(T)[None]
            ref = torch_attention(q.float(), kk.float(), v.float(), pos, pos, W)
            record("prefill", name, f"B=1 T=S={T} H={H} Hkv={H_kv} D={D} W={W}", dtype,
                   k.attention(q, kk, v, pos, pos, W), ref, tol)
            S = 48
            qd = torch.randn(2, 1, H, D, generator=g).to(dtype)
            kd = torch.randn(2, S, H_kv, D, generator=g).to(dtype)
            vd = torch.randn(2, S, H_kv, D, generator=g).to(dtype)
            k_pos = torch.arange(S).repeat(2, 1)
            k_pos[1, 30:] = -1  # ragged: the second sequence holds 30 keys
            q_pos = torch.tensor([[S - 1], [29]])
            ref = torch_attention(qd.float(), kd.float(), vd.float(), q_pos, k_pos, W)
            record("decode", name, f"B=2 S={S} H={H} Hkv={H_kv} D={D} W={W} splits=2", dtype,
                   k.decode_attention(qd, kd, vd, q_pos, k_pos, W, num_splits=2, block_n=16), ref, tol)
            if a.moe is not None:
                E, top_k, N, dim, hidden = a.moe.num_experts, a.moe.num_experts_per_tok, 12, 48, 80
                x = torch.randn(N, dim, generator=g)
                gate = torch.randn(E, dim, generator=g)
                w1 = torch.randn(E, hidden, dim, generator=g) * dim**-0.5
                w3 = torch.randn(E, hidden, dim, generator=g) * dim**-0.5
                w2 = torch.randn(E, dim, hidden, generator=g) * hidden**-0.5
                cast = [t.to(dtype) for t in (x, gate, w1, w2, w3)]
                ref = torch_moe(*[t.float() for t in cast], top_k)[0]
                out, _ = k.moe_forward(*cast, top_k, block_m=16, block_n=32, block_k=32)
                record("moe", name, f"N={N} dim={dim} hidden={hidden} E={E} k={top_k}", dtype, out, ref,
                       1e-4 if dtype == torch.float32 else 1e-2)
        x = torch.randn(4, a.dim, generator=g)
        norm = RMSNorm(a.dim, a.norm_eps)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            out, ref = k.rms_norm(x, norm.weight, norm.eps), rms_norm(x, norm.weight, norm.eps)
            record("rms_norm", name, f"rows=4 dim={a.dim}", torch.float32, out, ref, 1e-5)
        xr = torch.randn(1, 8, 2, D, generator=g)
        cos, sin = rope_angles(torch.arange(8)[None] * 997, D, a.rope_theta)
        record("rope", name, f"B=1 T=8 H=2 D={D}", torch.float32, k.apply_rotary_emb(xr, cos, sin),
               torch_rope(xr, cos, sin), 1e-5)
    return rows


def _on_device(fn: Callable, device: str) -> Callable:
    """fn with its tensor arguments moved to `device` and its tensor results (or tuple of them) to the CPU."""
    def moved(*args, **kwargs):
        to = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        out = fn(*map(to, args), **{key: to(value) for key, value in kwargs.items()})
        back = lambda t: t.cpu() if isinstance(t, torch.Tensor) else t  # noqa: E731
        return tuple(map(back, out)) if isinstance(out, tuple) else back(out)
    return moved


def _latent_sweep(name: str, a: ModelArgs, k, g: torch.Generator, record: Callable, quick: bool) -> None:
    """A latent model's rows of the sweep: the decode kernel at the model's latent and rotary widths (a ragged
    batch with a padding query, 2 splits) and the MoE kernels given route_fine's choice among its experts."""
    m, fm = a.mla, a.fine_moe
    H, n, r, v, c = 2 if quick else 4, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 1e-2)):
        B, S = 3, 48
        q_nope, q_rope = (torch.randn(B, 1, H, d, generator=g).to(dtype) for d in (n, r))
        latents, k_rope = (torch.randn(B, S, d, generator=g).to(dtype) for d in (c, r))
        kv_b = (torch.randn(H * (n + v), c, generator=g) * c**-0.5).to(dtype)
        k_pos = torch.arange(S).repeat(B, 1)
        k_pos[1, 30:] = -1  # ragged: the second sequence holds 30 tokens
        q_pos = torch.tensor([[S - 1], [29], [-1]])  # the third row is padding
        scale = mla_softmax_scale(m, a.yarn)
        args = (q_nope, q_rope, latents, k_rope, kv_b, v, q_pos, k_pos, scale)
        ref = torch_latent_attention(*[t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                                       for t in args])
        w = kv_b.view(H, n + v, c)
        q_latent = torch.einsum("bhn,hnc->bhc", q_nope[:, 0], w[:, :n])
        out = k.latent_decode_attention(q_latent, q_rope[:, 0], latents, k_rope, q_pos, k_pos, scale,
                                        num_splits=2, block_n=16)
        record("latent_decode", name, f"B={B} S={S} H={H} c={c} r={r} splits=2", dtype,
               torch.einsum("bhc,hvc->bhv", out, w[:, n:])[:, None], ref, tol)
        if fm is not None:
            N, dim, hidden = 12, 48, 32
            x, gate = torch.randn(N, dim, generator=g), torch.randn(fm.num_experts, dim, generator=g)
            w1, w3 = (torch.randn(fm.num_experts, hidden, dim, generator=g) * dim**-0.5 for _ in range(2))
            w2 = torch.randn(fm.num_experts, dim, hidden, generator=g) * hidden**-0.5
            weights, experts, _ = route_fine(x, gate, fm)
            cast = [t.to(dtype) for t in (x, w1, w2, w3)]
            ref = torch_mix(cast[0].float(), weights, experts, *[t.float() for t in cast[1:]])
            out = k.mix_experts(cast[0], weights, experts, *cast[1:], block_m=16, block_n=32, block_k=32)
            record("fine_moe", name, f"N={N} dim={dim} hidden={hidden} E={fm.num_experts} "
                   f"k={fm.num_experts_per_tok}", dtype, out, ref, 1e-4 if dtype == torch.float32 else 1e-2)


# ---- the GPU path: timings ---------------------------------------------------------------------------------
def device_peaks(name: str, tflops: float | None = None,
                 gbps: float | None = None) -> tuple[float | None, float | None]:
    """(peak TFLOP/s, peak GB/s) of a GPU by name; explicit values win; None where unknown."""
    for pattern, pf, pb in DEVICE_PEAKS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return tflops or pf, gbps or pb
    return tflops, gbps


def _time(fn: Callable[[], object]) -> float | str:
    """Median milliseconds (triton.testing.do_bench), or "OOM"."""
    import triton

    try:
        return float(triton.testing.do_bench(fn, warmup=10, rep=50))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"


def _sdpa(q, k, v, q_pos, k_pos, window):
    """torch scaled_dot_product_attention with the reference's mask (is_causal when that is the same)."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    T, S = q.shape[1], k.shape[1]
    if window is None and T == S:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    else:
        mask = attention_mask(q_pos, k_pos, window)[:, None]
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


def _measure(rows: list[Row], timer: Callable, peaks: tuple[float | None, float | None], dtype: torch.dtype,
             family: str, model: str, shape: str, flops: float, nbytes: float, providers, args) -> None:
    """Time each (name, fn) provider as fn(*args) under inference_mode; one printed Row each, appended to rows (a
    provider that raises gets a row whose status is the error, and the next one is still timed)."""
    for provider, fn in providers:
        try:
            with torch.inference_mode():
                ms = timer(lambda fn=fn: fn(*args))
        except Exception as e:  # noqa: BLE001 - a row that says what broke, then the next provider
            ms = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        row = Row(family, model, shape, provider, str(dtype).replace("torch.", ""))
        if isinstance(ms, str):
            row.status = ms
        else:
            row.ms, row.tflops, row.gbps = ms, flops / ms / 1e9, nbytes / ms / 1e6
            if peaks[0] and peaks[1]:
                row.roofline_frac = max(flops / (peaks[0] * 1e12), nbytes / (peaks[1] * 1e9)) / (ms / 1e3)
            row.status = "ok"
        rows.append(row)
        print(_format_row(row), flush=True)


# tile sweeps (--tiles): the default first; (block_m, block_n, num_warps, num_stages) for the flash prefill and
# (block_m, block_n, block_k) for the MoE GEMMs
PREFILL_TILES = ((64, 64, 4, 2), (128, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2),
                 (64, 128, 4, 2), (128, 32, 4, 3), (64, 64, 4, 3))
MOE_TILES = ((64, 64, 64), (64, 64, 32), (128, 128, 64), (128, 64, 64), (64, 128, 64), (16, 64, 64), (32, 128, 64))


def tile_sweep(dtype: torch.dtype, peaks: tuple[float | None, float | None], device: str = "cuda",
               timer: Callable[[Callable[[], object]], float | str] = _time) -> list[Row]:
    """The flash prefill at each of PREFILL_TILES (Nemo's heads without a window at T = 4096 and 16384, and
    Mistral-7B's 4096-key window at 16384) and the Mixtral-8x7B MoE at each of MOE_TILES (N = 64 and 4096 tokens),
    beside PyTorch's fastest (SDPA, the expert loop): what the untuned defaults leave on a given GPU."""
    import triton_kernels as tk

    dev, elt = device, torch.tensor([], dtype=dtype).element_size()
    rows: list[Row] = []
    for name, T in (("mistral-nemo-12b", 4096), ("mistral-nemo-12b", 16384), ("mistral-7b-v0.1", 16384)):
        a = PRESETS[name]
        H, H_kv, D, W = a.n_heads, a.n_kv_heads, a.head_dim, a.window_for_layer(0)
        q = torch.randn(1, T, H, D, device=dev, dtype=dtype)
        k, v = (torch.randn(1, T, H_kv, D, device=dev, dtype=dtype) for _ in range(2))
        pos = torch.arange(T, device=dev)[None]
        providers = [("torch-sdpa", _sdpa)] + [
            (f"triton {bm}x{bn} w{w} s{st}", lambda *x, t=(bm, bn, w, st): tk.prefill_attention(
                *x, block_m=t[0], block_n=t[1], num_warps=t[2], num_stages=t[3])) for bm, bn, w, st in PREFILL_TILES]
        first = len(rows)
        _measure(rows, timer, peaks, dtype, "prefill", name, f"B=1 T={T} H={H}/{H_kv} D={D} W={W}",
                 *attention_work(1, T, T, H, H_kv, D, W, elt), providers, (q, k, v, pos, pos, W))
        _errors(rows[first:], providers, (q, k, v, pos, pos, W))
        del q, k, v
    a = PRESETS["mixtral-8x7b"]
    E, top_k = a.moe.num_experts, a.moe.num_experts_per_tok
    w1, w3 = (torch.randn(E, a.hidden_dim, a.dim, device=dev, dtype=dtype) * a.dim**-0.5 for _ in range(2))
    w2 = torch.randn(E, a.dim, a.hidden_dim, device=dev, dtype=dtype) * a.hidden_dim**-0.5
    gate = torch.randn(E, a.dim, device=dev, dtype=dtype)
    for N in (64, 4096):
        x = torch.randn(N, a.dim, device=dev, dtype=dtype)
        # experts whose weights are read (a dry run on the meta device, which has no values, counts them all)
        used = E if x.is_meta else int(route(x, gate, top_k)[1].unique().numel())
        providers = [("torch-loop", torch_moe)] + [
            (f"triton {bm}x{bn}x{bk}", lambda *x, t=(bm, bn, bk): tk.moe_forward(
                *x, block_m=t[0], block_n=t[1], block_k=t[2])) for bm, bn, bk in MOE_TILES]
        _measure(rows, timer, peaks, dtype, "moe", "mixtral-8x7b", f"N={N} dim={a.dim} hidden={a.hidden_dim} "
                 f"E={E} k={top_k}", *moe_work(N, a.dim, a.hidden_dim, top_k, used, elt), providers,
                 (x, gate, w1, w2, w3, top_k))
        _errors(rows[-len(providers):], providers, (x, gate, w1, w2, w3, top_k))
    del w1, w2, w3
    a = PRESETS["mistral-small-4-2603"]  # fine-grained experts: 128 of hidden 2048, top-4 (6.4 GB in bf16)
    fm = a.fine_moe
    E, hidden = fm.num_experts, fm.moe_intermediate_size
    w1, w3 = (torch.randn(E, hidden, a.dim, device=dev, dtype=dtype) * a.dim**-0.5 for _ in range(2))
    w2 = torch.randn(E, a.dim, hidden, device=dev, dtype=dtype) * hidden**-0.5
    gate = torch.randn(E, a.dim, device=dev, dtype=dtype)
    for N in (64, 4096):
        x = torch.randn(N, a.dim, device=dev, dtype=dtype)
        weights, experts, _ = (None, None, None) if x.is_meta else route_fine(x, gate, fm)
        if x.is_meta:  # a dry run: a routing of the right shape
            weights = torch.empty(N, fm.num_experts_per_tok, device=dev)
            experts = torch.empty(N, fm.num_experts_per_tok, device=dev, dtype=torch.long)
        used = E if x.is_meta else int(experts.unique().numel())
        providers = [("torch-loop", torch_mix)] + [
            (f"triton {bm}x{bn}x{bk}", lambda *x, t=(bm, bn, bk): tk.mix_experts(
                *x, block_m=t[0], block_n=t[1], block_k=t[2])) for bm, bn, bk in MOE_TILES]
        _measure(rows, timer, peaks, dtype, "fine_moe", "mistral-small-4-2603",
                 f"N={N} dim={a.dim} hidden={hidden} E={E} k={fm.num_experts_per_tok}",
                 *moe_work(N, a.dim, hidden, fm.num_experts_per_tok, used, elt), providers,
                 (x, weights, experts, w1, w2, w3))
        _errors(rows[-len(providers):], providers, (x, weights, experts, w1, w2, w3))
    return rows


def _errors(rows: list[Row], providers, args) -> None:
    """Each kernel row's largest difference from the first provider's output (PyTorch's), in row.max_err: another
    tile size is another order of the sums, never another result (not on the meta device: no values)."""
    if args[0].is_meta:
        return
    with torch.inference_mode():
        first = providers[0][1](*args)
        first = (first[0] if isinstance(first, tuple) else first).float()
        for row, (_, fn) in zip(rows[1:], providers[1:]):
            if row.status == "ok":
                out = fn(*args)
                row.max_err = float(((out[0] if isinstance(out, tuple) else out).float() - first).abs().max())


def gpu_benchmarks(dtype: torch.dtype, quick: bool, peaks: tuple[float | None, float | None],
                   device: str = "cuda", timer: Callable[[Callable[[], object]], float | str] = _time,
                   ) -> list[Row]:
    """Time every provider at the model shapes; one Row per (shape, provider), printed as it is measured.

    `device` and `timer` exist so tests can drive the plumbing without a GPU (with a stub timer). The kernels are
    inference-only: everything runs under torch.inference_mode(). A provider that raises gets a row whose status
    is the error (printed, in the CSV, and main() exits 1), and the harness goes on with the next one.
    """
    import triton_kernels as tk

    dev, elt = device, torch.tensor([], dtype=dtype).element_size()
    rows: list[Row] = []

    def add(family, model, shape, flops, nbytes, providers, args):
        """providers: (name, fn) pairs all called as fn(*args)."""
        _measure(rows, timer, peaks, dtype, family, model, shape, flops, nbytes, providers, args)

    attention_providers = (("torch-eager", torch_attention), ("torch-sdpa", _sdpa), ("triton", tk.attention))
    for name in MODELS[:1] if quick else MODELS:
        a = PRESETS[name]
        H, H_kv, D, W = a.n_heads, a.n_kv_heads, a.head_dim, a.window_for_layer(0)
        for T in PREFILL_LENGTHS[:2] if quick else PREFILL_LENGTHS:  # prefill of one prompt
            q = torch.randn(1, T, H, D, device=dev, dtype=dtype)
            k, v = (torch.randn(1, T, H_kv, D, device=dev, dtype=dtype) for _ in range(2))
            pos = torch.arange(T, device=dev)[None]
            add("prefill", name, f"B=1 T={T} H={H}/{H_kv} D={D} W={W}",
                *attention_work(1, T, T, H, H_kv, D, W, elt), attention_providers, (q, k, v, pos, pos, W))
        for B in DECODE_BATCHES[:2] if quick else DECODE_BATCHES:  # one decode step over a full cache
            for ctx in DECODE_CONTEXTS[:2] if quick else DECODE_CONTEXTS:
                slots = min(ctx, W) if W else ctx  # a windowed layer keeps a rolling buffer of W slots
                q = torch.randn(B, 1, H, D, device=dev, dtype=dtype)
                k, v = (torch.randn(B, slots, H_kv, D, device=dev, dtype=dtype) for _ in range(2))
                k_pos = (torch.arange(slots, device=dev) + (ctx - slots)).expand(B, slots)
                q_pos = torch.full((B, 1), ctx - 1, device=dev)
                add("decode", name, f"B={B} ctx={ctx} H={H}/{H_kv} D={D} W={W}",
                    *attention_work(B, 1, ctx, H, H_kv, D, W, elt), attention_providers,
                    (q, k, v, q_pos, k_pos, W))
        if a.moe is not None:
            E, top_k = a.moe.num_experts, a.moe.num_experts_per_tok
            w1, w3 = (torch.randn(E, a.hidden_dim, a.dim, device=dev, dtype=dtype) * a.dim**-0.5
                      for _ in range(2))
            w2 = torch.randn(E, a.dim, a.hidden_dim, device=dev, dtype=dtype) * a.hidden_dim**-0.5
            gate = torch.randn(E, a.dim, device=dev, dtype=dtype)
            for N in MOE_TOKENS[:2] if quick else MOE_TOKENS:
                x = torch.randn(N, a.dim, device=dev, dtype=dtype)
                used = int(route(x, gate, top_k)[1].unique().numel())  # experts whose weights are read
                add("moe", name, f"N={N} dim={a.dim} hidden={a.hidden_dim} E={E} k={top_k}",
                    *moe_work(N, a.dim, a.hidden_dim, top_k, used, elt),
                    (("torch-loop", torch_moe), ("triton", tk.moe_forward)), (x, gate, w1, w2, w3, top_k))
            del w1, w2, w3
        N = 4096
        x = torch.randn(N, a.dim, device=dev, dtype=dtype)
        norm = RMSNorm(a.dim, a.norm_eps).to(dev, dtype)
        add("rms_norm", name, f"rows={N} dim={a.dim}", 4.0 * N * a.dim, float(elt * (2 * N * a.dim + a.dim)),
            (("torch-eager", rms_norm), ("triton", tk.rms_norm)),
            (x, norm.weight, norm.eps))
        xr = torch.randn(1, N, H, D, device=dev, dtype=dtype)
        cos, sin = rope_angles(torch.arange(N, device=dev)[None], D, a.rope_theta)
        add("rope", name, f"T={N} H={H} D={D}", 6.0 * N * H * D, float(2 * elt * N * H * D + 4 * N * D),
            (("torch-eager", torch_rope), ("triton", tk.apply_rotary_emb)), (xr, cos, sin))
    for name in LATENT_MODELS:
        a = PRESETS[name]
        m, fm, H = a.mla, a.fine_moe, a.n_heads
        n, r, v, c = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank
        kv_b = torch.randn(H * (n + v), c, device=dev, dtype=dtype) * c**-0.5
        for B in DECODE_BATCHES[:2] if quick else DECODE_BATCHES:  # one decode step over a full latent cache
            for ctx in DECODE_CONTEXTS[:2] if quick else DECODE_CONTEXTS:
                q_nope, q_rope = (torch.randn(B, 1, H, d, device=dev, dtype=dtype) for d in (n, r))
                latents, k_rope = (torch.randn(B, ctx, d, device=dev, dtype=dtype) for d in (c, r))
                k_pos = torch.arange(ctx, device=dev).expand(B, ctx)
                q_pos = torch.full((B, 1), ctx - 1, device=dev)
                add("latent_decode", name, f"B={B} ctx={ctx} H={H} c={c} r={r}",
                    *latent_decode_work(B, ctx, H, n, r, v, c, elt),
                    (("torch-absorbed", absorbed_latent_attention), ("triton", tk.latent_attention)),
                    (q_nope, q_rope, latents, k_rope, kv_b, v, q_pos, k_pos, mla_softmax_scale(m, a.yarn)))
        if fm is not None and not quick:  # 128 experts of Small 4's width: 6.4 GB in bf16
            E, top_k, hidden = fm.num_experts, fm.num_experts_per_tok, fm.moe_intermediate_size
            w1, w3 = (torch.randn(E, hidden, a.dim, device=dev, dtype=dtype) * a.dim**-0.5 for _ in range(2))
            w2 = torch.randn(E, a.dim, hidden, device=dev, dtype=dtype) * hidden**-0.5
            gate = torch.randn(E, a.dim, device=dev, dtype=dtype)
            for N in MOE_TOKENS:
                x = torch.randn(N, a.dim, device=dev, dtype=dtype)
                weights, experts, _ = route_fine(x, gate, fm)
                used = int(experts.unique().numel())
                add("fine_moe", name, f"N={N} dim={a.dim} hidden={hidden} E={E} k={top_k}",
                    *moe_work(N, a.dim, hidden, top_k, used, elt),
                    (("torch-loop", torch_mix), ("triton", tk.mix_experts)), (x, weights, experts, w1, w2, w3))
            del w1, w2, w3
    return rows


# ---- output ------------------------------------------------------------------------------------------------
def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _format_row(r: Row) -> str:
    return (f"{r.family:9} {r.model:17} {r.shape:44} {r.provider:12} {r.dtype:8} {_fmt(r.ms, '10.4f'):>10} "
            f"{_fmt(r.tflops, '8.2f'):>8} {_fmt(r.gbps, '8.1f'):>8} {_fmt(r.roofline_frac, '6.2f'):>6} "
            f"{_fmt(r.max_err, '9.2e'):>9} {r.status}")


def _header() -> str:
    return (f"{'family':9} {'model':17} {'shape':44} {'provider':12} {'dtype':8} {'ms':>10} {'TFLOP/s':>8} "
            f"{'GB/s':>8} {'roof':>6} {'max_err':>9} status")


def write_csv(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if getattr(r, k) is None else getattr(r, k) for k in CSV_FIELDS})


def write_plot(rows: list[Row], path: Path) -> bool:
    """One panel per family, a bar per (shape, provider): TFLOP/s, or GB/s; False: no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    families = [f for f in ("prefill", "decode", "moe", "rms_norm", "rope", "latent_decode", "fine_moe")
                if any(r.family == f and r.ms is not None for r in rows)]
    if not families:
        return False
    fig, axes = plt.subplots(len(families), 1, figsize=(14, 3.2 * len(families)), squeeze=False)
    for ax, fam in zip(axes[:, 0], families):
        fam_rows = [r for r in rows if r.family == fam and r.ms is not None]
        labels = list(dict.fromkeys(f"{r.model}\n{r.shape}" for r in fam_rows))
        providers = list(dict.fromkeys(r.provider for r in fam_rows))
        metric = "gbps" if fam in ("decode", "rms_norm", "rope", "latent_decode") else "tflops"
        width = 0.8 / max(1, len(providers))
        for i, p in enumerate(providers):
            vals = {f"{r.model}\n{r.shape}": getattr(r, metric) for r in fam_rows if r.provider == p}
            ax.bar([j + i * width for j in range(len(labels))], [vals.get(lab, 0.0) for lab in labels], width,
                   label=p)
        ax.set_title(fam)
        ax.set_ylabel("GB/s" if metric == "gbps" else "TFLOP/s")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
        ax.set_xticklabels(labels, fontsize=5, rotation=90)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m triton_kernels.bench",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="directory for the CSV and plot")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16",
                        help="dtype of the GPU timings")
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--tiles", action="store_true",
                        help="only the tile sweep: the flash prefill and MoE kernels at other tile sizes (GPU)")
    parser.add_argument("--peak-tflops", type=float, help="device peak dense fp16/bf16 TFLOP/s (roofline)")
    parser.add_argument("--peak-gbps", type=float, help="device peak memory bandwidth in GB/s (roofline)")
    args = parser.parse_args(argv)

    import triton_kernels._common as common

    if torch.cuda.is_available() and common.interpreting():
        if argv is None:  # kernels were defined for the interpreter (the Makefile exports TRITON_INTERPRET=1)
            print("CUDA device found but TRITON_INTERPRET=1: re-running with TRITON_INTERPRET=0", flush=True)
            os.execve(sys.executable, [sys.executable, "-m", "triton_kernels.bench", *sys.argv[1:]],
                      {**os.environ, "TRITON_INTERPRET": "0"})
        print("CUDA device found but TRITON_INTERPRET=1: timings would be meaningless; "
              "set TRITON_INTERPRET=0")
        return 2

    if not torch.cuda.is_available():
        print("No CUDA GPU on this machine: nothing is timed and no timing is reported.\n"
              "Running the correctness sweep instead: every kernel vs its fp32 PyTorch reference under "
              "TRITON_INTERPRET=1 (numpy interpreter) at small shapes with each model's head layout.\n")
        print(_header())
        rows = correctness_sweep(quick=args.quick)
        for r in rows:
            print(_format_row(r))
        write_csv(rows, args.out / "kernels-correctness.csv")
        failed = sum(r.status != "pass" for r in rows)
        print(f"\ncorrectness sweep: {len(rows) - failed} passed, {failed} failed")
        print(f"CSV: {args.out / 'kernels-correctness.csv'}")
        return 1 if failed else 0

    name = torch.cuda.get_device_name()
    peaks = device_peaks(name, args.peak_tflops, args.peak_gbps)
    print(f"GPU: {name}; roofline peaks: "
          + (f"{peaks[0]} TFLOP/s, {peaks[1]} GB/s" if all(peaks)
             else "unknown (pass --peak-tflops and --peak-gbps)"))
    print(_header())
    if args.tiles:
        rows = tile_sweep(getattr(torch, args.dtype), peaks)
        write_csv(rows, args.out / "tiles.csv")
        print(f"CSV: {args.out / 'tiles.csv'}")
        return 1 if any(r.status.startswith("error") for r in rows) else 0
    rows = gpu_benchmarks(getattr(torch, args.dtype), args.quick, peaks)
    write_csv(rows, args.out / "kernels.csv")
    plotted = write_plot(rows, args.out / "kernels.png")
    print(f"CSV: {args.out / 'kernels.csv'}" + (f"; plot: {args.out / 'kernels.png'}" if plotted else
                                                 "; no plot (matplotlib not installed)"))
    errors = [r for r in rows if r.status.startswith("error")]
    if errors:
        print(f"{len(errors)} of {len(rows)} rows raised (status column); exit status 1")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
