"""`make demo` / `mistral-ref demo`: the family table, then a short generation.

Until the embedded tiny Mixtral lands this runs a *random-weight* Mixtral-shaped model: the tokens it prints are
noise, and the demo says so.  What it shows is the machinery: presets, parameter counts, the cached decode loop.
"""

from __future__ import annotations

import time

import torch

from mistral_ref.cache import KVCache
from mistral_ref.cli import family_table
from mistral_ref.config import ModelArgs, MoeArgs
from mistral_ref.model import Transformer


def run_demo() -> int:
    print("The Mistral family (parameter counts computed on the meta device):\n")
    print(family_table())
    print("\nA short greedy generation on a RANDOM-WEIGHT Mixtral-shaped model (8 experts, top-2, GQA, window 16):")
    print("the output tokens are meaningless; this only exercises the prefill + rolling-cache decode loop.\n")
    torch.manual_seed(0)
    args = ModelArgs(dim=128, n_layers=4, hidden_dim=256, n_heads=4, n_kv_heads=2, head_dim=48, vocab_size=1000,
                     sliding_window=16, moe=MoeArgs(num_experts=8, num_experts_per_tok=2))
    model = Transformer(args).eval()
    prompt = torch.randint(3, args.vocab_size, (1, 24))
    max_tokens = 32
    cache = KVCache(args, batch_size=1, max_seq_len=prompt.shape[1] + max_tokens)
    out = []
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model(prompt, torch.arange(prompt.shape[1])[None], cache)
        for i in range(max_tokens):
            tok = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
            out.append(int(tok))
            logits = model(tok, torch.tensor([[prompt.shape[1] + i]]), cache)
    dt = time.perf_counter() - t0
    print(f"prompt ids: {prompt[0].tolist()}")
    print(f"generated ids: {out}")
    print(f"{max_tokens} tokens in {dt:.2f} s; rolling cache holds {cache.layers[0].capacity} slots per layer")
    return 0
