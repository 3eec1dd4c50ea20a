"""Quantized checkpoints: a model quantize_model quantized, saved and loaded without quantizing again.

The files are a native checkpoint (params.json + consolidated.safetensors) whose linear weights are stored as the
buffers of mistral_ref.quantize.QuantizedWeight (``layers.0.attention.wq.weight.qweight`` int8 / uint8, and
``.scales`` or ``.scales_and_zeros`` in the compute dtype), with params.json recording how:

    "quantization": {"method": "mistral-ref weight-only", "scheme": "int4", "group_size": 32,
                     "dtype": "bfloat16", "int4_layout": "torch-cpu-32"}

(params.json's "quantization" key is one that other tools' files use too; only an entry with this "method" is
read here.)  int4_layout names the byte order of quantize.pack_int4, the order torch's int4 CPU kernel reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mistral_ref.checkpoint.dtypes import parse_dtype
from mistral_ref.checkpoint.errors import CheckpointError, listing
from mistral_ref.checkpoint.files import CheckpointFiles
from mistral_ref.checkpoint.names import from_mistral_name
from mistral_ref.checkpoint.safetensors_io import TensorInfo, read_safetensors_header
from mistral_ref.config import ModelArgs
from mistral_ref.model import Transformer, meta_model
from mistral_ref.quantize import QuantizationError, check_scheme, quantization_of, quantized_shell

METHOD = "mistral-ref weight-only"
INT4_LAYOUT = "torch-cpu-32"


def quantization_entry(model: Transformer) -> dict[str, Any]:
    """The params.json "quantization" entry of a quantized model."""
    quant = quantization_of(model)
    assert quant is not None
    entry = {"method": METHOD, **quant, "dtype": str(model.layers[0].attention_norm.weight.dtype).removeprefix(
        "torch.")}
    if quant["scheme"] == "int4":
        entry["int4_layout"] = INT4_LAYOUT
    return entry


def read_quantization(files: CheckpointFiles) -> dict[str, Any] | None:
    """The quantization entry of a checkpoint saved by save_checkpoint from a quantized model, else None.

    Raises CheckpointError (naming params.json and the field) for an entry of this method that cannot be read.
    """
    if files.format != "native":
        return None
    raw = json.loads(files.config.read_text(encoding="utf-8"))
    entry = raw.get("quantization") if isinstance(raw, dict) else None
    if not isinstance(entry, dict) or entry.get("method") != METHOD:
        return None
    where = f"{files.config}: quantization"
    try:
        check_scheme(entry.get("scheme"), entry.get("group_size", 32))
    except QuantizationError as e:
        raise CheckpointError(f"{where}: {e}") from None
    if entry["scheme"] == "int4" and entry.get("int4_layout") != INT4_LAYOUT:
        raise CheckpointError(f"{where}.int4_layout is {entry.get('int4_layout')!r}; this version reads "
                              f"{INT4_LAYOUT!r}")
    try:
        parse_dtype(entry.get("dtype"))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}.dtype: {e}") from None
    return entry


def quantized_index(files: CheckpointFiles, model: Transformer) -> dict[str, TensorInfo]:
    """{name: TensorInfo} of a quantized checkpoint's tensors, checked against `model` (a quantized_shell):
    every name present, nothing else, shapes equal, integer codes int8 / uint8, everything else floating."""
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    index: dict[str, TensorInfo] = {}
    problems: list[str] = []
    for shard in files.shards:
        for key, info in read_safetensors_header(shard).items():
            key = from_mistral_name(key, model.args)  # Mistral's names of latent attention / fine experts
            if key not in expected:
                problems.append(f"{shard}: unexpected tensor {key!r}")
                continue
            want = expected[key]
            if tuple(info.shape) != tuple(want.shape):
                problems.append(f"{shard}: {key!r} has shape {list(info.shape)}, expected {list(want.shape)} "
                                f"from {files.config.name} and its quantization entry")
            elif not want.dtype.is_floating_point and info.dtype != want.dtype:
                problems.append(f"{shard}: {key!r} has dtype {info.dtype}, expected {want.dtype} (quantized codes)")
            elif want.dtype.is_floating_point and not info.dtype.is_floating_point:
                problems.append(f"{shard}: {key!r} has dtype {info.dtype}, expected a floating point type")
            index[key] = info
    missing = sorted(set(expected) - set(index))
    if missing:
        problems.insert(0, f"{files.config.parent}: missing {len(missing)} tensor(s) of the quantized model: "
                           f"{listing(missing)}")
    if problems:
        raise CheckpointError("\n".join(problems))
    return index


def quantized_model(files: CheckpointFiles, args: ModelArgs, entry: dict[str, Any],
                    dtype: torch.dtype | str | None) -> tuple[Transformer, dict[str, TensorInfo], torch.dtype]:
    """What load_weights needs to load a quantized checkpoint (no quantizing: the codes are read as stored):
    the meta-device quantized model, the checked tensor index, and the compute dtype (scales, norms,
    embeddings): `dtype`, or when None the one recorded at save time."""
    model = quantized_shell(meta_model(args), entry["scheme"], entry.get("group_size", 32))
    return model, quantized_index(files, model), parse_dtype(dtype) or parse_dtype(entry["dtype"])


def check_requested(path: str | Path, entry: dict[str, Any], quantize: str | None) -> None:
    """A quantized checkpoint loads as it was quantized: asking for another scheme is an error."""
    if quantize is not None and quantize != entry["scheme"]:
        raise CheckpointError(f"{path}: is already quantized ({entry['scheme']}); it cannot be loaded with "
                              f"quantize={quantize!r} (load the original weights to quantize them differently, "
                              "or pass quantize=None)")
