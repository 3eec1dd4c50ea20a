"""GGUF, llama.cpp's single-file format: read one into a Transformer (load_gguf), write one (save_gguf).

A GGUF file holds, in order: the magic b"GGUF" and a version; typed key/value metadata ("general.architecture":
"llama", "llama.embedding_length": 4096, ..., often the tokenizer too); a table of tensors (name, shape, ggml
type, offset); then the tensor bytes.  A tensor is plain (F32, F16, BF16) or quantized in blocks: Q8_0 stores 32
weights as 32 int8 and one fp16 scale, Q4_0 / Q4_1 / Q5_0 / Q5_1 likewise with 4 or 5 bits, the "K-quants"
(Q2_K .. Q6_K) nest 16- or 32-weight blocks in 256-weight super-blocks with quantized scales.  The `gguf` package
(llama.cpp's own Python reader, the `gguf` extra) parses the file through a memory map and dequantizes blocks;
this module maps what it finds onto the native checkpoint: the config (ModelArgs) and the tensor names.

* Architectures.  llama.cpp's converter writes Mistral 7B, Nemo, Mistral Small and Mixtral as "llama" (the
  architecture string names the computation, and theirs is Llama's); newer converters write Mistral-format
  checkpoints as "mistral3", which is the same computation unless it carries YaRN RoPE scaling or an attention
  temperature (Ministral 3): those, and every other architecture, are refused with the field that says so.
  Mistral Small 4 (latent attention, fine-grained experts) is "mistral4", written and read by the rules of
  checkpoint/gguf_mistral4.py.
* Names.  token_embd / output_norm / output, and per block blk.N.attn_{norm,q,k,v,output},
  blk.N.ffn_{norm,gate,up,down}; Mixtral's router is blk.N.ffn_gate_inp and its experts are stacked in
  blk.N.ffn_{gate,up,down}_exps (num_experts, rows, columns) — or, in files written before April 2024, one
  tensor per expert, blk.N.ffn_gate.E.  gate = w1, up = w3, down = w2, as in Hugging Face's MLP.
* Shapes.  GGUF lists dimensions fastest-first (ggml's ne[0] is the row length): a (4096 x 14336) w1 is stored
  as [4096, 14336].  The gguf package hands out numpy arrays in the usual row-major order, so rows are rows.
* The q/k row order.  convert_hf_to_gguf.py reorders the rows of Hugging Face's q_proj / k_proj head by head:
  reshape(n_heads, 2, head_dim / 2, dim), swap the two middle axes — that is permute_qk(w, head_dim,
  to="native") (checkpoint/names.py): it turns HF's "halves" layout back into the interleaved pairs that
  llama.cpp's RoPE rotates, the native layout.  So a GGUF's attn_q / attn_k rows are the native wq / wk rows:
  they load unchanged here, save_gguf writes native rows unchanged, and a reader that wants HF order (such as
  transformers' GGUF loader) undoes llama.cpp's permutation with permute_qk(w, head_dim, to="hf").
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from mistral_ref.checkpoint.dtypes import float32_decimal, parse_dtype
from mistral_ref.checkpoint.errors import CheckpointError, listing
from mistral_ref.checkpoint.files import CheckpointFiles, expected_shapes
from mistral_ref.checkpoint.gguf_mistral4 import ARCH as MISTRAL4
from mistral_ref.checkpoint.gguf_mistral4 import (
    Planned,
    check_mistral4,
    mistral4_fields,
    mistral4_index,
    mistral4_metadata,
    mistral4_plan,
)
from mistral_ref.checkpoint.gguf_quant import gguf_quantized_weight
from mistral_ref.checkpoint.names import natural_key
from mistral_ref.checkpoint.safetensors_io import Progress
from mistral_ref.config import ConfigError, ModelArgs, MoeArgs
from mistral_ref.model import Transformer, meta_model
from mistral_ref.quantize import QuantizedWeight, quantize_weight, quantized_shell

if TYPE_CHECKING:
    from mistral_ref.tokenizer import Tokenizer

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
ARCHITECTURES = ("llama", "mistral3")

#: ggml types that load: plain ones become tensors directly, quantized ones are dequantized by the gguf package.
PLAIN_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
QUANTIZED_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
#: ggml types save_gguf writes (the gguf package quantizes these; the K-quants it only dequantizes).
SAVE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")

# ---- names: llama.cpp's <-> native -------------------------------------------------------------------------
_GLOBAL = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
           "output.weight": "output.weight"}
_LAYER = {  # blk.N.<gguf>.weight -> layers.N.<native>.weight
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2",
    "ffn_gate_inp": "feed_forward.gate",
}
_EXPERTS = {"ffn_gate_exps": "w1", "ffn_up_exps": "w3", "ffn_down_exps": "w2"}  # stacked (E, rows, columns)
_PER_EXPERT = {"ffn_gate": "w1", "ffn_up": "w3", "ffn_down": "w2"}  # blk.N.ffn_gate.E.weight (before 2024-04)
_BLOCK = re.compile(r"blk\.(\d+)\.([a-z_]+)(?:\.(\d+))?\.weight")
_NATIVE_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.weight")
_NATIVE_EXPERT = re.compile(r"feed_forward\.experts\.(\d+)\.(w[123])")


def is_gguf_file(path: str | Path) -> bool:
    """True if `path` is a file that starts with GGUF's magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _gguf_package(path: Path) -> Any:
    try:
        import gguf
    except ImportError:
        raise CheckpointError(f"{path}: reading or writing a GGUF file needs the gguf package "
                              "(pip install 'mistral-ref[gguf]')") from None
    return gguf


def open_gguf(path: str | Path) -> Any:
    """A gguf.GGUFReader of `path`: metadata parsed, tensors left in a copy-on-write memory map (nothing read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if not is_gguf_file(path):
        with open(path, "rb") as f:
            head = f.read(8)
        raise CheckpointError(f"{path}: not a GGUF file (it starts with {head!r}, a GGUF file with b'GGUF')")
    gguf = _gguf_package(path)
    try:
        return gguf.GGUFReader(path, mode="c")
    except (ValueError, IndexError, KeyError) as e:  # the reader's own complaints: bad version, truncated file
        raise CheckpointError(f"{path}: a corrupt or unsupported GGUF file: {e}") from None


# ---- metadata -> ModelArgs ---------------------------------------------------------------------------------
_MISSING = object()


def _value(reader: Any, key: str, path: Path, default: Any = _MISSING) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise CheckpointError(f"{path}: metadata key {key!r} is missing (a GGUF written by llama.cpp's "
                                  "converter always has it)")
        return default
    return field.contents()


def gguf_model_args(reader: Any, path: str | Path) -> ModelArgs:
    """The ModelArgs a GGUF file's metadata describes (architecture "llama", plain "mistral3" or "mistral4").

    Raises CheckpointError naming the file and the metadata key for an architecture or a feature (RoPE scaling,
    an attention temperature, per-layer head counts, partial rotary dimensions) that this model does not have.
    """
    path = Path(path)
    arch = _value(reader, "general.architecture", path)
    if arch not in (*ARCHITECTURES, MISTRAL4):
        raise CheckpointError(f"{path}: general.architecture is {arch!r}; mistral-ref reads {ARCHITECTURES} "
                              f"and {MISTRAL4!r} (llama.cpp writes Mistral 7B, Nemo, Small and Mixtral as 'llama', "
                              "Small 4 as 'mistral4')")

    def get(key: str, default: Any = _MISSING) -> Any:
        return _value(reader, f"{arch}.{key}", path, default)

    vocab = get("vocab_size", None)
    if vocab is None:  # older files: the tokenizer's length, else the embedding's rows
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        embd = [t for t in reader.tensors if t.name == "token_embd.weight"]
        vocab = len(tokens.data) if tokens is not None else int(embd[0].shape[1]) if embd else None
        if vocab is None:
            raise CheckpointError(f"{path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens nor "
                                  "token_embd.weight gives the vocabulary size")

    common = dict(dim=int(get("embedding_length")), n_layers=int(get("block_count")),
                  n_heads=int(get("attention.head_count")), vocab_size=int(vocab),
                  norm_eps=float32_decimal(get("attention.layer_norm_rms_epsilon")),
                  rope_theta=float32_decimal(get("rope.freq_base", 10000.0)),  # llama.cpp's default base
                  max_seq_len=int(get("context_length")) if f"{arch}.context_length" in reader.fields else None)
    if arch == MISTRAL4:
        try:
            return ModelArgs(**common, **mistral4_fields(get, path))
        except ConfigError as e:
            raise CheckpointError(f"{path}: the metadata describes no valid model: {e}") from None
    scaling = get("rope.scaling.type", "none")
    if scaling != "none" or get("rope.scaling.factor", 1.0) != 1.0:
        raise CheckpointError(f"{path}: {arch}.rope.scaling.type is {scaling!r}: RoPE scaling is not part of "
                              "the Mistral models this reference implements (plain RoPE only)")
    for key in ("attention.temperature_scale", "rope.scaling.yarn_log_multiplier"):
        if f"{arch}.{key}" in reader.fields:
            raise CheckpointError(f"{path}: {arch}.{key} is set: a Ministral-3-style attention scaling that this "
                                  "reference does not implement")
    if get("expert_gating_func", 1) != 1:  # 1 = softmax (ExpertGatingFuncType.SOFTMAX)
        raise CheckpointError(f"{path}: {arch}.expert_gating_func is {get('expert_gating_func')}: only softmax "
                              "routing (1) is Mixtral's")
    dim, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    n_kv_heads = get("attention.head_count_kv", n_heads)
    if isinstance(n_kv_heads, list):  # per-layer counts: only a constant list describes this model
        if len(set(n_kv_heads)) != 1:
            raise CheckpointError(f"{path}: {arch}.attention.head_count_kv differs between layers "
                                  f"({listing(map(str, n_kv_heads))}): not a Mistral-family model")
        n_kv_heads = n_kv_heads[0]
    head_dim = int(get("attention.key_length", get("rope.dimension_count", dim // n_heads)))
    for key in ("attention.value_length", "rope.dimension_count"):
        if int(get(key, head_dim)) != head_dim:
            raise CheckpointError(f"{path}: {arch}.{key} is {get(key)} but the head width is {head_dim}: "
                                  "this model rotates and attends with whole heads")
    experts = int(get("expert_count", 0))
    window = get("attention.sliding_window", None)
    try:
        return ModelArgs(
            **common, n_kv_heads=int(n_kv_heads), head_dim=head_dim,
            hidden_dim=int(get("expert_feed_forward_length", get("feed_forward_length")))
            if experts else int(get("feed_forward_length")),
            sliding_window=int(window) if window else None,
            moe=MoeArgs(experts, int(get("expert_used_count"))) if experts else None,
        )
    except ConfigError as e:
        raise CheckpointError(f"{path}: the metadata describes no valid model: {e}") from None


# ---- the tensor index: every native tensor, with where it lives in the file --------------------------------
class GGUFSource(NamedTuple):
    """Where one native tensor lives in a GGUF file: the reader's tensor and, for stacked experts, the index
    along its first axis."""

    tensor: Any  # gguf.ReaderTensor
    expert: int | None = None

    @property
    def type_name(self) -> str:
        return self.tensor.tensor_type.name

    @property
    def nbytes(self) -> int:
        n = self.tensor.n_bytes
        return n // self.tensor.data.shape[0] if self.expert is not None else n


def _logical_shape(tensor: Any) -> tuple[int, ...]:
    """Row-major shape of a GGUF tensor (the file lists dimensions fastest-first)."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def _native_name(name: str) -> tuple[str, bool] | None:
    """GGUF tensor name -> (native name, stacked): a stacked experts tensor gives a pattern with "{}" for the
    expert.  None if the name is not a tensor of this model."""
    if name in _GLOBAL:
        return _GLOBAL[name], False
    m = _BLOCK.fullmatch(name)
    if m is None:
        return None
    layer, part, expert = m[1], m[2], m[3]
    if expert is not None:  # one tensor per expert (files before April 2024)
        return (f"layers.{layer}.feed_forward.experts.{expert}.{_PER_EXPERT[part]}.weight", False) \
            if part in _PER_EXPERT else None
    if part in _LAYER:
        return f"layers.{layer}.{_LAYER[part]}.weight", False
    if part in _EXPERTS:
        return f"layers.{layer}.feed_forward.experts.{{}}.{_EXPERTS[part]}.weight", True
    return None


def gguf_index(reader: Any, args: ModelArgs, path: str | Path, strict: bool = True) -> dict[str, GGUFSource]:
    """{native name: GGUFSource} for every tensor of Transformer(args), after checking names, shapes and types.

    A file without output.weight ties the output projection to token_embd (as llama.cpp does).  Raises
    CheckpointError naming the file and tensor for a missing tensor, a shape that disagrees with the metadata,
    a ggml type that cannot be read, and (if strict) a tensor this model does not have.
    """
    path = Path(path)
    expected = expected_shapes(args)
    n_experts = args.moe.num_experts if args.moe else 0
    index: dict[str, GGUFSource] = {}
    covered: set[str] = set()  # native names some tensor of the file stands for (readable or not)
    unexpected, problems = [], []
    for tensor in reader.tensors:
        found = _native_name(tensor.name)
        if found is None:
            unexpected.append(tensor.name)
            continue
        native, stacked = found
        names = [native.format(e) for e in range(n_experts)] if stacked else [native]
        if not names or names[0] not in expected:
            unexpected.append(tensor.name)
            continue
        covered.update(names)
        shape, want = _logical_shape(tensor), ((n_experts,) if stacked else ()) + expected[names[0]]
        kind = tensor.tensor_type.name
        if kind not in PLAIN_TYPES and kind not in QUANTIZED_TYPES:
            problems.append(f"{path}: tensor {tensor.name!r} has ggml type {kind}, which mistral-ref does not "
                            f"read (supported: {', '.join([*PLAIN_TYPES, *QUANTIZED_TYPES])})")
        elif shape != want:
            problems.append(f"{path}: tensor {tensor.name!r} has shape {list(shape)}, expected {list(want)} "
                            f"{'(experts x rows x columns) ' if stacked else ''}from the metadata")
        elif stacked:  # one native tensor per slice along the first axis
            index.update({name: GGUFSource(tensor, e) for e, name in enumerate(names)})
        else:
            index[native] = GGUFSource(tensor)
    if "output.weight" not in covered and "tok_embeddings.weight" in index:
        index["output.weight"] = index["tok_embeddings.weight"]  # tied embeddings
        covered.add("output.weight")
    missing = sorted(set(expected) - covered, key=natural_key)
    if missing:
        problems.insert(0, f"{path}: missing {len(missing)} tensor(s) that the metadata describes "
                           f"(native names): {listing(missing)}")
    if unexpected:
        hint = " (rope_freqs: a RoPE scaling this model does not have)" if any(
            u.startswith("rope_freqs") for u in unexpected) else ""
        message = (f"{path}: {len(unexpected)} tensor(s) that a {args.n_layers}-layer "
                   f"{'Mixtral' if args.moe else 'Mistral'} model does not have: "
                   f"{listing(sorted(unexpected, key=natural_key))}{hint}")
        if strict:
            problems.append(message)
        else:
            log.warning("%s (ignored: strict=False)", message)
    if problems:
        raise CheckpointError("\n".join(problems))
    return index


def gguf_dtype(index: dict[str, GGUFSource]) -> torch.dtype:
    """The dtype a GGUF file loads in by default: float32 if any tensor is quantized, else the plain type
    holding most bytes."""
    if any(s.type_name in QUANTIZED_TYPES for s in index.values()):
        return torch.float32
    nbytes: dict[torch.dtype, int] = {}
    for s in index.values():
        nbytes[PLAIN_TYPES[s.type_name]] = nbytes.get(PLAIN_TYPES[s.type_name], 0) + s.nbytes
    return max(nbytes, key=nbytes.__getitem__)


# ---- reading one tensor ------------------------------------------------------------------------------------
_DEQUANT_ROWS_BYTES = 16 << 20  # quantized bytes dequantized at a time (the fp32 result is ~4-8x that)


def read_gguf_tensor(source: GGUFSource, dtype: torch.dtype, mmap: bool = True) -> torch.Tensor:
    """One native tensor from its GGUF source, in `dtype`.

    Plain F32/F16/BF16 tensors are views of the memory map when no cast is needed and mmap is True (nothing is
    read until used), else private copies; quantized tensors are dequantized by the gguf package a few MB of
    blocks at a time straight into the result, so memory grows by the result only.
    """
    import gguf

    t = source.tensor
    data = t.data if source.expert is None else t.data[source.expert]  # numpy view of the map
    kind = source.type_name
    if kind in PLAIN_TYPES:
        view = torch.from_numpy(data.view(np.int16)).view(torch.bfloat16) if kind == "BF16" \
            else torch.from_numpy(data)
        return view if (view.dtype == dtype and mmap) else view.to(dtype, copy=True)
    qtype = gguf.GGMLQuantizationType[kind]
    rows = data.reshape(-1, data.shape[-1])  # (rows, bytes per row)
    out = torch.empty(rows.shape[0], gguf.quant_shape_from_byte_shape(rows.shape, qtype)[-1], dtype=dtype)
    step = max(1, _DEQUANT_ROWS_BYTES // rows.shape[1])
    for i in range(0, rows.shape[0], step):
        out[i:i + step] = torch.from_numpy(gguf.dequantize(rows[i:i + step], qtype))
    return out.view(_logical_shape(t)[1:] if source.expert is not None else _logical_shape(t))


def load_gguf(path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
              strict: bool = True, progress: bool | None = None, *, mmap: bool = True,
              quantize: str | None = None, group_size: int = 32) -> Transformer:
    """Load a llama.cpp GGUF file into a Transformer (what load_model does for a .gguf file).

    dtype: the parameters' dtype; None: float32 for a quantized file (its weights are dequantized), else the
    plain type holding most bytes.  Quantized tensors are dequantized once, at load: the model then computes
    with the dequantized weights (the numbers llama.cpp's kernels approximate on the fly).  mmap, strict,
    progress: as for load_model.  `model.checkpoint_files.format` is "gguf".
    quantize, group_size: as for load_model; Q4_0 matrices then become int4 groups of 32 without requantizing
    (checkpoint/gguf_quant.py; a "mistral4" file's kv_b_proj, rebuilt from two tensors, is quantized from its
    values).
    """
    path = Path(path)
    reader = open_gguf(path)
    args = gguf_model_args(reader, path)
    if args.mla is not None:  # "mistral4": tensors split, fused or transposed on the way (gguf_mistral4.py)
        return _load_mistral4(reader, args, path, dtype, torch.device(device), strict, progress, mmap, quantize,
                              group_size)
    index = gguf_index(reader, args, path, strict=strict)
    dtype = parse_dtype(dtype) or gguf_dtype(index)
    device = torch.device(device)
    model = meta_model(args)
    quantized = quantized_names(model, quantize, group_size)
    bar = Progress(sum(s.nbytes for s in index.values()), progress, f"loading {path.name}")
    state = {}
    try:
        for name, source in index.items():
            def read(source: GGUFSource = source) -> torch.Tensor:
                return read_gguf_tensor(source, dtype, mmap=mmap and device.type == "cpu")
            if name in quantized:
                data = source.tensor.data if source.expert is None else source.tensor.data[source.expert]
                qw = gguf_quantized_weight(source.type_name, data, read, quantize, group_size, dtype, name)
                state.update({f"{name}.{k}": v.to(device) for k, v in qw.state_dict().items()})
            else:
                state[name] = read().to(device)
            bar.update(source.nbytes)
    finally:
        bar.close()
    model.load_state_dict(state, strict=True, assign=True)
    model.checkpoint_files = CheckpointFiles("gguf", path, (path,))
    return model.eval()


def quantized_names(model: Transformer, quantize: str | None, group_size: int) -> dict[str, QuantizedWeight]:
    """{weight name: its QuantizedWeight placeholder} of a meta model made ready for `quantize` (none: {})."""
    if quantize is None:
        return {}
    return {f"{n}.weight": m.weight for n, m in quantized_shell(model, quantize, group_size).named_modules()
            if isinstance(getattr(m, "weight", None), QuantizedWeight)}


def _load_mistral4(reader: Any, args: ModelArgs, path: Path, dtype: torch.dtype | str | None, device: torch.device,
                   strict: bool, progress: bool | None, mmap: bool, quantize: str | None,
                   group_size: int) -> Transformer:
    """load_gguf for a "mistral4" file: each native tensor made from its sources (mistral4_index).  With quantize,
    a matrix from one source (a whole tensor, or rows of an expert's slice) goes through gguf_quantized_weight as
    the "llama" files' matrices do (Q4_0: int4 groups of 32 without requantizing); kv_b_proj, made from attn_k_b
    (transposed) and attn_v_b, is quantized from its values."""
    index = mistral4_index(reader.tensors, args, expected_shapes(args), path, strict=strict)
    sources = {id(t): GGUFSource(t, e) for parts, _ in index.values() for t, e in parts}
    dtype = parse_dtype(dtype) or gguf_dtype({str(k): s for k, s in sources.items()})
    model = meta_model(args)
    quantized = quantized_names(model, quantize, group_size)
    bar = Progress(sum(GGUFSource(t, e).nbytes for parts, _ in index.values() for t, e in parts), progress,
                   f"loading {path.name}")
    state = {}
    try:
        for name, (parts, combine) in index.items():
            def read(parts: list = parts, combine: Callable = combine) -> torch.Tensor:
                return combine([read_gguf_tensor(GGUFSource(t, e), dtype, mmap=mmap and device.type == "cpu")
                                for t, e in parts])
            if name in quantized:
                if len(parts) == 1:  # (combine: the tensor or a slice of its rows, of values or of quantized blocks)
                    (t, e), = parts
                    data = combine([t.data if e is None else t.data[e]])
                    qw = gguf_quantized_weight(GGUFSource(t).type_name, data, read, quantize, group_size, dtype, name)
                else:  # kv_b_proj, made of two tensors
                    qw = quantize_weight(read(), quantize, group_size, name)
                state.update({f"{name}.{k}": v.to(device) for k, v in qw.state_dict().items()})
            else:
                state[name] = read().to(device)
            bar.update(sum(GGUFSource(t, e).nbytes for t, e in parts))
    finally:
        bar.close()
    model.load_state_dict(state, strict=True, assign=True)
    model.checkpoint_files = CheckpointFiles("gguf", path, (path,))
    return model.eval()


# ---- writing -----------------------------------------------------------------------------------------------
def _gguf_name(native: str) -> str:
    """Native name -> llama.cpp name (experts: the stacked tensor's name)."""
    for gguf_name, name in _GLOBAL.items():
        if name == native:
            return gguf_name
    m = _NATIVE_LAYER.fullmatch(native)
    if m is None:
        raise KeyError(f"no GGUF name for native tensor {native!r}")
    layer, rest = m.groups()
    e = _NATIVE_EXPERT.fullmatch(rest)
    if e:
        return f"blk.{layer}.{next(k for k, v in _EXPERTS.items() if v == e[2])}.weight"
    return f"blk.{layer}.{next(k for k, v in _LAYER.items() if v == rest)}.weight"


def _llama_plan(state: dict[str, torch.Tensor]) -> list[Planned]:
    """The "llama" architecture's tensors: (gguf name, row-major shape, producer), experts stacked."""
    grouped: dict[str, list[str]] = {}
    for native in sorted(state, key=natural_key):
        grouped.setdefault(_gguf_name(native), []).append(native)
    plan: list[Planned] = []
    for gname, natives in grouped.items():
        if len(natives) > 1 or "_exps" in gname:  # experts stacked (E, rows, columns)
            plan.append((gname, (len(natives), *state[natives[0]].shape),
                         lambda natives=natives: torch.stack([state[n] for n in natives])))
        else:
            plan.append((gname, tuple(state[natives[0]].shape), lambda native=natives[0]: state[native]))
    return plan


_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "BF16": 32}  # LlamaFileType


def _model_tokenizer_dir(model: Transformer) -> Path | None:
    """The directory of the checkpoint `model` was loaded from (where its tokenizer file lives), if known."""
    files = getattr(model, "checkpoint_files", None)
    if files is None:
        return None
    return Path(files.config).parent


def save_gguf(model: Transformer, path: str | Path, qtype: str = "F16", name: str | None = None,
              progress: bool | None = None, tokenizer: Tokenizer | str | Path | None = None) -> Path:
    """Write `model` as a llama.cpp GGUF file (architecture "llama"; latent attention with fine-grained experts,
    Mistral Small 4: "mistral4", checkpoint/gguf_mistral4.py), one tensor at a time.

    qtype: the ggml type of the matrices (SAVE_TYPES: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1); norms and
    the MoE router stay F32, as llama.cpp keeps them.  Quantized types need every row length to be a multiple
    of 32.  q/k rows are written in the native order, which is llama.cpp's (module docstring).  Experts are
    stacked into blk.N.ffn_{gate,up,down}_exps.  name: general.name (default: the file's stem).

    tokenizer: a Tokenizer, a tokenizer file or a checkpoint directory; None: the one next to the checkpoint the
    model was loaded from (model.checkpoint_files), if any.  Its vocabulary is written as llama.cpp's
    tokenizer.ggml.* metadata (checkpoint/gguf_tokenizer.py: SentencePiece as model "llama", tekken as "gpt2"
    with the "tekken" pre-tokenizer), which llama.cpp needs to load the file; without a tokenizer the file
    still loads here (mistral-ref reads the tokenizer file next to the .gguf) but not in llama.cpp, and a warning
    says so.  A sliding window is written as llama.attention.sliding_window, which llama.cpp's "llama"
    architecture ignores: it attends to the whole context.  The file is written to a temporary name and
    renamed.  Returns the path.
    """
    path = Path(path)
    gguf = _gguf_package(path)
    if qtype not in SAVE_TYPES:
        raise ValueError(f"qtype must be one of {SAVE_TYPES}, got {qtype!r}")
    args = model.args
    if isinstance(args.sliding_window, tuple):
        raise CheckpointError(f"{path}: GGUF metadata cannot express a per-layer sliding window list "
                              f"({args.sliding_window})")
    if args.mla is not None or args.fine_moe is not None:
        check_mistral4(args, path)  # latent attention and fine-grained experts: llama.cpp's "mistral4"
    if getattr(model, "quantization", None) is not None:  # quantize.quantize_model's record
        raise CheckpointError(f"{path}: the model is quantized ({model.quantization['scheme']}); save_gguf writes "
                              "a float model (its qtype argument quantizes: Q8_0, Q4_0, ...)")
    arch = "llama" if args.mla is None else MISTRAL4
    if tokenizer is None:
        directory = _model_tokenizer_dir(model)
        if directory is not None and directory.is_dir():
            from mistral_ref.tokenizer import TokenizerError, find_tokenizer_file

            try:
                tokenizer = find_tokenizer_file(directory)
            except TokenizerError:
                tokenizer = None
    vocab = None
    if tokenizer is None:
        log.warning("%s: written without a tokenizer (pass save_gguf(..., tokenizer=...)): llama.cpp cannot load "
                    "it, mistral-ref reads the tokenizer file placed next to it", path)
    else:
        from mistral_ref.checkpoint.gguf_tokenizer import add_tokenizer, tokenizer_metadata

        vocab = tokenizer_metadata(tokenizer, args.vocab_size)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch)
    writer.add_string("general.name", name or path.stem)
    writer.add_uint32("general.file_type", _FILE_TYPES[qtype])
    if qtype.startswith("Q"):
        writer.add_uint32("general.quantization_version", gguf.GGML_QUANT_VERSION)
    state = model.state_dict()
    if arch == MISTRAL4:
        ints, floats, others = mistral4_metadata(args)
        planned = mistral4_plan(state, args)
    else:
        ints = {"context_length": args.max_seq_len or 32768, "embedding_length": args.dim,
                "block_count": args.n_layers, "feed_forward_length": args.hidden_dim,
                "attention.head_count": args.n_heads, "attention.head_count_kv": args.n_kv_heads,
                "attention.key_length": args.head_dim, "attention.value_length": args.head_dim,
                "rope.dimension_count": args.head_dim, "vocab_size": args.vocab_size}
        if args.sliding_window:
            ints["attention.sliding_window"] = args.sliding_window
        if args.moe:
            ints.update(expert_count=args.moe.num_experts, expert_used_count=args.moe.num_experts_per_tok)
        floats, others = {"attention.layer_norm_rms_epsilon": args.norm_eps, "rope.freq_base": args.rope_theta}, {}
        planned = _llama_plan(state)
    for key, value in ints.items():
        writer.add_uint32(f"{arch}.{key}", int(value))
    for key, value in floats.items():
        writer.add_float32(f"{arch}.{key}", float(value))
    for key, value in others.items():
        (writer.add_bool if isinstance(value, bool) else writer.add_string)(f"{arch}.{key}", value)
    if vocab is not None:
        add_tokenizer(writer, vocab)

    tensors = []
    for gname, shape, make in planned:
        kind = "F32" if len(shape) == 1 or gname.endswith("ffn_gate_inp.weight") else qtype
        ggml = gguf.GGMLQuantizationType[kind]
        block, type_size = gguf.GGML_QUANT_SIZES[ggml]
        if shape[-1] % block:
            raise CheckpointError(f"{path}: tensor {gname!r} has rows of {shape[-1]} values, not a multiple of "
                                  f"{kind}'s block of {block}: use F32/F16/BF16")
        nbytes = math.prod(shape[:-1]) * shape[-1] // block * type_size
        if kind in ("F32", "F16"):
            writer.add_tensor_info(gname, shape, np.dtype(np.float32 if kind == "F32" else np.float16), nbytes)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, ggml)
            writer.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=ggml)
        tensors.append((gname, make, shape, ggml))
    bar = Progress(sum(math.prod(t[2]) for t in tensors) * 2, progress, f"writing {path.name}")
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _name, make, shape, ggml in tensors:
            w = make()
            values = w.detach().to("cpu", torch.float32).contiguous().numpy()
            writer.write_tensor_data(gguf.quantize(values, ggml))
            bar.update(math.prod(shape) * 2)
            del w, values
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()
        bar.close()
        tmp.unlink(missing_ok=True)
    return path
