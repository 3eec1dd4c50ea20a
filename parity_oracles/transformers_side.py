"""The transformers side of ``mistral-ref parity``: transformers' own model on the same checkpoint, with forward
hooks on its modules recording what mistral_ref.parity records on ours (entry point ``mistral_ref.parity_sides``)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mistral_ref.checkpoint import convert_checkpoint, find_checkpoint
from mistral_ref.checkpoint.gguf import is_gguf_file
from mistral_ref.parity import (
    TRANSFORMERS,
    Log,
    Trace,
    _finish,
    _quiet,
    _Recorder,
    check_tokens,
    peak_rss_bytes,
    reset_peak_rss,
)


def _hf_directory(checkpoint: Path, tmp: str, log: Log) -> dict[str, Any]:
    """from_pretrained arguments for transformers to load `checkpoint` (converting native files if needed)."""
    if is_gguf_file(checkpoint):
        return {"pretrained_model_name_or_path": str(checkpoint.parent), "gguf_file": checkpoint.name}
    files = find_checkpoint(checkpoint)
    if files.format == "hf":
        return {"pretrained_model_name_or_path": str(files.config.parent)}
    size = sum(p.stat().st_size for p in files.shards)
    log(f"transformers: {checkpoint} holds native files only: converting them to Hugging Face files in {tmp} "
        f"({size / 2**30:.2f} GiB of disk, removed afterwards)")
    convert_checkpoint(checkpoint, tmp, format="hf")
    return {"pretrained_model_name_or_path": tmp}


def run_transformers(checkpoint: str | Path, tokens: Sequence[int], dtype: torch.dtype, *, layers: bool = True,
                     generate: int = 0, log: Log = _quiet) -> Trace:
    """mistral_ref.parity.run_mistral_ref's counterpart: transformers' model (hooks on its modules), same checkpoint."""
    import transformers

    checkpoint, tokens = Path(checkpoint), list(tokens)
    reset_peak_rss()
    with tempfile.TemporaryDirectory(prefix="mistral-ref-parity-") as tmp:
        where = _hf_directory(checkpoint, tmp, log)
        log(f"transformers: loading {checkpoint} ({str(dtype).removeprefix('torch.')})")
        t0 = time.perf_counter()
        hf = transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=dtype).eval()
        load_s = time.perf_counter() - t0
    fmt = "gguf" if "gguf_file" in where else "hf"
    trace = Trace(TRANSFORMERS, str(checkpoint), fmt, str(dtype).removeprefix("torch."), load_s=load_s)
    check_tokens(tokens, hf.config.vocab_size, checkpoint)
    body = hf.model
    rec = _Recorder(trace, len(body.layers), log)
    if layers:
        rec.record(body.embed_tokens, "embeddings")
        for i, layer in enumerate(body.layers):
            rec.record(layer.self_attn, f"layers.{i}.attention")
            rec.record(layer.mlp, f"layers.{i}.feed_forward")
            rec.record(layer, f"layers.{i}.residual")
            if hasattr(layer.mlp, "gate"):  # Mixtral's router returns (logits, weights, expert indices)
                rec.experts(layer.mlp.gate, i, lambda out: out[2])
        rec.record(body.norm, "norm")
    for i, layer in enumerate(body.layers):
        rec.progress(layer, i)
    past: list[Any] = [None]

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return hf(input_ids=ids, use_cache=False).logits

    def step(ids: list[int], start: int) -> torch.Tensor:
        out = hf(input_ids=torch.tensor([ids]), past_key_values=past[0], use_cache=True)
        past[0] = out.past_key_values
        return out.logits[0, -1]

    _finish(trace, tokens, generate, forward, step, rec, log)
    trace.peak_rss = peak_rss_bytes()
    return trace


