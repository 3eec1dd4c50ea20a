"""Helpers shared by the kernel families: interpreter detection, dtype policy, NaN-poisoned outputs, checks.

Dtype policy (one rule for every kernel).  Kernels load their operands in the storage dtype and accumulate in
fp32.  When `upcast(dtype)` is true they also cast every loaded operand to fp32 at once and run `tl.dot` in
exact fp32 ("ieee"): always for fp32 inputs (tf32 would break fp32 parity), and always under the interpreter,
whose bfloat16 arithmetic is wrong (triton 3.8: a bf16 tl.dot is off by orders of magnitude).  On a GPU with
fp16/bf16 inputs the dots run on the tensor cores in the storage dtype with fp32 accumulation, as
FlashAttention does.
"""

from __future__ import annotations

import os

import torch
import triton

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs kernels with its numpy interpreter (TRITON_INTERPRET=1), e.g. without a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def upcast(dtype: torch.dtype) -> bool:
    """Whether kernels cast loaded operands to fp32 and use exact fp32 dots (see the module docstring)."""
    return dtype == torch.float32 or interpreting()


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact fp32 when operands are upcast, else the default (unused for halves)."""
    return "ieee" if upcast(dtype) else "tf32"


def poisoning() -> bool:
    """Outputs are pre-filled with NaN (so an element a kernel forgets to write fails every comparison).

    On by default under the interpreter (where tests run), or anywhere with TRITON_KERNELS_POISON=1; off on a
    GPU by default, where the extra fill would show up in benchmarks.
    """
    flag = os.environ.get("TRITON_KERNELS_POISON")
    if flag is not None:
        return flag.lower() in ("1", "true", "yes", "on")
    return interpreting()


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A float output buffer: NaN-filled when `poisoning()`, else uninitialised."""
    if poisoning():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def block_dim(n: int, minimum: int = 16) -> int:
    """A power-of-two block covering n elements, at least `minimum` (tl.dot needs >= 16 on GPUs)."""
    return max(minimum, triton.next_power_of_2(n))


def check_float(name: str, t: torch.Tensor, where: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where}: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_no_grad(where: str, *tensors: torch.Tensor) -> None:
    """The kernels have no backward: refuse inputs that autograd would need gradients for (no silent zero)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(f"{where}: the Triton kernels are inference-only (no backward); call under "
                           "torch.no_grad() / torch.inference_mode(), or use the torch backend to train")


def check_device(where: str, *tensors: torch.Tensor) -> None:
    """All tensors on one device, usable by Triton (a GPU, or the CPU under the interpreter)."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{where}: all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(f"{where}: tensors are on the CPU but TRITON_INTERPRET is not set; Triton runs "
                           "CPU tensors only under its interpreter (set TRITON_INTERPRET=1 before importing "
                           "triton)")
