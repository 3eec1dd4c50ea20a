"""Compiled decode without the wait: time from `mistral-ref chat --compile` to the first token (cold and warm
compile cache), and decode tokens/s eager vs regional compile vs full-graph compile, in one run.

    .venv/bin/python benchmarks/bench_compile.py [--quick] [--models mistral-125m,mixtral-140m] [--dtypes fp32,bf16]
                                                 [--quantized int8,int4] [--threads N] [--runs 3] [--new 64]
                                                 [--skip-decode] [--json out.json]

For each model shape (bench.py's random-weight Mistral-shaped 125M and Mixtral-shaped 140M; the vocabulary is the
tokenizer's: mistral-common's v3 SentencePiece model, 32768 tokens, else the embedded model's, 3072) and dtype:

* chat: a checkpoint is written to a temporary directory in the row's dtype (as Mistral's bf16 checkpoints are),
  and `mistral-ref chat CKPT --compile MODE` (regional, full) is started in a fresh process with one user turn on
  stdin (a reply of 64 tokens); the time from starting the process to the reply's first character on stdout
  (starting Python and loading included), and the time from --compile to the compiled step running, as chat
  reports it (chat compiles in the background: the first tokens decode eagerly).  "cold" uses an empty compile
  cache directory (TORCHINDUCTOR_CACHE_DIR), "warm" starts again on the same directory (median of --runs starts),
  which loads the saved steps; `chat` without --compile is the baseline, and `python -c "import torch"`, started
  before each start, the floor under any start.  The starts write and reuse Python's bytecode, as Python
  does by default (a PYTHONDONTWRITEBYTECODE in the environment is dropped for them).
* decode tokens/s, greedy, --new tokens after a 128-token prompt, batch 1, in this process on one model: eager,
  regional compile (compile_decode(mode="regional"), the default) and full-graph compile (mode="full"), rounds
  alternating, each mode's compile time measured on its own first (cold: a fresh cache directory), then the time a
  new CompiledDecode takes to load the saved steps; the greedy tokens of the three must be identical.  The same
  for int8 and int4 (group 32) weight-only models computing in bf16 (--quantized; decode only).

A benchmark, not a test: nothing here asserts a speed; `--quick` smoke-runs one tiny model.  `make bench` runs it
after bench.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from bench import (
    DTYPES,
    MODELS,
    QUICK_MODELS,
    StepClock,
    alternate,
    fmt,
    load_average,
    physical_cores,
    random_model,
    summary,
)

from mistral_ref.backends.compiled import compile_decode
from mistral_ref.checkpoint import save_checkpoint
from mistral_ref.embedded import EMBEDDED_MODEL_DIR
from mistral_ref.generation import generate
from mistral_ref.quantize import quantize_model
from mistral_ref.tokenizer import load_tokenizer

READY = re.compile(r"compiled decode step ready ([\d.]+) s after --compile \(([^)]+)\)")


def tokenizer_file() -> Path:
    """mistral-common's v3 SentencePiece model (Mistral's 32768 tokens) if installed, else the embedded model's."""
    try:
        from mistral_ref.tokenizer import mistral_common_data_dir

        path = mistral_common_data_dir() / "mistral_instruct_tokenizer_240323.model.v3"
        if path.exists():
            return path
    except (ImportError, OSError):
        pass
    return EMBEDDED_MODEL_DIR / "tokenizer.model.v3"


def write_checkpoint(args, directory: Path, dtype: torch.dtype = torch.float32) -> None:
    """A random-weight native checkpoint of `args` in `dtype` with a v3 tokenizer next to it."""
    save_checkpoint(random_model(args).to(dtype), directory, format="native")
    shutil.copy(tokenizer_file(), directory / "tokenizer.model.v3")


def first_token(ckpt: Path, dtype: str, threads: int, compile_dir: Path | None, mode: str = "regional") -> dict:
    """Start `mistral-ref chat` (with --compile MODE when compile_dir is given) on one user turn of --max-tokens
    64; seconds from the start to the reply's first character and to the end of the reply, and when the
    compiled step was ready (seconds after --compile began, as chat reports it) and how (compiled / loaded)."""
    cmd = [sys.executable, "-m", "mistral_ref", "chat", str(ckpt), "--temperature", "0", "--max-tokens", "64",
           "--dtype", str(DTYPES[dtype]).removeprefix("torch."), "--threads", str(threads)]
    cmd += ["--compile", mode] if compile_dir else []
    env = start_env()
    if compile_dir:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(compile_dir)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdin.write(b"Tell me a story.\n")
    proc.stdin.close()  # one turn, then end of input: chat exits after the reply (and a compilation it started)
    first = None
    while first is None:
        c = proc.stdout.read(1)
        if not c:
            break
        if not c.isspace():
            first = time.perf_counter() - t0
    reply = proc.stdout.read()
    err = proc.stderr.read().decode()
    if proc.wait() != 0 or first is None:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err}")
    m = READY.search(err)
    if compile_dir and m is None:
        raise RuntimeError(f"{' '.join(cmd)} did not report its compiled step:\n{err}")
    return {"first_token_s": first, "exit_s": time.perf_counter() - t0, "reply_bytes": len(reply),
            "ready_s": float(m[1]) if m else None, "how": m[2] if m else None}


def start_env() -> dict:
    """The environment of the timed starts: this one, except that Python writes and reuses bytecode as it does by
    default (PYTHONDONTWRITEBYTECODE, set in some sandboxes, would compile mistral_ref's sources at every start)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def import_torch() -> float:
    """Seconds from starting Python to `import torch` done (a character on stdout, as first_token times it; not
    the process's exit): the floor under any start of mistral-ref."""
    t0 = time.perf_counter()
    with subprocess.Popen([sys.executable, "-c", "import torch; print('x', flush=True)"], stdout=subprocess.PIPE,
                          env=start_env()) as proc:
        if proc.stdout.read(1) != b"x":
            raise RuntimeError("python -c 'import torch' failed")
        seconds = time.perf_counter() - t0
        proc.stdout.read()
    return seconds


def bench_first_token(args, dname: str, threads: int, runs: int, tmp: Path) -> dict:
    """Starts of `chat` (eager, then --compile regional and full: cold, then warm) on a checkpoint saved in the
    run's dtype (as Mistral's are: bf16 weights load as views of the file), each start after one of
    `python -c "import torch"` (the floor)."""
    ckpt = tmp / "ckpt"
    write_checkpoint(args, ckpt, DTYPES[dname])
    floor = []

    def start(compile_dir: Path | None = None, mode: str = "regional") -> dict:
        floor.append(import_torch())
        return first_token(ckpt, dname, threads, compile_dir, mode)

    out = {"eager": [start() for _ in range(runs)]}
    for mode in ("regional", "full"):
        cache_dir = tmp / f"compile-cache-{mode}"  # empty: the first compiled start is cold
        out[mode] = {"cold": start(cache_dir, mode), "warm": [start(cache_dir, mode) for _ in range(runs)]}
    out["import_torch"] = floor
    shutil.rmtree(ckpt)
    return out


def bench_decode_modes(args, dtype: torch.dtype, prompt_len: int, new: int, runs: int, tmp: Path,
                       quantize: str | None = None, modes: tuple[str, ...] = ("regional", "full")) -> dict:
    """Decode tok/s of eager and each compile mode on one model, rounds alternating; compile times first
    (cold: a fresh cache directory), then the time to load the saved steps (a second CompiledDecode)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "decode-cache")  # fresh: both compiles are cold
    model = random_model(args).to(dtype)
    if quantize:  # int8 / int4 (group 32) weight-only, computing in `dtype`
        quantize_model(model, quantize, group_size=32)
    steps, compile_s, load_s = {"eager": None}, {}, {}
    for mode in modes:
        torch._dynamo.reset()
        compile_decode(model, mode=mode)
        compile_s[mode] = model.compiled_decode.warm_up(1, prompt_len + new)  # (seconds, what happened)
        torch._dynamo.reset()
        compile_decode(model, mode=mode)
        load_s[mode] = model.compiled_decode.warm_up(1, prompt_len + new)  # loaded from the disk this time
        steps[mode] = model.compiled_decode
    prompt = torch.randint(0, args.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1)).tolist()
    tokens, clock = {}, StepClock(model)

    def run(mode):
        def fn():
            model.compiled_decode = steps[mode]
            tokens[mode] = generate(model, prompt, new, temperature=0.0)[0].tokens
            return clock.run(lambda: generate(model, prompt, new, temperature=0.0))[1]
        return fn

    t = alternate({mode: run(mode) for mode in steps}, runs, measure=lambda fn: fn(), warmup=False)
    clock.handle.remove()
    model.compiled_decode = None
    return {"tok_s": {mode: summary([1 / s for s in v]) for mode, v in t.items()},
            "compile": {mode: {"seconds": s, "how": how} for mode, (s, how) in compile_s.items()},
            "load": {mode: {"seconds": s, "how": how} for mode, (s, how) in load_s.items()},
            "same_tokens": all(tokens[mode] == tokens["eager"] for mode in modes)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one tiny model, fp32, one round (smoke test)")
    p.add_argument("--models", help=f"comma-separated subset of {', '.join(MODELS)} (default mistral-125m,"
                                    "mixtral-140m)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of fp32,bf16 ('none': only the "
                                                         "quantized rows)")
    p.add_argument("--threads", type=int, help="torch threads (default: physical cores)")
    p.add_argument("--runs", type=int, help="rounds per figure (default 3; quick 1)")
    p.add_argument("--new", type=int, help="new tokens per decode run (default 64; quick 8)")
    p.add_argument("--quantized", default="int8,int4",
                   help="weight-only schemes whose decode modes are measured too, in bf16 (default int8,int4; "
                        "'' for none)")
    p.add_argument("--skip-decode", action="store_true", help="only the chat starts (no decode tokens/s)")
    p.add_argument("--json", type=Path, help="also write every figure here")
    opts = p.parse_args(argv)
    threads = opts.threads or physical_cores()
    torch.set_num_threads(threads)
    runs = opts.runs or (1 if opts.quick else 3)
    new = opts.new or (8 if opts.quick else 64)
    vocab = load_tokenizer(tokenizer_file()).vocab_size
    if opts.quick:
        models = {name: replace(a, vocab_size=vocab, n_layers=4) for name, a in QUICK_MODELS.items()}
    else:
        names = opts.models.split(",") if opts.models else ["mistral-125m", "mixtral-140m"]
        models = {name: replace(MODELS[name], vocab_size=vocab) for name in names}
    dtypes = ["fp32"] if opts.quick else [d for d in opts.dtypes.split(",") if d not in ("", "none")]

    print(f"# compiled decode: first token of `mistral-ref chat --compile`, decode eager / regional / full — torch "
          f"{torch.__version__}, {threads} threads, load average {load_average()}")
    print(f"vocabulary {vocab} ({tokenizer_file().name}); medians [min-max] of {runs} rounds\n")
    rows, result = [], {"threads": threads, "runs": runs, "models": {}}
    for name, args in models.items():
        for dname in dtypes:
            with tempfile.TemporaryDirectory() as tmp:
                ft = bench_first_token(args, dname, threads, runs, Path(tmp))
                dec = None if opts.skip_decode else bench_decode_modes(
                    args, DTYPES[dname], 128 if not opts.quick else 32, new, runs, Path(tmp))
            result["models"].setdefault(name, {})[dname] = {"first_token": ft, "decode": dec}
            rows.append((name, dname, ft, dec))
            decode = "" if dec is None else (f"; decode regional {fmt(dec['tok_s']['regional'])} full "
                                             f"{fmt(dec['tok_s']['full'])} tok/s")
            print(f"  {name} {dname}: chat --compile first token {ft['regional']['cold']['first_token_s']:.1f} s "
                  f"cold, compiled step ready {ft['regional']['cold']['ready_s']:.1f} s after --compile{decode}",
                  flush=True)

        for scheme in [] if opts.quick or opts.skip_decode or not opts.quantized else opts.quantized.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                dec = bench_decode_modes(args, torch.bfloat16, 128, new, runs, Path(tmp), quantize=scheme,
                                         modes=("regional",))  # (the full graph: minutes more per row)
            result["models"].setdefault(name, {})[f"{scheme}-bf16"] = {"decode": dec}
            rows.append((name, f"{scheme} (bf16)", None, dec))
            print(f"  {name} {scheme} (bf16): decode eager {fmt(dec['tok_s']['eager'])} regional "
                  f"{fmt(dec['tok_s']['regional'])} tok/s", flush=True)

    def med(xs, key):
        return statistics.median(x[key] for x in xs)

    print("\n## `mistral-ref chat --compile [MODE]`: seconds from starting the process to the reply's first token")
    print("(eager = chat without --compile; cold = empty compile cache, warm = the next starts; medians; floor = "
          "`python -c 'import torch'`, started before each start)")
    print("| model | dtype | floor | eager | regional cold | regional warm | full cold | full warm |")
    print("|---|---|---|---|---|---|---|---|")
    for name, dname, ft, _ in rows:
        if ft is None:  # quantized rows: decode only
            continue
        r, f = ft["regional"], ft["full"]
        print(f"| {name} | {dname} | {statistics.median(ft['import_torch']):.1f} | "
              f"{med(ft['eager'], 'first_token_s'):.1f} | {r['cold']['first_token_s']:.1f} | "
              f"{med(r['warm'], 'first_token_s'):.1f} | {f['cold']['first_token_s']:.1f} | "
              f"{med(f['warm'], 'first_token_s'):.1f} |")
    print("\n## ... and seconds from --compile to the compiled step running (compiled in the background meanwhile, "
          "tokens decode eagerly; warm = loaded from the disk)")
    print("| model | dtype | regional cold | regional warm | full cold | full warm |")
    print("|---|---|---|---|---|---|")
    for name, dname, ft, _ in rows:
        if ft is None:
            continue
        r, f = ft["regional"], ft["full"]
        print(f"| {name} | {dname} | {r['cold']['ready_s']:.1f} ({r['cold']['how']}) | {med(r['warm'], 'ready_s'):.1f} "
              f"({r['warm'][-1]['how']}) | {f['cold']['ready_s']:.1f} ({f['cold']['how']}) | "
              f"{med(f['warm'], 'ready_s'):.1f} ({f['warm'][-1]['how']}) |")
    decoded = [row for row in rows if row[3] is not None]
    if decoded:  # (not with --skip-decode)
        print(f"\n## Decode tokens/s, batch 1, greedy, {new} new tokens; compile = seconds to compile each mode "
              "(cold), load = seconds for a new start to load it")
        print("| model | dtype | eager | regional | full | compile regional / full | load regional / full | "
              "greedy tokens identical |")
        print("|---|---|---|---|---|---|---|---|")
        for name, dname, _, dec in decoded:
            t, c, ld = dec["tok_s"], dec["compile"], dec["load"]
            full = "full" in t  # (quantized rows: regional only)
            c_full, ld_full = (f"{c['full']['seconds']:.1f}", f"{ld['full']['seconds']:.1f}") if full else ("-", "-")
            print(f"| {name} | {dname} | {fmt(t['eager'])} | {fmt(t['regional'])} | "
                  f"{fmt(t['full']) if full else '-'} | {c['regional']['seconds']:.1f} / {c_full} | "
                  f"{ld['regional']['seconds']:.1f} / {ld_full} | {dec['same_tokens']} |")
    print(f"\nload average after: {load_average()}")
    if opts.json:
        opts.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
