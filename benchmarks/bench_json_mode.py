"""Per-token overhead of constrained JSON decoding: the runtime llguidance processor (mistral_ref.grammar) and
the hand-written teaching grammar (mistral_ref.json_mode).

    .venv/bin/python benchmarks/bench_json_mode.py [--tokens 64] [--rows 4]

For each tokenizer (SentencePiece v3, 32,768 tokens; Tekken, 131,072 tokens) a tiny random-weight model generates
with the JsonLogitsProcessor, and the processor's own time is measured per generated token:

* greedy: the lazy path (tokens checked one by one in descending logit order until one is allowed);
* sampled: the exact allowed mask, from the per-state cache or computed with numpy on a miss;
* sampled + structure: a logit bias makes JSON punctuation and EOS likely, so the grammar state changes almost
  every token (the cache's worst case).

It also reports the one-time cost per tokenizer (token bytes + index) and, for scale, what a naive mask costs:
running every token of the vocabulary through the grammar in a Python loop, for one state.

Then the same modes with the runtime path, grammar.GrammarLogitsProcessor (llguidance), on ``json_object`` and on
a JSON schema with nested objects, arrays and enums (rows "llguidance ..."): its time per generated token covers
feeding the token to the matcher, computing the mask and applying it to the logits.
"""

from __future__ import annotations

import argparse
import time

import torch

from mistral_ref.config import ModelArgs
from mistral_ref.generation import generate
from mistral_ref.grammar import GrammarLogitsProcessor, json_schema_grammar, ll_tokenizer
from mistral_ref.json_mode import JsonLogitsProcessor, JsonVocab, advance, initial_state, json_vocab
from mistral_ref.model import Transformer
from mistral_ref.tokenizer import load_tokenizer, mistral_common_data_dir


class Timed:
    """Wraps a logits processor and adds up the time spent in it."""

    def __init__(self, proc):
        self.proc, self.seconds, self.calls = proc, 0.0, 0

    def __call__(self, generated, logits):
        t0 = time.perf_counter()
        out = self.proc(generated, logits)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def structure_bias(tok, vocab: JsonVocab, strength: float = 8.0):
    """A processor adding `strength` to the logits of EOS and of tokens made only of JSON punctuation."""
    bias = torch.zeros(tok.vocab_size)
    for i, data in enumerate(vocab.token_bytes):
        if data and all(c in b'{}[]":,' for c in data):
            bias[i] = strength
    bias[tok.eos_id] = strength + 2

    def proc(generated, logits):
        return logits + bias
    return proc


def run(name: str, tokens: int, rows: int) -> None:
    tok = load_tokenizer(mistral_common_data_dir() / name)
    t0 = time.perf_counter()
    vocab = json_vocab(tok)
    build = time.perf_counter() - t0
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, hidden_dim=128, n_heads=4, n_kv_heads=2,
                                  vocab_size=tok.vocab_size)).eval()
    prompt = tok.encode_chat([{"role": "user", "content": "Answer in JSON."}])

    state = advance(initial_state(), b'{"key": "va')
    t0 = time.perf_counter()
    sum(advance(state, b) is not None for b in vocab.token_bytes if b)
    naive = time.perf_counter() - t0
    vocab._cache.clear()
    t0 = time.perf_counter()
    vocab.allowed(state)
    vectorised = time.perf_counter() - t0

    print(f"\n{name}: vocabulary {tok.vocab_size} tokens; token bytes + index built once in {build:.2f} s")
    print(f"  one full mask, one state: naive Python loop {naive * 1e3:.0f} ms, vectorised {vectorised * 1e3:.1f} ms")
    print("  | mode | rows | tokens generated | model + sampling ms/token | JSON processor ms/token | cache hit rate |")
    print("  |---|---|---|---|---|---|")
    for mode in ("greedy", "sampled", "sampled + structure"):
        greedy = mode == "greedy"
        vocab._cache.clear()
        vocab.cache_hits = vocab.cache_misses = 0
        proc = Timed(JsonLogitsProcessor(tok, greedy=greedy))
        procs = [structure_bias(tok, vocab), proc] if "structure" in mode else [proc]
        n_rows = 1 if greedy else rows
        t0 = time.perf_counter()
        results = generate(model, [prompt] * n_rows, tokens, temperature=0 if greedy else 1.0, seed=0,
                           eos_id=tok.eos_id, logits_processors=procs)
        total = time.perf_counter() - t0
        n = sum(len(r.tokens) + (r.stop_token_id is not None) for r in results)
        lookups = vocab.cache_hits + vocab.cache_misses
        hit = f"{vocab.cache_hits / lookups:.0%} of {lookups}" if lookups else "- (lazy path)"
        print(f"  | {mode} | {n_rows} | {n} | {(total - proc.seconds) / n * 1e3:.2f} | "
              f"{proc.seconds / n * 1e3:.2f} | {hit} |")


SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "role": {"enum": ["admin", "user"]},
    "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "integer"}}}},
    "required": ["name", "role"]}


def run_grammar(name: str, tokens: int, rows: int) -> None:
    tok = load_tokenizer(mistral_common_data_dir() / name)
    t0 = time.perf_counter()
    ll_tokenizer(tok)
    build = time.perf_counter() - t0
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, hidden_dim=128, n_heads=4, n_kv_heads=2,
                                  vocab_size=tok.vocab_size)).eval()
    prompt = tok.encode_chat([{"role": "user", "content": "Answer in JSON."}])
    bias = structure_bias(tok, json_vocab(tok))
    print(f"\n{name}: vocabulary {tok.vocab_size} tokens; llguidance tokenizer built once in {build:.2f} s")
    print("  | mode | rows | tokens generated | model + sampling ms/token | grammar processor ms/token |")
    print("  |---|---|---|---|---|")
    for what, schema in (("json_object", None), ("schema", SCHEMA)):
        grammar = json_schema_grammar(schema)
        for mode in ("greedy", "sampled", "sampled + structure"):
            greedy = mode == "greedy"
            proc = Timed(GrammarLogitsProcessor(tok, grammar))
            procs = [bias, proc] if "structure" in mode else [proc]
            n_rows = 1 if greedy else rows
            t0 = time.perf_counter()
            results = generate(model, [prompt] * n_rows, tokens, temperature=0 if greedy else 1.0, seed=0,
                               eos_id=tok.eos_id, logits_processors=procs)
            total = time.perf_counter() - t0
            n = sum(len(r.tokens) + (r.stop_token_id is not None) for r in results)
            print(f"  | llguidance {what}, {mode} | {n_rows} | {n} | {(total - proc.seconds) / n * 1e3:.2f} | "
                  f"{proc.seconds / n * 1e3:.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=64, help="max tokens per row")
    p.add_argument("--rows", type=int, default=4, help="batch rows when sampling")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    for name in ("mistral_instruct_tokenizer_240323.model.v3", "tekken_240718.json"):
        run(name, args.tokens, args.rows)
    for name in ("mistral_instruct_tokenizer_240323.model.v3", "tekken_240718.json"):
        run_grammar(name, args.tokens, args.rows)


if __name__ == "__main__":
    main()
