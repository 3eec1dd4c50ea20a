"""Saving a model and converting a checkpoint directory, one tensor at a time, into either format.

save_checkpoint: a model in memory -> native or HF files.  convert_checkpoint: files -> files of the other
format (or re-sharded, or cast) without building the model, carrying the tokenizer files across.  Both plan
the shards, then write each file with write_safetensors (temporary name, then rename).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import torch

from mistral_ref.checkpoint.dtypes import dominant_dtype, parse_dtype
from mistral_ref.checkpoint.errors import CheckpointError
from mistral_ref.checkpoint.files import (
    CheckpointFiles,
    checkpoint_index,
    find_checkpoint,
    index_name,
    is_weight_file,
    read_model_args,
    shard_names,
)
from mistral_ref.checkpoint.names import (
    hf_fuses_experts,
    is_qk,
    native_to_hf_name,
    natural_key,
    to_hf_tensor,
    to_mistral_name,
)
from mistral_ref.checkpoint.quantized import quantization_entry
from mistral_ref.checkpoint.safetensors_io import (
    CHUNK_BYTES,
    Progress,
    TensorInfo,
    TensorToWrite,
    read_tensor,
    write_safetensors,
)
from mistral_ref.config import ConfigError, ModelArgs
from mistral_ref.model import Transformer
from mistral_ref.quantize import quantization_of

log = logging.getLogger(__name__)

_HF_EXPERT_TENSOR = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def fuse_experts(tensors: list[TensorToWrite]) -> list[TensorToWrite]:
    """Replace HF per-expert tensors by transformers 5.23's two fused tensors per layer (names.hf_fuses_experts):
    experts.gate_up_proj (E, 2 * hidden, dim), expert e's gate_proj rows then its up_proj rows, and
    experts.down_proj (E, dim, hidden).  Each fused tensor is produced when written, from its experts' producers:
    memory grows by one layer's experts (the largest tensor written), not by the model."""
    layers: dict[str, dict[tuple[int, str], TensorToWrite]] = {}
    out = []
    for t in tensors:
        m = _HF_EXPERT_TENSOR.fullmatch(t.name)
        if m is None:
            out.append(t)
        else:
            layers.setdefault(m[1], {})[int(m[2]), m[3]] = t
    for layer, parts in layers.items():
        n = len(parts) // 3
        if sorted(parts) != sorted((e, k) for e in range(n) for k in ("gate_proj", "up_proj", "down_proj")):
            raise CheckpointError(f"layer {layer}: the routed experts are not experts 0..{n - 1} with gate_proj, "
                                  "up_proj and down_proj each: cannot write them fused")
        gate, up, down = parts[0, "gate_proj"], parts[0, "up_proj"], parts[0, "down_proj"]

        def gate_up(parts=parts, n=n) -> torch.Tensor:  # (E, 2 * hidden, dim)
            return torch.stack([torch.cat([parts[e, "gate_proj"].produce(), parts[e, "up_proj"].produce()])
                                for e in range(n)])

        def down_proj(parts=parts, n=n) -> torch.Tensor:  # (E, dim, hidden)
            return torch.stack([parts[e, "down_proj"].produce() for e in range(n)])

        prefix = f"model.layers.{layer}.mlp.experts."
        out.append(TensorToWrite(prefix + "gate_up_proj", (n, gate.shape[0] + up.shape[0], gate.shape[1]),
                                 gate.dtype, gate_up))
        out.append(TensorToWrite(prefix + "down_proj", (n, *down.shape), down.dtype, down_proj))
    return out


def _write_checkpoint(directory: Path, fmt: str, args: ModelArgs, tensors: list[TensorToWrite],
                      max_shard_bytes: int | None, progress: bool | None,
                      quantization: dict | None = None) -> CheckpointFiles:
    """Config, shards (greedy, in layer order), the index when sharded; then remove stale shards of `fmt`."""
    if fmt not in ("native", "hf"):
        raise ValueError(f"format must be 'native' or 'hf', got {fmt!r}")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if fmt == "hf" and hf_fuses_experts(args):
        tensors = fuse_experts(tensors)
    tensors = sorted(tensors, key=lambda t: natural_key(t.name))
    shards: list[list[TensorToWrite]] = [[]]
    for t in tensors:
        if shards[-1] and max_shard_bytes is not None and sum(x.nbytes for x in shards[-1]) + t.nbytes > \
                max_shard_bytes:
            shards.append([])
        shards[-1].append(t)
    names = shard_names(fmt, len(shards))
    directory.mkdir(parents=True, exist_ok=True)

    if fmt == "hf":
        try:
            config = args.to_hf_config()
        except ConfigError as err:
            raise CheckpointError(f"{directory / 'config.json'}: {err}") from None
        dtype_name = str(dominant_dtype(tensors)).removeprefix("torch.")
        config.update(dtype=dtype_name, torch_dtype=dtype_name)  # transformers 5 reads dtype, 4.x torch_dtype
        config_path = directory / "config.json"
    else:
        try:
            config = args.to_params_json()
        except ConfigError as err:
            raise CheckpointError(f"{directory / 'params.json'}: {err}") from None
        if quantization is not None:  # a quantized model (checkpoint/quantized.py)
            config["quantization"] = quantization
        config_path = directory / "params.json"

    bar = Progress(sum(t.nbytes for t in tensors), progress, f"writing {directory.name}")
    for shard, name in zip(shards, names):
        write_safetensors(directory / name, shard, bar)
    bar.close()
    index_path = None
    if len(shards) > 1:
        index_path = directory / index_name(fmt)
        weight_map = {t.name: name for shard, name in zip(shards, names) for t in shard}
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors),
                              "total_parameters": sum(math.prod(t.shape) for t in tensors)},
                 "weight_map": dict(sorted(weight_map.items(), key=lambda kv: natural_key(kv[0])))}
        index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    # A directory that held another save of the same format must not keep its shards or index (they'd mix).
    keep = {*names, *([index_path.name] if index_path else [])}
    for p in directory.iterdir():
        if is_weight_file(fmt, p.name) and p.name not in keep:
            p.unlink()
    return CheckpointFiles(fmt, config_path, tuple(directory / n for n in names), index_path)


def save_checkpoint(model: Transformer, path: str | Path, format: str = "native",
                    max_shard_bytes: int | None = None, dtype: torch.dtype | str | None = None,
                    progress: bool | None = None) -> CheckpointFiles:
    """Write `model` as a native (params.json + consolidated*.safetensors) or Hugging Face (config.json +
    model*.safetensors [+ model.safetensors.index.json]) checkpoint directory.

    Native files of latent-attention / fine-grained-expert models hold Mistral's tensor names (wq_a, wkv_b,
    experts.E.w1, ...: names.to_mistral_name) and Mistral's params.json spelling (ModelArgs.to_params_json).
    HF files hold what transformers 5.23's save_pretrained writes for the model class, so its from_pretrained
    reads them: for Mistral4 (softmax-routed fine-grained experts) each layer's routed experts fused into
    experts.gate_up_proj / experts.down_proj (fuse_experts), for every other class one tensor per expert.

    max_shard_bytes: split the weights into shards of at most this many bytes (a bigger tensor gets a shard
    of its own); None writes one file.  dtype: cast while writing (None keeps the parameters' dtype).
    Tensors are produced and written one at a time, so memory grows by at most one tensor.
    A quantized model (mistral_ref.quantize) is written in the native format with its integer codes as they
    are and its quantization in params.json (checkpoint/quantized.py): load_model reads it back quantized.
    Returns the files written.
    """
    fmt, args, dtype = format, model.args, parse_dtype(dtype)
    quantization = None
    if quantization_of(model) is not None:
        if fmt != "native":
            raise CheckpointError(f"{path}: a quantized model is saved in the native format only, not {fmt!r}")
        quantization = quantization_entry(model)
        if dtype is not None:
            quantization["dtype"] = str(dtype).removeprefix("torch.")
    tensors = []
    for name, param in model.state_dict().items():
        out_name = native_to_hf_name(name, args) if fmt == "hf" else to_mistral_name(name, args)
        cast = dtype if param.is_floating_point() else None  # quantized codes keep their integer dtype

        def produce(name: str = name, param: torch.Tensor = param, cast: torch.dtype | None = cast) -> torch.Tensor:
            tensor = to_hf_tensor(name, param, args)[1] if fmt == "hf" else param
            return tensor.to(cast or param.dtype)

        tensors.append(TensorToWrite(out_name, tuple(param.shape), cast or param.dtype, produce))
    return _write_checkpoint(Path(path), fmt, args, tensors, max_shard_bytes, progress, quantization)


# What a converted checkpoint needs besides weights and config to chat at once: the tokenizer files that
# mistral_ref.tokenizer.load_tokenizer reads (tekken*.json, tokenizer.model.vN, tokenizer.model) and the ones
# Hugging Face tools read (tokenizer.json, tokenizer_config.json, special_tokens_map.json).
_TOKENIZER_FILE = re.compile(r"tokenizer\.model.*|.*\.model\.v\d+(m\d+)?|.*tekken.*\.json|tokenizer\.json"
                             r"|tokenizer_config\.json|special_tokens_map\.json")


def copy_tokenizer_files(src: Path, dst: Path) -> list[Path]:
    """Copy the tokenizer files of checkpoint directory `src` into `dst` (each written to a temporary name,
    then renamed).  Files already in place (src is dst) are left alone.  Returns the files of dst copied."""
    copied = []
    for p in sorted(src.iterdir()):
        if not (p.is_file() and _TOKENIZER_FILE.fullmatch(p.name)):
            continue
        target = dst / p.name
        if target.exists() and os.path.samefile(p, target):
            continue
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        try:
            shutil.copyfile(p, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        copied.append(target)
    return copied


def convert_checkpoint(src: str | Path, dst: str | Path, format: str = "hf",
                       max_shard_bytes: int | None = None, dtype: torch.dtype | str | None = None,
                       progress: bool | None = None) -> CheckpointFiles:
    """Convert a checkpoint directory to `format` ("native" or "hf") without building the model.

    Streams tensor by tensor (read, rename, permute q/k, cast if `dtype` is given, write), so memory stays at
    about one tensor whatever the checkpoint's size.  The source is checked as strictly as load_model checks
    it.  dst may be the source directory (e.g. to add the other format's files next to the native ones, as the
    public repositories do).  The tokenizer files next to the source's config (tekken.json, tokenizer.model*,
    HF's tokenizer.json / tokenizer_config.json / special_tokens_map.json) are copied to dst, so the converted
    checkpoint chats at once.  Returns the weight files written.
    """
    files = find_checkpoint(src)
    args = read_model_args(files)
    index = checkpoint_index(files, args, strict=True)
    dtype = parse_dtype(dtype)
    # Open every source file before writing anything: a shard of the same name in dst is replaced by rename,
    # and an open file keeps reading the old one.
    handles = {file: open(file, "rb", buffering=0) for file in files.shards}
    scratch = torch.empty(min(CHUNK_BYTES, max(i.nbytes for i in index.values())), dtype=torch.uint8)
    tensors = []
    for name, info in index.items():

        def produce(name: str = name, info: TensorInfo = info) -> torch.Tensor:
            to_native = files.format == "hf" and format == "native" and is_qk(name)
            tensor = read_tensor(handles[info.file], info, dtype or info.dtype,
                                 qk_head_dim=args.head_dim if to_native else 0, scratch=scratch)
            if (files.format, format) == ("native", "hf"):
                tensor = to_hf_tensor(name, tensor, args)[1]
            return tensor

        out_name = native_to_hf_name(name, args) if format == "hf" else to_mistral_name(name, args)
        tensors.append(TensorToWrite(out_name, info.shape, dtype or info.dtype, produce))
    try:
        written = _write_checkpoint(Path(dst), format, args, tensors, max_shard_bytes, progress)
    finally:
        for handle in handles.values():
            handle.close()
    copied = copy_tokenizer_files(files.config.parent, Path(dst))
    if copied:
        log.info("copied tokenizer file(s) %s to %s", ", ".join(p.name for p in copied), dst)
    return written
