"""Encode/decode throughput of mistral_ref.tokenizer against mistral-common on the same text.

Usage: .venv/bin/python benchmarks/bench_tokenizer.py [--mb 2] [--repeat 5]

Prints, for every tokenizer file shipped in the mistral-common wheel, the best-of-N throughput of
``encode`` (MB of UTF-8 per second) and ``decode`` for both libraries, and the ratio ours / theirs
(> 1 means we are faster). Both sides produce the same ids (checked before timing). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from mistral_ref.tokenizer import load_tokenizer, mistral_common_data_dir

SAMPLE = (
    "The quick brown fox jumps over the lazy dog. Le cœur a ses raisons que la raison ne connaît point. "
    "Größenwahn in Köln. ¿Qué tal, señor? हिन्दी भारत की राजभाषा है। "
    "اللغة العربية جميلة. 我能吞下玻璃而不伤身体。 "
    "മലയാളം ഒരു ദ്രാവിഡ ഭാഷയാണ്. Emoji 😀👍🏽🇫🇷. def f(x):\n    return x ** 2  # code\n"
    "0 12 345 6789 3.14159 -2.5e-10   spaces   and\ttabs\r\n"
)
FILES = [
    "tokenizer.model.v1",
    "mistral_instruct_tokenizer_240323.model.v3",
    "mistral_instruct_tokenizer_241114.model.v7",
    "tekken_240718.json",
]


def best_of(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=1.0, help="megabytes of text per measurement")
    parser.add_argument("--repeat", type=int, default=5, help="best of N runs")
    args = parser.parse_args()

    data = mistral_common_data_dir()
    if data is None:
        raise SystemExit("mistral-common is not installed: pip install mistral-common")
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    text = SAMPLE * max(1, int(args.mb * 1e6 / len(SAMPLE.encode())))
    mb = len(text.encode()) / 1e6
    print(f"text: {mb:.2f} MB, best of {args.repeat}")
    print(f"{'file':44s} {'encode MB/s ours':>17s} {'theirs':>8s} {'ratio':>6s}   "
          f"{'decode MB/s ours':>17s} {'theirs':>8s} {'ratio':>6s}")  # fmt: skip
    for name in FILES:
        ours = load_tokenizer(data / name)
        theirs = MistralTokenizer.from_file(str(data / name)).instruct_tokenizer.tokenizer
        ids = ours.encode(text)
        assert ids == theirs.encode(text, bos=False, eos=False), "token mismatch"
        enc_ours = mb / best_of(lambda o=ours: o.encode(text), args.repeat)
        enc_theirs = mb / best_of(lambda t=theirs: t.encode(text, bos=False, eos=False), args.repeat)
        dec_ours = mb / best_of(lambda o=ours, i=ids: o.decode(i), args.repeat)
        dec_theirs = mb / best_of(lambda t=theirs, i=ids: t.decode(i), args.repeat)
        print(
            f"{name:44s} {enc_ours:17.1f} {enc_theirs:8.1f} {enc_ours / enc_theirs:6.2f}   "
            f"{dec_ours:17.1f} {dec_theirs:8.1f} {dec_ours / dec_theirs:6.2f}"
        )
        dec = ours.stream_decoder()
        t0 = time.perf_counter()
        for t in ids:
            dec.feed(t)
        dec.flush()
        dt = time.perf_counter() - t0
        print(f"{'':44s} streaming decode: {len(ids) / dt / 1e6:.2f} M tokens/s ({len(ids)} tokens)")


if __name__ == "__main__":
    main()
