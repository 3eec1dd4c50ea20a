# Source of notebooks/01_architecture.ipynb (build with: .venv/bin/python notebooks/build.py)

# %% [markdown]
# # 01 · The Mistral architecture from first principles
#
# A Mistral model is a stack of pre-norm transformer blocks. Each block is
# `h = x + attention(RMSNorm(x))`, then `out = h + feed_forward(RMSNorm(h))`, where attention uses
# **rotary position embeddings**, **grouped-query attention** and (Mistral-7B-v0.1) a **sliding window**, and the
# feed-forward is a **SwiGLU** MLP, or, in Mixtral, a **sparse mixture of eight SwiGLU experts** of which each
# token visits two.
#
# This notebook takes those pieces one at a time and runs them. Every function used here is imported from
# `mistral_ref`, the code you would read next: `rope.py` → `attention.py` → `moe.py` → `model.py` →
# `config.py`. Section 7 counts the parameters of every model in the family without allocating any memory and
# checks them against the published totals; section 8 derives what latent attention (Mistral Small 4, Large 3)
# saves in the KV cache and shows its absorbed decode equals the plain one.

# %%
import dataclasses
import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from mistral_ref.attention import attention, attention_mask, llama4_query_scale
from mistral_ref.backends import get_backend
from mistral_ref.backends.mla import absorbed_latent_attention
from mistral_ref.cache import KVCache
from mistral_ref.checkpoint import permute_to_hf, permute_to_native
from mistral_ref.config import FineMoeArgs, MlaArgs, ModelArgs, MoeArgs
from mistral_ref.family import PRESETS, family_table, kv_cache_bytes, parameter_counts
from mistral_ref.mla import latent_attention
from mistral_ref.model import RMSNorm, Transformer, meta_model
from mistral_ref.moe import FeedForward, MoeLayer, load_balancing_loss, moe_forward, route
from mistral_ref.rope import (
    apply_rotary_emb,
    apply_rotary_emb_half,
    rope_angles,
    rope_frequencies,
    yarn_correction_range,
    yarn_frequencies,
)

torch.manual_seed(0)
# constrained layout: labels, titles and colour bars are never clipped, whatever saves or shows the figure
plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (9, 3.2), "figure.constrained_layout.use": True})

# %% [markdown]
# ## 1. Rotary position embeddings (RoPE)
#
# RoPE encodes a token's position by **rotating** its query and key vectors. A head vector of width `head_dim`
# is read as `head_dim/2` two-dimensional pairs; pair `i` turns by the angle `position × θ^(-2i/head_dim)`.
# Low pairs spin fast (they resolve nearby positions), high pairs turn slowly (they tell far positions apart).
# The base θ sets how slow the slowest pair is: Mistral-7B-v0.1 uses θ = 10⁴, later models 10⁶ (Mistral Small
# 2501: 10⁸), which stretches the longest wavelength far beyond the context length.

# %%
head_dim = 128
fig, ax = plt.subplots()
for theta in (1e4, 1e6, 1e8):
    freqs = rope_frequencies(head_dim, theta)  # (64,) radians per position
    ax.semilogy(2 * math.pi / freqs, label=f"θ = {theta:.0e}")
for ctx, name in ((4096, "4k"), (32768, "32k"), (131072, "128k")):
    ax.axhline(ctx, color="grey", lw=0.6, ls="--")
    ax.text(1, ctx * 1.3, f"{name} tokens", fontsize=8, color="grey")
ax.set_xlabel("pair index i (head_dim = 128)")
ax.set_ylabel("wavelength 2π/ω_i (tokens)")
ax.set_title("RoPE: each pair rotates with its own frequency")
ax.legend()
plt.show()

# %% [markdown]
# Why rotations? Rotating q by angle `mα` and k by `nα` leaves their dot product depending only on `m − n`:
# attention scores become functions of **relative** position. We check that numerically: the score of a query at
# position m and a key at position n equals the score at (m + 1000, n + 1000).

# %%
q, k = torch.randn(1, 1, 1, head_dim), torch.randn(1, 1, 1, head_dim)  # (B, T, heads, head_dim)


def rotated(x, position, theta=1e6):
    cos, sin = rope_angles(torch.tensor([[position]]), head_dim, theta)  # (1, 1, head_dim/2)
    return apply_rotary_emb(x, cos, sin)


scores = {}
for m, n in ((7, 3), (1007, 1003), (20007, 20003), (20003, 20007)):
    scores[m, n] = (rotated(q, m) * rotated(k, n)).sum().item()
    print(f"query at {m:>5}, key at {n:>5} (m − n = {m - n:+d}): q·k = {scores[m, n]:+.6f}")
# Equal for equal m − n, up to the fp32 rounding of large angles (why angles are computed in fp32, never bf16);
# a different offset gives a different score.
assert abs(scores[20007, 20003] - scores[7, 3]) < 1e-3 * abs(scores[7, 3])
assert abs(scores[20003, 20007] - scores[7, 3]) > 1e-2

# %% [markdown]
# ### Interleaved pairs vs. rotated halves
#
# The pairs can be laid out in two ways. **Native** Mistral checkpoints (and `mistral_ref.rope.apply_rotary_emb`)
# rotate *interleaved* features `(x[2i], x[2i+1])`. **Hugging Face** checkpoints rotate *halves*
# `(x[i], x[i + head_dim/2])` (`apply_rotary_emb_half`). Both are the same rotation applied to a different
# ordering of the features, so converting a checkpoint permutes the rows of `wq` and `wk`
# (`checkpoint.permute_to_hf` / `permute_to_native`) — never `wv`, which is not rotated.

# %%
d = 16
native_freq = [i // 2 for i in range(d)]  # feature 2i and 2i+1 rotate with frequency i
hf_freq = [i % (d // 2) for i in range(d)]  # feature i and i + d/2 rotate with frequency i
fig, axes = plt.subplots(1, 2, figsize=(9, 2.4))
for ax, freq, title in ((axes[0], native_freq, "native: interleaved pairs (2i, 2i+1)"),
                        (axes[1], hf_freq, "Hugging Face: halves (i, i + d/2)")):
    ax.imshow([freq], cmap="tab10", vmin=0, vmax=9, aspect="auto")
    for i in range(d):
        ax.text(i, 0, f"x{i}\nω{freq[i]}", ha="center", va="center", fontsize=7)
    ax.set_yticks([])
    ax.set_xticks([])
    ax.set_title(title, fontsize=10)
fig.supxlabel("features of one head (head_dim 16); same colour = same pair, rotated by the same frequency ω",
              fontsize=9)
plt.show()

# The permutation of checkpoint.py makes the two layouts agree: permute the features of x (viewed as rows),
# rotate halves, and you get the permuted interleaved rotation.
n_heads, T = 2, 5
x = torch.randn(1, T, n_heads, d)
cos, sin = rope_angles(torch.arange(T)[None], d, 1e4)
as_rows = x.reshape(T, n_heads * d).T  # (n_heads*d, T): each head's features are "rows", like wq's
x_hf = permute_to_hf(as_rows, n_heads, d).T.reshape(1, T, n_heads, d)
native_then_permuted = permute_to_hf(apply_rotary_emb(x, cos, sin).reshape(T, -1).T, n_heads, d)
hf_rotation = apply_rotary_emb_half(x_hf, cos, sin).reshape(T, -1).T
print("max |difference|:", (native_then_permuted - hf_rotation).abs().max().item())
assert torch.allclose(native_then_permuted, hf_rotation, atol=1e-6)
assert torch.equal(permute_to_native(permute_to_hf(as_rows, n_heads, d), n_heads, d), as_rows)

# %% [markdown]
# ## 2. Grouped-query attention (GQA)
#
# With multi-head attention every query head has its own key and value head, and the KV cache stores all of
# them for every past token. GQA lets a *group* of query heads share one key-value head: Mistral-7B has 32
# query heads and 8 KV heads, so the cache is 4× smaller. The reference `attention()` simply repeats each KV
# head for its group — the result equals multi-head attention with the repeated keys and values:

# %%
B, T, H, H_kv, D = 1, 6, 8, 2, 16
q = torch.randn(B, T, H, D)
k, v = torch.randn(B, T, H_kv, D), torch.randn(B, T, H_kv, D)
pos = torch.arange(T)[None]
gqa = attention(q, k, v, pos, pos, window=None)
mha = attention(q, k.repeat_interleave(H // H_kv, dim=2), v.repeat_interleave(H // H_kv, dim=2), pos, pos, None)
assert torch.allclose(gqa, mha)
print("query head -> kv head:", [h // (H // H_kv) for h in range(H)])

# %% [markdown]
# What it saves: the KV cache of one 32k-token sequence in bf16, for every model of the family, measured by
# allocating `mistral_ref.cache.KVCache` on the **meta** device (shapes only, no memory). "MHA" is the same
# model with as many KV heads as query heads. Mistral-7B-v0.1 also has a 4096-token sliding window, so its
# cache is a rolling buffer of 4096 slots per layer whatever the length (section 3).

# %%
def kv_cache_gib(args, seq_len=32768):
    cache = KVCache(args, batch_size=1, max_seq_len=seq_len, dtype=torch.bfloat16, device="meta")
    return cache.nbytes() / 2**30


rows = []
for name, args in PRESETS.items():
    full = dataclasses.replace(args, sliding_window=None)
    mha = dataclasses.replace(full, n_kv_heads=args.n_heads)
    rows.append((name, args.n_heads, args.n_kv_heads, kv_cache_gib(mha), kv_cache_gib(full), kv_cache_gib(args)))
print(f"{'model':22} {'heads':>5} {'kv':>3} {'MHA GiB':>8} {'GQA GiB':>8} {'+window':>8}")
for r in rows:
    print(f"{r[0]:22} {r[1]:5} {r[2]:3} {r[3]:8.1f} {r[4]:8.1f} {r[5]:8.1f}")

fig, ax = plt.subplots(figsize=(9, 3.4))
xs = range(len(rows))
ax.bar([i - 0.27 for i in xs], [r[3] for r in rows], 0.27, label="multi-head (n_kv_heads = n_heads)")
ax.bar(xs, [r[4] for r in rows], 0.27, label="grouped-query (the real models)")
ax.bar([i + 0.27 for i in xs], [r[5] for r in rows], 0.27, label="GQA + sliding window")
ax.set_xticks(list(xs))
ax.set_xticklabels([r[0] for r in rows], rotation=30, ha="right", fontsize=8)
ax.set_ylabel("KV cache, 32k tokens, bf16 (GiB)")
ax.legend(fontsize=8)
plt.show()
mistral7b = next(r for r in rows if r[0] == "mistral-7b-v0.1")
assert mistral7b[3] / mistral7b[4] == 4 and mistral7b[4] / mistral7b[5] == 8

# %% [markdown]
# ## 3. Sliding-window attention, and how information travels beyond the window
#
# With a window of W keys, the query at position p sees positions p−W+1 … p (itself included). All masking in
# `mistral_ref` comes from one function, `attention_mask(q_pos, k_pos, window)`:

# %%
T, W = 16, 5
pos = torch.arange(T)[None]
fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
for ax, w, title in ((axes[0], None, "causal"), (axes[1], W, f"causal + sliding window W={W}")):
    ax.imshow(attention_mask(pos, pos, w)[0], cmap="Blues")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
plt.show()

# %% [markdown]
# A token never *directly* sees more than W positions back, yet the model does use older context: layer 1 at
# position p mixes positions p−W+1 … p, each of which already mixed its own W predecessors in layer 0. After L
# layers, information can flow from up to L·(W−1) positions back (the Mistral 7B paper: 32 layers × 4096 ≈ 131k
# tokens).
#
# We measure this on real models rather than argue it: build `Transformer`s with W = 4 and 1…5 layers, and ask
# autograd which input positions the last position's logits depend on (non-zero gradient with respect to the
# token embeddings).

# %%
T, W = 40, 4
reach = []
for n_layers in range(1, 6):
    torch.manual_seed(n_layers)
    args = ModelArgs(dim=32, n_layers=n_layers, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=64,
                     sliding_window=W)
    model = Transformer(args)
    embeddings = []
    handle = model.tok_embeddings.register_forward_hook(lambda mod, inp, out, store=embeddings: store.append(out))
    logits = model(torch.randint(0, 64, (1, T)))
    handle.remove()
    (grad,) = torch.autograd.grad(logits[0, -1].sum(), embeddings[0])  # (1, T, dim)
    influence = grad[0].abs().sum(-1)  # (T,)
    reach.append((influence > 0).float())
    first = int((influence > 0).nonzero().min())
    print(f"{n_layers} layer(s): position {T - 1} depends on positions {first} .. {T - 1} "
          f"({T - first} tokens; theory L·(W−1)+1 = {n_layers * (W - 1) + 1})")
    assert T - first == n_layers * (W - 1) + 1

fig, ax = plt.subplots(figsize=(9, 2.4))
ax.imshow(torch.stack(reach), cmap="Greens", aspect="auto", extent=(-0.5, T - 0.5, 5.5, 0.5))
ax.set_xlabel("input position")
ax.set_ylabel("layers")
ax.set_title(f"receptive field of position {T - 1} with a window of W={W} keys (green: gradient ≠ 0)")
plt.show()

# %% [markdown]
# ### Interleaved windows (Ministral 8B)
#
# Ministral 8B mixes the two: its 36 layers repeat the pattern *one full-attention layer, then three layers with a
# 32k window* (`params.json` lists one window per layer of the pattern, `null` for full; Hugging Face writes
# `sliding_window` plus `layer_types`). The full layers keep the whole context reachable in one hop; the window
# layers keep the cache small: a window layer's cache is a rolling buffer of W slots, a full layer's grows with
# the context (`cache.layer_capacity`).

# %%
ministral = PRESETS["ministral-8b-2410"]
print("windows of the first 8 layers:", [ministral.window_for_layer(i) for i in range(8)])
contexts = [2**k for k in range(10, 18)]  # 1k .. 128k
fig, ax = plt.subplots()
for label, args in (("every layer full", dataclasses.replace(ministral, sliding_window=None)),
                    ("Ministral 8B: 1 full : 3 windowed (32k)", ministral),
                    ("every layer windowed (32k)", dataclasses.replace(ministral, sliding_window=32768))):
    ax.plot(contexts, [kv_cache_bytes(args, c) / 2**30 for c in contexts], "o-", label=label)
ax.set_xscale("log", base=2)
ax.set_xlabel("context (tokens)")
ax.set_ylabel("KV cache, bf16, batch 1 (GiB)")
ax.set_title("interleaved windows: the cache grows with the context only on the full layers")
ax.legend(fontsize=8)
plt.show()
# at 128k: 9 full layers x 131072 slots + 27 window layers x 32768 slots, against 36 x 131072
assert kv_cache_bytes(ministral, 131072) * 36 == kv_cache_bytes(dataclasses.replace(ministral, sliding_window=None),
                                                                  131072) * (9 + 27 / 4)

# %% [markdown]
# ## 3b. Longer contexts: YaRN and the query scaling (Ministral 3)
#
# Ministral 3 was trained with RoPE on 16k positions and serves 256k. Positions beyond 16k would turn the slow pairs
# to angles never seen in training. **YaRN** (Peng et al. 2023) changes the frequencies once, per pair:
# a pair that turns many times within the original context (more than `beta_fast` = 32 turns) already saw every
# angle and keeps its frequency; a pair that turns less than `beta_slow` = 1 time is slowed down `factor` = 16
# times, so 256k positions look like the 16k it knows; the pairs between blend linearly (`rope.yarn_frequencies`).
# YaRN may also multiply cos and sin by 0.1·ln(factor) + 1 (Ministral 3 does not: `YarnArgs.attention_scaling`
# is 1).

# %%
m3 = PRESETS["ministral-3-8b-2512"]
plain = rope_frequencies(m3.head_dim, m3.rope_theta)
yarn = yarn_frequencies(m3.head_dim, m3.rope_theta, m3.yarn)
low, high = yarn_correction_range(m3.head_dim, m3.rope_theta, m3.yarn)
fig, ax = plt.subplots()
ax.semilogy(2 * math.pi / plain, label="RoPE, θ = 1e6")
ax.semilogy(2 * math.pi / (plain / m3.yarn.factor), ":", label="every pair slowed down 16x (position interpolation)")
ax.semilogy(2 * math.pi / yarn, "--", label="YaRN 16x over 16k")
ax.axvspan(low, high, color="grey", alpha=0.15, label=f"blend: pairs {low} .. {high}")
for ctx, name in ((16384, "16k: trained"), (262144, "256k: served")):
    ax.axhline(ctx, color="grey", lw=0.6, ls="--")
    ax.text(1, ctx * 1.3, name, fontsize=8, color="grey")
ax.set_xlabel("pair index i (head_dim = 128)")
ax.set_ylabel("wavelength 2π/ω_i (tokens)")
ax.set_title("YaRN keeps the fast pairs and stretches the slow ones")
ax.legend(fontsize=8)
plt.show()
assert torch.equal(yarn[:low + 1], plain[:low + 1])  # fast pairs: unchanged
assert torch.allclose(yarn[high:], plain[high:] / 16)  # slow pairs: 16x slower

# %% [markdown]
# Ministral 3 also multiplies each **query** (not key) by `1 + β·ln(1 + ⌊p / 16384⌋)` with β = 0.1 (the
# "llama 4 scaling", `attention.llama4_query_scale`): 1 inside the trained 16k, then a slowly growing factor that
# sharpens the softmax where many more keys compete. It is plain arithmetic on q before the attention function,
# which is why no attention kernel needs to know about it.

# %%
positions = torch.arange(0, 262144, 256)[None]
scale = llama4_query_scale(positions, m3.llama_4_scaling)[0]
fig, ax = plt.subplots(figsize=(9, 2.6))
ax.plot(positions[0] / 1024, scale)
ax.set_xlabel("query position (k tokens)")
ax.set_ylabel("query scale")
ax.set_title("the query scaling: a step every 16k positions")
plt.show()
assert scale[0] == 1 and abs(scale[-1] - (1 + 0.1 * math.log(16))) < 1e-6

# %% [markdown]
# ## 4. RMSNorm
#
# Mistral normalises with RMSNorm: `x / sqrt(mean(x²) + ε) · weight` — no mean subtraction and no bias
# (cheaper than LayerNorm, and it works as well). It is computed in fp32 and cast back before the weight
# multiplies. Two properties to see: the output has unit root-mean-square, and scaling the input does not
# change the output.

# %%
ops = get_backend("reference")  # the layers compute through a backend's functions: here the plain ones
norm = RMSNorm(8, eps=1e-5)
x = torch.randn(3, 8) * 5 + 2
y = norm(x, ops)
print("rms of the output rows:", y.pow(2).mean(-1).sqrt())
assert torch.allclose(norm(10 * x, ops), y, atol=1e-5)
print("RMSNorm keeps the mean (LayerNorm would remove it):", y.mean(-1))
print("LayerNorm of the same rows has mean:", F.layer_norm(x, (8,)).mean(-1))

# %% [markdown]
# ## 5. SwiGLU feed-forward
#
# The dense feed-forward is `w2( silu(w1 x) ⊙ w3 x )`: a SiLU-*gated* linear unit (Shazeer 2020). `w1` is the
# gate, `w3` the up-projection, `w2` the down-projection. With three matrices instead of two, the hidden width
# is about 3.5 × dim (14336 for dim 4096) to keep the parameter budget of a 4 × dim two-matrix MLP.

# %%
z = torch.linspace(-5, 5, 200)
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
axes[0].plot(z, F.silu(z), label="silu(z) = z·σ(z)")
axes[0].plot(z, F.relu(z), "--", label="relu(z)")
axes[0].legend()
axes[0].set_title("the activation")
ff = FeedForward(dim=1, hidden_dim=1)
with torch.no_grad():
    ff.w1.weight.fill_(1.0)
    ff.w2.weight.fill_(1.0)
    for gain in (0.5, 1.0, 2.0):
        ff.w3.weight.fill_(gain)
        axes[1].plot(z, ff(z[:, None], ops)[:, 0], label=f"w3 = {gain}")
axes[1].set_title("a one-unit SwiGLU: silu(w1·z)·(w3·z)")
axes[1].legend()
plt.show()

# %% [markdown]
# ## 6. The sparse mixture of experts (Mixtral)
#
# Mixtral replaces the feed-forward with 8 SwiGLU experts and a router (`gate`, a linear map dim → 8). For each
# token the router scores the experts; the token visits the **top 2**, and their outputs are mixed with weights
# `softmax` over those two scores (`moe.route`). Only 2 of 8 experts run per token: Mixtral-8x7B holds 46.7B
# parameters but uses about 12.9B per token.
#
# Below, a random `MoeLayer` routes 2,048 tokens: the router probabilities of the first tokens, and how many
# tokens each expert receives.

# %%
torch.manual_seed(0)
moe_args = ModelArgs(dim=64, n_layers=1, hidden_dim=96, n_heads=4, vocab_size=32, moe=MoeArgs(8, 2))
layer = MoeLayer(moe_args)
tokens = torch.randn(2048, 64)
weights, experts, logits = route(tokens, layer.gate.weight, top_k=2)  # (N, 2), (N, 2), (N, 8)
probs = logits.softmax(-1)

# The mixture computed "densely": every expert on every token, weighted by the routing weights (0 for the
# experts a token does not visit) — equal to the sparse moe_forward, which only runs the chosen experts.
dense = torch.zeros_like(tokens)
for e, expert in enumerate(layer.experts):
    w_e = (weights * (experts == e)).sum(-1, keepdim=True)  # (N, 1)
    dense += w_e * expert(tokens, ops)
sparse, _ = moe_forward(tokens, layer.gate.weight, [e.w1.weight for e in layer.experts],
                        [e.w2.weight for e in layer.experts], [e.w3.weight for e in layer.experts], top_k=2)
assert torch.allclose(sparse, dense, atol=1e-5)

load = torch.bincount(experts.flatten(), minlength=8) / experts.numel()
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), gridspec_kw={"width_ratios": [1.4, 1]})
im = axes[0].imshow(probs[:32].T.detach(), aspect="auto", cmap="viridis")
for n in range(32):
    for e in experts[n].tolist():
        axes[0].plot(n, e, "w.", ms=4)
axes[0].set_xlabel("token")
axes[0].set_ylabel("expert")
axes[0].set_yticks(range(8))
axes[0].set_title("router probabilities (dots: the 2 chosen experts)", fontsize=10)
fig.colorbar(im, ax=axes[0])
axes[1].bar(range(8), load.tolist())
axes[1].axhline(1 / 8, color="k", ls="--", lw=0.8, label="perfect balance")
axes[1].set_xticks(range(8))
axes[1].set_xlabel("expert")
axes[1].set_ylabel("share of routed slots")
axes[1].set_title("expert load", fontsize=10)
axes[1].legend(fontsize=8)
plt.show()

# %% [markdown]
# Nothing forces a router to spread tokens: a trained router could send everything to a few experts, wasting
# the rest. Training adds the Switch-Transformer **load-balancing loss**
# `E · Σₑ fₑ · Pₑ` (fraction of routed slots × mean router probability, per expert), which is `top_k` = 2 for a
# perfectly uniform router and grows as the load concentrates. We skew the router by adding a growing bias to
# expert 0's score and watch both the load and the loss (notebook 06 trains with this loss). Once every token
# already sends one of its two slots to expert 0 the load cannot grow further, but the loss keeps rising: its
# `Pₑ` term sees the router probability still piling onto expert 0.

# %%
biases = torch.linspace(0, 6, 13)
aux, share0 = [], []
for b in biases:
    skew = logits.clone()
    skew[:, 0] += b
    aux.append(load_balancing_loss([skew], num_experts=8, top_k=2).item())
    share0.append((skew.topk(2, -1).indices == 0).float().mean().item())
fig, ax = plt.subplots()
ax.plot(share0, aux, "o-")
ax.set_xlabel("share of routed slots that go to expert 0 (at most 1/2: a token picks 2 different experts)")
ax.set_ylabel("load-balancing loss")
ax.axhline(2, color="grey", ls="--", lw=0.8)
ax.set_title("the auxiliary loss grows as the load concentrates")
plt.show()
assert aux[-1] > aux[0]

# %% [markdown]
# ## 7. Parameter counts of the whole family
#
# `family.parameter_counts` computes the counts from the shapes alone (a formula: embeddings, then per layer the
# attention projections, two norms and the feed-forward or experts + router), so `mistral-ref info` needs no
# torch. Below it is checked against the real module tree built on PyTorch's **meta** device
# (`model.meta_model`: tensors with shapes but no storage, so even Mistral Large 2's 123B parameters cost no
# memory), broken down by part. *Active* parameters are those a token uses: the total minus the 6 experts (of 8)
# per layer a token does not visit. Then the check against Mistral's published numbers: Mixtral-8x7B has 46.7B
# parameters, 12.9B active; Mixtral-8x22B 141B, 39B active.

# %%
def breakdown(args):
    model = meta_model(args)
    parts = {"embeddings + output": 0, "attention": 0, "feed-forward / experts": 0, "router + norms": 0}
    for name, p in model.named_parameters():
        if name.startswith(("tok_embeddings", "output")):
            parts["embeddings + output"] += p.numel()
        elif ".attention." in name:
            parts["attention"] += p.numel()
        elif ".experts." in name or ".w1" in name or ".w2" in name or ".w3" in name:
            parts["feed-forward / experts"] += p.numel()
        else:
            parts["router + norms"] += p.numel()
    return parts


counts = {name: parameter_counts(args) for name, args in PRESETS.items()}
parts = {name: breakdown(args) for name, args in PRESETS.items()}
print(f"{'model':22} {'total':>8} {'active':>8} | {'embed+output':>12} {'attention':>9} {'FFN/experts':>11} "
      f"{'router+norms':>12}")
for name in PRESETS:
    c, p = counts[name], parts[name]
    assert sum(p.values()) == c["total"]
    print(f"{name:22} {c['total'] / 1e9:7.2f}B {c['active'] / 1e9:7.2f}B | {p['embeddings + output'] / 1e9:11.2f}B "
          f"{p['attention'] / 1e9:8.2f}B {p['feed-forward / experts'] / 1e9:10.2f}B "
          f"{p['router + norms'] / 1e6:11.2f}M")

assert round(counts["mixtral-8x7b"]["total"] / 1e9, 1) == 46.7
assert round(counts["mixtral-8x7b"]["active"] / 1e9, 1) == 12.9
assert round(counts["mixtral-8x22b"]["total"] / 1e9) == 141
assert round(counts["mixtral-8x22b"]["active"] / 1e9) == 39
assert round(counts["mistral-7b-v0.1"]["total"] / 1e9, 1) == 7.2
assert round(counts["mistral-nemo-12b"]["total"] / 1e9) == 12
assert round(counts["mistral-large-2407"]["total"] / 1e9) == 123
print("published totals reproduced: Mixtral-8x7B 46.7B / 12.9B active, Mixtral-8x22B 141B / 39B active")

# %%
names = list(PRESETS)
fig, ax = plt.subplots(figsize=(9, 3.6))
ax.bar(names, [counts[n]["total"] / 1e9 for n in names], label="total", color="lightsteelblue")
ax.bar(names, [counts[n]["active"] / 1e9 for n in names], width=0.5, label="active per token", color="navy")
for i, n in enumerate(names):
    ax.text(i, counts[n]["total"] / 1e9 + 2, f"{counts[n]['total'] / 1e9:.1f}", ha="center", fontsize=7)
ax.set_ylabel("parameters (billions)")
ax.set_xticks(range(len(names)))
ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
ax.set_title("the Mistral family: total vs active parameters")
ax.legend()
plt.show()

# %% [markdown]
# ## 8. Latent attention: what the cache saves, and the absorbed decode
#
# Mistral Small 4 and Mistral Large 3 replace grouped-query attention by **multi-head latent attention** (MLA,
# `mla.py`). A grouped-query layer caches, per token, a key and a value for each of its `n_kv_heads` heads:
# `2 × n_kv_heads × head_dim` numbers. A latent layer caches one compressed **latent** of `kv_lora_rank` numbers,
# from which `kv_b_proj` re-expands every head's un-rotated key and its value, plus ONE rotary key of
# `qk_rope_head_dim` numbers shared by all heads (rotation cannot pass through the re-expansion, so the rotated part
# travels beside the latent): `kv_lora_rank + qk_rope_head_dim` numbers. Per token over the whole model, in bf16
# (2 bytes a number):
#
# `bytes/token = n_layers × (kv_lora_rank + qk_rope_head_dim) × 2`  vs  `n_layers × 2 × n_kv_heads × head_dim × 2`
#
# Mistral Small 4: 36 layers × (256 + 64) × 2 = 23 040 bytes = 22.5 KiB per token. The same model with 8 kv heads
# of 128 would cache 36 × 2048 × 2 = 144 KiB (6.4×), with full keys and values of its 32 heads 576 KiB (25.6×).
# The formula below is the one `mistral-ref info` prints (`family.kv_cache_bytes`), checked against the table.

# %%
def latent_bytes_per_token(a, bytes_per_number=2):
    return a.n_layers * (a.mla.kv_lora_rank + a.mla.qk_rope_head_dim) * bytes_per_number


def gqa_bytes_per_token(a, n_kv_heads, head_dim, bytes_per_number=2):
    return a.n_layers * 2 * n_kv_heads * head_dim * bytes_per_number


small4 = PRESETS["mistral-small-4-2603"]
mla_b = latent_bytes_per_token(small4)
gqa8_b = gqa_bytes_per_token(small4, 8, 128)
full_b = gqa_bytes_per_token(small4, small4.n_heads, 128)
print(f"Mistral Small 4, per token: latent {mla_b} B = {mla_b / 1024:.1f} KiB; GQA with 8 kv heads "
      f"{gqa8_b / 1024:.0f} KiB ({gqa8_b / mla_b:.1f}x); full 32 heads {full_b / 1024:.0f} KiB ({full_b / mla_b:.1f}x)")
assert mla_b == 23040 == kv_cache_bytes(small4, 1)
assert (gqa8_b / mla_b, full_b / mla_b) == (6.4, 25.6)
row = next(line for line in family_table().splitlines() if line.startswith("| mistral-small-4-2603 |"))
assert "| 22.5 KiB | 5.6 GiB |" in row  # what `mistral-ref info` prints: per token, and at the 256k context
print(row)

large3 = PRESETS["mistral-large-3-2512"]
print(f"Mistral Large 3, per token: latent {latent_bytes_per_token(large3) / 1024:.1f} KiB "
      f"(61 layers x (512 + 64) x 2 B); 2 x 128 heads of 128 would cache "
      f"{gqa_bytes_per_token(large3, 128, 128) / 1024 / 1024:.1f} MiB")
assert latent_bytes_per_token(large3) == kv_cache_bytes(large3, 1)

# %%
per_token = {n: kv_cache_bytes(a, 1) / 1024 for n, a in PRESETS.items()}
fig, ax = plt.subplots(figsize=(9, 3.6))
ax.bar(list(per_token), list(per_token.values()),
       color=["darkorange" if PRESETS[n].mla else "steelblue" for n in per_token])
ax.set_yscale("log")
ax.set_ylabel("KV cache per token (KiB, bf16)")
ax.set_xticks(range(len(per_token)))
ax.set_xticklabels(list(per_token), rotation=30, ha="right", fontsize=8)
ax.set_title("cache per token: latent attention (orange) vs grouped-query attention (blue)")
plt.show()

# %% [markdown]
# Caching only the latent costs a re-expansion at every decode step: the plain path multiplies every cached latent
# by `kv_b_proj` (`H × (n + v) × c` multiply-adds per cached token) to get keys and values, then attends. The
# **absorbed** path (`backends/mla.py`) uses associativity instead: `q_nope · (W_UK c) = (W_UKᵀ q_nope) · c`, and
# `Σ p (W_UV c) = W_UV (Σ p c)`, so the query is moved into latent space once, scores are dot products with the
# cached latents, and the value projection is applied once to the weighted latent: `2 × H × c` per cached token.
# Same numbers, in another order. Below: a tiny Small-4-shaped model fills its latent cache with a prompt; with its
# layer-0 `kv_b_proj` and those cached latents, the absorbed attention equals the plain one
# (`mla.latent_attention`, which expands) to fp32 rounding.

# %%
tiny = dataclasses.replace(small4, dim=64, n_layers=2, hidden_dim=96, n_heads=4, n_kv_heads=4, head_dim=16,
                           vocab_size=100,
                           mla=MlaArgs(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                                       q_lora_rank=24, mscale_all_dim=1.0),
                           fine_moe=FineMoeArgs(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32))
torch.manual_seed(0)
tiny_model = Transformer(tiny).eval()
S = 12
cache = KVCache(tiny, batch_size=1, max_seq_len=S)
with torch.no_grad():
    tiny_model(torch.randint(0, 100, (1, S)), torch.arange(S)[None], cache=cache)
latents, k_rope = cache[0].latent[:, :, 0], cache[0].k_rope[:, :, 0]  # (1, S, 16), (1, S, 8)
attn0 = tiny_model.layers[0].attention
H, n, v = tiny.n_heads, tiny.mla.qk_nope_head_dim, tiny.mla.v_head_dim
q_nope, q_rope = torch.randn(1, 1, H, n), torch.randn(1, 1, H, tiny.mla.qk_rope_head_dim)  # one decode query
q_pos, k_pos = torch.tensor([[S]]), torch.arange(S)[None]
with torch.no_grad():
    # the reference expands every cached latent with kv_b_proj into per-head keys and values, then attends
    plain = latent_attention(q_nope, q_rope, latents, k_rope, attn0.kv_b_proj.weight, v, q_pos, k_pos, attn0.scale)
    absorbed = absorbed_latent_attention(q_nope, q_rope, latents, k_rope, attn0.kv_b_proj.weight, v, q_pos, k_pos,
                                         attn0.scale)
err = ((absorbed - plain).abs().max() / plain.abs().max()).item()
c = tiny.mla.kv_lora_rank
print(f"absorbed vs plain: max relative difference {err:.1e}; per cached token {H * (n + v) * c} multiply-adds "
      f"to expand vs {2 * H * c} in latent space")
assert plain.shape == absorbed.shape == (1, 1, H, v)
assert err < 1e-5
