# Source of notebooks/05_kernels.ipynb (build with: .venv/bin/python notebooks/build.py)

# %% [markdown]
# # 05 · Kernels: flash attention, split-K decode and MoE dispatch in Triton
#
# The reference code in `mistral_ref` is written for reading: `attention()` materialises the whole (T × S) score
# matrix, `moe_forward()` loops over experts in Python. The `triton_kernels` package computes **the same
# functions** — same names, same arguments, same results within fp32 rounding — the way a GPU wants them:
#
# | kernel | replaces | idea |
# |---|---|---|
# | `attention` (prefill: the flash kernel) | `mistral_ref.attention.attention` | tiles of queries × keys, online softmax, skip masked tiles |
# | `decode_attention` (what `attention` runs when T = 1) | the same, one query per sequence | split the KV cache into chunks, merge partial softmaxes |
# | `moe_forward` | `mistral_ref.moe.moe_forward` | sort token slots by expert, then grouped matrix multiplies |
#
# Without a GPU, Triton can still *run* kernels with its numpy interpreter. `triton_kernels` chooses it by itself
# when no CUDA device is present (before Triton is imported; no environment variable needed). It is slow — one
# program instance at a time — so the shapes here are tiny, but it checks the kernels' logic on any laptop. With
# a GPU, the last sections time them.

# %%
import time

import torch

HAS_GPU = torch.cuda.is_available()

import matplotlib.pyplot as plt  # noqa: E402

import triton_kernels as tk  # noqa: E402  (on a CPU: Triton's interpreter, chosen on import)
from mistral_ref.attention import attention, attention_mask  # noqa: E402
from mistral_ref.config import ModelArgs, MoeArgs  # noqa: E402
from mistral_ref.family import PRESETS, parameter_counts  # noqa: E402
from mistral_ref.model import Transformer  # noqa: E402
from mistral_ref.moe import moe_forward, route  # noqa: E402
from triton_kernels import bench  # noqa: E402

# constrained layout: labels, titles and colour bars are never clipped, whatever saves or shows the figure
plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (9, 3.2), "figure.constrained_layout.use": True})
device = "cuda" if HAS_GPU else "cpu"
print("device:", torch.cuda.get_device_name() if HAS_GPU else "CPU (Triton interpreter)")
_ = torch.manual_seed(0)

# %% [markdown]
# ## 1. Flash attention (prefill)
#
# The reference computes `softmax(q kᵀ / √d + mask) v` with a (T × S) matrix of scores. Flash attention
# (Dao et al. 2022, 2023) never forms it: each program owns a block of queries and walks the keys tile by tile,
# keeping for every query a running maximum `m`, a running sum `l` of `exp(s − m)` and an unnormalised output,
# rescaled whenever the maximum grows. Memory traffic drops from O(T·S) to O(T + S) per head.
#
# Here: GQA (8 query heads on 2 KV heads), head_dim 24 (not a power of two), a sliding window shorter than the
# sequence, and a ragged batch (the second row is padding after 30 tokens: position −1).

# %%
B, T, H, H_kv, D, W = 2, 48, 8, 2, 24, 20
q = torch.randn(B, T, H, D, device=device)
k, v = torch.randn(B, T, H_kv, D, device=device), torch.randn(B, T, H_kv, D, device=device)
pos = torch.arange(T, device=device).repeat(B, 1)
pos[1, 30:] = -1  # padding
start = time.perf_counter()
out = tk.attention(q, k, v, pos, pos, W)  # T > 1: the flash prefill kernel
elapsed = time.perf_counter() - start
ref = attention(q, k, v, pos, pos, W)
err = (out - ref).abs().max().item()
print(f"flash attention (Triton) vs reference: max |error| = {err:.1e} (fp32; {elapsed:.2f} s"
      f"{' under the interpreter' if not HAS_GPU else ''})")
assert err < 1e-5

# %% [markdown]
# **Tile skipping.** A tile of (query block × key block) that the mask forbids entirely is never loaded. With
# a causal mask about half the tiles go; a sliding window removes everything left of the band, so the work per
# query stops growing with the sequence. The picture below is computed from the one mask builder,
# `attention_mask`, for a 2,048-token prompt with Mistral-7B-v0.1's 4096-key window scaled down to 512 and
# 64 × 64 tiles.

# %%
def tiles_visited(T, window, block=64):
    p = torch.arange(T)[None]
    allowed = attention_mask(p, p, window)[0]  # (T, T)
    n = T // block
    return allowed.reshape(n, block, n, block).any(dim=(1, 3))  # (query blocks, key blocks)


fig, axes = plt.subplots(1, 2, figsize=(8, 3.8))
for ax, window in zip(axes, (None, 512)):
    visited = tiles_visited(2048, window)
    ax.imshow(visited, cmap="Oranges")
    ax.set_title(f"window {window}: {visited.float().mean():.0%} of tiles computed", fontsize=10)
    ax.set_xlabel("key block")
    ax.set_ylabel("query block")
plt.show()

# %% [markdown]
# ## 2. Split-K decode attention, and the merge rule behind it
#
# At decode time there is one query per sequence and a long KV cache: too little parallel work if one program
# walks the whole cache. `decode_attention` cuts the cache into chunks, computes a partial softmax per chunk —
# `(m, l, acc)`: chunk maximum, sum of `exp(s − m)`, unnormalised output — and merges the partials with the
# rescaling rule of the online softmax. The rule is easy to check in plain PyTorch:

# %%
scores, values = torch.randn(100), torch.randn(100, 4)
parts = []
for chunk in torch.arange(100).chunk(3):
    s = scores[chunk]
    m = s.max()
    parts.append((m, torch.exp(s - m).sum(), torch.exp(s - m) @ values[chunk]))
m_all = max(m for m, _, _ in parts)
l_all = sum(torch.exp(m - m_all) * l for m, l, _ in parts)
merged = sum(torch.exp(m - m_all) * acc for m, _, acc in parts) / l_all
assert torch.allclose(merged, torch.softmax(scores, 0) @ values, atol=1e-6)

# One new token per sequence over a cache of 96 slots; row 1 holds only 50 positions (-1 = empty slot).
S = 96
qd = torch.randn(B, 1, H, D, device=device)
kd, vd = torch.randn(B, S, H_kv, D, device=device), torch.randn(B, S, H_kv, D, device=device)
k_pos = torch.arange(S, device=device).repeat(B, 1)
k_pos[1, 50:] = -1
q_pos = torch.tensor([[S - 1], [49]], device=device)
for splits in (1, 2, 3):
    out = tk.decode_attention(qd, kd, vd, q_pos, k_pos, W, num_splits=splits, block_n=16)
    err = (out - attention(qd, kd, vd, q_pos, k_pos, W)).abs().max().item()
    print(f"decode_attention, {splits} split(s): max |error| = {err:.1e}")
    assert err < 1e-5

# %% [markdown]
# ## 3. MoE: sorted dispatch and grouped GEMMs
#
# The reference loops over experts and gathers each expert's tokens. The kernel instead (like vLLM's fused MoE)
# lists the N × top_k *slots* (token, choice), **sorts them by expert**, pads each expert's run to a multiple of
# the tile height `block_m`, and launches one grid in which every tile belongs to a single expert — so a tile is
# a plain matrix multiply with that expert's weights. `moe_align_block_size` does the sorting:

# %%
N, dim, hidden, E, top_k, block_m = 40, 32, 48, 8, 2, 16
x = torch.randn(N, dim, device=device)
gate = torch.randn(E, dim, device=device)
w1 = torch.randn(E, hidden, dim, device=device) * dim**-0.5
w3 = torch.randn(E, hidden, dim, device=device) * dim**-0.5
w2 = torch.randn(E, dim, hidden, device=device) * hidden**-0.5
_, experts, _ = route(x, gate, top_k)  # (N, 2)
sorted_slots, block_expert = tk.moe_align_block_size(experts, E, block_m)
used = int((block_expert >= 0).sum())
slots = sorted_slots[: used * block_m].reshape(used, block_m).cpu()
padding = slots == N * top_k  # the sentinel slot id
print("slots per expert:", torch.bincount(experts.flatten(), minlength=E).tolist())
print(f"{used} tiles of {block_m} rows; experts of the tiles: {block_expert[:used].tolist()}; "
      f"{int(padding.sum())} padding rows")

fig, ax = plt.subplots(figsize=(9, 4.6))
grid = torch.where(padding, torch.tensor(-1), block_expert[:used, None].cpu().expand(-1, block_m))
ax.imshow(grid.T, cmap="tab10", vmin=-1, vmax=9, aspect="auto")
for t in range(used):
    for r in range(block_m):
        label = "pad" if padding[t, r] else f"{int(slots[t, r]) // top_k}"
        ax.text(t, r, label, ha="center", va="center", fontsize=7)
ax.set_xticks(range(used))
ax.set_xticklabels([f"{t}\nexpert {int(block_expert[t])}" for t in range(used)], fontsize=8)
ax.set_yticks(range(block_m))
ax.tick_params(axis="y", labelsize=7)
ax.set_xlabel("tile (one expert each)")
ax.set_ylabel("row in tile")
ax.set_title("slots sorted by expert (number = token index; colour = expert; pad = padding row)", fontsize=10)
plt.show()

out, logits = tk.moe_forward(x, gate, w1, w2, w3, top_k, block_m=16, block_n=16, block_k=16)
ref, ref_logits = moe_forward(x, gate, w1, w2, w3, top_k)
err = (out - ref).abs().max().item()
print(f"moe_forward (Triton) vs reference: max |error| = {err:.1e}; router logits identical: "
      f"{torch.equal(logits, ref_logits)}")
assert err < 1e-4

# %% [markdown]
# ## 4. The whole model on the kernels
#
# `Transformer.set_backend("triton")` swaps the functions every block computes with (the backend registry of
# `mistral_ref.backends`; `triton_kernels` registered itself when imported). A tiny
# Mixtral (GQA, sliding window shorter than the prompt, 4 experts, top-2) gives the same logits either way:

# %%
args = ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=128,
                 sliding_window=12, moe=MoeArgs(4, 2))
model = Transformer(args).to(device).eval()
tokens = torch.randint(0, 128, (1, 24), device=device)
with torch.no_grad():
    reference = model.set_backend("reference")(tokens)
    kernels = model.set_backend("triton")(tokens)
model.set_backend("torch")
rel = ((kernels - reference).abs().max() / reference.abs().max()).item()
print(f"logits, Triton backends vs reference: relative error {rel:.1e}")
assert rel < 1e-5

# %% [markdown]
# ## 5. Benchmarks (GPU only)
#
# `python -m triton_kernels.bench` times the PyTorch reference, `torch.nn.functional.scaled_dot_product_attention`
# and the Triton kernels at the real shapes of Mistral-7B, Mixtral and Nemo, and reports TFLOP/s, GB/s and the
# fraction of the device's roofline. Below: its quick subset, as a table and its plot. Without a GPU there is
# nothing meaningful to time — interpreter timings say nothing about a GPU — so the cell says so and skips.

# %%
if HAS_GPU:
    import tempfile
    from pathlib import Path

    from IPython.display import Image, display

    name = torch.cuda.get_device_name()
    peaks = bench.device_peaks(name)
    print(f"{name}: peaks {peaks[0]} TFLOP/s, {peaks[1]} GB/s")
    print(bench._header())
    rows = bench.gpu_benchmarks(torch.bfloat16, quick=True, peaks=peaks)
    png = Path(tempfile.mkdtemp()) / "kernels.png"
    if bench.write_plot(rows, png):
        display(Image(filename=str(png)))
else:
    print("No CUDA GPU here: skipping the timings (run this notebook on a GPU machine, or "
          "`python -m triton_kernels.bench` there). The sections above checked the kernels' results under the "
          "interpreter; the roofline below needs no GPU.")

# %% [markdown]
# ## 6. The roofline model, on paper: why decode is memory-bound and prefill is not
#
# A kernel's speed is bounded by `min(peak FLOP/s, arithmetic intensity × memory bandwidth)`, where the
# **arithmetic intensity** is FLOPs per byte moved. We compute it for Mistral-7B in bf16:
#
# * **matmuls**: 2 FLOPs per weight per token (every weight except the embedding table, which is a lookup);
#   the weights (2 bytes each) are read once per forward pass *whatever the number of tokens in it*.
# * **attention**: FLOPs and bytes from `triton_kernels.bench.attention_work` (4·head_dim FLOPs per head and
#   visible query-key pair; q, o, k and v read or written once), per layer.
#
# Decoding one token per sequence reads all 14.5 GB of weights to do 2 FLOPs per weight per sequence: the
# intensity is about the batch size. Prefill processes T tokens per weight read: intensity grows with T.

# %%
a = PRESETS["mistral-7b-v0.1"]
P = parameter_counts(a)["total"]
P_matmul = P - a.vocab_size * a.dim  # the embedding table is a lookup, not a matmul
elt = 2  # bf16


def work(batch, new_tokens, context):
    """(FLOPs, bytes) of one forward pass of `batch` sequences, `new_tokens` each, attending to `context`."""
    flops = 2 * P_matmul * batch * new_tokens
    nbytes = elt * P  # weights, read once
    attn_flops, attn_bytes = bench.attention_work(batch, new_tokens, context, a.n_heads, a.n_kv_heads,
                                                   a.head_dim, a.sliding_window, elt)
    return flops + a.n_layers * attn_flops, nbytes + a.n_layers * attn_bytes


cases = {f"decode B={b}": work(b, 1, 4096) for b in (1, 8, 64)}
cases |= {f"prefill T={t}": work(1, t, t) for t in (128, 512, 4096)}
for name, (f, n) in cases.items():
    print(f"{name:15} {f / 1e9:10.1f} GFLOP {n / 1e9:7.2f} GB   intensity {f / n:8.1f} FLOP/byte")

# %% [markdown]
# Two machines to hold these against: a nominal **A100** (312 TFLOP/s dense bf16, 2,039 GB/s — the datasheet
# numbers in `bench.DEVICE_PEAKS`), and **this CPU**, measured right now with an fp32 matrix multiply (peak
# FLOP/s) and a large copy (bandwidth). The machine may be shared, so its numbers are rough.

# %%
def measure_cpu():
    n = 1024
    m1, m2 = torch.randn(n, n), torch.randn(n, n)
    m1 @ m2
    t0, reps = time.perf_counter(), 10
    for _ in range(reps):
        m1 @ m2
    flops = 2 * n**3 * reps / (time.perf_counter() - t0)
    big = torch.empty(64 * 2**20 // 4)  # 64 MiB, beyond the caches
    dst = torch.empty_like(big)
    dst.copy_(big)
    t0, reps = time.perf_counter(), 5
    for _ in range(reps):
        dst.copy_(big)
    bandwidth = 2 * big.nbytes * reps / (time.perf_counter() - t0)  # read + write
    return flops, bandwidth


cpu_flops, cpu_bw = measure_cpu()
gpu_flops, gpu_bw = 312e12, 2039e9
print(f"this CPU: {cpu_flops / 1e9:.0f} GFLOP/s (fp32 matmul, {torch.get_num_threads()} threads), "
      f"{cpu_bw / 1e9:.1f} GB/s (copy)")
print(f"ridge point (intensity where compute becomes the limit): A100 {gpu_flops / gpu_bw:.0f} FLOP/byte, "
      f"this CPU {cpu_flops / cpu_bw:.1f} FLOP/byte")

intensity = torch.logspace(-1, 4, 200)
fig, ax = plt.subplots(figsize=(9, 4.2))
for label, peak, bw, color in (("A100 (nominal)", gpu_flops, gpu_bw, "tab:green"),
                               ("this CPU (measured)", cpu_flops, cpu_bw, "tab:purple")):
    ax.loglog(intensity, torch.minimum(torch.tensor(peak), intensity * bw), color=color, label=label)
for i, (name, (f, n)) in enumerate(cases.items()):
    ai = f / n
    for peak, bw, color in ((gpu_flops, gpu_bw, "tab:green"), (cpu_flops, cpu_bw, "tab:purple")):
        ax.plot(ai, min(peak, ai * bw), "o", color=color, ms=5)
    ax.annotate(name, (ai, min(gpu_flops, ai * gpu_bw)), textcoords="offset points", fontsize=8,
                xytext=(6, -14) if i % 2 else (-6, 8), ha="left" if i % 2 else "right")
ax.set_xlabel("arithmetic intensity (FLOP / byte)")
ax.set_ylabel("attainable FLOP/s")
ax.set_title("roofline: Mistral-7B forward passes in bf16")
ax.legend(loc="lower right")
plt.show()

# %% [markdown]
# What the roofline predicts for one forward pass (time = max(FLOPs / peak, bytes / bandwidth)):

# %%
print(f"{'':15} {'A100 ms':>9} {'bound':>8} {'tokens/s':>10} | {'CPU ms':>9} {'bound':>8} {'tokens/s':>9}")
for name, (f, n) in cases.items():
    tokens = int(name.split("=")[1])
    line = f"{name:15}"
    for peak, bw in ((gpu_flops, gpu_bw), (cpu_flops, cpu_bw)):
        t_c, t_m = f / peak, n / bw
        t = max(t_c, t_m)
        rate = f"{tokens / t:,.0f}" if tokens / t >= 10 else f"{tokens / t:.2f}"
        line += f" {t * 1e3:9.1f} {'compute' if t_c > t_m else 'memory':>8} {rate:>10} |"
    print(line.rstrip("|"))
decode1 = cases["decode B=1"]
assert decode1[0] / decode1[1] < 2 < gpu_flops / gpu_bw  # decode at batch 1 is memory-bound
assert cases["prefill T=4096"][0] / cases["prefill T=4096"][1] > gpu_flops / gpu_bw  # long prefill is not

# %% [markdown]
# Reading it: at batch 1 a decode step is pure weight streaming — about 7 ms per token on an A100 whatever its
# FLOP/s, which is why batching (more sequences per weight read), GQA (smaller KV reads), quantisation (fewer
# bytes per weight) and speculative decoding (more tokens per weight read) are the levers for decoding speed,
# while prefill is limited by raw compute and is where flash attention's FLOP efficiency matters.
