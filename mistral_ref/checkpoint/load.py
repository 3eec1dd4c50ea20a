"""Loading: a checkpoint directory -> a Transformer whose tensors are views of the files or private copies.

load_model = find_checkpoint + checkpoint_index (everything checked before a byte of weights is read)
             + meta_model (shapes only, no memory) + load_weights (assign every tensor).
load_weights is also what mistral_ref.parallel uses, with `select` naming the slice of each tensor a rank holds.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path

import torch
from safetensors import safe_open

from mistral_ref.checkpoint.dtypes import dominant_dtype, parse_dtype
from mistral_ref.checkpoint.errors import CheckpointError, listing
from mistral_ref.checkpoint.files import CheckpointFiles, checkpoint_index, find_checkpoint, read_model_args
from mistral_ref.checkpoint.gguf import is_gguf_file, load_gguf
from mistral_ref.checkpoint.names import is_qk
from mistral_ref.checkpoint.quantized import check_requested, quantized_model, read_quantization
from mistral_ref.checkpoint.safetensors_io import (
    CHUNK_BYTES,
    WHOLE,
    Progress,
    TensorInfo,
    TensorSlice,
    read_tensor,
    slice_shape,
)
from mistral_ref.model import Transformer, meta_model
from mistral_ref.quantize import check_scheme, quantize_model

log = logging.getLogger(__name__)

_WORKERS = min(4, os.cpu_count() or 1)
_thread_local = threading.local()  # each worker thread's reused read buffer


def _read_job(info: TensorInfo, dtype: torch.dtype, part: TensorSlice, qk_head_dim: int,
              device: torch.device) -> torch.Tensor:
    """:func:`read_tensor` in a worker thread, with its own file handle and scratch buffer."""
    scratch = getattr(_thread_local, "scratch", None)
    if scratch is None or scratch.numel() < min(CHUNK_BYTES, info.nbytes):
        scratch = _thread_local.scratch = torch.empty(min(CHUNK_BYTES, info.nbytes), dtype=torch.uint8)
    with open(info.file, "rb", buffering=0) as f:
        return read_tensor(f, info, dtype, part, qk_head_dim, scratch).to(device)


def load_weights(model: Transformer, files: CheckpointFiles, index: dict[str, TensorInfo], dtype: torch.dtype,
                 device: torch.device | str = "cpu", *, mmap: bool = True, progress: bool | None = None,
                 select: Callable[[str], TensorSlice] | None = None) -> Transformer:
    """Fill `model` (built on the meta device) with the tensors `index` lists; returns it in eval mode.

    index: from :func:`checkpoint_index` ({native name: TensorInfo}, already checked against the config).
    dtype, device: of every parameter (integer tensors, the codes of a quantized model, keep their dtype).
    select: which rows or columns of each tensor (by native name) to read, e.g. a rank's slice in
    mistral_ref.parallel; None reads every tensor whole.  HF q/k rows are put in the native order (whole
    heads, so slicing by heads first is exact).
    mmap: on the CPU, whole tensors that need no conversion stay views of the files' private (copy-on-write)
    memory maps: nothing is read until used.  Everything else is read into private memory one tensor at a
    time by a few threads (:func:`read_tensor`), so resident memory peaks at about one copy of what is loaded.
    Raises CheckpointError if a parameter of `model` was left without weights.
    """
    device = torch.device(device)
    head_dim = model.args.head_dim
    parts = {name: select(name) if select else WHOLE for name in index}
    nbytes = {name: math.prod(slice_shape(info.shape, parts[name])) * info.dtype.itemsize
              for name, info in index.items()}  # what is read of each tensor, in the file's dtype
    bar = Progress(sum(nbytes.values()), progress, f"loading {files.config.parent.name}")
    by_file: dict[Path, list[tuple[str, TensorInfo]]] = {}
    for name, info in index.items():
        by_file.setdefault(info.file, []).append((name, info))
    state: dict[str, torch.Tensor] = {}
    pool = ThreadPoolExecutor(_WORKERS)  # file reads and torch copies release the GIL
    try:
        jobs: dict[Future[torch.Tensor], str] = {}
        for file, entries in by_file.items():
            with safe_open(file, framework="pt") as mapped:
                for name, info in entries:
                    qk_head_dim = head_dim if files.format == "hf" and is_qk(name) else 0
                    whole_key = tuple(mapped.get_slice(info.key).get_shape()) == tuple(info.shape)  # not a slice
                    want = dtype if info.dtype.is_floating_point else info.dtype  # quantized integers stay
                    if mmap and device.type == "cpu" and info.dtype == want and not qk_head_dim \
                            and parts[name] == WHOLE and whole_key:  # (files.fused_expert_parts makes slices)
                        state[name] = mapped.get_tensor(info.key)  # a view of the memory map: nothing read yet
                        bar.update(nbytes[name])
                    else:
                        job = pool.submit(_read_job, info, want, parts[name], qk_head_dim, device)
                        jobs[job] = name
        for job in as_completed(jobs):
            name = jobs[job]
            state[name] = job.result()
            bar.update(nbytes[name])
    finally:
        pool.shutdown(cancel_futures=True)
        bar.close()
    model.load_state_dict(state, strict=True, assign=True)
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise CheckpointError(f"{files.config.parent}: parameters left without weights: {listing(left_on_meta)}")
    model.checkpoint_files = files
    return model.eval()


def load_model(path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
               strict: bool = True, progress: bool | None = None, *, mmap: bool = True,
               quantize: str | None = None, group_size: int = 32) -> Transformer:
    """Load a native or Hugging Face checkpoint directory (or one .safetensors file next to its config), or a
    llama.cpp GGUF file (checkpoint/gguf.py: load_gguf; needs the `gguf` extra).

    dtype: the parameters' dtype ("bf16", "float32", torch.float16, ...); None keeps the checkpoint's (the dtype
    holding most of its bytes).  device: where the parameters live.  strict: unexpected tensors are an error
    (False: a warning); missing tensors and shape mismatches are always errors.  progress: a byte progress bar
    on stderr (None: only for checkpoints >= 1 GiB on a terminal).  mmap: on the CPU, tensors that need no
    conversion stay views of the files' private (copy-on-write) memory maps: read lazily, shared with the page
    cache, and the model then reads the files it came from (save_checkpoint replaces files by rename, which is
    safe; do not truncate them in place while the model lives).  Tensors that are converted (dtype, HF q/k
    order, device) and all tensors when mmap=False are read into private memory one at a time.  Either way
    resident memory peaks at about one copy of the weights.

    quantize: "int8" or "int4" quantizes the linear layers after loading (mistral_ref.quantize.quantize_model,
    int4 in groups of `group_size`); a checkpoint saved from a quantized model (checkpoint/quantized.py) loads
    quantized as it was, without quantizing again, and asking it for another scheme is a CheckpointError.

    The returned model is in eval mode; `model.checkpoint_files` records which files were read (a directory
    holding both formats loads the native set).  Raises CheckpointError (or config.ConfigError) on bad input.
    """
    if quantize is not None:
        check_scheme(quantize, group_size)  # before reading anything
    if is_gguf_file(path) or str(path).endswith(".gguf"):
        return load_gguf(path, dtype, device, strict, progress, mmap=mmap, quantize=quantize, group_size=group_size)
    files = find_checkpoint(path)
    log.debug("loading %s checkpoint %s (%d shard(s)%s)", files.format, files.config.parent,
              len(files.shards), f"; ignoring {len(files.ignored)} file(s) of the other format"
              if files.ignored else "")
    args = read_model_args(files)
    quantization = read_quantization(files)
    if quantization is not None:  # saved quantized: load the codes as they are
        check_requested(path, quantization, quantize)
        model, index, dtype = quantized_model(files, args, quantization, dtype)
        return load_weights(model, files, index, dtype, device, mmap=mmap, progress=progress)
    index = checkpoint_index(files, args, strict=strict)
    dtype = parse_dtype(dtype) or dominant_dtype(index.values())
    model = load_weights(meta_model(args), files, index, dtype, device, mmap=mmap, progress=progress)
    return model if quantize is None else quantize_model(model, quantize, group_size=group_size)
