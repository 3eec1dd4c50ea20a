"""Helpers shared by the kernel families: the interpreter choice, dtype policy, NaN-poisoned outputs, checks.

Interpreter.  Triton runs CPU tensors only with its numpy interpreter, which must be chosen before Triton itself
is imported (triton.language defines its own jit functions then).  The package imports this module first, and it
chooses once, explicitly: the interpreter when TRITON_INTERPRET=1, or when the variable is unset and no CUDA GPU is
present; compiled kernels otherwise.  It imports Triton with that choice and pins it in
`triton.knobs.runtime.interpret`; the environment is left as it was.

Dtype policy (one rule for every kernel).  Kernels load their operands in the storage dtype and accumulate in
fp32.  When `upcast(dtype)` is true they also cast every loaded operand to fp32 at once and run `tl.dot` in
exact fp32 ("ieee"): always for fp32 inputs (tf32 would break fp32 parity), and always under the interpreter,
whose bfloat16 arithmetic is wrong (triton 3.8: a bf16 tl.dot is off by orders of magnitude).  On a GPU with
fp16/bf16 inputs the dots run on the tensor cores in the storage dtype with fp32 accumulation, as
FlashAttention does.
"""

from __future__ import annotations

import os
import sys

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRUE = ("1", "true", "yes", "on")


def _choose_interpreter() -> bool:
    flag = os.environ.get("TRITON_INTERPRET")
    if flag is not None:
        return flag.lower() in _TRUE
    return not torch.cuda.is_available()


def _import_triton(interpret: bool):
    """Import Triton in the chosen mode (see the module docstring); the environment is restored afterwards."""
    if "triton" in sys.modules:  # imported already (by torch, or the user): its mode is fixed
        import triton

        if bool(triton.knobs.runtime.interpret) != interpret:
            raise ImportError(
                f"Triton was imported before triton_kernels {'without' if interpret else 'with'} its CPU "
                f"interpreter, but triton_kernels needs it {'on' if interpret else 'off'} here; import "
                "triton_kernels first, or set TRITON_INTERPRET=1 (CPU) / 0 (GPU) before starting Python")
        return triton
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        import triton

        triton.knobs.runtime.interpret = interpret  # pinned in Triton's knobs: no longer read from the environment
    finally:  # (the knob also writes the variable: put back what was there)
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return triton


_INTERPRET = _choose_interpreter()
triton = _import_triton(_INTERPRET)


def interpreting() -> bool:
    """True when this package's kernels run on Triton's CPU interpreter (see the module docstring)."""
    return _INTERPRET


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
        return flag.lower() in _TRUE
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
        raise RuntimeError(f"{where}: tensors are on the CPU but the kernels were compiled for the GPU; Triton runs "
                           "CPU tensors only under its interpreter (set TRITON_INTERPRET=1 before importing "
                           "triton_kernels)")
