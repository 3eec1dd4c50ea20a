"""The `mistral-ref` command (also `python -m mistral_ref`).

  mistral-ref info                     the family table: shapes, windows, tokenizers, parameter counts
  mistral-ref demo                     the main job on the embedded default model
  mistral-ref convert SRC DST --to hf  convert a checkpoint between the native and Hugging Face formats
  mistral-ref chat [CHECKPOINT]        an interactive chat in the terminal (streaming; the embedded model
                                       when no checkpoint is given)
  mistral-ref generate [CHECKPOINT] --prompt TEXT   a one-shot raw completion (no chat template), streamed
  mistral-ref serve [CHECKPOINT] --port N           the chat-completions HTTP endpoint (server.py)
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


# ---- chat, generate, serve -----------------------------------------------------------------------------------
def under_torchrun() -> bool:
    """True when torchrun (or another launcher) started this process as one rank of several."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def load_sharded_for_cli(checkpoint: str | None, dtype: str | None) -> tuple[object, object, str, int]:
    """Under torchrun: join the process group and load only this rank's shard (mistral_ref.parallel).

    returns (model, tokenizer, name, rank).  Without CHECKPOINT the embedded model is sharded.
    """
    from pathlib import Path

    from mistral_ref import parallel
    from mistral_ref.tokenizer import load_tokenizer

    env = parallel.init_from_env()
    if checkpoint is None:
        from mistral_ref.embedded import EMBEDDED_MODEL_DIR

        checkpoint = str(EMBEDDED_MODEL_DIR)
    path = Path(checkpoint)
    model = parallel.load_sharded_model(path, dtype=_dtype(dtype) if dtype else None)
    tok = load_tokenizer(path if path.is_dir() else path.parent)
    if env.rank == 0:
        print(f"[{path.resolve().name} sharded over {env.world_size} ranks ({env.device})]", file=sys.stderr)
    return model, tok, path.resolve().name, env.rank


def load_for_cli(checkpoint: str | None, dtype: str | None) -> tuple[object, object, str]:
    """(model, tokenizer, name) of a checkpoint directory, or of the embedded model when `checkpoint` is None."""
    if checkpoint is None:
        try:
            from mistral_ref.embedded import EMBEDDED_MODEL_DIR, load_embedded
        except ImportError:
            raise FileNotFoundError("no CHECKPOINT given and this install has no embedded model "
                                    "(mistral_ref.embedded): pass a checkpoint directory") from None
        model, tok = load_embedded(**({"dtype": _dtype(dtype)} if dtype else {}))
        print(f"[using the embedded model {EMBEDDED_MODEL_DIR.name} ({EMBEDDED_MODEL_DIR}); pass a CHECKPOINT "
              "directory to use another]", file=sys.stderr)
        return model, tok, EMBEDDED_MODEL_DIR.name
    from pathlib import Path

    from mistral_ref.checkpoint import load_model
    from mistral_ref.tokenizer import load_tokenizer

    path = Path(checkpoint)
    model = load_model(path, dtype=dtype)
    tok = load_tokenizer(path if path.is_dir() else path.parent)
    if tok.vocab_size != model.args.vocab_size:
        raise ValueError(f"{checkpoint}: the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                         f"{model.args.vocab_size}")
    return model, tok, path.resolve().name


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _sampling(args: argparse.Namespace) -> dict:
    """The sampling options shared by chat / generate, as chat_completion / generate_stream keywords."""
    out = {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens,
           "presence_penalty": args.presence_penalty, "frequency_penalty": args.frequency_penalty}
    if args.seed is not None:
        out["seed"] = args.seed
    if args.stop:
        out["stop"] = args.stop
    return out


def cmd_chat(args: argparse.Namespace) -> int:
    from mistral_ref.api import RequestError, chat_completion

    model, tok, name = load_for_cli(args.checkpoint, args.dtype)
    if args.compile:
        model.compile_decode()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {name} ({tok.kind} {tok.version} tokenizer); /reset clears the conversation, "
              "/exit or Ctrl-D quits, Ctrl-C interrupts a reply", file=sys.stderr)
    params = _sampling(args)
    if args.json:
        params["response_format"] = {"type": "json_object"}
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            print("[conversation cleared]", file=sys.stderr)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": line})
        try:
            chunks = chat_completion(model, tok, system + history, stream=True, model_name=name,
                                     max_context=args.max_context, **params)
        except RequestError as e:
            history.pop()
            print(f"[error: {e}]" + (" (try /reset)" if e.field == "messages" else ""), file=sys.stderr)
            continue
        reply, calls, finish = "", [], None
        try:
            for chunk in chunks:
                delta = chunk["choices"][0]["delta"]
                piece = delta.get("content") or ""
                reply += piece
                print(piece, end="", flush=True)
                calls += delta.get("tool_calls") or []
                finish = chunk["choices"][0]["finish_reason"] or finish
        except KeyboardInterrupt:
            chunks.close()
            finish = "interrupted"
        for call in calls:
            print(f"[tool call {call['function']['name']}({call['function']['arguments']}) id={call['id']}]",
                  end="")
        print()
        if finish in ("length", "interrupted"):
            print(f"[{finish}]", file=sys.stderr)
        if calls:  # no tools run in this chat: a call cannot be answered, so the exchange is dropped
            history.pop()
            print("[the model called a tool; this chat runs no tools, so that exchange was dropped]",
                  file=sys.stderr)
        else:
            history.append({"role": "assistant", "content": reply})
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import time

    from mistral_ref.generation import generate_stream

    rank = 0
    if under_torchrun():  # every rank runs the same loop on its shard; only rank 0 prints
        model, tok, _, rank = load_sharded_for_cli(args.checkpoint, args.dtype)
    else:
        model, tok, _ = load_for_cli(args.checkpoint, args.dtype)
        if args.compile:
            model.compile_decode()
    ids = tok.encode(args.prompt, bos=True)
    kw = _sampling(args)
    if rank or under_torchrun():
        kw.setdefault("seed", 0)  # ranks must draw the same samples: one shared seed
    max_tokens = kw.pop("max_tokens")
    if args.max_context is not None or model.args.max_seq_len is not None:
        limit = args.max_context or model.args.max_seq_len
        if len(ids) + max_tokens > limit:
            raise ValueError(f"--prompt is {len(ids)} tokens; with --max-tokens {max_tokens} that exceeds the "
                             f"context of {limit} tokens")
    t0 = time.perf_counter()
    n = 0
    finish = None
    for event in generate_stream(model, tok, ids, max_tokens, ignore_eos=args.ignore_eos,
                                 continue_prompt_text=True, **kw):
        if rank == 0:
            print(event.text, end="", flush=True)
        if event.token_id is not None:
            n += 1
        finish = event.finish_reason or finish
    dt = time.perf_counter() - t0
    if under_torchrun():  # leave the group together: a rank exiting with gloo threads alive can abort
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    if rank:
        return 0
    print()
    print(f"[{n} tokens in {dt:.2f} s ({n / dt:.1f} tokens/s), prompt {len(ids)} tokens, finish: {finish}]",
          file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from mistral_ref.server import serve

    model, tok, name = load_for_cli(args.checkpoint, args.dtype)
    if args.compile:
        model.compile_decode()
    serve(model, tok, host=args.host, port=args.port, model_name=args.model_name or name,
          max_context=args.max_context, max_body_bytes=args.max_body_bytes)
    return 0


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="checkpoint directory (native or Hugging Face, with its tokenizer file); default: the "
                        "embedded model")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="parameter dtype (default: the checkpoint's)")
    p.add_argument("--max-context", type=int, default=None,
                   help="context length in tokens (default: the model's max_seq_len, if it declares one)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (Transformer.compile_decode): faster tokens after a "
                        "first step that compiles for a minute or so")


def _add_sampling_options(p: argparse.ArgumentParser, max_tokens: int | None) -> None:
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")


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

    ch = sub.add_parser("chat", help="chat in the terminal (streaming)")
    _add_model_options(ch)
    _add_sampling_options(ch, None)
    ch.add_argument("--system", default=None, help="a system prompt")
    ch.add_argument("--json", action="store_true", help="JSON mode: every reply is a JSON object")
    ch.set_defaults(func=cmd_chat)

    g = sub.add_parser("generate", help="one-shot raw completion of a prompt (no chat template), streamed")
    _add_model_options(g)
    g.add_argument("--prompt", required=True)
    _add_sampling_options(g, 128)
    g.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-tokens tokens")
    g.set_defaults(func=cmd_generate)

    sv = sub.add_parser("serve", help="serve the chat-completions API over HTTP")
    _add_model_options(sv)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--model-name", default=None, help="the name clients use (default: the directory name)")
    sv.add_argument("--max-body-bytes", type=int, default=4 << 20)
    sv.set_defaults(func=cmd_serve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, KeyError) as e:  # our errors say what and where (OSError: e.g. port in use)
        print(f"mistral-ref {args.command}: error: {e}", file=sys.stderr)
        return 2
