"""Checkpoint I/O: native (params.json + consolidated*.safetensors) and Hugging Face (config.json +
model*.safetensors).

The two formats differ in three ways only: tensor names (a fixed map, below), the config file, and the row
order of the query and key projections — native checkpoints rotate interleaved pairs, HF checkpoints rotate
halves, so HF's q_proj / k_proj rows are a permutation of wq / wk (:func:`permute_to_hf`,
:func:`permute_to_native`).

Loading (:func:`load_model`) reads only safetensors (never a pickle), checks every header against the config
before touching a byte, builds the model on the meta device and assigns tensors that are views of the files'
memory maps (or, when a tensor must be converted, read into private memory one at a time), so resident memory
stays about one copy of the weights.  Saving (:func:`save_checkpoint`) and
converting (:func:`convert_checkpoint`) stream one tensor at a time into either format, sharded or not.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open

from mistral_ref.config import ConfigError, ModelArgs
from mistral_ref.model import Transformer, meta_model

log = logging.getLogger(__name__)

# ---- names -------------------------------------------------------------------------------------------------
_GLOBAL_NAMES = {  # native -> HF
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {  # native suffix of layers.N. -> HF suffix of model.layers.N.
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.gate.weight": "block_sparse_moe.gate.weight",
}
_EXPERT = re.compile(r"feed_forward\.experts\.(\d+)\.(w[123])\.weight")
_HF_EXPERT = re.compile(r"block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
_NATIVE_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_HF_TO_NATIVE_LAYER = {v: k for k, v in _LAYER_NAMES.items()}
_HF_TO_NATIVE_GLOBAL = {v: k for k, v in _GLOBAL_NAMES.items()}


def native_to_hf_name(name: str) -> str:
    """'layers.3.attention.wq.weight' -> 'model.layers.3.self_attn.q_proj.weight' (KeyError if unknown)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _NATIVE_LAYER.fullmatch(name)
    if m:
        layer, rest = m.groups()
        if rest in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"
        e = _EXPERT.fullmatch(rest)
        if e:
            return f"model.layers.{layer}.block_sparse_moe.experts.{e[1]}.{e[2]}.weight"
    raise KeyError(f"no Hugging Face name for native tensor {name!r}")


def hf_to_native_name(name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'layers.3.attention.wq.weight' (KeyError if unknown)."""
    if name in _HF_TO_NATIVE_GLOBAL:
        return _HF_TO_NATIVE_GLOBAL[name]
    m = _HF_LAYER.fullmatch(name)
    if m:
        layer, rest = m.groups()
        if rest in _HF_TO_NATIVE_LAYER:
            return f"layers.{layer}.{_HF_TO_NATIVE_LAYER[rest]}"
        e = _HF_EXPERT.fullmatch(rest)
        if e:
            return f"layers.{layer}.feed_forward.experts.{e[1]}.{e[2]}.weight"
    raise KeyError(f"no native name for Hugging Face tensor {name!r}")


# ---- the q/k permutation -----------------------------------------------------------------------------------
def permute_to_hf(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Native wq/wk rows (interleaved pairs per head) -> HF q_proj/k_proj rows (halves per head).

    w: (n_heads * head_dim, dim).  Within each head, output feature 2i+j moves to j*head_dim/2 + i.
    n_heads is n_kv_heads for wk; head_dim is the real head width (NOT dim // n_heads: Nemo differs).
    """
    dim = w.shape[1]
    return w.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim)


def permute_to_native(w: torch.Tensor, n_heads: int, head_dim: int, out: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Inverse of :func:`permute_to_hf`.  w: (n_heads * head_dim, dim).

    out: write the result (cast to out's dtype) into this (n_heads * head_dim, dim) tensor instead of a new one.
    """
    dim = w.shape[1]
    rows = w.view(n_heads, 2, head_dim // 2, dim).transpose(1, 2)  # (n_heads, head_dim/2, 2, dim)
    if out is None:
        return rows.reshape(n_heads * head_dim, dim)
    out.view(n_heads, head_dim // 2, 2, dim).copy_(rows)
    return out


def rotary_heads(native_name: str, args: ModelArgs) -> int | None:
    """How many heads a tensor's rows hold if the formats order them differently (wq: n_heads, wk: n_kv_heads),
    else None: every other tensor, wv included, is identical in both formats."""
    if native_name.endswith("attention.wq.weight"):
        return args.n_heads
    if native_name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


def to_hf_tensor(name: str, w: torch.Tensor, args: ModelArgs) -> tuple[str, torch.Tensor]:
    """One native tensor -> (HF name, HF tensor)."""
    n_heads = rotary_heads(name, args)
    if n_heads is not None:
        w = permute_to_hf(w, n_heads, args.head_dim)
    return native_to_hf_name(name), w


def to_native_tensor(name: str, w: torch.Tensor, args: ModelArgs) -> tuple[str, torch.Tensor]:
    """One HF tensor -> (native name, native tensor)."""
    native = hf_to_native_name(name)
    n_heads = rotary_heads(native, args)
    if n_heads is not None:
        w = permute_to_native(w, n_heads, args.head_dim)
    return native, w


# ---- errors ------------------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked.  The message names the file, the key, what was expected and
    what was found."""


def _listing(names: Iterable[str], limit: int = 5) -> str:
    """'a, b, c, d, e (+12 more)' — the first few names of a long list and the count of the rest."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _natural_key(name: str) -> list[int | str]:
    """Sort key that puts layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# ---- safetensors files: check the header before trusting the bytes -----------------------------------------
# A safetensors file is: 8 bytes little-endian header length N, N bytes of JSON
# {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the tensor bytes
# (offsets count from the end of the header).  Nothing in it can execute code, unlike torch.save's pickles.
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle")
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, name there, dtype and shape (from the header; nothing read yet)."""

    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # where its bytes start in the file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _pickle_refusal(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: this is a pickle file (torch.save / PyTorch .pth/.bin/.pt). Unpickling can run arbitrary "
        "code, so mistral-ref reads only .safetensors and never calls torch.load. Use the repository's "
        "*.safetensors files, or convert this file once in an environment you trust "
        "(torch.load(..., weights_only=True) then safetensors.torch.save_file).")


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """Read and check the header of one .safetensors file without touching its tensor bytes.

    Refuses pickles and git-lfs pointer files, and a file shorter than its header says (truncated download).
    returns {key: TensorInfo}, in file order.  Raises CheckpointError naming the file (and the key at fault).
    """
    path = Path(path)
    if path.suffix in _PICKLE_SUFFIXES:
        raise _pickle_refusal(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
        if head.startswith(b"version https://git-lfs"):
            raise CheckpointError(
                f"{path}: this is a git-lfs pointer file ({size} bytes), not the weights; fetch the real "
                "file (`git lfs pull`, or download the repository with huggingface-cli / huggingface_hub)")
        if size < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file (expected >= 8)")
        # A safetensors header is JSON, so byte 8 is "{".  torch.save writes a zip archive ("PK\3\4") or, in
        # its legacy format, a bare pickle (0x80 then the protocol number).
        if head[8:9] != b"{" and (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
            raise _pickle_refusal(path)
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{path}: the header length field says {header_len} bytes but only {size - 8} follow it: "
                "the file is truncated (an interrupted download?) or not a safetensors file")
        f.seek(8)
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e}): corrupt file") \
            from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object: corrupt file")
    header.pop("__metadata__", None)
    data_size = size - 8 - header_len
    infos: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: key {key!r}: malformed header entry {entry!r}") from None
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected or begin < 0:
            raise CheckpointError(
                f"{path}: key {key!r}: shape {list(shape)} of {entry['dtype']} needs {expected} bytes, "
                f"the header gives offsets {begin}..{end}: corrupt file")
        if end > data_size:
            raise CheckpointError(
                f"{path}: key {key!r}: its bytes end at offset {end} but the file holds only {data_size} "
                f"bytes of tensor data (file size {size}, expected at least {8 + header_len + end}): "
                "the file is truncated")
        infos[key] = TensorInfo(path, key, dtype, shape, 8 + header_len + begin)
    return infos


# ---- finding the files -------------------------------------------------------------------------------------
_NATIVE_SHARD = re.compile(r"consolidated-(\d+)-of-(\d+)\.safetensors")
_HF_SHARD = re.compile(r"model-(\d+)-of-(\d+)\.safetensors")
_NATIVE_INDEX = "consolidated.safetensors.index.json"
_HF_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class CheckpointFiles:
    """The files of one checkpoint: format "native" (params.json) or "hf" (config.json), config and shards.

    ignored: weight files of the other format in the same directory (repos often ship both; one set loads).
    """

    format: str
    config: Path
    shards: tuple[Path, ...]
    index: Path | None = None
    ignored: tuple[Path, ...] = ()


def _shard_set(directory: Path, pattern: re.Pattern[str],
               index_name: str) -> tuple[tuple[Path, ...], Path | None]:
    """The weight files of one format in `directory`: from its index.json if present, else its shard names."""
    index = directory / index_name
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()), key=_natural_key)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid index file (expected a JSON object with a "
                                  f"'weight_map' of tensor name -> file name): {e!r}") from None
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise CheckpointError(
                f"{index}: names {len(missing)} shard file(s) that are not in {directory}: "
                f"{_listing(missing)} (an incomplete download?)")
        return tuple(directory / f for f in files), index
    found = [(p, pattern.fullmatch(p.name)) for p in directory.iterdir()]
    shards = sorted(((int(m[1]), int(m[2]), p) for p, m in found if m), key=lambda s: s[0])
    if not shards:
        return (), None
    totals = {total for _, total, _ in shards}
    numbers = [k for k, _, _ in shards]
    total = max(totals)
    if len(totals) > 1 or numbers not in (list(range(1, total + 1)), list(range(total))):
        names = [p.name for _, _, p in shards]
        raise CheckpointError(
            f"{directory}: shard files {_listing(names, 8)} do not form one complete set of {total} "
            "(a shard is missing, or files of two different saves are mixed)")
    return tuple(p for _, _, p in shards), None


def _native_files(directory: Path) -> tuple[tuple[Path, ...], Path | None]:
    single = directory / "consolidated.safetensors"
    shards, index = _shard_set(directory, _NATIVE_SHARD, _NATIVE_INDEX)
    if shards:
        return shards, index
    return ((single,), None) if single.is_file() else ((), None)


def _hf_files(directory: Path) -> tuple[tuple[Path, ...], Path | None]:
    shards, index = _shard_set(directory, _HF_SHARD, _HF_INDEX)
    if shards:
        return shards, index
    single = directory / "model.safetensors"
    return ((single,), None) if single.is_file() else ((), None)


def find_checkpoint(path: str | Path) -> CheckpointFiles:
    """Detect the format of a checkpoint directory (or of one .safetensors file next to its config).

    Native = params.json + consolidated.safetensors or consolidated-0000k-of-0000n.safetensors;
    Hugging Face = config.json + model.safetensors, or model-0000k-of-0000n.safetensors
    (+ model.safetensors.index.json).
    A directory holding both loads the native set (recorded in `ignored`).  Pickled weights are refused.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            if path.suffix in _PICKLE_SUFFIXES:
                raise _pickle_refusal(path)
            raise CheckpointError(f"{path}: expected a directory or a .safetensors file")
        keys = read_safetensors_header(path)
        looks_hf = any(k.startswith(("model.", "lm_head.")) for k in keys)
        config = path.parent / ("config.json" if looks_hf else "params.json")
        if not config.is_file():
            raise CheckpointError(
                f"{path}: holds {'Hugging Face' if looks_hf else 'native'} tensor names, so {config.name} is "
                f"expected next to it, but {config} does not exist")
        return CheckpointFiles("hf" if looks_hf else "native", config, (path,))
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or directory")
    native, native_index = _native_files(path) if (path / "params.json").is_file() else ((), None)
    hf, hf_index = _hf_files(path) if (path / "config.json").is_file() else ((), None)
    if native:
        return CheckpointFiles("native", path / "params.json", native, native_index, ignored=hf)
    if hf:
        return CheckpointFiles("hf", path / "config.json", hf, hf_index)
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise _pickle_refusal(path / pickles[0])
    configs = [n for n in ("params.json", "config.json") if (path / n).is_file()]
    if not configs:
        raise CheckpointError(f"{path}: no params.json (native) or config.json (Hugging Face) in this "
                              "directory")
    raise CheckpointError(
        f"{path}: has {' and '.join(configs)} but no weights: expected consolidated.safetensors / "
        "consolidated-0000k-of-0000n.safetensors (native) or model.safetensors / "
        f"model-0000k-of-0000n.safetensors (Hugging Face); found "
        f"{_listing(sorted(p.name for p in path.iterdir()), 10)}")


def read_model_args(files: CheckpointFiles) -> ModelArgs:
    """The ModelArgs of a checkpoint, from params.json or config.json."""
    if files.format == "native":
        return ModelArgs.from_params_json(files.config)
    return ModelArgs.from_hf_config(files.config)


# ---- the tensor index: every tensor of the checkpoint, named natively, checked against the config ----------
_IGNORED_HF_KEYS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # old HF RoPE buffers


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """{native name: shape} of every parameter of Transformer(args), from a meta-device model (no memory)."""
    return {k: tuple(v.shape) for k, v in meta_model(args).state_dict().items()}


def _shape_hint(name: str, expected: tuple[int, ...], found: tuple[int, ...], args: ModelArgs) -> str:
    """Which config field most likely disagrees with the checkpoint."""
    if len(expected) != len(found):
        return "the tensor has the wrong number of dimensions"
    rows_differ = expected[0] != found[0]
    if name in ("tok_embeddings.weight", "output.weight"):
        if rows_differ:
            return f"check vocab_size (config: {args.vocab_size})"
        return f"check dim / hidden_size (config: {args.dim})"
    if name.endswith("attention.wq.weight"):
        if rows_differ:
            return (f"check n_heads and head_dim (config: {args.n_heads} x {args.head_dim} = "
                    f"{args.n_heads * args.head_dim} rows; head_dim is not always dim // n_heads)")
    elif name.endswith(("attention.wk.weight", "attention.wv.weight")):
        if rows_differ:
            return (f"check n_kv_heads and head_dim (config: {args.n_kv_heads} x {args.head_dim} = "
                    f"{args.n_kv_heads * args.head_dim} rows)")
    elif name.endswith("attention.wo.weight"):
        if not rows_differ:
            return f"check n_heads and head_dim (config: {args.n_heads} x {args.head_dim} columns)"
    elif name.endswith(("w1.weight", "w3.weight")):
        if rows_differ:
            return f"check hidden_dim / intermediate_size (config: {args.hidden_dim})"
    elif name.endswith("w2.weight"):
        if not rows_differ:
            return f"check hidden_dim / intermediate_size (config: {args.hidden_dim})"
    elif name.endswith("feed_forward.gate.weight") and rows_differ:
        return f"check the number of experts (config: {args.moe.num_experts if args.moe else None})"
    return f"check dim / hidden_size (config: {args.dim})"


def checkpoint_index(files: CheckpointFiles, args: ModelArgs, strict: bool = True) -> dict[str, TensorInfo]:
    """{native name: TensorInfo} for every tensor the model needs, after checking names, shapes and dtypes.

    Reads only headers.  Raises CheckpointError for missing keys, shape mismatches, duplicate keys, an
    index.json that disagrees with its shards, and (if strict) unexpected keys; non-strict loads warn about
    the latter.
    """
    expected = expected_shapes(args)
    index: dict[str, TensorInfo] = {}
    unexpected: list[str] = []
    problems: list[str] = []
    weight_map = None
    if files.index is not None:
        weight_map = json.loads(files.index.read_text(encoding="utf-8"))["weight_map"]
    for shard in files.shards:
        for key, info in read_safetensors_header(shard).items():
            if weight_map is not None and weight_map.get(key) != shard.name:
                raise CheckpointError(
                    f"{files.index}: key {key!r} is stored in {shard.name} but the index says "
                    f"{weight_map.get(key)!r}: the index and the shards come from different saves")
            if files.format == "hf":
                if _IGNORED_HF_KEYS.fullmatch(key):
                    continue
                try:
                    name = hf_to_native_name(key)
                except KeyError:
                    unexpected.append(key)
                    continue
            else:
                name = key
            if name not in expected:
                unexpected.append(key)
                continue
            if name in index:
                raise CheckpointError(f"key {key!r} is stored twice: in {index[name].file} and in {shard}")
            if tuple(info.shape) != expected[name]:
                problems.append(
                    f"{shard}: key {key!r} has shape {list(info.shape)}, expected "
                    f"{list(expected[name])} from {files.config.name}: "
                    f"{_shape_hint(name, expected[name], info.shape, args)}")
            elif not info.dtype.is_floating_point:
                problems.append(
                    f"{shard}: key {key!r} has dtype {info.dtype}, expected a floating point type "
                    "(quantized checkpoints are not supported)")
            index[name] = info
    if weight_map is not None:
        stored = {info.key for info in index.values()} | set(unexpected)
        absent = sorted(set(weight_map) - stored, key=_natural_key)
        if absent:
            problems.append(f"{files.index}: names {len(absent)} tensor(s) that its shards do not contain: "
                            f"{_listing(absent)}")
    missing = sorted(set(expected) - set(index), key=_natural_key)
    where = ", ".join(str(s) for s in files.shards[:3]) + (" ..." if len(files.shards) > 3 else "")
    if missing:
        hint = ""
        dense_found = any(re.search(r"\.(mlp|feed_forward)\.w", u) for u in unexpected)
        experts_found = any(".experts." in u for u in unexpected)
        if any(".experts." in m for m in missing) and dense_found:
            hint = " — the config describes experts (moe / num_local_experts) but the checkpoint is dense"
        elif any(m.endswith("feed_forward.w1.weight") for m in missing) and experts_found:
            hint = " — the checkpoint holds experts but the config describes a dense model"
        elif files.format == "native" and any(u.startswith("model.") for u in unexpected):
            hint = " — the file holds Hugging Face names: pass its config.json or name it model.safetensors"
        name = files.shards[0].name
        if len(files.shards) == 1 and (_HF_SHARD.fullmatch(name) or _NATIVE_SHARD.fullmatch(name)):
            hint += " — this is one shard of a sharded checkpoint: pass the directory instead"
        problems.insert(0, f"{where}: missing {len(missing)} tensor(s) that {files.config.name} expects: "
                           f"{_listing(missing)}{hint}")
    if unexpected:
        message = (f"{where}: {len(unexpected)} unexpected tensor(s) that {files.config.name} does not "
                   f"describe: {_listing(sorted(unexpected, key=_natural_key))}")
        if strict:
            problems.append(message)
        else:
            warnings.warn(message + " (ignored: strict=False)", stacklevel=3)
    if problems:
        raise CheckpointError("\n".join(problems))
    return index


# ---- reading one tensor into private memory ---------------------------------------------------------------
_CHUNK_BYTES = 16 << 20
_WORKERS = min(4, os.cpu_count() or 1)
_thread_local = threading.local()


def _read_bytes(f: BinaryIO, offset: int, out: torch.Tensor, info: TensorInfo) -> None:
    """Fill the uint8 tensor `out` with the file's bytes from `offset` (one copy from the page cache)."""
    buffer = memoryview(out.numpy())
    f.seek(offset)
    done = 0
    while done < len(buffer):  # one read() returns at most ~2 GiB on Linux
        n = f.readinto(buffer[done:])
        if not n:
            raise CheckpointError(f"{info.file}: key {info.key!r}: the file ended early, at byte "
                                  f"{offset + done} (was it truncated while loading?)")
        done += n


def _read_tensor(f: BinaryIO, info: TensorInfo, dtype: torch.dtype, heads: int | None = None,
                 head_dim: int = 0, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor from an open file into a new tensor of `dtype`, in the native q/k row order.

    heads: for an HF q_proj / k_proj, the heads whose rows :func:`permute_to_native` reorders.  A tensor that
    needs no change is read straight into the result; one that does goes through `scratch`, a small reused
    buffer, a few heads or rows at a time, so memory grows by the result only.  (Reading through the memory
    map instead would leave the file's pages resident next to the converted copy: two copies at the peak.)
    """
    out = torch.empty(info.shape, dtype=dtype)
    if dtype == info.dtype and heads is None:
        _read_bytes(f, info.offset, out.reshape(-1).view(torch.uint8), info)
        return out
    rows = out.reshape(info.shape[0] if info.shape else 1, -1)  # (rows, row elements)
    row_bytes = rows.shape[1] * info.dtype.itemsize
    unit = head_dim if heads else 1  # permuted tensors are read whole heads at a time
    per_chunk = min(rows.shape[0], max(unit, _CHUNK_BYTES // max(row_bytes, 1) // unit * unit))
    if scratch is None or scratch.numel() < per_chunk * row_bytes:
        scratch = torch.empty(per_chunk * row_bytes, dtype=torch.uint8)
    for r0 in range(0, rows.shape[0], per_chunk):
        n = min(per_chunk, rows.shape[0] - r0)
        chunk = scratch[: n * row_bytes]
        _read_bytes(f, info.offset + r0 * row_bytes, chunk, info)
        src = chunk.view(info.dtype).view(n, -1)
        if heads:
            permute_to_native(src, n // head_dim, head_dim, out=rows[r0:r0 + n])
        else:
            rows[r0:r0 + n].copy_(src)  # casts
    return out


class _Progress:
    """A byte counter on stderr: tqdm if installed, else one rewritten line.  Silent when disabled."""

    def __init__(self, total: int, enabled: bool | None, desc: str):
        if enabled is None:  # auto: only for big checkpoints, only on a terminal
            enabled = total >= 1 << 30 and sys.stderr.isatty()
        self.enabled, self.total, self.done, self.desc, self._last = enabled, total, 0, desc, 0.0
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                                 file=sys.stderr)
            except ImportError:
                pass

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)
        elif self.enabled and (time.monotonic() - self._last > 0.5 or self.done >= self.total):
            self._last = time.monotonic()
            print(f"\r{self.desc}: {self.done / 2**30:.2f} / {self.total / 2**30:.2f} GiB", end="",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def _read_job(info: TensorInfo, dtype: torch.dtype, heads: int | None, head_dim: int,
              device: torch.device) -> torch.Tensor:
    """:func:`_read_tensor` in a worker thread, with its own file handle and scratch buffer."""
    scratch = getattr(_thread_local, "scratch", None)
    if scratch is None or scratch.numel() < min(_CHUNK_BYTES, info.nbytes):
        scratch = _thread_local.scratch = torch.empty(min(_CHUNK_BYTES, info.nbytes), dtype=torch.uint8)
    with open(info.file, "rb", buffering=0) as f:
        return _read_tensor(f, info, dtype, heads, head_dim, scratch).to(device)


# ---- loading -----------------------------------------------------------------------------------------------
_DTYPE_ALIASES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                  "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
                  "float32": torch.float32, "float": torch.float32}


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype.removeprefix("torch.") not in _DTYPE_ALIASES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPE_ALIASES)}")
    return _DTYPE_ALIASES[dtype.removeprefix("torch.")]


def load_model(path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
               strict: bool = True, progress: bool | None = None, *, mmap: bool = True) -> Transformer:
    """Load a native or Hugging Face checkpoint directory (or one .safetensors file next to its config).

    dtype: the parameters' dtype; None keeps the checkpoint's (the dtype holding most of its bytes).
    device: where the parameters live.  strict: unexpected tensors are an error (False: a warning); missing
    tensors and shape mismatches are always errors.  progress: a byte progress bar on stderr (None: only for
    checkpoints >= 1 GiB on a terminal).  mmap: on the CPU, tensors that need no conversion stay views of
    the files' private (copy-on-write) memory maps: read lazily, shared with the page cache, and the model then
    reads the files it came from (save_checkpoint replaces files by rename, which is safe; do not truncate
    them in place while the model lives).  Tensors that are converted (dtype, HF q/k order, device) and all
    tensors when mmap=False are read into private memory one at a time.  Either way resident memory peaks at
    about one copy of the weights.

    The returned model is in eval mode; `model.checkpoint_files` records which files were read (a directory
    holding both formats loads the native set).  Raises CheckpointError (or config.ConfigError) on bad input.
    """
    files = find_checkpoint(path)
    log.debug("loading %s checkpoint %s (%d shard(s)%s)", files.format, files.config.parent,
              len(files.shards), f"; ignoring {len(files.ignored)} file(s) of the other format"
              if files.ignored else "")
    args = read_model_args(files)
    index = checkpoint_index(files, args, strict=strict)
    bytes_by_dtype = Counter[torch.dtype]()
    for info in index.values():
        bytes_by_dtype[info.dtype] += info.nbytes
    dtype = _as_dtype(dtype) or bytes_by_dtype.most_common(1)[0][0]
    device = torch.device(device)

    model = meta_model(args)  # shapes only, no memory
    by_file: dict[Path, list[tuple[str, TensorInfo]]] = {}
    for name, info in index.items():
        by_file.setdefault(info.file, []).append((name, info))
    bar = _Progress(sum(i.nbytes for i in index.values()), progress, f"loading {files.config.parent.name}")
    state: dict[str, torch.Tensor] = {}
    pool = ThreadPoolExecutor(_WORKERS)  # file reads and torch copies release the GIL
    try:
        jobs: dict[Future[torch.Tensor], str] = {}
        for file, entries in by_file.items():
            with safe_open(file, framework="pt") as mapped:
                for name, info in entries:
                    heads = rotary_heads(name, args) if files.format == "hf" else None
                    if mmap and device.type == "cpu" and info.dtype == dtype and heads is None:
                        state[name] = mapped.get_tensor(info.key)  # a view of the memory map: nothing read yet
                        bar.update(info.nbytes)
                    else:
                        jobs[pool.submit(_read_job, info, dtype, heads, args.head_dim, device)] = name
        for job in as_completed(jobs):
            state[jobs[job]] = job.result()
            bar.update(index[jobs[job]].nbytes)
    finally:
        pool.shutdown(cancel_futures=True)
        bar.close()
    model.load_state_dict(state, strict=True, assign=True)
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise CheckpointError(f"{files.config.parent}: parameters left without weights: "
                              f"{_listing(left_on_meta)}")
    model.checkpoint_files = files
    return model.eval()


# ---- saving ------------------------------------------------------------------------------------------------
@dataclass
class _Entry:
    """One tensor to write: its name in the file, shape, dtype, and how to produce it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _write_safetensors(path: Path, entries: list[_Entry], bar: _Progress) -> None:
    """Write one .safetensors file tensor by tensor (header first: shapes are known), then rename it in place.

    Writing to a temporary name and renaming keeps any model that memory-maps the old file valid.
    Tensors are laid out widest dtype first so every tensor starts at an offset aligned to its element size.
    """
    entries = sorted(entries, key=lambda e: -e.dtype.itemsize)  # stable: keeps name order within a dtype
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": _DTYPE_NAMES[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for e in entries:
                tensor = e.produce()
                if tuple(tensor.shape) != e.shape or tensor.dtype != e.dtype:
                    raise CheckpointError(f"{path}: key {e.name!r}: produced {tensor.dtype} "
                                          f"{list(tensor.shape)}, expected {e.dtype} {list(e.shape)}")
                data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                f.write(data.numpy().data)
                del tensor, data
                bar.update(e.nbytes)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _shard_names(fmt: str, n: int) -> list[str]:
    """Shard file names as the real repositories spell them."""
    stem = "model" if fmt == "hf" else "consolidated"
    if n == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


def _write_checkpoint(directory: Path, fmt: str, args: ModelArgs, entries: list[_Entry],
                      max_shard_bytes: int | None, progress: bool | None) -> CheckpointFiles:
    """Config, shards (greedy, in layer order), the index when sharded; then remove stale shards of `fmt`."""
    if fmt not in ("native", "hf"):
        raise ValueError(f"format must be 'native' or 'hf', got {fmt!r}")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    entries = sorted(entries, key=lambda e: _natural_key(e.name))
    shards: list[list[_Entry]] = [[]]
    for e in entries:
        if shards[-1] and max_shard_bytes is not None and sum(x.nbytes for x in shards[-1]) + e.nbytes > \
                max_shard_bytes:
            shards.append([])
        shards[-1].append(e)
    names = _shard_names(fmt, len(shards))
    directory.mkdir(parents=True, exist_ok=True)

    dtypes = Counter[torch.dtype]()
    for e in entries:
        dtypes[e.dtype] += e.nbytes
    if fmt == "hf":
        try:
            config = args.to_hf_config()
        except ConfigError as err:
            raise CheckpointError(f"{directory / 'config.json'}: {err}") from None
        dtype_name = str(dtypes.most_common(1)[0][0]).removeprefix("torch.")
        config.update(dtype=dtype_name, torch_dtype=dtype_name)  # transformers 5 reads dtype, 4.x torch_dtype
        config_path = directory / "config.json"
    else:
        config, config_path = args.to_params_json(), directory / "params.json"

    bar = _Progress(sum(e.nbytes for e in entries), progress, f"writing {directory.name}")
    for shard, name in zip(shards, names):
        _write_safetensors(directory / name, shard, bar)
    bar.close()
    index_path = None
    if len(shards) > 1:
        index_path = directory / (_HF_INDEX if fmt == "hf" else _NATIVE_INDEX)
        weight_map = {e.name: name for shard, name in zip(shards, names) for e in shard}
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries),
                              "total_parameters": sum(math.prod(e.shape) for e in entries)},
                 "weight_map": dict(sorted(weight_map.items(), key=lambda kv: _natural_key(kv[0])))}
        index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    # A directory that held another save of the same format must not keep its shards or index (they'd mix).
    pattern = _HF_SHARD if fmt == "hf" else _NATIVE_SHARD
    stale = {"model.safetensors", _HF_INDEX} if fmt == "hf" else {"consolidated.safetensors", _NATIVE_INDEX}
    for p in directory.iterdir():
        if (p.name in stale or pattern.fullmatch(p.name)) and p.name not in names and p != index_path:
            p.unlink()
    return CheckpointFiles(fmt, config_path, tuple(directory / n for n in names), index_path)


def save_checkpoint(model: Transformer, path: str | Path, format: str = "native",
                    max_shard_bytes: int | None = None, dtype: torch.dtype | str | None = None,
                    progress: bool | None = None) -> CheckpointFiles:
    """Write `model` as a native (params.json + consolidated*.safetensors) or Hugging Face (config.json +
    model*.safetensors [+ model.safetensors.index.json]) checkpoint directory.

    max_shard_bytes: split the weights into shards of at most this many bytes (a bigger tensor gets a shard
    of its own); None writes one file.  dtype: cast while writing (None keeps the parameters' dtype).
    Tensors are produced and written one at a time, so memory grows by at most one tensor.
    Returns the files written.
    """
    fmt, args, dtype = format, model.args, _as_dtype(dtype)
    entries = []
    for name, param in model.state_dict().items():
        out_name = native_to_hf_name(name) if fmt == "hf" else name

        def produce(name: str = name, param: torch.Tensor = param) -> torch.Tensor:
            tensor = to_hf_tensor(name, param, args)[1] if fmt == "hf" else param
            return tensor.to(dtype or param.dtype)

        entries.append(_Entry(out_name, tuple(param.shape), dtype or param.dtype, produce))
    return _write_checkpoint(Path(path), fmt, args, entries, max_shard_bytes, progress)


def convert_checkpoint(src: str | Path, dst: str | Path, format: str = "hf",
                       max_shard_bytes: int | None = None, dtype: torch.dtype | str | None = None,
                       progress: bool | None = None) -> CheckpointFiles:
    """Convert a checkpoint directory to `format` ("native" or "hf") without building the model.

    Streams tensor by tensor (read, rename, permute q/k, cast if `dtype` is given, write), so memory stays at
    about one tensor whatever the checkpoint's size.  The source is checked as strictly as :func:`load_model`
    checks it.  dst may be the source directory (e.g. to add the other format's files next to the native
    ones, as the public repositories do).  Returns the files written.
    """
    files = find_checkpoint(src)
    args = read_model_args(files)
    index = checkpoint_index(files, args, strict=True)
    dtype = _as_dtype(dtype)
    # Open every source file before writing anything: a shard of the same name in dst is replaced by rename,
    # and an open file keeps reading the old one.
    handles = {file: open(file, "rb", buffering=0) for file in files.shards}
    scratch = torch.empty(min(_CHUNK_BYTES, max(i.nbytes for i in index.values())), dtype=torch.uint8)
    entries = []
    for name, info in index.items():

        def produce(name: str = name, info: TensorInfo = info) -> torch.Tensor:
            heads = rotary_heads(name, args) if (files.format, format) == ("hf", "native") else None
            tensor = _read_tensor(handles[info.file], info, dtype or info.dtype, heads, args.head_dim, scratch)
            if (files.format, format) == ("native", "hf"):
                tensor = to_hf_tensor(name, tensor, args)[1]
            return tensor

        out_name = native_to_hf_name(name) if format == "hf" else name
        entries.append(_Entry(out_name, info.shape, dtype or info.dtype, produce))
    try:
        return _write_checkpoint(Path(dst), format, args, entries, max_shard_bytes, progress)
    finally:
        for handle in handles.values():
            handle.close()
