"""The `mistral-ref` command (also `python -m mistral_ref`).

  mistral-ref --version
  mistral-ref info                     the family table: shapes, windows, tokenizers, parameters, KV cache (no torch)
  mistral-ref demo                     the main job on the embedded default model
  mistral-ref convert SRC DST --to hf  convert a checkpoint between the native and Hugging Face formats
  mistral-ref chat [CHECKPOINT]        an interactive chat in the terminal (streaming; the embedded model
                                       when no checkpoint is given)
  mistral-ref generate [CHECKPOINT] --prompt TEXT   a one-shot raw completion (no chat template), streamed
  mistral-ref serve [CHECKPOINT] --port N           the chat-completions HTTP endpoint (server.py)
  mistral-ref parity CHECKPOINT [--against transformers | OTHER]   layer-by-layer comparison (parity.py)

Every command but info takes --threads N; `mistral-ref COMMAND --help` lists each option with its default.
Status lines ("[...]") go to stderr, generated text to stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from mistral_ref import __version__

#: Replies in `chat` stop after this many tokens unless --max-tokens says otherwise (capped by the context).
CHAT_MAX_TOKENS = 512

#: Below this many active parameters a model decodes fastest on one thread: its matrices are too small for the
#: work a thread gets to outweigh waking and joining it (measurements: README, "Threads").
SMALL_MODEL_ACTIVE_PARAMS = 20_000_000


def _status(message: str) -> None:
    print(f"[{message}]", file=sys.stderr, flush=True)


# ---- threads ------------------------------------------------------------------------------------------------------
def physical_cores() -> int:
    """The cores this process may run on, each core's hyper-threads counted once, capped by a cgroup CPU quota."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{topology}/physical_package_id") as pkg, open(f"{topology}/core_id") as core:
                cores.add((pkg.read().strip(), core.read().strip()))
        except OSError:  # no sysfs topology (not Linux): count logical CPUs
            cores.add(("cpu", str(cpu)))
    n = len(cores)
    try:  # a container limited to Q microseconds of CPU per P: at most ceil(Q / P) cores' worth
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            n = min(n, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, n)


def free_cores() -> tuple[int, int]:
    """(physical cores, cores busy with other work): the 1-minute load average, read before this command works."""
    cores = physical_cores()
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return cores, min(busy, cores)


def default_threads(active_params: int | None, cores: int, busy: int) -> tuple[int, str]:
    """The thread count used without --threads, and the reason printed with it.

    One thread for a small model; otherwise one per physical core that other work leaves free.  A torch thread
    without a core of its own stalls every parallel step of the others (measured on a busy 2-core machine: two
    threads decoded 4-30x slower than one, whatever the model size).
    """
    if active_params is not None and active_params < SMALL_MODEL_ACTIVE_PARAMS:
        return 1, f"{active_params / 1e6:.1f}M active parameters: one thread is fastest for a model this small"
    return max(1, cores - busy), f"{cores} physical cores, {busy} busy with other work (1-minute load average)"


def set_threads(args: argparse.Namespace, model_args: object | None = None, quiet: bool = False) -> int:
    """Apply --threads, else OMP_NUM_THREADS, else default_threads(model) to torch's intra-op pool, and say so.

    The server's worker thread, started afterwards, inherits the setting.  Returns the thread count.
    """
    import torch

    if args.threads is not None:
        n, why = args.threads, "--threads"
    elif os.environ.get("OMP_NUM_THREADS"):
        n, why = torch.get_num_threads(), "OMP_NUM_THREADS"  # torch already honours it
    else:
        active = None
        if model_args is not None:
            from mistral_ref.family import parameter_counts

            active = parameter_counts(model_args)["active"]
        n, why = default_threads(active, *args.cores)
    torch.set_num_threads(n)
    if not quiet:
        _status(f"threads: {n} ({why}); --threads N to change")
    return n


# ---- info, demo, convert --------------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    from mistral_ref.family import family_table  # no torch: the counts come from the shapes

    print(family_table())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mistral_ref.config import ModelArgs
    from mistral_ref.demo import run_demo
    from mistral_ref.embedded import EMBEDDED_MODEL_DIR

    set_threads(args, ModelArgs.from_params_json(EMBEDDED_MODEL_DIR))
    return run_demo()


def cmd_convert(args: argparse.Namespace) -> int:
    from mistral_ref.checkpoint import convert_checkpoint

    if args.to == "gguf":
        return cmd_convert_gguf(args)
    set_threads(args)
    t0 = time.perf_counter()
    convert_checkpoint(args.src, args.dst, format=args.to, max_shard_bytes=args.max_shard_bytes)
    print(f"wrote {args.to} checkpoint to {args.dst} in {time.perf_counter() - t0:.1f} s")
    return 0


# ---- loading a model: the embedded one by default ---------------------------------------------------------------
def under_torchrun() -> bool:
    """True when torchrun (or another launcher) started this process as one rank of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _is_embedded(checkpoint: str | None) -> bool:
    from mistral_ref.embedded import is_embedded_model_dir

    return checkpoint is None or is_embedded_model_dir(checkpoint)


def load_sharded_for_cli(checkpoint: str | None, dtype: str | None) -> tuple[object, object, str, int]:
    """Under torchrun: join the process group and load only this rank's shard (mistral_ref.parallel).

    returns (model, tokenizer, name, rank).  Without CHECKPOINT the embedded model is sharded.
    """
    from pathlib import Path

    from mistral_ref import parallel
    from mistral_ref.embedded import EMBEDDED_DTYPE, EMBEDDED_MODEL_DIR
    from mistral_ref.tokenizer import load_tokenizer

    env = parallel.init_from_env()
    if _is_embedded(checkpoint):
        checkpoint, dtype = str(EMBEDDED_MODEL_DIR), dtype or EMBEDDED_DTYPE
    path = Path(checkpoint)
    model = parallel.load_sharded_model(path, dtype=dtype)
    tok = load_tokenizer(path if path.is_dir() else path.parent)
    if env.rank == 0:
        _status(f"{path.resolve().name} sharded over {env.world_size} ranks ({env.device})")
    return model, tok, path.resolve().name, env.rank


def load_for_cli(checkpoint: str | None, dtype: str | None) -> tuple[object, object, str]:
    """(model, tokenizer, name) of a checkpoint directory, or of the embedded model when `checkpoint` is None,
    ready to decode (_decoding_layout).

    The embedded model loads the same way whether named by its path or not (in EMBEDDED_DTYPE unless --dtype).
    """
    model, tok, name = _load_for_cli(checkpoint, dtype)
    return _decoding_layout(model), tok, name


def _decoding_layout(model):
    """Stack a MoE model's experts (backends/moe.py: stack_experts): each expert's weights become views of three
    (E, ...) tensors, same names and values, one copy of the weights (from a memory-mapped checkpoint the stacks
    are private memory rather than views of the files).  A one-token step, eager as well as compiled, then sends a
    layer's chosen experts to the C kernels in one call instead of the grouped dispatch.  Likewise each attention
    layer's wq, wk, wv become views of one tensor (backends/linear.py: join_projections): a prompt's three
    products of x are one GEMM.  The CLI owns the model it loads, so replacing parameter objects is safe here;
    library users call stack_all_experts and join_projections themselves (compile_decode stacks)."""
    from mistral_ref.backends.linear import join_projections
    from mistral_ref.backends.moe import stack_all_experts

    stack_all_experts(model)
    join_projections(model)
    return model


def _load_for_cli(checkpoint: str | None, dtype: str | None) -> tuple[object, object, str]:
    from pathlib import Path

    if _is_embedded(checkpoint):
        from mistral_ref.embedded import EMBEDDED_DTYPE, EMBEDDED_MODEL_DIR, load_embedded

        t0 = time.perf_counter()
        model, tok = load_embedded(dtype=dtype or EMBEDDED_DTYPE)
        if checkpoint is None:
            _status(f"using the embedded model {EMBEDDED_MODEL_DIR.name} ({EMBEDDED_MODEL_DIR}); pass a CHECKPOINT "
                    "directory to use another")
        _status(f"loaded {EMBEDDED_MODEL_DIR.name} ({model.dtype}) in {time.perf_counter() - t0:.2f} s")
        return model, tok, EMBEDDED_MODEL_DIR.name
    from mistral_ref.checkpoint import load_model
    from mistral_ref.tokenizer import load_tokenizer

    path = Path(checkpoint)
    _status(f"loading {path}")
    t0 = time.perf_counter()
    model = load_model(path, dtype=dtype)
    tok = load_tokenizer(path if path.is_dir() else path.parent)
    if tok.vocab_size != model.args.vocab_size:
        raise ValueError(f"{checkpoint}: the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                         f"{model.args.vocab_size}")
    _status(f"loaded {path.resolve().name} ({model.dtype}) in {time.perf_counter() - t0:.2f} s")
    return model, tok, path.resolve().name


def _sampling(args: argparse.Namespace) -> dict:
    """The sampling options shared by chat / generate, as chat_completion / generate_stream keywords."""
    out = {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens,
           "presence_penalty": args.presence_penalty, "frequency_penalty": args.frequency_penalty}
    if args.seed is not None:
        out["seed"] = args.seed
    if args.stop:
        out["stop"] = args.stop
    return out


def _compile(model, positions: int = CHAT_MAX_TOKENS + 1, background: bool = False, mode: str = "regional"
             ) -> None:
    """--compile: compile the decode step, or load it from the compile cache.  In the foreground (generate):
    now, for a batch-1 request of `positions` positions (the real request's cache size bucket), with the time
    on a line of its own.  In the background (chat, serve): each new decode shape is compiled by a worker
    thread from its first step on, decoding runs eagerly until it is ready, and _compile_report says when."""
    from mistral_ref.backends.compile_cache import compile_cache_dir

    what = "one transformer block reused by every layer" if mode == "regional" else "the whole step as one graph"
    when = ("in the background from the first decode step: the first token does not wait, tokens come eagerly "
            "until it is ready" if background else "now")
    _status(f"--compile: compiling the decode step (torch.compile, {mode}: {what}) {when}; kept in "
            f"{compile_cache_dir()}, so the next start loads it; a new batch or cache size compiles again")
    t0 = time.perf_counter()
    model.compile_decode(mode=mode, background=background)
    if not background:  # (in the background, the first decode step queues its own shape: nothing to warm up)
        what = model.compiled_decode.warm_up(1, positions)[1] if model.compiled_decode is not None else "off"
        _status(f"compiled in {time.perf_counter() - t0:.1f} s ({what}; not counted in tokens/s below)")


def _compile_report(model, reported: bool, finish: bool = False) -> bool:
    """chat --compile: once the background compilation is done, say when (once; returns whether it has been
    said).  finish=True (leaving chat): wait for a compilation still running, so it is saved for the next start."""
    steps = getattr(model.compiled_decode, "steps", None)
    if steps is None or reported:
        return reported
    if finish and not steps.wait(0):
        _status("--compile: finishing the compiled decode step so that the next start loads it (Ctrl-C skips)")
        try:
            steps.wait()
        except KeyboardInterrupt:
            return reported
    if not steps.wait(0) or not steps.events:
        return reported
    ready = max(done for _, _, _, done in steps.events) - steps.started
    _status(f"compiled decode step ready {ready:.1f} s after --compile ({steps.summary()}); "
            "decoding runs compiled from then on")
    return True


# ---- chat, generate, serve -----------------------------------------------------------------------------------
CHAT_COMMANDS = {
    "/help": "list these commands",
    "/reset": "clear the conversation (the system prompt stays)",
    "/exit": "quit (also /quit, Ctrl-D); Ctrl-C interrupts a reply",
}


def _chat_help() -> str:
    return "chat commands:\n" + "\n".join(f"  {c:<7} {what}" for c, what in CHAT_COMMANDS.items())


def cmd_chat(args: argparse.Namespace) -> int:
    from mistral_ref.api import RequestError, chat_completion, context_length

    model, tok, name = load_for_cli(args.checkpoint, args.dtype)
    set_threads(args, model.args)
    if args.compile:  # sized for the first reply: the cache capacity is bucketed, so later turns reuse it
        _compile(model, positions=(args.max_tokens or CHAT_MAX_TOKENS) + 1, background=True, mode=args.compile)
    reported = False  # chat --compile: whether _compile_report has said that the compiled step is ready
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt_mode == "reasoning":  # the checkpoint's reasoning system prompt goes first
        from mistral_ref.api import reasoning_system_message

        try:
            system.insert(0, reasoning_system_message(tok))
        except RequestError as e:
            _status(f"error: {e}")
            return 2
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    if interactive:
        _status(f"chatting with {name} ({tok.kind} {tok.version} tokenizer); /help lists the commands, /exit or "
                "Ctrl-D quits, Ctrl-C interrupts a reply")
    params = _sampling(args)
    if args.json:
        params["response_format"] = {"type": "json_object"}
    if args.reasoning_effort is not None:
        params["reasoning_effort"] = args.reasoning_effort
        try:  # the request checks it on every turn; say it once, before the first
            tok.encode_chat([{"role": "user", "content": ""}], reasoning_effort=args.reasoning_effort)
        except ValueError as e:
            _status(f"error: --reasoning-effort: {e}")
            return 2
    context = context_length(model, args.max_context)
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
            _status("conversation cleared")
            continue
        if text in ("/help", "/?") or (text.startswith("/") and " " not in text and len(text) > 1):
            if text not in ("/help", "/?"):
                print(f"unknown command {text}", file=sys.stderr)
            print(_chat_help(), file=sys.stderr)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": line})
        messages = system + history
        if args.max_tokens is None:  # the default per reply, capped by what the context leaves
            params["max_tokens"] = CHAT_MAX_TOKENS
            if context is not None:
                left = context - len(tok.encode_chat(messages, reasoning_effort=args.reasoning_effort))
                params["max_tokens"] = min(CHAT_MAX_TOKENS, left) if left > 0 else None
        try:
            chunks = chat_completion(model, tok, messages, stream=True, model_name=name,
                                     max_context=args.max_context, **params)
        except RequestError as e:
            history.pop()
            _status(f"error: {e}" + (" (try /reset)" if e.field == "messages" else ""))
            continue
        reply, calls, finish, usage = "", [], None, None
        t0 = time.perf_counter()
        try:
            for chunk in chunks:
                delta = chunk["choices"][0]["delta"]
                piece = delta.get("content") or ""
                if isinstance(piece, list):  # a thought (reasoning models): on stderr, kept out of the reply
                    think = "".join(t["text"] for c in piece for t in c["thinking"])
                    print(think + ("\n" if piece[-1]["closed"] else ""), end="", file=sys.stderr, flush=True)
                    continue
                reply += piece
                print(piece, end="", flush=True)
                calls += delta.get("tool_calls") or []
                finish = chunk["choices"][0]["finish_reason"] or finish
                usage = chunk.get("usage") or usage
        except KeyboardInterrupt:
            chunks.close()
            finish = "interrupted"
        for call in calls:
            print(f"[tool call {call['function']['name']}({call['function']['arguments']}) id={call['id']}]",
                  end="")
        print()
        if finish == "length":
            _status(f"length: the reply reached max_tokens ({params['max_tokens']}); --max-tokens N allows more")
        elif finish == "interrupted":
            _status("interrupted")
        if args.compile and usage:
            _status(f"{usage['completion_tokens']} tokens in {time.perf_counter() - t0:.1f} s")
            reported = _compile_report(model, reported)
        if calls:  # no tools run in this chat: a call cannot be answered, so the exchange is dropped
            history.pop()
            _status("the model called a tool; this chat runs no tools, so that exchange was dropped")
        else:
            history.append({"role": "assistant", "content": reply})
    if args.compile:  # a compilation still running is finished, so that the next start is warm
        _compile_report(model, reported, finish=True)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from mistral_ref.generation import generate_stream

    rank = 0
    if under_torchrun():  # every rank runs the same loop on its shard; only rank 0 prints
        model, tok, _, rank = load_sharded_for_cli(args.checkpoint, args.dtype)
    else:
        model, tok, _ = load_for_cli(args.checkpoint, args.dtype)
    set_threads(args, model.args, quiet=rank != 0)
    ids = tok.encode(args.prompt, bos=True)
    kw = _sampling(args)
    if under_torchrun():
        kw.setdefault("seed", 0)  # ranks must draw the same samples: one shared seed
    max_tokens = kw.pop("max_tokens")
    if args.max_context is not None or model.args.max_seq_len is not None:
        limit = args.max_context or model.args.max_seq_len
        if len(ids) + max_tokens > limit:
            raise ValueError(f"--prompt is {len(ids)} tokens; with --max-tokens {max_tokens} that exceeds the "
                             f"context of {limit} tokens")
    if args.compile and not under_torchrun():  # the request's own cache size: the step the real run uses
        _compile(model, positions=len(ids) + max_tokens, mode=args.compile)
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
    _status(f"{n} tokens in {dt:.2f} s ({n / dt:.1f} tokens/s), prompt {len(ids)} tokens, finish: {finish}")
    return 0


def check_port_free(host: str, port: int) -> None:
    """Raise OSError naming host and port when the server could not listen there (checked before loading)."""
    import socket

    if port == 0:
        return  # the system picks a free port
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise OSError(f"--host {host}: cannot resolve it ({e})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server does
        try:
            s.bind(address)
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port} ({e.strerror}): is another server running there? "
                          "pick another with --port") from None


def cmd_serve(args: argparse.Namespace) -> int:
    from mistral_ref.server import ServerOptions, check_exposure, serve

    check_exposure(args.host, ServerOptions(**_serve_options(args)))  # before loading: a refusal is instant
    check_port_free(args.host, args.port)
    model, tok, name = load_for_cli(args.checkpoint, args.dtype)
    set_threads(args, model.args)  # set before serve() starts the model worker thread, which inherits it
    if args.compile:  # in the background: the server answers at once, eagerly until the step is ready
        _compile(model, background=True, mode=args.compile)
    serve(model, tok, host=args.host, port=args.port, model_name=args.model_name or name,
          max_context=args.max_context, max_body_bytes=args.max_body_bytes, **_serve_options(args))
    return 0


# ---- parity: layer-by-layer comparison with transformers or another checkpoint; GGUF export ---------------------
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # checkpoint.gguf.SAVE_TYPES


def cmd_convert_gguf(args: argparse.Namespace) -> int:
    """convert SRC DST.gguf --to gguf: load SRC (memory-mapped) and write it tensor by tensor with save_gguf."""
    from pathlib import Path

    from mistral_ref.checkpoint import copy_tokenizer_files, load_model, save_gguf

    dst = Path(args.dst)
    if dst.suffix != ".gguf":
        raise ValueError(f"{dst}: with --to gguf, DST is the .gguf file to write")
    set_threads(args)
    t0 = time.perf_counter()
    save_gguf(load_model(args.src), dst, args.gguf_type)
    src_dir = Path(args.src) if Path(args.src).is_dir() else Path(args.src).parent
    copied = copy_tokenizer_files(src_dir, dst.parent)
    print(f"wrote {args.gguf_type} GGUF {dst} in {time.perf_counter() - t0:.1f} s"
          + (f" (and the tokenizer file(s) {', '.join(p.name for p in copied)} next to it)" if copied else ""))
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    import importlib.util

    from mistral_ref import parity

    if args.against == parity.TRANSFORMERS and importlib.util.find_spec("transformers") is None:
        raise ValueError("--against transformers needs the transformers package (the `test` extra); or compare "
                         "with another checkpoint: --against OTHER_CHECKPOINT")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib (the `bench` or `notebooks` extra)")
    set_threads(args)
    tokens, probe = parity.probe_tokens(args.checkpoint, prompt=args.prompt, chat=args.chat, tokens=args.tokens)
    layers = args.layers or args.plot is not None
    t0 = time.perf_counter()
    report = parity.run_parity(args.checkpoint, args.against, tokens, probe=probe, dtype=args.dtype, layers=layers,
                               generate=args.generate, tolerance=args.tolerance, log=_status)
    print(report.table(layers=layers))
    _status(f"parity run took {time.perf_counter() - t0:.1f} s; peak resident memory "
            f"{max(report.a.peak_rss_bytes, report.b.peak_rss_bytes) / 2**30:.2f} GiB")
    if args.json:
        _status(f"wrote {parity.write_json(report, args.json)}")
    if args.plot:
        _status(f"wrote {parity.plot_report(report.to_dict(), args.plot)}")
    return 0 if report.passed else 1


# ---- quantize: weight-only int8 / int4 checkpoints (mistral_ref/quantize.py) ----------------------------------
def _add_quantize_parser(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("quantize", help="write a weight-only int8 / int4 quantized copy of a checkpoint")
    q.add_argument("src", help="checkpoint to read (directory, or a .gguf file)")
    q.add_argument("dst", help="directory to write (a native safetensors checkpoint that loads quantized)")
    q.add_argument("--scheme", choices=["int8", "int4"], required=True,
                   help="int8: one scale per output channel; int4: a scale and zero per group of inputs (required)")
    q.add_argument("--group-size", type=int, default=32, metavar="N",
                   help="int4: inputs per group, 32, 64, 128 or 256 (default: 32)")
    q.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="the dtype the quantized model computes in (scales, norms, embeddings) (default: the "
                        "checkpoint's own)")
    _add_threads_option(q, "one per physical core not busy with other work")
    q.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    """quantize SRC DST --scheme S: load SRC, quantize its linear layers, save DST with its tokenizer files."""
    from pathlib import Path

    from mistral_ref.checkpoint import copy_tokenizer_files, load_model, save_checkpoint

    set_threads(args)
    t0 = time.perf_counter()
    model = load_model(args.src, dtype=args.dtype, quantize=args.scheme, group_size=args.group_size)
    written = save_checkpoint(model, args.dst)
    src_dir = Path(args.src) if Path(args.src).is_dir() else Path(args.src).parent
    copy_tokenizer_files(src_dir, Path(args.dst))
    size = sum(p.stat().st_size for p in written.shards)
    group = f" (groups of {args.group_size})" if args.scheme == "int4" else ""
    print(f"wrote {args.scheme}{group} checkpoint to {args.dst}: {size / 2**20:.1f} MiB of weights, "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def _add_parity_parser(sub: argparse._SubParsersAction) -> None:
    pa = sub.add_parser("parity", help="compare mistral-ref with transformers or another checkpoint, layer by layer",
                        description="Run mistral-ref on CHECKPOINT and the other implementation on the same token "
                                    "ids, one at a time, and report per-layer errors, logits agreement and the "
                                    "first greedy divergence.  Exit status 1 when the logits exceed the tolerance.")
    pa.add_argument("checkpoint", help="checkpoint directory (native or Hugging Face), .safetensors or .gguf file")
    pa.add_argument("--against", default="transformers", metavar="transformers|OTHER_CHECKPOINT",
                    help="transformers (loads CHECKPOINT's HF files, or the GGUF; native files are converted in a "
                         "temporary directory), or another checkpoint that mistral-ref loads (default: transformers)")
    probe = pa.add_mutually_exclusive_group()
    probe.add_argument("--prompt", default=None, help="text to encode with CHECKPOINT's tokenizer (default: a fixed "
                                                      "sentence, or 16 fixed random ids without a tokenizer)")
    probe.add_argument("--chat", default=None, metavar="FILE",
                       help="a JSON file of chat messages (or {messages, tools}), encoded with the chat template "
                            "(default: none)")
    probe.add_argument("--tokens", default=None, metavar="IDS",
                       help="token ids, e.g. '1 415 5565' or '1,415,5565' (default: none)")
    pa.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="dtype of both sides (default: the checkpoint's own; float32 for a quantized GGUF)")
    pa.add_argument("--layers", action="store_true",
                    help="record and print every layer: embeddings, attention, feed-forward/MoE, residual stream, "
                         "router choices (default: logits only)")
    pa.add_argument("--generate", type=int, default=0, metavar="N",
                    help="greedy-decode N tokens on each side and report the first step where they diverge "
                         "(default: 0)")
    pa.add_argument("--tolerance", type=float, default=None, metavar="MAX_REL",
                    help="logits max|a-b|/max|b| that passes (default: 1e-5 for float32, 0.1 for bfloat16, 0.02 "
                         "for float16)")
    pa.add_argument("--json", default=None, metavar="OUT", help="write the report as JSON (default: no)")
    pa.add_argument("--plot", default=None, metavar="OUT.png",
                    help="plot the error by layer (needs matplotlib; implies --layers) (default: no)")
    _add_threads_option(pa, "one per physical core not busy with other work")
    pa.set_defaults(func=cmd_parity)


def _serve_options(args: argparse.Namespace) -> dict:
    """The serve flags as mistral_ref.server.ServerOptions fields."""
    from mistral_ref.server_options import API_KEY_ENV

    options = dict(api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, insecure=args.insecure,
                   cors_origins=tuple(args.cors_origin), max_batch=args.max_batch, max_queue=args.max_queue,
                   max_tokens_limit=args.max_tokens_limit, request_timeout=args.request_timeout,
                   max_connections=args.max_connections, header_timeout=args.header_timeout,
                   body_timeout=args.body_timeout)
    if args.allowed_host:
        options["allowed_hosts"] = tuple(args.allowed_host)
    if args.kv_cache_mib is not None:
        options["kv_cache_bytes"] = args.kv_cache_mib << 20
    if args.content_filter is not None:
        options["content_filter"] = args.content_filter
    return options


def _add_serve_options(sv: argparse.ArgumentParser) -> None:
    from mistral_ref.server_options import ServerOptions  # plain data: its defaults are the flags' defaults

    o = ServerOptions()
    sv.add_argument("--api-key", default=None, metavar="KEY",
                    help="require 'Authorization: Bearer KEY' (or 'api-key: KEY') on every route (default: the "
                         "environment variable MISTRAL_REF_API_KEY; prefer it: a flag shows in ps)")
    sv.add_argument("--insecure", action="store_true",
                    help="allow serving beyond loopback (e.g. --host 0.0.0.0) without an API key (default: refused)")
    sv.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                    help="a name the Host header may carry, repeatable; '*' = any (default: on loopback localhost, "
                         "127.0.0.1, ::1; beyond loopback any)")
    sv.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                    help="a browser origin allowed to call the API (CORS), repeatable (default: none, CORS off)")
    sv.add_argument("--max-batch", type=int, default=o.max_batch, metavar="N",
                    help=f"requests decoding together; 1 = one at a time (default: {o.max_batch})")
    sv.add_argument("--max-queue", type=int, default=o.max_queue, metavar="N",
                    help=f"waiting requests beyond which new ones get 503 (default: {o.max_queue})")
    sv.add_argument("--kv-cache-mib", type=int, default=None, metavar="MIB",
                    help="KV cache limit; requests wait for room (default: half the memory available at start)")
    sv.add_argument("--max-tokens-limit", type=int, default=o.max_tokens_limit, metavar="N",
                    help=f"most tokens one request may generate (default: {o.max_tokens_limit})")
    sv.add_argument("--request-timeout", type=float, default=o.request_timeout, metavar="S",
                    help=f"wall-clock budget of a request, queue included (default: {o.request_timeout:g})")
    sv.add_argument("--max-connections", type=int, default=o.max_connections, metavar="N",
                    help=f"open connections beyond which new ones get 503 (default: {o.max_connections})")
    sv.add_argument("--header-timeout", type=float, default=o.header_timeout, metavar="S",
                    help=f"seconds a client has to send a request's head (default: {o.header_timeout:g})")
    sv.add_argument("--body-timeout", type=float, default=o.body_timeout, metavar="S",
                    help=f"seconds a client has to send a request's body (default: {o.body_timeout:g})")
    sv.add_argument("--content-filter", default=None, metavar="SPEC",
                    help="content safety on prompts and replies: 'self-check' (the served model classifies with "
                         "Mistral's moderation categories) or 'module:function' (your callable text -> bool or "
                         "-> {category: bool | score}); a flagged prompt gets HTTP 400 code content_filter, a "
                         "flagged reply ends with finish_reason content_filter (default: off)")


# ---- the parser ---------------------------------------------------------------------------------------------------
def _add_threads_option(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help=f"torch threads (default: {default}; OMP_NUM_THREADS, when set, is kept)")


_MODEL_THREADS = ("1 for a model under 20M active parameters, else one per physical core not busy with other work")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="checkpoint directory (native or Hugging Face, with its tokenizer file) (default: the "
                        "embedded tiny Mixtral)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="parameter dtype (default: the checkpoint's own, i.e. the dtype holding most of its "
                        "bytes; float32 for the embedded model, named or not, whose numbers were measured in "
                        "float32)")
    p.add_argument("--max-context", type=int, default=None, metavar="TOKENS",
                   help="context length in tokens (default: the model's max_seq_len, if it declares one)")
    p.add_argument("--compile", nargs="?", const="regional", choices=("regional", "full"), default=None,
                   help="torch.compile the decode step (Transformer.compile_decode): 'regional' (the default "
                        "with --compile: one block reused by every layer, seconds to compile) or 'full' (the whole "
                        "step: faster tokens than 'regional', longer to compile); compiled steps are saved on disk "
                        "and loaded by the next start; chat and serve compile in the background (default: off; on "
                        "a CPU with the C kernels built, the eager step is one C++ call and measured faster than "
                        "either: README, 'Speed on a CPU')")
    _add_threads_option(p, _MODEL_THREADS)


def _add_sampling_options(p: argparse.ArgumentParser, max_tokens: str) -> None:
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: 0.7)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0, off)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N", help=f"tokens to generate (default: "
                                                                              f"{max_tokens})")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="-2..2 (default: 0)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="-2..2 (default: 0)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible (default: none)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="a stop string, repeatable (default: none)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mistral-ref", description="Reference implementation of the Mistral family")
    p.add_argument("--version", action="version", version=f"mistral-ref {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("info", help="print the family table: parameters, KV cache (instant: no torch)").set_defaults(
        func=cmd_info)

    d = sub.add_parser("demo", help="run the demo on the embedded default model")
    _add_threads_option(d, "1: the embedded model is tiny")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("convert", help="convert a checkpoint between native and Hugging Face formats")
    c.add_argument("src", help="checkpoint directory to read")
    c.add_argument("dst", help="directory to write")
    c.add_argument("--to", choices=["native", "hf", "gguf"], required=True,
                   help="output format (required); gguf: DST is a .gguf file")
    c.add_argument("--gguf-type", default="F16", choices=GGUF_TYPES,
                   help="with --to gguf: the ggml type of the matrices (norms and routers stay F32) (default: F16)")
    c.add_argument("--max-shard-bytes", type=int, default=None, metavar="BYTES",
                   help="split the output into shards of at most this size (default: one file)")
    _add_threads_option(c, "one per physical core not busy with other work")
    c.set_defaults(func=cmd_convert)

    ch = sub.add_parser("chat", help="chat in the terminal (streaming)")
    _add_model_options(ch)
    _add_sampling_options(ch, f"{CHAT_MAX_TOKENS} per reply, capped by the context")
    ch.add_argument("--system", default=None, help="a system prompt (default: none)")
    ch.add_argument("--json", action="store_true", help="JSON mode: every reply is a JSON object (default: off)")
    ch.add_argument("--reasoning-effort", default=None, metavar="LEVEL",
                    help="how much a v15 model thinks before answering: none ... max, as its tokenizer file allows "
                    "(default: the model's own)")
    ch.add_argument("--prompt-mode", choices=["reasoning"], default=None,
                    help="reasoning: begin with the checkpoint's SYSTEM_PROMPT.txt (default: none); a model's "
                    "thinking is shown on stderr")
    ch.set_defaults(func=cmd_chat)

    g = sub.add_parser("generate", help="one-shot raw completion of a prompt (no chat template), streamed")
    _add_model_options(g)
    g.add_argument("--prompt", required=True, help="the text to continue (required)")
    _add_sampling_options(g, "128")
    g.add_argument("--ignore-eos", action="store_true",
                   help="generate exactly --max-tokens tokens (default: stop at EOS)")
    g.set_defaults(func=cmd_generate, max_tokens=128)

    sv = sub.add_parser("serve", help="serve the chat-completions API over HTTP")
    _add_model_options(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port, checked before loading; 0 = any (default: 8000)")
    sv.add_argument("--model-name", default=None, help="the name clients use (default: the directory name)")
    sv.add_argument("--max-body-bytes", type=int, default=4 << 20, metavar="BYTES",
                    help="largest request body accepted (default: 4 MiB)")
    _add_serve_options(sv)
    sv.set_defaults(func=cmd_serve)
    _add_parity_parser(sub)
    _add_quantize_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None) is not None and args.threads < 1:
        print(f"mistral-ref {args.command}: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    args.cores = free_cores()  # read before this command loads or computes anything (its own load would count)
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader went away (`mistral-ref info | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError, KeyError) as e:  # our errors say what and where (OSError: e.g. port in use)
        print(f"mistral-ref {args.command}: error: {e}", file=sys.stderr)
        return 2
