"""The Mistral family: one preset per published model, parameter counts, and the table `mistral-ref info` prints.

The presets are `ModelArgs` with the published shapes (dim / layers / heads / kv heads / head_dim / hidden / vocab /
rope theta / window / experts / YaRN / tied embeddings), the tokenizer version and the trained context of each
model.  Parameter counts and KV-cache sizes are computed from those shapes with the formulas below, so this module
never imports torch or builds a model: `mistral-ref info` prints instantly.  tests/test_family.py checks the
parameter formula against the meta-device model (`mistral_ref.model.meta_model`) and the cache formula against
`mistral_ref.cache.cache_nbytes`, for every preset and for random shapes.  README ("The family") says which
numbers come from published files and which could not be checked.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mistral_ref.config import FineMoeArgs, Llama4Scaling, MlaArgs, ModelArgs, MoeArgs, YarnArgs

_MIXTRAL_MOE = MoeArgs(num_experts=8, num_experts_per_tok=2)
# Ministral 3: YaRN 16x over 16k (256k), no cos/sin magnitude change (HF mscale = mscale_all_dim = 1), and the
# query scaling with beta 0.1 over the same 16k (transformers' Ministral3Config defaults).
_MINISTRAL3_YARN = YarnArgs(factor=16.0, original_max_position_embeddings=16384, beta=32.0, alpha=1.0,
                            apply_scale=False)
_MINISTRAL3_QUERY = Llama4Scaling(original_max_position_embeddings=16384, beta=0.1)
# Devstral Small 2: YaRN over 8k to its config's max_position_embeddings of 393216 (48x); not verified (README).
_DEVSTRAL2_YARN = YarnArgs(factor=48.0, original_max_position_embeddings=8192, beta=32.0, alpha=1.0,
                           apply_scale=False)
_DEVSTRAL2_QUERY = Llama4Scaling(original_max_position_embeddings=8192, beta=0.1)


# Mistral Small 4 (119B, 6.5B active): transformers 5.23's Mistral4Config defaults, which are that model's shape
# (latent attention: q 1024, kv 256, 64 + 64 qk, 128 v; 128 experts of 2048 top-4 + 1 shared; YaRN 128x over 8k with
# the softmax-scale correction mscale_all_dim 1 and the query scaling beta 0.1; rope theta 1e4).
_SMALL4 = ModelArgs(dim=4096, n_layers=36, head_dim=128, hidden_dim=12288, n_heads=32, n_kv_heads=32,
                    vocab_size=131072, norm_eps=1e-6, rope_theta=1e4,
                    yarn=YarnArgs(factor=128.0, original_max_position_embeddings=8192, apply_scale=False),
                    llama_4_scaling=Llama4Scaling(original_max_position_embeddings=8192, beta=0.1),
                    mla=MlaArgs(kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=128,
                                q_lora_rank=1024, mscale_all_dim=1.0),
                    fine_moe=FineMoeArgs(num_experts=128, num_experts_per_tok=4, moe_intermediate_size=2048),
                    max_seq_len=262144, tokenizer="v15-tekken")


# Mistral Large 3 (675B, 41B active with its 2.5B vision encoder; the language model alone: 673B, 39B active): the
# published params.json of Mistral-Large-3-675B-Instruct-2512 (as quoted in vLLM's and unsloth's tests of their
# params.json readers; README "The family"): dim 7168, 61 layers of 128 latent-attention heads (q 1536, kv 512,
# 128 + 64 qk, 128 v), 3 dense layers of 16384 then 128 experts of 4096 top-4 + 1 shared, softmax routing in one
# group (vLLM: scoring_func softmax, norm_topk_prob true), routed_scale 1; YaRN 36x over 8k with apply_scale false
# (mscale_all_dim 1, as Mistral translated Small 4's identical yarn section) and the query scaling beta 0.1 over 8k;
# rope theta 1e4; vocabulary 131072; max_position_embeddings 294912 (the model card: a 256k context).
_LARGE3 = ModelArgs(dim=7168, n_layers=61, head_dim=192, hidden_dim=16384, n_heads=128, n_kv_heads=128,
                    vocab_size=131072, norm_eps=1e-6, rope_theta=1e4,
                    yarn=YarnArgs(factor=36.0, original_max_position_embeddings=8192, beta=32.0, alpha=1.0,
                                  apply_scale=False),
                    llama_4_scaling=Llama4Scaling(original_max_position_embeddings=8192, beta=0.1),
                    mla=MlaArgs(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                                q_lora_rank=1536, mscale_all_dim=1.0),
                    fine_moe=FineMoeArgs(num_experts=128, num_experts_per_tok=4, moe_intermediate_size=4096,
                                         n_shared_experts=1, first_k_dense_replace=3),
                    max_seq_len=262144)


def _small3(**kw) -> ModelArgs:
    """The Mistral Small 3.x text model (24B): Small 3, 3.1, 3.2, Magistral Small, Devstral Small 1 and 2."""
    return ModelArgs(**{**dict(dim=5120, n_layers=40, head_dim=128, hidden_dim=32768, n_heads=32, n_kv_heads=8,
                               vocab_size=131072, norm_eps=1e-5), **kw})


def _ministral3(**kw) -> ModelArgs:
    """A Ministral 3 text model (2512): 32 heads over 8 kv heads of 128, Tekken vocabulary, YaRN to 256k."""
    return ModelArgs(**{**dict(n_heads=32, n_kv_heads=8, head_dim=128, vocab_size=131072, norm_eps=1e-5,
                               yarn=_MINISTRAL3_YARN, llama_4_scaling=_MINISTRAL3_QUERY, max_seq_len=262144,
                               tokenizer="v13-tekken"), **kw})


PRESETS: dict[str, ModelArgs] = {
    "mistral-7b-v0.1": ModelArgs(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                                 vocab_size=32000, rope_theta=1e4, sliding_window=4096, max_seq_len=32768,
                                 tokenizer="v1"),
    "mistral-7b-v0.2": ModelArgs(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                                 vocab_size=32000, rope_theta=1e6, max_seq_len=32768, tokenizer="v1"),
    "mistral-7b-v0.3": ModelArgs(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                                 vocab_size=32768, rope_theta=1e6, max_seq_len=32768, tokenizer="v3"),
    "mixtral-8x7b": ModelArgs(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                              vocab_size=32000, rope_theta=1e6, moe=_MIXTRAL_MOE, max_seq_len=32768, tokenizer="v1"),
    "mixtral-8x22b": ModelArgs(dim=6144, n_layers=56, head_dim=128, hidden_dim=16384, n_heads=48, n_kv_heads=8,
                               vocab_size=32768, rope_theta=1e6, moe=_MIXTRAL_MOE, max_seq_len=65536, tokenizer="v3"),
    "mistral-nemo-12b": ModelArgs(dim=5120, n_layers=40, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                                  vocab_size=131072, rope_theta=1e6, max_seq_len=131072, tokenizer="v3-tekken"),
    "mistral-small-2409": ModelArgs(dim=6144, n_layers=56, head_dim=128, hidden_dim=16384, n_heads=48, n_kv_heads=8,
                                    vocab_size=32768, rope_theta=1e6, max_seq_len=32768, tokenizer="v3"),
    "mistral-small-2501": ModelArgs(dim=5120, n_layers=40, head_dim=128, hidden_dim=32768, n_heads=32, n_kv_heads=8,
                                    vocab_size=131072, rope_theta=1e8, max_seq_len=32768, tokenizer="v7-tekken"),
    "mistral-large-2407": ModelArgs(dim=12288, n_layers=88, head_dim=128, hidden_dim=28672, n_heads=96,
                                    n_kv_heads=8, vocab_size=32768, rope_theta=1e6, max_seq_len=131072,
                                    tokenizer="v3"),
    "codestral-22b-2405": ModelArgs(dim=6144, n_layers=56, head_dim=128, hidden_dim=16384, n_heads=48,
                                    n_kv_heads=8, vocab_size=32768, rope_theta=1e6, max_seq_len=32768,
                                    tokenizer="v3"),
    # one full-attention layer, then three with a 32k window, repeated (the model card's "ragged (128k, 32k, 32k,
    # 32k)" attention pattern)
    "ministral-8b-2410": ModelArgs(dim=4096, n_layers=36, head_dim=128, hidden_dim=12288, n_heads=32, n_kv_heads=8,
                                   vocab_size=131072, rope_theta=1e8, sliding_window=(None, 32768, 32768, 32768),
                                   max_seq_len=131072, tokenizer="v3-tekken"),
    "ministral-3-3b-2512": _ministral3(dim=3072, n_layers=26, hidden_dim=9216, rope_theta=1e6, tied_embeddings=True),
    "ministral-3-8b-2512": _ministral3(dim=4096, n_layers=34, hidden_dim=14336, rope_theta=1e6),
    "ministral-3-14b-2512": _ministral3(dim=5120, n_layers=40, hidden_dim=16384, rope_theta=1e9),
    "mistral-small-2503": _small3(rope_theta=1e9, max_seq_len=131072, tokenizer="v7-tekken"),  # Small 3.1
    "mistral-small-2506": _small3(rope_theta=1e9, max_seq_len=131072, tokenizer="v11-tekken"),  # Small 3.2
    "magistral-small-2506": _small3(rope_theta=1e9, max_seq_len=131072, tokenizer="v11-tekken"),
    "devstral-small-2505": _small3(rope_theta=1e9, max_seq_len=131072, tokenizer="v7-tekken"),  # Devstral Small 1
    "devstral-small-2-2512": _small3(rope_theta=1e8, yarn=_DEVSTRAL2_YARN, llama_4_scaling=_DEVSTRAL2_QUERY,
                                     max_seq_len=262144, tokenizer="v13-tekken"),
    "mistral-small-4-2603": _SMALL4,
    "mistral-large-3-2512": _LARGE3,
}


def get_preset(name: str, **overrides: Any) -> ModelArgs:
    """A preset by name, optionally with some fields replaced (e.g. ``n_layers=2`` for a toy copy)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def with_known_context(args: ModelArgs) -> ModelArgs:
    """Fill a missing max_seq_len from the preset of the same architecture (real params.json files omit it).

    The match is on every shape field, the window, the experts and rope_theta; an unknown model keeps None and is
    then bounded only by memory when generating.
    """
    if args.max_seq_len is not None:
        return args
    for preset in PRESETS.values():
        if replace(preset, max_seq_len=None, tokenizer=None) == args:
            return replace(args, max_seq_len=preset.max_seq_len)
    return args


def parameter_counts(args: ModelArgs) -> dict[str, int]:
    """Total parameters and parameters active per token, from the shapes alone (no torch, no memory).

    The weights of `mistral_ref.model.Transformer(args)`, none with a bias:
      tok_embeddings and output: vocab_size x dim each (one matrix when tied_embeddings); the final norm: dim
      per layer: wq (n_heads*head_dim x dim), wk and wv (n_kv_heads*head_dim x dim each), wo (dim x n_heads*head_dim),
                 two norms (dim each), and the feed-forward: w1, w3 (hidden_dim x dim), w2 (dim x hidden_dim) —
                 for Mixtral num_experts copies of it plus the router gate (num_experts x dim).
    Active = total minus the experts a token does not visit: (num_experts - num_experts_per_tok) experts per layer.

    With latent attention (args.mla): q_a_proj (q_lora_rank x dim) + q_a_layernorm + q_b_proj (n_heads*qk_head_dim
    x q_lora_rank), or q_proj (n_heads*qk_head_dim x dim); kv_a_proj_with_mqa ((kv_lora_rank + qk_rope_head_dim) x
    dim), kv_a_layernorm, kv_b_proj (n_heads*(qk_nope_head_dim + v_head_dim) x kv_lora_rank), wo (dim x
    n_heads*v_head_dim).  With fine-grained experts (args.fine_moe): the first first_k_dense_replace layers are
    dense (hidden_dim); the others hold num_experts routed experts of moe_intermediate_size, the shared expert
    (n_shared_experts x moe_intermediate_size wide) and the router; a token visits num_experts_per_tok routed
    experts and the shared one (the e_score_correction_bias is a buffer, not a parameter).
    """
    d, hd = args.dim, args.head_dim
    attention = d * args.n_heads * hd * 2 + d * args.n_kv_heads * hd * 2  # wq, wo; wk, wv
    if args.fine_moe is not None or args.mla is not None:
        return _latent_parameter_counts(args)
    expert = 3 * d * args.hidden_dim  # w1, w2, w3
    experts = args.moe.num_experts if args.moe else 1
    router = args.moe.num_experts * d if args.moe else 0
    layer = attention + 2 * d + experts * expert + router
    embeddings = (1 if args.tied_embeddings else 2) * args.vocab_size * d  # tok_embeddings (and output)
    total = embeddings + d + args.n_layers * layer
    idle = (args.moe.num_experts - args.moe.num_experts_per_tok) if args.moe else 0
    return {"total": total, "active": total - args.n_layers * idle * expert}


def _latent_parameter_counts(args: ModelArgs) -> dict[str, int]:
    """parameter_counts for models with latent attention and / or fine-grained experts (see there)."""
    d, H, m, fm = args.dim, args.n_heads, args.mla, args.fine_moe
    if m is None:
        attention = d * H * args.head_dim * 2 + d * args.n_kv_heads * args.head_dim * 2
    else:
        q = d * H * m.qk_head_dim if m.q_lora_rank is None else \
            d * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * H * m.qk_head_dim  # q_a_proj, norm, q_b_proj
        kv = d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank  # kv_a_proj_with_mqa, kv_a_layernorm
        kv += m.kv_lora_rank * H * (m.qk_nope_head_dim + m.v_head_dim)  # kv_b_proj
        attention = q + kv + H * m.v_head_dim * d  # + wo
    dense = 3 * d * args.hidden_dim
    total = active = 0
    for layer in range(args.n_layers):
        base = attention + 2 * d  # + the two norms
        if args.is_dense_layer(layer):
            total, active = total + base + dense, active + base + dense
        elif fm is not None:
            expert = 3 * d * fm.moe_intermediate_size
            shared_router = fm.n_shared_experts * expert + fm.num_experts * d
            total += base + fm.num_experts * expert + shared_router
            active += base + fm.num_experts_per_tok * expert + shared_router
        else:  # Mixtral experts under latent attention
            moe = args.moe
            total += base + moe.num_experts * dense + moe.num_experts * d
            active += base + moe.num_experts_per_tok * dense + moe.num_experts * d
    embeddings = (1 if args.tied_embeddings else 2) * args.vocab_size * d + d  # + the final norm
    return {"total": total + embeddings, "active": active + embeddings}


def kv_cache_bytes(args: ModelArgs, context: int, bytes_per_value: int = 2, batch_size: int = 1) -> int:
    """Bytes of keys and values a KV cache holds for `context` positions (bf16 / fp16: 2 bytes per value).

    Each layer keeps min(window, context) slots (a window layer rolls over its W slots; a full layer keeps one
    per position), each holding a key and a value of n_kv_heads x head_dim — or, with latent attention, the latent
    and the rotary key (kv_lora_rank + qk_rope_head_dim).  Equals mistral_ref.cache.cache_nbytes
    (tests/test_family.py), without torch.
    """
    slots = sum(min(w, context) if (w := args.window_for_layer(i)) is not None else context
                for i in range(args.n_layers))
    per_slot = (args.mla.kv_lora_rank + args.mla.qk_rope_head_dim if args.mla is not None
                else 2 * args.n_kv_heads * args.head_dim)
    return batch_size * slots * per_slot * bytes_per_value


def _window_text(args: ModelArgs) -> str:
    """The window column: '-', '4096', or a per-layer pattern such as 'full/32768/32768/32768'."""
    w = args.sliding_window
    if isinstance(w, tuple):
        return "/".join("full" if x is None else str(x) for x in w)
    return str(w) if w else "-"


def _rope_text(args: ModelArgs) -> str:
    """The theta column: theta, with YaRN as 'yarn 16x16384' and the query scaling as '+q0.1'."""
    text = f"{args.rope_theta:g}"
    if args.yarn:
        text += f" yarn {args.yarn.factor:g}x{args.yarn.original_max_position_embeddings}"
    if args.llama_4_scaling:
        text += f" +q{args.llama_4_scaling.beta:g}"
    return text


def _bytes_text(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}" if n < 100 * size else f"{n / size:.0f} {unit}"
    return f"{n} B"


def family_table() -> str:
    """A Markdown table of every preset with its total / active parameter counts and its bf16 KV cache (batch 1):
    per token (while the context is shorter than every window) and at the trained context ("tied": the output
    projection is the embedding matrix)."""
    rows = ["| model | dim | layers | heads/kv | head_dim | hidden | vocab | theta | window | experts | tokenizer "
            "| total | active | context | KV/token | KV at context |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in PRESETS.items():
        c = parameter_counts(a)
        experts = f"{a.moe.num_experts} top-{a.moe.num_experts_per_tok}" if a.moe else "-"
        if a.fine_moe:
            experts = f"{a.fine_moe.num_experts} top-{a.fine_moe.num_experts_per_tok} +{a.fine_moe.n_shared_experts}"
        context = a.max_seq_len or 32768
        tied = " tied" if a.tied_embeddings else ""
        rows.append(
            f"| {name} | {a.dim} | {a.n_layers} | {a.n_heads}/{a.n_kv_heads} | {a.head_dim} | {a.hidden_dim} "
            f"| {a.vocab_size}{tied} | {_rope_text(a)} | {_window_text(a)} | {experts} | {a.tokenizer} "
            f"| {c['total'] / 1e9:.2f}B | {c['active'] / 1e9:.2f}B | {context // 1024}k "
            f"| {_bytes_text(kv_cache_bytes(a, 1))} | {_bytes_text(kv_cache_bytes(a, context))} |")
    return "\n".join(rows)
