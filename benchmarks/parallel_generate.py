"""Load a checkpoint sharded over N ranks, greedy-generate from token ids, report per-rank memory and time.

Run under torchrun (gloo on CPUs, NCCL on GPUs; see mistral_ref/parallel.py):

    # once, single process: a random-weight checkpoint to measure with (or use a real one)
    python benchmarks/parallel_generate.py --make-checkpoint /tmp/ckpt --shape mistral
    # then, for N = 1, 2, 4 ...
    torchrun --nproc-per-node 2 benchmarks/parallel_generate.py /tmp/ckpt --tokens 1 1782 6323 --max-tokens 16

Every rank prints nothing; rank 0 prints one line per rank: load time, resident memory before loading, peak
resident memory after loading (ru_maxrss), the weights the rank holds, and the checkpoint's size / N, then the
generated ids (equal on every rank: checked) and the decode speed.
"""

from __future__ import annotations

import argparse
import importlib
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mistral_ref.cache import KVCache
from mistral_ref.checkpoint import checkpoint_index, find_checkpoint, read_model_args, save_checkpoint
from mistral_ref.config import ModelArgs, MoeArgs
from mistral_ref.model import Transformer
from mistral_ref.parallel import MOE_MODES, init_from_env, load_sharded_model

MiB = 2**20
SHAPES = {  # scaled-down family members: big enough that weights dominate a rank's memory
    "mistral": ModelArgs(dim=2048, n_layers=6, n_heads=16, n_kv_heads=8, head_dim=128, hidden_dim=7168,
                         vocab_size=32768, sliding_window=4096, rope_theta=1e6),
    "mixtral": ModelArgs(dim=1024, n_layers=4, n_heads=16, n_kv_heads=8, head_dim=64, hidden_dim=3584,
                         vocab_size=32768, rope_theta=1e6, moe=MoeArgs(num_experts=8, num_experts_per_tok=2)),
}


def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@torch.inference_mode()
def greedy(model: Transformer, prompt: list[int], max_tokens: int) -> tuple[list[int], float]:
    """Prefill, then decode max_tokens tokens by argmax with a KV cache.  returns ids, decode seconds."""
    device = model.device
    tokens = torch.tensor([prompt], device=device)  # (1, T)
    T = tokens.shape[1]
    cache = KVCache(model.args, 1, T + max_tokens, dtype=model.dtype, device=device)  # this rank's kv heads
    logits = model(tokens, torch.arange(T, device=device)[None], cache)[:, -1]  # (1, vocab)
    out = []
    t0 = time.perf_counter()
    for i in range(max_tokens):
        tok = logits.argmax(-1)  # (1,)
        out.append(int(tok))
        if i + 1 < max_tokens:
            logits = model(tok[:, None], torch.tensor([[T + i]], device=device), cache)[:, -1]
    return out, time.perf_counter() - t0


def make_checkpoint(directory: Path, shape: str, fmt: str, dtype: str, seed: int) -> None:
    args = SHAPES[shape]
    torch.manual_seed(seed)
    model = Transformer(args)
    files = save_checkpoint(model, directory, fmt, max_shard_bytes=512 * MiB, dtype=dtype)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote a random {shape}-shaped {fmt} checkpoint: {n / 1e6:.0f}M parameters in {dtype}, "
          f"{len(files.shards)} file(s) in {directory}")


def run(path: Path, prompt: list[int], max_tokens: int, dtype: str | None, moe: str) -> None:
    env = init_from_env()
    torch.set_num_threads(max(1, torch.get_num_threads() // env.world_size) if env.device.type == "cpu"
                          else torch.get_num_threads())
    files = find_checkpoint(path)
    full_bytes = sum(i.nbytes for i in checkpoint_index(files, read_model_args(files)).values())
    # Building any Transformer on the meta device imports torch._dynamo once (nn.Embedding's init on meta goes
    # through torch._refs); import it now so the memory measured below is the weights' and not the import's.
    importlib.import_module("torch._dynamo")

    dist.barrier()
    before = rss_bytes()
    t0 = time.perf_counter()
    model = load_sharded_model(path, dtype, moe=moe, device=env.device)
    load_s = time.perf_counter() - t0
    peak = peak_rss_bytes()
    held = sum(p.nbytes for p in model.parameters())
    gpu_peak = torch.cuda.max_memory_allocated(env.device) if env.device.type == "cuda" else 0
    dist.barrier()

    ids, decode_s = greedy(model, prompt, max_tokens)
    stats = dict(rank=env.rank, load_s=load_s, before=before, peak=peak, held=held, gpu_peak=gpu_peak,
                 ids=ids)
    gathered: list[dict] = [None] * env.world_size  # type: ignore[list-item]
    dist.all_gather_object(gathered, stats)
    if env.rank == 0:
        a = model.args
        print(f"{files.format} checkpoint {path}: {full_bytes / MiB:.0f} MiB; world_size={env.world_size} "
              f"({dist.get_backend()}), moe={moe}; per rank {a.n_heads} heads, {a.n_kv_heads} kv heads, "
              f"hidden_dim {a.hidden_dim}, dtype {model.dtype}")
        columns = ["rank", "load s", "RSS before MiB", "peak RSS MiB", "peak - before MiB",
                   "weights held MiB", "checkpoint / N MiB"] + (["GPU peak MiB"] if gpu_peak else [])
        print(" | ".join(columns))
        for s in gathered:
            row = [s["rank"], f"{s['load_s']:.2f}", *(f"{v / MiB:.0f}" for v in (
                s["before"], s["peak"], s["peak"] - s["before"], s["held"], full_bytes / env.world_size))]
            row += [f"{s['gpu_peak'] / MiB:.0f}"] if gpu_peak else []
            print(" | ".join(f"{v:>{len(c)}}" for v, c in zip(row, columns)))
        same = all(s["ids"] == ids for s in gathered)
        print(f"greedy ids (rank 0): {ids}  — identical on every rank: {same}")
        print(f"decode: {max_tokens / decode_s:.1f} tokens/s ({decode_s / max_tokens * 1e3:.1f} ms/token)")
        if not same:
            sys.exit(1)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="native or Hugging Face checkpoint directory")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 1782, 6323, 29473], help="prompt token ids")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--dtype", default=None, help="bf16 / fp16 / fp32 (default: as stored)")
    p.add_argument("--moe", choices=MOE_MODES, default="expert", help="how experts are split over ranks")
    p.add_argument("--make-checkpoint", action="store_true",
                   help="instead: write a random-weight checkpoint to CHECKPOINT (single process)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="mistral", help="with --make-checkpoint")
    p.add_argument("--format", choices=["native", "hf"], default="native", help="with --make-checkpoint")
    p.add_argument("--seed", type=int, default=0, help="with --make-checkpoint")
    a = p.parse_args()
    if a.make_checkpoint:
        make_checkpoint(a.checkpoint, a.shape, a.format, a.dtype or "bf16", a.seed)
    else:
        run(a.checkpoint, a.tokens, a.max_tokens, a.dtype, a.moe)


if __name__ == "__main__":
    main()
