"""The decode operators' C++ kernels against their Python functions: a compiled step's time both ways, one run.

    python benchmarks/bench_operators.py --rounds 2

Each round runs, alternating, a fresh process with MISTRAL_REF_CPU_OPS=0 (the operators torch.ops.mistral_ref.gemv_*
served by the Python functions of backends/cpu_gemv.py) and one with the C++ kernels of cpu_gemv_ops.cpp loaded, on
the same random weights (seeded): `make bench`'s Mixtral 140M and Mistral 125M shapes in bf16, int8 and int4,
decode step compiled (mode "full"), greedy decode of 64 tokens after a 128-token prompt, 5 runs a process.  Prints
the median [min-max] milliseconds of a decode step per process and the ratio of medians (C++ / Python) per round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PROBE = r"""
import json, statistics, sys, time, torch
sys.path.insert(0, sys.argv[1])
from bench import MODELS, QUICK_MODELS, random_model
from mistral_ref.backends import compiled, cpu_gemv
from mistral_ref.generation import generate
from mistral_ref.quantize import quantize_model
name, dtype, new = sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(int(sys.argv[5]))
model = random_model({**MODELS, **QUICK_MODELS}[name]).to(torch.bfloat16)
if dtype != "bf16":
    quantize_model(model, dtype)
model.compile_decode(mode="full")
model.compiled_decode.warm_up(1, 128 + new)
operators = cpu_gemv.operators(wait=True)
run = lambda: generate(model, [[1] * 128], new, temperature=0.0)
run()
call, spent = compiled.CompiledDecode.__call__, []
def timed(self, *a, **k):
    t = time.perf_counter()
    out = call(self, *a, **k)
    spent.append(time.perf_counter() - t)
    return out
compiled.CompiledDecode.__call__ = timed
steps = []
for _ in range(5):
    spent.clear()
    run()
    steps.append(sum(spent) / len(spent) * 1e3)
print(json.dumps({"operators": operators, "step_ms": steps}))
"""

CASES = [("mixtral-140m", "bf16"), ("mixtral-140m", "int8"), ("mixtral-140m", "int4"), ("mistral-125m", "bf16"),
         ("mistral-125m", "int8"), ("mistral-125m", "int4")]


def probe(name: str, dtype: str, cpp: bool, new: int, threads: int) -> dict:
    env = {**os.environ, "MISTRAL_REF_CPU_OPS": "1" if cpp else "0"}
    done = subprocess.run([sys.executable, "-c", PROBE, str(Path(__file__).parent), name, dtype, str(new),
                           str(threads)], capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{name} {dtype}: the probe failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--new", type=int, default=64, help="new tokens a run")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--cases", help="comma-separated model:dtype (default: " +
                   ",".join(f"{n}:{d}" for n, d in CASES) + ")")
    opts = p.parse_args(argv)
    cases = [tuple(c.split(":")) for c in opts.cases.split(",")] if opts.cases else CASES
    print(f"# compiled decode step, ms: operators in Python vs C++ ({opts.threads} threads, {opts.rounds} rounds, "
          f"{opts.new} tokens after a 128-token prompt)")
    for name, dtype in cases:
        for r in range(opts.rounds):
            py = probe(name, dtype, False, opts.new, opts.threads)
            cpp = probe(name, dtype, True, opts.new, opts.threads)
            if not cpp["operators"] == "C++":
                raise SystemExit(f"the C++ operators are not available: {cpp['operators']}")
            a, b = statistics.median(py["step_ms"]), statistics.median(cpp["step_ms"])
            print(f"{name} {dtype} round {r + 1}: Python {a:.2f} [{min(py['step_ms']):.2f}-{max(py['step_ms']):.2f}]"
                  f"  C++ {b:.2f} [{min(cpp['step_ms']):.2f}-{max(cpp['step_ms']):.2f}]  ratio {b / a:.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
