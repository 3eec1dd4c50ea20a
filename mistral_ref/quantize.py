"""Weight-only quantization: int8 per output channel and int4 in groups along the input, for every linear layer.

A linear layer's weight W (out, in) is stored as small integers plus floating-point scales; activations stay in
the model's dtype and every product computes x @ dequantize(W).T.  That is the whole math:

  int8  (per output channel, symmetric):  W[o, i] = q[o, i] * scale[o]                 q in -127 .. 127
  int4  (groups of G inputs, min-max):    W[o, i] = (q[o, i] - 8) * scale[g, o] + zero[g, o]
                                          q in 0 .. 15, g = i // G (G = group_size: 32, 64, 128 or 256)

(int4's zero is the value of the group's middle code 8; min-max quantization puts codes 0 and 15 on the
group's smallest and largest weight.  llama.cpp's Q4_0 is the same formula with zero = 0: checkpoint/gguf_quant.py.)

A quantized layer keeps its name: `quantize_model` puts a :class:`QuantizedWeight` module where the nn.Linear's
`weight` parameter was, so the layers still call ``ops.linear(x, self.wq.weight)`` and the state dict reads
``layers.0.attention.wq.weight.qweight`` / ``.scales`` (int8) or ``.qweight`` / ``.scales_and_zeros`` (int4).
Backend "torch" multiplies by a QuantizedWeight with PyTorch's CPU weight-only kernels (backends/quant.py); any
other torch function given one (F.linear in backend "reference", the experts' loop of moe.mix_experts, an einsum)
sees :meth:`QuantizedWeight.dequantize`, the formula above: see ``__torch_function__``.

Quantized: attention (wq wk wv wo; latent attention's projections), dense and expert SwiGLUs (w1 w2 w3, shared
experts included) and the output projection.  Kept as they are: embeddings (a lookup, and the output projection of
tied-embedding models), norms, and the MoE routers (`gate`: tiny, and a rounding there changes which experts run).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

SCHEMES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 CPU kernel accepts
KEEP = ("gate",)  # linear layers named so are never quantized (MoE routers)


def scales_name(scheme: str) -> str:
    """The buffer a QuantizedWeight of `scheme` keeps its scales in: "scales" (int8) or "scales_and_zeros" (int4)."""
    return "scales" if scheme == "int8" else "scales_and_zeros"


class QuantizationError(ValueError):
    """A scheme, group size or weight shape that weight-only quantization cannot take (names the tensor)."""


class QuantizedWeight(nn.Module):
    """A linear layer's weight (out_features, in_features) as integers and scales; stands where `weight` was.

    int8: qweight (out, in) int8, scales (out,) in the compute dtype.
    int4: qweight (out, in / 2) uint8 in the byte layout of torch's int4 CPU kernel (see :func:`pack_int4`),
          scales_and_zeros (in / group_size, out, 2) in the compute dtype ([..., 0] scale, [..., 1] zero).
    The compute dtype (`dtype`) is the scales' dtype: converting the model (.to(torch.bfloat16)) converts them and
    leaves the integers alone.
    """

    def __init__(self, scheme: str, qweight: torch.Tensor, scales: torch.Tensor, group_size: int | None = None):
        super().__init__()
        self.scheme, self.group_size = scheme, group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer(scales_name(scheme), scales)

    @property
    def shape(self) -> torch.Size:
        """The logical (out_features, in_features) shape of the weight."""
        out, cols = self.qweight.shape
        return torch.Size((out, cols if self.scheme == "int8" else 2 * cols))

    @property
    def dtype(self) -> torch.dtype:
        return self._scales().dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def _scales(self) -> torch.Tensor:
        return self._buffers[scales_name(self.scheme)]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (out, in): the formula of the module docstring computed in fp32, then rounded to `dtype`
        (default: the compute dtype)."""
        dtype = dtype or self.dtype
        if self.scheme == "int8":
            return (self.qweight.float() * self.scales.float()[:, None]).to(dtype)
        out, inp = self.shape
        q = unpack_int4(self.qweight).float().view(out, inp // self.group_size, self.group_size)  # (out, groups, G)
        sz = self.scales_and_zeros.float().transpose(0, 1)  # (out, groups, 2)
        return ((q - 8) * sz[..., :1] + sz[..., 1:]).view(out, inp).to(dtype)

    def float(self) -> torch.Tensor:  # type: ignore[override]
        """The dequantized weight in fp32, as a tensor's .float() (code written for plain weights, e.g.
        backends.linear.multiply_sum_linear, calls it).  Converting the model itself (model.float(), .to(dtype))
        converts the scales and never calls this."""
        return self.dequantize(torch.float32)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return f"{self.scheme}, shape={tuple(self.shape)}, dtype={self.dtype}{group}"

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        """Any torch function given a QuantizedWeight computes with its dequantized weight (the plain math)."""
        def plain(a: Any) -> Any:
            if isinstance(a, QuantizedWeight):
                return a.dequantize()
            if isinstance(a, (list, tuple)):
                return type(a)(plain(b) for b in a)
            return a
        return func(*plain(args), **{k: plain(v) for k, v in (kwargs or {}).items()})


class QuantizedExperts(Sequence):
    """A MoE layer's E quantized experts of one kind (all w1, all w2 or all w3) with their codes and scales in two
    stacked tensors: a layout for the fast backends (backends/moe.py: stack_experts), not math.

    qweight: (E, out, in) int8 or (E, out, in / 2) uint8; scales: (E, out) or scales_and_zeros (E, in / G, out, 2).
    Each expert's QuantizedWeight keeps its buffers as views of its slice (no extra memory; state dict unchanged),
    and indexing gives it back: code written for a list of experts (moe.mix_experts) reads this the same way.
    """

    def __init__(self, experts: Sequence[QuantizedWeight]):
        first = experts[0]
        self.scheme, self.group_size = first.scheme, first.group_size
        name = scales_name(self.scheme)
        self.qweight = torch.stack([e.qweight for e in experts])
        self.scales = torch.stack([e._buffers[name] for e in experts])
        for e, q, s in zip(experts, self.qweight, self.scales):
            e._buffers["qweight"], e._buffers[name] = q, s
        self.experts = list(experts)

    @staticmethod
    def stackable(experts: Sequence[Any]) -> bool:
        """True if `experts` are QuantizedWeights of one scheme, group size, shape and dtype (on one device)."""
        first = experts[0] if experts else None
        return isinstance(first, QuantizedWeight) and all(
            isinstance(e, QuantizedWeight) and (e.scheme, e.group_size, e.shape, e.dtype, e.device)
            == (first.scheme, first.group_size, first.shape, first.dtype, first.device) for e in experts)

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    def __len__(self) -> int:
        return len(self.experts)

    def __getitem__(self, e):  # type: ignore[override]
        return self.experts[e]


# ---- the int4 byte layout ------------------------------------------------------------------------------------

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes q (out, in) in 0..15 -> (out, in / 2) uint8 in the layout torch's int4 CPU kernel reads.

    The layout of torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1) on an AVX2 CPU (torch 2.5 .. 2.13;
    tested equal in tests/test_quant.py where torch packs that way: on an AVX-512 CPU it packs otherwise, and
    backends/quant.py then never hands these bytes to torch's kernel), the layout checkpoints store and the C
    kernels read, whatever the CPU: rows in blocks of 32; within a block, for each input k, 16 bytes whose low
    nibbles are rows 0..15 and high nibbles rows 16..31.  A last block of 16 rows stores, for each k, 8 bytes
    holding rows (0, 1), (2, 3), ... as (low, high) nibbles.  out must be a multiple of 16.
    """
    out, inp = q.shape
    q = q.to(torch.uint8)
    full = out // 32 * 32
    blocks = q[:full].view(out // 32, 2, 16, inp)  # (blocks, low/high, 16, in)
    parts = [(blocks[:, 0] | (blocks[:, 1] << 4)).transpose(1, 2).reshape(-1)]  # (blocks, in, 16) bytes
    if out > full:  # 16 rows left
        rest = q[full:].t()  # (in, 16)
        parts.append((rest[:, 0::2] | (rest[:, 1::2] << 4)).reshape(-1))  # (in, 8) bytes
    return torch.cat(parts).view(out, inp // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: (out, in / 2) uint8 -> codes (out, in) uint8 in 0..15."""
    out, inp = packed.shape[0], 2 * packed.shape[1]
    full = out // 32 * 32
    flat = packed.reshape(-1)
    head = flat[: full * inp // 2].view(out // 32, inp, 16)  # (blocks, in, 16)
    rows = [torch.stack([head & 15, head >> 4], 1).transpose(2, 3).reshape(full, inp)]  # (blocks, 2, 16, in)
    if out > full:
        tail = flat[full * inp // 2:].view(inp, 8)  # (in, 8)
        rows.append(torch.stack([tail & 15, tail >> 4], -1).reshape(inp, 16).t())  # (16, in)
    return torch.cat(rows)


# ---- quantizing one weight -----------------------------------------------------------------------------------

def check_scheme(scheme: str, group_size: int) -> None:
    """Raise QuantizationError for an unknown scheme or an int4 group size the kernel does not take."""
    if scheme not in SCHEMES:
        raise QuantizationError(f"quantization scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if scheme == "int4" and (isinstance(group_size, bool) or group_size not in INT4_GROUP_SIZES):
        raise QuantizationError(f"group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))} for int4, "
                                f"got {group_size!r}")


def check_shape(name: str, scheme: str, out: int, inp: int, group_size: int) -> None:
    """Raise QuantizationError (naming the tensor) if a weight (out, in) cannot take the scheme."""
    if scheme == "int4" and inp % group_size:
        raise QuantizationError(f"{name}: in_features {inp} is not a multiple of group_size {group_size}; "
                                f"choose a group_size dividing it (one of {', '.join(map(str, INT4_GROUP_SIZES))})")
    if scheme == "int4" and out % 16:
        raise QuantizationError(f"{name}: out_features {out} is not a multiple of 16, which torch's int4 CPU "
                                "kernel requires; use scheme 'int8' for this model")


def quantize_weight(weight: torch.Tensor, scheme: str, group_size: int = 32, name: str = "weight"
                    ) -> QuantizedWeight:
    """Quantize one weight (out, in); the scales take weight's dtype (the compute dtype).

    The integers are rounded against the scales as stored (rounded to that dtype), so dequantize() is the
    nearest grid point.  A row (int8) or group (int4) of zeros gets a tiny positive scale.
    """
    check_scheme(scheme, group_size)
    out, inp = weight.shape
    check_shape(name, scheme, out, inp, group_size)
    dtype, w = weight.dtype, weight.detach().float()
    if not torch.isfinite(w).all():
        raise QuantizationError(f"{name}: has non-finite values (inf / nan): cannot be quantized")
    tiny = torch.finfo(dtype).tiny
    if scheme == "int8":
        scales = (w.abs().amax(dim=1) / 127).clamp(min=tiny).to(dtype)  # (out,)
        q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        return QuantizedWeight("int8", q, scales)
    groups = w.view(out, inp // group_size, group_size)  # (out, groups, G)
    lo, hi = groups.amin(-1), groups.amax(-1)  # (out, groups)
    scales = ((hi - lo) / 15).clamp(min=tiny).to(dtype)
    zeros = (lo + 8 * scales.float()).to(dtype)  # the value of code 8
    s, z = scales.float()[..., None], zeros.float()[..., None]
    q = torch.round((groups - z) / s + 8).clamp(0, 15).view(out, inp)
    scales_and_zeros = torch.stack([scales, zeros], -1).transpose(0, 1).contiguous()  # (groups, out, 2)
    return QuantizedWeight("int4", pack_int4(q), scales_and_zeros, group_size)


def empty_quantized(scheme: str, out: int, inp: int, group_size: int, dtype: torch.dtype,
                    device: torch.device | str = "meta") -> QuantizedWeight:
    """A QuantizedWeight of the right shapes with uninitialised storage (on the meta device: none), to load into."""
    if scheme == "int8":
        return QuantizedWeight("int8", torch.empty(out, inp, dtype=torch.int8, device=device),
                               torch.empty(out, dtype=dtype, device=device))
    return QuantizedWeight("int4", torch.empty(out, inp // 2, dtype=torch.uint8, device=device),
                           torch.empty(inp // group_size, out, 2, dtype=dtype, device=device), group_size)


# ---- quantizing a model --------------------------------------------------------------------------------------

def quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every linear layer quantize_model replaces the weight of (see the module docstring)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] not in KEEP]


def quantization_of(model: nn.Module) -> dict[str, Any] | None:
    """{"scheme": ..., "group_size": ...} of a model quantize_model quantized, or None for a plain one."""
    return getattr(model, "quantization", None)


def quantize_model(model: nn.Module, scheme: str, *, group_size: int = 32) -> nn.Module:
    """Quantize the weights of `model`'s linear layers in place (see the module docstring); returns the model.

    scheme: "int8" (per output channel) or "int4" (groups of `group_size` inputs: 32, 64, 128 or 256).  The
    scales take each weight's dtype, the dtype the model computes in: quantize a bf16 model to run in bf16.
    Every layer is checked before any is changed: a weight the scheme cannot take (in_features not a multiple of
    group_size, ...) raises QuantizationError naming it, and the model is left as it was.  Quantizing a
    quantized model is an error.  Also `model.quantization` records the scheme (saved with the checkpoint).
    """
    check_scheme(scheme, group_size)
    if quantization_of(model) is not None:
        raise QuantizationError(f"the model is already quantized ({quantization_of(model)}); load the original "
                                "weights to quantize them again")
    linears = quantizable_linears(model)
    for name, lin in linears:
        if isinstance(lin.weight, QuantizedWeight):
            raise QuantizationError(f"{name}.weight is already quantized")
        check_shape(f"{name}.weight", scheme, *lin.weight.shape, group_size)
    for name, lin in linears:
        quantized = quantize_weight(lin.weight, scheme, group_size, f"{name}.weight")
        del lin.weight  # the Parameter gives way to a module of the same name
        lin.weight = quantized
    for module in model.modules():
        if getattr(module, "stacked", None) is not None:
            module.stacked = None  # stacks of the old expert weights (backends/moe.py) are stale
    if getattr(model, "compiled_decode", None) is not None:
        model.compiled_decode.forget_modules()  # compiled steps were keyed by the old weights' kinds
    model.quantization = {"scheme": scheme, **({"group_size": group_size} if scheme == "int4" else {})}
    return model


def quantized_shell(model: nn.Module, scheme: str, group_size: int = 32) -> nn.Module:
    """A meta-device model (model.meta_model) with empty QuantizedWeight modules in place of the weights that
    quantize_model replaces, ready for load_state_dict(assign=True) from a quantized checkpoint."""
    check_scheme(scheme, group_size)
    for name, lin in quantizable_linears(model):
        out, inp = lin.weight.shape
        check_shape(f"{name}.weight", scheme, out, inp, group_size)
        dtype = lin.weight.dtype
        del lin.weight
        lin.weight = empty_quantized(scheme, out, inp, group_size, dtype)
    model.quantization = {"scheme": scheme, **({"group_size": group_size} if scheme == "int4" else {})}
    return model
