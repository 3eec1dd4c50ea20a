"""Reading and writing .safetensors files: check the header, read one tensor (or a slice of it) into private
memory through a small reused buffer, write a file atomically.  A byte progress bar for both.

A safetensors file is: 8 bytes little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the tensor bytes
(offsets count from the end of the header), each tensor row-major.  Nothing in it can execute code, unlike
torch.save's pickles.  The tensors' byte ranges must tile the data exactly (no overlap, no hole, no trailing
bytes), as the safetensors library requires: two keys sharing bytes would otherwise load, and convert, as
aliases of one tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import torch

from mistral_ref.checkpoint.errors import CheckpointError
from mistral_ref.checkpoint.names import permute_qk

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle")
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


# ---- the header: check it before trusting the bytes --------------------------------------------------------
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


def pickle_refusal(path: Path) -> CheckpointError:
    """The error for a pickled weight file: what it is, why it is refused, what to use instead."""
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
    if path.suffix in PICKLE_SUFFIXES:
        raise pickle_refusal(path)
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
            raise pickle_refusal(path)
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{path}: the header length field says {header_len} bytes but only {size - 8} follow it: "
                "the file is truncated (an interrupted download?) or not a safetensors file")
        f.seek(8)
        raw = f.read(header_len)
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a repeated key, an int of > 4300 digits
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e}): corrupt file") \
            from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object: corrupt file")
    header.pop("__metadata__", None)
    data_size = size - 8 - header_len
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []  # (begin, end, key) of every tensor's bytes
    for key, entry in header.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(_natural(s) for s in entry["shape"])
            begin, end = (_natural(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: key {key!r}: malformed header entry {entry!r:.200}") from None
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected:
            raise CheckpointError(
                f"{path}: key {key!r}: shape {list(shape)} of {entry['dtype']} needs {expected} bytes, "
                f"the header gives offsets {begin}..{end}: corrupt file")
        if end > data_size:
            raise CheckpointError(
                f"{path}: key {key!r}: its bytes end at offset {end} but the file holds only {data_size} "
                f"bytes of tensor data (file size {size}, expected at least {8 + header_len + end}): "
                "the file is truncated")
        infos[key] = TensorInfo(path, key, dtype, shape, 8 + header_len + begin)
        spans.append((begin, end, key))
    _check_tiling(path, spans, data_size)
    return infos


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json.loads' object hook: a key given twice is an error (json keeps the last one silently)."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice")
        seen.add(key)
    return dict(pairs)


def _natural(value: object) -> int:
    """A header number (shape entry, offset): an int >= 0; anything else (bool, float, str, < 0) is corrupt."""
    if type(value) is not int or value < 0:
        raise ValueError(value)
    return value


def _check_tiling(path: Path, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """The tensors' byte ranges must cover the data exactly once: no overlap, no hole, nothing after the last."""
    reached, last_key = 0, None
    for begin, end, key in sorted(spans):
        if begin < reached:
            raise CheckpointError(
                f"{path}: key {key!r}: its bytes {begin}..{end} overlap those of key {last_key!r} (up to "
                f"{reached}): corrupt file (two tensors would share memory)")
        if begin > reached:
            raise CheckpointError(
                f"{path}: key {key!r}: its bytes start at {begin} but the tensors before it end at {reached}: "
                "bytes that belong to no tensor (corrupt file)")
        reached, last_key = end, key
    if reached != data_size:
        raise CheckpointError(
            f"{path}: the tensors' bytes end at {reached} but the file holds {data_size} bytes of tensor data: "
            f"{data_size - reached} trailing bytes that belong to no tensor (corrupt file)")


# ---- reading one tensor (or a slice of it) into private memory ---------------------------------------------
class TensorSlice(NamedTuple):
    """Rows (dim=0) or columns (dim=1) start .. stop-1 of a stored tensor; dim=None: the whole tensor."""

    dim: int | None
    start: int = 0
    stop: int = 0


WHOLE = TensorSlice(None)
CHUNK_BYTES = 16 << 20  # the most one read through the reused buffer brings in


def slice_shape(shape: tuple[int, ...], part: TensorSlice) -> tuple[int, ...]:
    """The shape of `part` of a tensor of `shape`."""
    if part.dim is None:
        return shape
    return (*shape[:part.dim], part.stop - part.start, *shape[part.dim + 1:])


def _check_slice(info: TensorInfo, part: TensorSlice, qk_head_dim: int) -> None:
    where = f"{info.file}: key {info.key!r}: cannot read {part} of shape {list(info.shape)}"
    if part.dim is None:
        return
    if part.dim not in (0, 1) or len(info.shape) <= part.dim or len(info.shape) > 2:
        raise ValueError(f"{where}: only rows or columns of a matrix (or elements of a vector) can be sliced")
    if not 0 <= part.start <= part.stop <= info.shape[part.dim]:
        raise ValueError(f"{where}: the slice is out of bounds")
    if qk_head_dim and (part.dim != 0 or part.start % qk_head_dim or part.stop % qk_head_dim):
        raise ValueError(f"{where}: a q/k projection whose rows change order can only be sliced by whole "
                         f"heads ({qk_head_dim} rows each)")


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


def read_tensor(f: BinaryIO, info: TensorInfo, dtype: torch.dtype, part: TensorSlice = WHOLE,
                qk_head_dim: int = 0, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor, or the rows / columns `part` names, from an open file into a new tensor of `dtype`.

    qk_head_dim: for an HF q_proj / k_proj, the head width: its rows are put in the native order
    (:func:`permute_qk`; a row slice must hold whole heads).  Rows that need no change are read straight into
    the result; anything else (a cast, the q/k order, a column slice) goes through `scratch`, a small reused
    buffer, a few heads or rows at a time, so memory grows by the result only.  (Reading through the memory map
    instead would leave the file's pages resident next to the converted copy: two copies at the peak.)  A column
    slice reads whole rows into the buffer and keeps its columns.
    """
    _check_slice(info, part, qk_head_dim)
    out = torch.empty(slice_shape(info.shape, part), dtype=dtype)
    if out.numel() == 0:
        return out  # e.g. another rank's expert: nothing to read
    n_rows, row_elems = (info.shape[0], math.prod(info.shape[1:])) if info.shape else (1, 1)
    row_bytes = row_elems * info.dtype.itemsize
    r0, r1 = (part.start, part.stop) if part.dim == 0 else (0, n_rows)
    columns = slice(part.start, part.stop) if part.dim == 1 else slice(None)
    offset = info.offset + r0 * row_bytes  # the rows r0 .. r1-1 are contiguous in the file
    if dtype == info.dtype and not qk_head_dim and part.dim != 1:
        _read_bytes(f, offset, out.reshape(-1).view(torch.uint8), info)
        return out
    rows = out.reshape(r1 - r0, -1)  # (rows, row elements kept)
    unit = qk_head_dim or 1  # permuted tensors are read whole heads at a time
    per_chunk = min(r1 - r0, max(unit, CHUNK_BYTES // max(row_bytes, 1) // unit * unit))
    if scratch is None or scratch.numel() < per_chunk * row_bytes:
        scratch = torch.empty(per_chunk * row_bytes, dtype=torch.uint8)
    for i in range(0, r1 - r0, per_chunk):
        n = min(per_chunk, r1 - r0 - i)
        chunk = scratch[: n * row_bytes]
        _read_bytes(f, offset + i * row_bytes, chunk, info)
        src = chunk.view(info.dtype).view(n, row_elems)[:, columns]  # (n, row elements kept), file order
        if qk_head_dim:
            permute_qk(src, qk_head_dim, "native", out=rows[i:i + n])
        else:
            rows[i:i + n].copy_(src)  # casts
    return out


# ---- writing one file --------------------------------------------------------------------------------------
@dataclass
class TensorToWrite:
    """One tensor to write: its name in the file, shape, dtype, and how to produce it (called once, when its
    turn comes, so only one tensor need exist at a time)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def write_safetensors(path: Path, tensors: list[TensorToWrite], progress: Progress) -> None:
    """Write one .safetensors file tensor by tensor (header first: shapes are known), then rename it in place.

    Writing to a temporary name and renaming keeps any model that memory-maps the old file valid.
    Tensors are laid out widest dtype first so every tensor starts at an offset aligned to its element size.
    """
    tensors = sorted(tensors, key=lambda t: -t.dtype.itemsize)  # stable: keeps name order within a dtype
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for t in tensors:
                tensor = t.produce()
                if tuple(tensor.shape) != t.shape or tensor.dtype != t.dtype:
                    raise CheckpointError(f"{path}: key {t.name!r}: produced {tensor.dtype} "
                                          f"{list(tensor.shape)}, expected {t.dtype} {list(t.shape)}")
                data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                f.write(data.numpy().data)
                del tensor, data
                progress.update(t.nbytes)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---- progress ----------------------------------------------------------------------------------------------
class Progress:
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
