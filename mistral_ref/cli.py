"""The `mistral-ref` command (also `python -m mistral_ref`).

  mistral-ref info                     the family table: shapes, windows, tokenizers, parameter counts
  mistral-ref demo                     the main job on the embedded default model
  mistral-ref convert SRC DST --to hf  convert a checkpoint between the native and Hugging Face formats
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def family_table() -> str:
    """A Markdown table of every preset with its total / active parameter counts (meta device, no memory)."""
    from mistral_ref.config import PRESETS, parameter_counts

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


def cmd_info(args: argparse.Namespace) -> int:
    print(family_table())
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from mistral_ref.checkpoint import convert_checkpoint

    convert_checkpoint(args.src, args.dst, format=args.to, max_shard_bytes=args.max_shard_bytes)
    print(f"wrote {args.to} checkpoint to {args.dst}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mistral_ref.demo import run_demo

    return run_demo()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mistral-ref", description="Reference implementation of the Mistral family")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print the family table").set_defaults(func=cmd_info)
    sub.add_parser("demo", help="run the demo on the embedded default model").set_defaults(func=cmd_demo)
    c = sub.add_parser("convert", help="convert a checkpoint between native and Hugging Face formats")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--to", choices=["native", "hf"], required=True)
    c.add_argument("--max-shard-bytes", type=int, default=None)
    c.set_defaults(func=cmd_convert)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as e:  # our errors say what and where: show them plainly
        print(f"mistral-ref {args.command}: error: {e}", file=sys.stderr)
        return 2
