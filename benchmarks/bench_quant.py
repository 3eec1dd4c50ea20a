"""Weight-only quantization: quality (KL divergence, top-1 agreement against bf16) and decode speed of bf16 /
int8 / int4 models, in one process on the same weights.

    .venv/bin/python benchmarks/bench_quant.py [--models embedded,mistral-125m] [--runs 5] [--threads N]
                                               [--probe 512] [--prompt 128] [--new 64] [--json out.json] [--quick]
                                               [--quality-only | --speed-only]

Models: "embedded" (the shipped tiny Mixtral, trained: probed on its held-out text) and "mistral-125m" (the
Mistral shape of benchmarks/bench.py with its random N(0, 0.02) weights: probed on random tokens).
Quality: one forward pass over --probe tokens; mistral_ref.parity.logits_agreement of each variant's logits
against the bf16 model's: top-1 agreement (fraction of positions with the same argmax), top-5 overlap, mean and
max KL(bf16 || variant) in nats.  fp32 against bf16 is printed first, to show the scale of bf16's own rounding.
Speed: greedy decode through generate(), --new tokens after a --prompt-token prompt, batch 1; a forward hook
times every pass, decode tokens/s = 1 / (seconds between consecutive passes).  Variants alternate round by round
(the order flips every round); medians over --runs rounds with [min-max].  A benchmark, not a test: nothing
here asserts a speed.  --quick: the embedded model and a tiny one, few tokens, 2 rounds (a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/bench.py: shapes, timing helpers
from bench import MODELS, QUICK_MODELS, StepClock, alternate, fmt, load_average, random_model, summary  # noqa: E402

from mistral_ref import load_embedded, quantize_model  # noqa: E402
from mistral_ref.embedded import EMBEDDED_MODEL_DIR  # noqa: E402
from mistral_ref.generation import generate  # noqa: E402
from mistral_ref.parity import logits_agreement  # noqa: E402
from mistral_ref.quantize import QuantizationError  # noqa: E402

# (label, scheme, group size); a group size that does not divide a model's widths is reported as such
VARIANTS = [("int8", "int8", 32), ("int4-g32", "int4", 32), ("int4-g64", "int4", 64), ("int4-g128", "int4", 128)]


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """(the fp32 model, probe tokens (1, T) without the length cut) of a model name."""
    if name == "embedded":
        model, tokenizer = load_embedded()
        docs = json.loads((EMBEDDED_MODEL_DIR / "heldout.json").read_text())["text_docs"]
        ids = [t for doc in docs for t in tokenizer.encode(doc, bos=True)]
        return model, torch.tensor([ids])
    args = {**MODELS, **QUICK_MODELS}[name]
    g = torch.Generator().manual_seed(1)
    return random_model(args), torch.randint(0, args.vocab_size, (1, 4096), generator=g)


def variants(fp32: torch.nn.Module) -> dict[str, torch.nn.Module | str]:
    """{label: bf16 model, quantized} (or the reason it cannot be) of every variant, bf16 itself first."""
    bf16 = copy.deepcopy(fp32).bfloat16()
    out: dict[str, torch.nn.Module | str] = {"bf16": bf16}
    for label, scheme, group in VARIANTS:
        try:
            out[label] = quantize_model(copy.deepcopy(bf16), scheme, group_size=group)
        except QuantizationError as e:
            out[label] = str(e).split(";")[0]
    return out


@torch.inference_mode()
def quality(fp32: torch.nn.Module, models: dict, probe: torch.Tensor) -> dict[str, dict]:
    reference = models["bf16"](probe)[0]  # (T, vocab)
    top = reference.argmax(-1)  # how spread the argmax is: top-1 agreement means little if one token wins
    rows: dict = {"bf16 argmax": {"distinct": int(top.unique().numel()),
                                  "most_frequent_share": float(top.bincount().max()) / top.numel()}}
    rows["fp32"] = logits_agreement(fp32(probe)[0], reference).__dict__
    for label, model in models.items():
        if label != "bf16":
            rows[label] = model if isinstance(model, str) else logits_agreement(model(probe)[0], reference).__dict__
    return rows


def speed(models: dict, vocab: int, prompt_len: int, new: int, runs: int) -> dict[str, dict]:
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(2)).tolist()
    runnable = {k: m for k, m in models.items() if not isinstance(m, str)}
    clocks = {k: StepClock(m) for k, m in runnable.items()}
    try:
        fns = {k: (lambda k=k: clocks[k].run(lambda: generate(runnable[k], prompt, new, temperature=0.0)))
               for k in runnable}
        t = alternate(fns, runs, measure=lambda fn: fn())
    finally:
        for c in clocks.values():
            c.handle.remove()
    return {k: summary([1 / step for _, step in v]) for k, v in t.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="embedded,mistral-125m")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--probe", type=int, default=512, help="tokens of the quality probe (default: 512)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--quality-only", action="store_true", help="skip the decode timing")
    p.add_argument("--speed-only", action="store_true", help="skip the quality probe")
    a = p.parse_args(argv)
    if a.quick:
        a.models, a.runs, a.probe, a.prompt, a.new = "embedded,tiny-gqa", 2, 64, 16, 8
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load_average()}")
    results = {}
    for name in a.models.split(","):
        fp32, probe = build(name)
        probe = probe[:, : min(a.probe, fp32.args.max_seq_len or a.probe)]
        models = variants(fp32)
        results[name] = {}
        if not a.speed_only:
            report_quality(name, quality(fp32, models, probe), probe.shape[1], results[name])
        if a.quality_only:
            continue
        s = speed(models, fp32.args.vocab_size, a.prompt, a.new, a.runs)
        print(f"{name}: decode tokens/s, batch 1, {a.new} tokens after {a.prompt}, median [min-max] of {a.runs}")
        for label, row in s.items():
            print(f"{label:<10} {fmt(row)}  ({row['median'] / s['bf16']['median']:.2f}x bf16)")
        results[name]["decode_tok_s"] = s
    print(f"\nload average after: {load_average()}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


def report_quality(name: str, q: dict, positions: int, result: dict) -> None:
    """Print the quality table of one model and add it to its result."""
    spread = q.pop("bf16 argmax")
    print(f"\n{name}: quality against bf16 over {positions} positions (bf16's argmax: {spread['distinct']} "
          f"distinct tokens, the most frequent at {spread['most_frequent_share']:.0%} of positions)")
    print(f"{'variant':<10} {'top-1':>7} {'top-5':>7} {'KL mean':>10} {'KL max':>10}")
    for label, row in q.items():
        if isinstance(row, str):
            print(f"{label:<10} n/a: {row}")
        else:
            print(f"{label:<10} {row['top1']:>7.3f} {row['top5']:>7.3f} {row['kl_mean']:>10.2e} {row['kl_max']:>10.2e}")
    result.update(quality=q, bf16_argmax=spread)


if __name__ == "__main__":
    main()
