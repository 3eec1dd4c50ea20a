"""Checkpoint loading: wall time and peak resident memory of mistral_ref.load_model vs transformers.

    .venv/bin/python benchmarks/bench_load.py [--gb 1.1] [--runs 3] [--dir DIR]

Writes a random bf16 Mistral-shaped checkpoint of about --gb GB in both formats (native consolidated.safetensors;
Hugging Face model-0000k-of-0000n.safetensors in 512 MiB shards + index) to a temporary directory, then measures
every loader in a fresh subprocess (so each starts with nothing loaded):

* load   — wall time of the load call itself (imports excluded, for every loader);
* ready  — load + touching every page of every weight.  A memory-mapped load defers reading to first use, so
           `load` alone would flatter it; `ready` is what a first forward pass has paid;
* peak   — growth of the peak resident set (VmHWM, reset with /proc/self/clear_refs just before loading) over
           load + touch, divided by the checkpoint's file size.  (ru_maxrss is not used: on Linux a child
           inherits its parent's peak across fork + exec, which would charge the benchmark's own memory to it.)

The files sit in the page cache (they were just written), the same for every loader.  Every child prints a
checksum of the output projection, and the parent checks that all loaders read the same numbers.  Prints medians
over --runs runs and ratios against transformers' from_pretrained on the same HF files.  A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
mode, path, dtype_name = sys.argv[1], sys.argv[2], sys.argv[3]
dtype = getattr(torch, dtype_name)
if mode.startswith("transformers"):
    import transformers
    transformers.utils.logging.disable_progress_bar()
    from transformers import MistralForCausalLM
    load = lambda: MistralForCausalLM.from_pretrained(path, dtype=dtype)
    output_weight = lambda m: m.lm_head.weight
else:
    from mistral_ref.checkpoint import load_model
    load = lambda: load_model(path, dtype=dtype, mmap=(mode != "mistral_ref-copy"))
    output_weight = lambda m: m.output.weight

def status(field):  # bytes
    return 1024 * int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])

open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
base = status("VmRSS:")
t0 = time.perf_counter()
model = load()
t1 = time.perf_counter()
with torch.no_grad():
    for p in model.parameters():  # read one byte of every page: what a first forward pass makes resident
        p.detach().reshape(-1).view(torch.uint8)[::4096].sum()
t2 = time.perf_counter()
peak = status("VmHWM:") - base
checksum = sum(row.double().sum().item() for row in output_weight(model).detach()[::97])
print(json.dumps({"load": t1 - t0, "ready": t2 - t0, "peak": peak, "checksum": checksum}))
"""


def write_checkpoints(root: Path, gb: float) -> tuple[Path, Path, int]:
    """A Mistral-shaped bf16 checkpoint of about `gb` GB (native and HF); returns the dirs and the file size."""
    import torch

    from mistral_ref.checkpoint import convert_checkpoint, save_checkpoint
    from mistral_ref.config import ModelArgs
    from mistral_ref.model import Transformer

    per_layer = 4 * 2048 * 2048 // 2 + 2 * 2048 * 512 + 3 * 2048 * 7168  # wq+wo, wk+wv, w1/w2/w3
    n_layers = max(1, round((gb * 1e9 / 2 - 2 * 32000 * 2048) / per_layer))
    args = ModelArgs(dim=2048, n_layers=n_layers, hidden_dim=7168, n_heads=16, n_kv_heads=4, head_dim=128,
                     vocab_size=32000, rope_theta=1e6, norm_eps=1e-5)
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly (no fp32 copy)
    torch.manual_seed(0)
    model = Transformer(args)
    torch.set_default_dtype(torch.float32)
    native, hf = root / "native", root / "hf"
    save_checkpoint(model, native, format="native")
    del model
    convert_checkpoint(native, hf, format="hf", max_shard_bytes=512 << 20)
    size = (native / "consolidated.safetensors").stat().st_size
    return native, hf, size


def run_child(mode: str, path: Path, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(path), dtype], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=1.1, help="checkpoint size in GB (>= 1 for a fair test)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoints (default: temp)")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="model dtypes to load into")
    opts = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=opts.dir) as tmp:
        t0 = time.perf_counter()
        native, hf, size = write_checkpoints(Path(tmp), opts.gb)
        print(f"wrote a {size / 1e9:.2f} GB bf16 checkpoint in both formats in {time.perf_counter() - t0:.1f} s "
              f"({len(list(hf.glob('model-*.safetensors')))} HF shards)\n")
        loaders = [("transformers from_pretrained (HF)", "transformers", hf),
                   ("mistral_ref load_model (HF)", "mistral_ref", hf),
                   ("mistral_ref load_model (native)", "mistral_ref", native),
                   ("mistral_ref load_model mmap=False (HF)", "mistral_ref-copy", hf)]
        for dtype in opts.dtypes.split(","):
            rows, checksums = [], set()
            for label, mode, path in loaders:
                runs = [run_child(mode, path, dtype) for _ in range(opts.runs)]
                checksums.update(round(r["checksum"], 3) for r in runs)
                rows.append((label, *(statistics.median(r[k] for r in runs) for k in ("load", "ready", "peak"))))
            if len(checksums) != 1:
                raise SystemExit(f"loaders disagree on the weights: checksums {checksums}")
            ref_load, ref_ready, ref_peak = rows[0][1:]
            print(f"model dtype {dtype} (file bf16, {size / 1e9:.2f} GB); medians of {opts.runs} runs; "
                  "ratios vs transformers (speed-up: > 1 is faster)")
            print("| loader | load s | ready s | peak RSS / file | load speed-up | ready speed-up | peak ratio |")
            print("|---|---|---|---|---|---|---|")
            for label, load, ready, peak in rows:
                print(f"| {label} | {load:.2f} | {ready:.2f} | {peak / size:.2f} | {ref_load / load:.1f}x "
                      f"| {ref_ready / ready:.1f}x | {peak / ref_peak:.2f} |")
            print()


if __name__ == "__main__":
    main()
