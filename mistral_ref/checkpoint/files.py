"""Finding a checkpoint's files and checking them against its config before a byte of weights is read.

find_checkpoint: which format a directory holds (native: params.json + consolidated*.safetensors; Hugging Face:
config.json + model*.safetensors), its shards and index.json, refusing pickles and git-lfs pointers.
checkpoint_index: every tensor the model needs, by the model's parameter name (a native file's names are ours, except
for Mistral's names of latent attention / fine-grained experts: names.from_mistral_name), with its file, dtype and
shape, after checking names, shapes and dtypes against the config (reads headers only), and, before the model is
even built on the meta device, that the files are large enough for the model the config describes
(check_config_fits_files).
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mistral_ref.checkpoint.errors import CheckpointError, listing
from mistral_ref.checkpoint.names import (
    from_mistral_name,
    hf_to_native_name,
    is_fp8_scale,
    is_vision_tensor,
    language_model_name,
    natural_key,
    to_mistral_name,
)
from mistral_ref.checkpoint.safetensors_io import (
    PICKLE_SUFFIXES,
    TensorInfo,
    pickle_refusal,
    read_safetensors_header,
)
from mistral_ref.config import ModelArgs, MoeArgs
from mistral_ref.family import parameter_counts, with_known_context
from mistral_ref.model import meta_model

log = logging.getLogger(__name__)

# ---- finding the files -------------------------------------------------------------------------------------
_NATIVE_SHARD = re.compile(r"consolidated-(\d+)-of-(\d+)\.safetensors")
_HF_SHARD = re.compile(r"model-(\d+)-of-(\d+)\.safetensors")
_NATIVE_INDEX = "consolidated.safetensors.index.json"
_HF_INDEX = "model.safetensors.index.json"


def shard_names(fmt: str, n: int) -> list[str]:
    """The names of n weight files of format `fmt`, as the real repositories spell them."""
    stem = "model" if fmt == "hf" else "consolidated"
    if n == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


def index_name(fmt: str) -> str:
    """The index file of a sharded checkpoint of format `fmt`."""
    return _HF_INDEX if fmt == "hf" else _NATIVE_INDEX


def is_weight_file(fmt: str, name: str) -> bool:
    """True for the weight files and the index of format `fmt` (what a save of that format replaces)."""
    pattern = _HF_SHARD if fmt == "hf" else _NATIVE_SHARD
    return name in (shard_names(fmt, 1)[0], index_name(fmt)) or pattern.fullmatch(name) is not None


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
            files = sorted(set(weight_map.values()), key=natural_key)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid index file (expected a JSON object with a "
                                  f"'weight_map' of tensor name -> file name): {e!r}") from None
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise CheckpointError(
                f"{index}: names {len(missing)} shard file(s) that are not in {directory}: "
                f"{listing(missing)} (an incomplete download?)")
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
            f"{directory}: shard files {listing(names, 8)} do not form one complete set of {total} "
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
            if path.suffix in PICKLE_SUFFIXES:
                raise pickle_refusal(path)
            with open(path, "rb") as f:
                head = f.read(8)
            raise CheckpointError(f"{path}: neither a .safetensors file nor a GGUF file (it starts with {head!r}); "
                                  "expected a checkpoint directory, a .safetensors file or a llama.cpp .gguf file")
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
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise pickle_refusal(path / pickles[0])
    configs = [n for n in ("params.json", "config.json") if (path / n).is_file()]
    if not configs:
        raise CheckpointError(f"{path}: no params.json (native) or config.json (Hugging Face) in this "
                              "directory")
    raise CheckpointError(
        f"{path}: has {' and '.join(configs)} but no weights: expected consolidated.safetensors / "
        "consolidated-0000k-of-0000n.safetensors (native) or model.safetensors / "
        f"model-0000k-of-0000n.safetensors (Hugging Face); found "
        f"{listing(sorted(p.name for p in path.iterdir()), 10)}")


def read_model_args(files: CheckpointFiles) -> ModelArgs:
    """The ModelArgs of a checkpoint, from params.json or config.json."""
    if files.format == "native":  # params.json files omit the trained context: the matching preset knows it
        return with_known_context(ModelArgs.from_params_json(files.config))
    return ModelArgs.from_hf_config(files.config)


# ---- the tensor index: every tensor of the checkpoint, named natively, checked against the config ----------
_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                    if hasattr(torch, n))
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


# The config fields that size the model, with their names in config.json.
_SIZE_FIELDS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "hidden_dim": "intermediate_size",
                "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
                "vocab_size": "vocab_size", "moe.num_experts": "num_local_experts"}
_LAYER_HEADER_BYTES = 9 * 40  # a layer stores >= 9 tensors (wq wk wv wo, 2 norms, w1 w2 w3), each >= 40 header bytes


def min_checkpoint_bytes(args: ModelArgs) -> int:
    """The fewest bytes that can hold the weights `args` describe: one byte per parameter (float8) plus the
    layers' header entries.  Arithmetic on the config only: nothing is built."""
    return parameter_counts(args)["total"] + args.n_layers * _LAYER_HEADER_BYTES


def _one_shard_hint(files: CheckpointFiles) -> str:
    name = files.shards[0].name
    if len(files.shards) == 1 and (_HF_SHARD.fullmatch(name) or _NATIVE_SHARD.fullmatch(name)):
        return " — this is one shard of a sharded checkpoint: pass the directory instead"
    return ""


def _magnitude(n: int) -> str:
    """4.3e+15 (or 10^1234 for an int too large for a float)."""
    return f"{n:.3g}" if n.bit_length() < 1000 else f"10^{int(n.bit_length() * 0.30103)}"


def check_config_fits_files(files: CheckpointFiles, args: ModelArgs) -> None:
    """Refuse a config whose model cannot be stored in the checkpoint's files (n_layers = 10**9, a vocab of
    10**9, ...): building even its meta-device modules would take hours or all memory.

    Raises CheckpointError naming the config file, the weight files' total size and the field(s) that alone
    imply more bytes than that (with every other size set to 1).
    """
    have = sum(shard.stat().st_size for shard in files.shards)
    need = min_checkpoint_bytes(args)
    if need <= have:
        return
    tiny = ModelArgs(dim=1, n_layers=1, hidden_dim=1, n_heads=1, n_kv_heads=1, head_dim=1, vocab_size=1)
    culprits = []
    for field, hf_name in _SIZE_FIELDS.items():
        if field == "moe.num_experts":
            value = args.moe.num_experts if args.moe else 1
            alone = replace(tiny, moe=MoeArgs(value, 1))
        else:
            value = getattr(args, field)
            # n_heads >= n_kv_heads in any valid config, so raising both keeps this a lower bound
            alone = replace(tiny, **{field: value}, **({"n_heads": value} if field == "n_kv_heads" else {}))
        if min_checkpoint_bytes(alone) > have:
            shown = value if value.bit_length() < 64 else _magnitude(value)
            culprits.append(f"{hf_name if files.format == 'hf' else field}={shown}")
    blame = (f"{', '.join(culprits)} alone cannot fit" if culprits else
             "the product of its sizes is too large")
    shards = listing([shard.name for shard in files.shards], 3)
    raise CheckpointError(
        f"{files.config}: describes a model of {_magnitude(parameter_counts(args)['total'])} parameters, needing "
        f"at least {_magnitude(need)} bytes, but its weight files ({shards}) hold {have} bytes: {blame} (a corrupt or "
        f"mismatched config){_one_shard_hint(files)}")


_FUSED_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")


def fused_expert_parts(hf_name: str, info: TensorInfo) -> list[tuple[str, TensorInfo]] | None:
    """The native expert tensors inside one of transformers 5's fused expert tensors, or None for other names.

    transformers 5.23 keeps (and Mistral4ForCausalLM saves) the routed experts of a layer as two tensors:
    experts.gate_up_proj (E, 2 * hidden, dim), each expert's gate rows then its up rows, and experts.down_proj
    (E, dim, hidden).  Each native tensor (experts.e.w1 / w3 / w2) is a contiguous run of bytes there, so it is
    described by the same file with another offset and shape: nothing is copied.
    """
    m = _FUSED_EXPERTS.fullmatch(hf_name)
    if m is None or len(info.shape) != 3:
        return None
    layer, kind = m.groups()
    n_experts, rows, cols = info.shape
    size = info.dtype.itemsize
    parts = []
    for e in range(n_experts):
        start = info.offset + e * rows * cols * size
        if kind == "down_proj":
            parts.append((f"layers.{layer}.feed_forward.experts.{e}.w2.weight", replace(info, shape=(rows, cols),
                                                                                          offset=start)))
        else:
            half = rows // 2
            parts.append((f"layers.{layer}.feed_forward.experts.{e}.w1.weight",
                          replace(info, shape=(half, cols), offset=start)))
            parts.append((f"layers.{layer}.feed_forward.experts.{e}.w3.weight",
                          replace(info, shape=(half, cols), offset=start + half * cols * size)))
    return parts


def refuse_fp8_quantized(files: CheckpointFiles, headers: dict[Path, dict[str, TensorInfo]]) -> None:
    """Raise CheckpointError naming the tensor if the files are an FP8-quantized checkpoint (names.is_fp8_scale):
    a tensor holding FP8 scales (qscale_weight, qscale_act, weight_scale_inv, ..._fake_quantizer.*), or float8
    tensors under a config that declares quantization (params.json "quantization", config.json
    "quantization_config").  Their float8 bytes mean something only times their scales, which are not applied
    here.  (Plain float8 files that save_checkpoint(dtype=float8) writes, without scales, still load.)"""
    for shard, header in headers.items():
        for key in header:
            if is_fp8_scale(key):
                raise CheckpointError(
                    f"{shard}: tensor {key!r} is a scale of an FP8-quantized checkpoint (float8 weights times "
                    "per-tensor qscale_weight / weight_scale_inv scales), which mistral-ref does not load: use the "
                    "BF16 release of the model")
    try:
        raw = json.loads(files.config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # read_model_args reports a bad config
    declared = isinstance(raw, dict) and (raw.get("quantization") or raw.get("quantization_config"))
    if not declared:
        return
    for shard, header in headers.items():
        for key, info in header.items():
            if info.dtype in _FP8_DTYPES:
                raise CheckpointError(
                    f"{shard}: tensor {key!r} is {str(info.dtype).removeprefix('torch.')} and {files.config.name} "
                    f"declares quantization {json.dumps(declared)[:200]}: an FP8-quantized checkpoint, which "
                    "mistral-ref does not load: use the BF16 release of the model")


def checkpoint_index(files: CheckpointFiles, args: ModelArgs, strict: bool = True) -> dict[str, TensorInfo]:
    """{native name: TensorInfo} for every tensor the model needs, after checking names, shapes and dtypes.

    Reads only headers.  Raises CheckpointError for a config too large for the files (before building
    anything), missing keys, shape mismatches, duplicate keys, an index.json that disagrees with its shards,
    and (if strict) unexpected keys; non-strict loads warn about the latter.
    """
    headers = {shard: read_safetensors_header(shard) for shard in files.shards}  # bad files are named first
    refuse_fp8_quantized(files, headers)
    check_config_fits_files(files, args)
    expected = expected_shapes(args)
    index: dict[str, TensorInfo] = {}
    unexpected: list[str] = []
    unexpected_file: dict[str, str] = {}  # unexpected key -> the file holding it
    problems: list[str] = []
    weight_map = None
    skipped: list[str] = []  # vision-tower tensors; an output weight the config ties to the embeddings
    if files.index is not None:
        weight_map = json.loads(files.index.read_text(encoding="utf-8"))["weight_map"]
    for shard in files.shards:
        for key, info in headers[shard].items():
            if weight_map is not None and weight_map.get(key) != shard.name:
                raise CheckpointError(
                    f"{files.index}: key {key!r} is stored in {shard.name} but the index says "
                    f"{weight_map.get(key)!r}: the index and the shards come from different saves")
            if is_vision_tensor(key):  # a multimodal checkpoint: only its language model loads
                skipped.append(key)
                continue
            if files.format == "hf":
                if _IGNORED_HF_KEYS.fullmatch(key):
                    continue
                parts = fused_expert_parts(language_model_name(key), info)
                if parts is not None:  # transformers 5's (E, ...) expert tensors: one slice per native tensor
                    for name, part in parts:
                        if expected.get(name) != part.shape:
                            problems.append(f"{shard}: key {key!r} has shape {list(info.shape)}, which does not "
                                            f"split into {files.config.name}'s experts ({name}: "
                                            f"{list(expected.get(name, ()))})")
                            break
                        index[name] = part
                    continue
                try:
                    name = hf_to_native_name(language_model_name(key), args)
                except KeyError:
                    unexpected.append(key)
                    unexpected_file[key] = shard.name
                    continue
            else:
                name = from_mistral_name(key, args)  # Mistral's names of latent attention / fine experts
            if name == "output.weight" and args.tied_embeddings:
                warnings.warn(f"{shard}: ignoring {key!r}: {files.config.name} ties the output projection to the "
                              "embeddings (tied_embeddings / tie_word_embeddings), as transformers does",
                              stacklevel=2)
                skipped.append(key)
                continue
            if name not in expected:
                unexpected.append(key)
                unexpected_file[key] = shard.name
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
    vision = sum(map(is_vision_tensor, skipped))
    if vision:
        log.info("%s: skipped %d vision-tower tensor(s): image inputs are not supported yet", files.config.parent,
                 vision)
    if weight_map is not None:
        stored = {info.key for info in index.values()} | set(unexpected) | set(skipped)
        absent = sorted(set(weight_map) - stored, key=natural_key)
        if absent:
            problems.append(f"{files.index}: names {len(absent)} tensor(s) that its shards do not contain: "
                            f"{listing(absent)}")
    missing = sorted(set(expected) - set(index), key=natural_key)
    where = ", ".join(str(s) for s in files.shards[:3]) + (" ..." if len(files.shards) > 3 else "")
    if missing:
        hint = ""
        dense_found = any(re.search(r"\.(mlp|feed_forward)\.w", u) for u in unexpected)
        experts_found = any(".experts." in u for u in unexpected)
        if any(".experts." in m for m in missing) and dense_found:
            hint = " — the config describes experts (moe / num_local_experts) but the checkpoint is dense"
        elif any(m.endswith("feed_forward.w1.weight") for m in missing) and experts_found:
            hint = " — the checkpoint holds experts but the config describes a dense model"
        elif missing == ["output.weight"]:
            hint = (" — if the model ties its output projection to its embeddings, its config must say so "
                    "(tied_embeddings in params.json, tie_word_embeddings in config.json)")
        elif files.format == "native" and any(u.startswith("model.") for u in unexpected):
            hint = " — the file holds Hugging Face names: pass its config.json or name it model.safetensors"
        hint += _one_shard_hint(files)
        if files.format == "native":  # as the file would name them (Mistral's names for latent layers)
            missing = [to_mistral_name(m, args) for m in missing]
        problems.insert(0, f"{where}: missing {len(missing)} tensor(s) that {files.config.name} expects: "
                           f"{listing(missing)}{hint}")
    if unexpected:
        named = [f"{k!r} (in {unexpected_file[k]})" for k in sorted(unexpected, key=natural_key)]
        message = (f"{where}: {len(unexpected)} unexpected tensor(s) that {files.config.name} does not "
                   f"describe: {listing(named)}")
        if files.format == "native" and (args.mla is not None or args.fine_moe is not None):
            message += (" — native files of latent-attention / fine-grained-expert models name their tensors as "
                        "Mistral's do (checkpoint/names.py: to_mistral_name)")
        if strict:
            problems.append(message)
        else:
            warnings.warn(message + " (ignored: strict=False)", stacklevel=3)
    if problems:
        raise CheckpointError("\n".join(problems))
    return index
