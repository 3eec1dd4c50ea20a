"""Before/after: mistral_ref's own speed from two source trees (e.g. two commits), measured in one run.

    git worktree add /tmp/before <commit>
    python benchmarks/bench_ab.py /tmp/before . --rounds 3

Each round runs every tree once, alternating, in a fresh process (PYTHONPATH=tree), on the same random weights
(seeded) with the default backend: prefill of a 512-token prompt (logits of the last position) and greedy decode of
32 tokens at batch 1, for `make bench`'s Mistral 125M and Mixtral 140M shapes in fp32 and bf16.  Prints medians
[min-max] per tree and the ratio of medians (second tree / first).  A tree's own speed unchanged in the same run
means its ratios to transformers (`make bench`) are unchanged too.
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
import json, sys, time, torch
from mistral_ref.config import ModelArgs, MoeArgs
from mistral_ref.model import Transformer
try:
    from mistral_ref.generation import generate
except ImportError:  # trees from before generate.py was renamed
    from mistral_ref.generate import generate
torch.set_num_threads(int(sys.argv[1]))
shapes = {
    "mistral-125m": ModelArgs(dim=768, n_layers=12, hidden_dim=2048, n_heads=12, n_kv_heads=4, head_dim=64,
                              vocab_size=32000, norm_eps=1e-5, rope_theta=1e6),
    "mixtral-140m": ModelArgs(dim=512, n_layers=8, hidden_dim=1024, n_heads=8, n_kv_heads=2, head_dim=64,
                              vocab_size=32000, norm_eps=1e-5, rope_theta=1e6, moe=MoeArgs(8, 2)),
}
out = {}
for name, args in shapes.items():
    torch.manual_seed(0)
    model = Transformer(args).eval()
    for dtype in (torch.float32, torch.bfloat16):
        model = model.to(dtype)
        prompt = torch.randint(0, args.vocab_size, (1, 512), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            model(prompt[:, :64], logits_at=torch.tensor([63]))  # warm-up
            t = time.perf_counter()
            model(prompt, logits_at=torch.tensor([511]))
            prefill = 512 / (time.perf_counter() - t)
        ids = prompt[0, :128].tolist()
        generate(model, [ids], 4, temperature=0)  # warm-up
        t = time.perf_counter()
        res = generate(model, [ids], 32, temperature=0, ignore_eos=True)[0]
        decode = len(res.tokens) / (time.perf_counter() - t)
        key = f"{name} {str(dtype).split('.')[-1]}"
        out[key] = {"prefill 512 tok/s": prefill, "decode b1 tok/s": decode, "tokens": res.tokens[:8]}
print(json.dumps(out))
"""


def run(tree: Path, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree.resolve()))
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", PROBE, str(threads)], env=env, cwd=tree, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trees", nargs=2, type=Path, help="the two source trees (before, after)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    samples: list[list[dict]] = [[], []]
    for r in range(args.rounds):
        for i, tree in enumerate(args.trees):
            samples[i].append(run(tree, args.threads))
            print(f"round {r + 1}: {tree} done", file=sys.stderr, flush=True)
    first = samples[0][0]
    print(f"# {args.trees[0]} (A) vs {args.trees[1]} (B): medians [min-max] of {args.rounds} alternating rounds, "
          f"{args.threads} threads; ratio = B / A")
    for key in first:
        for metric in ("prefill 512 tok/s", "decode b1 tok/s"):
            a = [s[key][metric] for s in samples[0]]
            b = [s[key][metric] for s in samples[1]]
            ma, mb = statistics.median(a), statistics.median(b)
            print(f"{key:22s} {metric:18s} A {ma:8.1f} [{min(a):.1f}-{max(a):.1f}]  "
                  f"B {mb:8.1f} [{min(b):.1f}-{max(b):.1f}]  ratio {mb / ma:.2f}")
        same = all(s[key]["tokens"] == first[key]["tokens"] for s in samples[0] + samples[1])
        print(f"{key:22s} greedy tokens identical in every run: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
