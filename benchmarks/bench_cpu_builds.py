"""The C kernels' builds against each other, same run: one-row products streaming from memory (decode's case).

`make bench` runs it last.  Each kernel build of backends/cpu_gemv.c is loaded side by side (cpu_gemv.build with
extra flags: the native build with the walk cpu_gemv chose and with the other one, the same build without its
prefetches, and, on a CPU with AVX-512, the AVX2 loops alone)
and times one-row bf16 / int8 / int4 products over weights far larger than the caches (`--mb` of bf16 weight),
alternating the builds, each round starting with the next one (whichever ran first in a round was slower here:
the position, not the code, showed between identical int4 loops).  Prints GB/s of weight read per build (median
[min-max]) and each round's time ratio to the native build.  The builds give bitwise the same results
(tests/test_cpu_gemv.py).  Then eager greedy decode of a bench model (`--decode`, bf16 random weights, 32 tokens
after a 128-token prompt, batch 1) with the walk cpu_gemv chose and with the other one, alternating.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import MODELS, QUICK_MODELS, random_model  # noqa: E402

from mistral_ref.backends import cpu_gemv  # noqa: E402
from mistral_ref.generation import generate  # noqa: E402
from mistral_ref.quantize import quantize_weight  # noqa: E402


def builds() -> dict[str, tuple[object, int]]:
    """name -> (loaded library, walk to set: 1 four rows at a time, 0 one row): native first, with the walk
    cpu_gemv chose for this machine; then the native build with the other walk, and the others with four rows."""
    native = cpu_gemv.library()
    if native is None:
        raise SystemExit(f"C kernels unavailable: {cpu_gemv.status()}")
    chosen = native.cpu_gemv_walk()
    out = {"native": (native, chosen), f"native, {cpu_gemv.WALKS[1 - chosen]}": (native, 1 - chosen),
           "no prefetch": (cpu_gemv.load(cpu_gemv.build(("-DCPU_GEMV_NO_PREFETCH",))), 1)}
    if native.cpu_gemv_isa() == 3:
        out["AVX2 loops"] = (cpu_gemv.load(cpu_gemv.build(("-DCPU_GEMV_NO_AVX512",))), 1)
    return out


def product(lib, x: torch.Tensor, w, y: torch.Tensor, threads: int) -> None:
    """y = x @ w.T through `lib` (bf16 x and y), as cpu_gemv.gemv_float / gemv_quantized call it."""
    rows, inp = x.shape
    if isinstance(w, torch.Tensor):
        code = lib.gemv_float(x.data_ptr(), w.data_ptr(), 0, y.data_ptr(), 1, rows, w.shape[0], inp, threads)
    elif w.scheme == "int8":
        code = lib.gemv_int8(x.data_ptr(), w.qweight.data_ptr(), w.scales.data_ptr(),
                             int(w.scales.dtype == torch.bfloat16), y.data_ptr(), 1, rows, w.shape[0], inp, threads)
    else:
        code = lib.gemv_int4(x.data_ptr(), w.qweight.data_ptr(), w.scales_and_zeros.data_ptr(),
                             int(w.scales_and_zeros.dtype == torch.bfloat16), y.data_ptr(), 1, rows, w.shape[0],
                             inp, w.group_size, threads)
    if code != 0:
        raise MemoryError("cpu_gemv: out of memory")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=int, default=256, help="MB of bf16 weight (8192 x 1024 matrices)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--decode", default="mistral-125m", choices=[*MODELS, *QUICK_MODELS, "none"],
                   help="the model whose eager decode is timed with either walk ('none': skip)")
    opts = p.parse_args(argv)
    libs = builds()
    g = torch.Generator().manual_seed(0)
    dense = [(torch.randn(8192, 1024, generator=g) * 0.05).bfloat16() for _ in range(max(1, opts.mb // 16))]
    x = torch.randn(1, 1024, generator=g).bfloat16()
    y = torch.empty(1, 8192, dtype=torch.bfloat16)
    print(f"# C kernel builds, one-row products of {len(dense)} x (8192 x 1024) weights, {opts.threads} threads, "
          f"{opts.rounds} alternating rounds; GB/s of weight read, median [min-max]; per-round time ratio to native")
    print(f"# native: the walk cpu_gemv chose here, {cpu_gemv.walk()}; 'no prefetch' and 'AVX2 loops' walk four rows "
          f"at a time (their loops without prefetches / without the four-row AVX-512 loops)")
    for scheme, width in (("bf16", 2.0), ("int8", 1.0), ("int4", 0.5)):
        weights = dense if scheme == "bf16" else [quantize_weight(w, scheme, 32) for w in dense]
        nbytes = len(dense) * 8192 * 1024 * width
        seconds: dict[str, list[float]] = {name: [] for name in libs}
        names = list(libs)
        for k in range(opts.rounds + 1):  # the first round warms up, not counted
            for name in names[k % len(names):] + names[:k % len(names)]:  # each round starts with another build
                lib, walk = libs[name]
                lib.cpu_gemv_set_walk(walk)
                t0 = time.perf_counter()
                for w in weights:
                    product(lib, x, w, y, opts.threads)
                seconds[name].append(time.perf_counter() - t0)
        for name, s in seconds.items():
            s = s[1:]
            rates = [nbytes / t / 1e9 for t in s]
            ratios = ", ".join(f"{a / b:.2f}" for a, b in zip(s, seconds["native"][1:]))
            print(f"{scheme} {name}: {statistics.median(rates):.1f} [{min(rates):.1f}-{max(rates):.1f}] GB/s, "
                  f"time / native per round: {ratios}", flush=True)
    native, chosen = libs["native"]
    native.cpu_gemv_set_walk(chosen)
    if opts.decode != "none":
        decode_walks(opts.decode, opts.rounds, chosen)


def decode_walks(name: str, rounds: int, chosen: int) -> None:
    """Eager greedy decode (bf16, 32 tokens after 128, batch 1) with the chosen walk and the other, alternating,
    each round starting with the other one; tok/s median [min-max] and each round's ratio chosen / other."""
    model = random_model({**MODELS, **QUICK_MODELS}[name]).to(torch.bfloat16)
    prompt = [list(range(1, 129))]
    rates: dict[int, list[float]] = {chosen: [], 1 - chosen: []}
    for k in range(rounds + 1):  # the first round warms up, not counted
        for walk in (chosen, 1 - chosen) if k % 2 == 0 else (1 - chosen, chosen):
            cpu_gemv.set_walk(bool(walk))
            t0 = time.perf_counter()
            generate(model, prompt, 32, temperature=0.0)
            if k:
                rates[walk].append(32 / (time.perf_counter() - t0))
    cpu_gemv.set_walk(bool(chosen))
    for walk, r in rates.items():
        print(f"decode {name} bf16 b1, {cpu_gemv.WALKS[walk]}{' (chosen)' if walk == chosen else ''}: "
              f"{statistics.median(r):.1f} [{min(r):.1f}-{max(r):.1f}] tok/s", flush=True)
    ratios = ", ".join(f"{a / b:.2f}" for a, b in zip(rates[chosen], rates[1 - chosen]))
    print(f"decode {name}: chosen walk's tok/s / the other's per round: {ratios}", flush=True)


if __name__ == "__main__":
    main()
