"""The Mistral family: one preset per published model, parameter counts, and the table `mistral-ref info` prints.

The presets are `ModelArgs` with the published shapes (dim / layers / heads / kv heads / head_dim / hidden / vocab /
rope theta / window / experts), the tokenizer version and the trained context of each model.  Parameter counts are
computed from those shapes with the formula below, so this module never imports torch or builds a model:
`mistral-ref info` prints instantly.  tests/test_family.py checks the formula against the meta-device model
(`mistral_ref.model.meta_model`) for every preset and for random shapes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mistral_ref.config import ModelArgs, MoeArgs

_MIXTRAL_MOE = MoeArgs(num_experts=8, num_experts_per_tok=2)

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
      tok_embeddings and output: vocab_size x dim each; the final norm: dim
      per layer: wq (n_heads*head_dim x dim), wk and wv (n_kv_heads*head_dim x dim each), wo (dim x n_heads*head_dim),
                 two norms (dim each), and the feed-forward: w1, w3 (hidden_dim x dim), w2 (dim x hidden_dim) —
                 for Mixtral num_experts copies of it plus the router gate (num_experts x dim).
    Active = total minus the experts a token does not visit: (num_experts - num_experts_per_tok) experts per layer.
    """
    d, hd = args.dim, args.head_dim
    attention = d * args.n_heads * hd * 2 + d * args.n_kv_heads * hd * 2  # wq, wo; wk, wv
    expert = 3 * d * args.hidden_dim  # w1, w2, w3
    experts = args.moe.num_experts if args.moe else 1
    router = args.moe.num_experts * d if args.moe else 0
    layer = attention + 2 * d + experts * expert + router
    total = 2 * args.vocab_size * d + d + args.n_layers * layer
    idle = (args.moe.num_experts - args.moe.num_experts_per_tok) if args.moe else 0
    return {"total": total, "active": total - args.n_layers * idle * expert}


def family_table() -> str:
    """A Markdown table of every preset with its total / active parameter counts."""
    rows = ["| model | dim | layers | heads/kv | head_dim | hidden | vocab | theta | window | experts | tokenizer "
            "| total | active |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in PRESETS.items():
        c = parameter_counts(a)
        experts = f"{a.moe.num_experts} top-{a.moe.num_experts_per_tok}" if a.moe else "-"
        rows.append(
            f"| {name} | {a.dim} | {a.n_layers} | {a.n_heads}/{a.n_kv_heads} | {a.head_dim} | {a.hidden_dim} "
            f"| {a.vocab_size} | {a.rope_theta:g} | {a.sliding_window or '-'} | {experts} | {a.tokenizer} "
            f"| {c['total'] / 1e9:.2f}B | {c['active'] / 1e9:.2f}B |")
    return "\n".join(rows)
