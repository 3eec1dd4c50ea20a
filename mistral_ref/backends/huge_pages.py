"""A model's weights on transparent huge pages (Linux), for decode on a CPU.

A decode step reads every weight once from memory.  On 4 KB pages that is a TLB miss every 4 KB (a 125M-parameter
bf16 model: ~60,000 a token); on 2 MB pages, one every 2 MB.  PyTorch's CPU allocator asks for huge pages only
when the process starts with THP_MEM_ALLOC_ENABLE=1 (read once, at its first allocation), which a library
imported after torch cannot arrange; :func:`place` moves the weights there afterwards: one private anonymous
mapping, advised MADV_HUGEPAGE, that the kernel backs with 2 MB pages where /sys/kernel/mm/transparent_hugepage/
enabled is "always" or "madvise" (as on most distributions).

What moves: every CPU parameter and buffer of the module, and the stacked experts of MoE layers (backends/moe.py:
stack_experts), storage by storage: tensors that shared a storage (tied weights, experts viewing their stack) share
the new one, at the same offsets and strides.  The Parameter objects stay the same (optimizers, hooks and state
dict keep working); only their storage changes, so a `.data` or `.detach()` alias taken before is a copy from then
on.  Each storage is its own torch storage inside the mapping (safetensors sees no shared tensors).  Values and
dtypes are unchanged, bitwise.  Left where they are: tensors in shared memory (`share_memory_()`: other processes
read them), inference tensors, and anything not on the CPU.

The "torch" backend's decode step (backends/decode_step.py) calls it once per model, when it first plans; set
MISTRAL_REF_HUGE_PAGES=0 to keep the weights where they are.  Figures: README "Speed on a CPU".
"""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path

import torch
from torch import nn

HUGE_PAGE = 2 << 20  # bytes of an x86-64 / arm64 transparent huge page
SWITCH = "MISTRAL_REF_HUGE_PAGES"
ARENAS = "_huge_page_arenas"  # model.__dict__ key: (start, end) addresses of the mappings holding its weights
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> str | None:
    """None where weights can go on huge pages, else why not (a short phrase)."""
    if os.environ.get(SWITCH, "1") == "0":
        return f"{SWITCH}=0"
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return "not Linux"
    try:
        mode = _THP.read_text()
    except OSError:
        return "no transparent huge pages in this kernel"
    if "[never]" in mode:
        return "transparent huge pages are off ([never])"
    return None


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters, buffers and stacked experts (tensors, or the tensors inside a QuantizedExperts)."""
    found = [*module.parameters(), *module.buffers()]
    for m in module.modules():
        for part in getattr(m, "stacked", None) or ():
            found += [part] if isinstance(part, torch.Tensor) else [
                v for v in vars(part).values() if isinstance(v, torch.Tensor)]
    return found


def place(module: nn.Module, min_bytes: int = HUGE_PAGE) -> int:
    """Move the module's CPU weights into one mapping advised for huge pages; returns the bytes moved (0 where
    huge pages are unavailable, nothing is left to move, or the weights come to less than `min_bytes`).

    Storages already moved are skipped, so calling it again after adding or replacing weights moves only those.
    """
    if available() is not None:
        return 0
    arenas = module.__dict__.setdefault(ARENAS, [])
    storages: dict[int, list[torch.Tensor]] = {}
    for t in _tensors(module):
        if (t.device.type != "cpu" or t.layout != torch.strided or t.is_inference() or t.numel() == 0
                or t.is_shared()):  # (shared memory: another process reads it; a private copy would end that)
            continue
        ptr = t.untyped_storage().data_ptr()
        if any(start <= ptr < end for start, end in arenas):
            continue
        group = storages.setdefault(ptr, [])
        if all(u is not t for u in group):
            group.append(t)
    sizes = {ptr: group[0].untyped_storage().nbytes() for ptr, group in storages.items()}
    total = sum(-(-n // 64) * 64 for n in sizes.values())
    if total < max(min_bytes, 1):
        return 0
    arena = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        arena.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel built without transparent huge pages: moving would gain nothing
        arena.close()
        return 0
    whole = torch.frombuffer(arena, dtype=torch.uint8)
    start = whole.data_ptr()
    offset = -start % HUGE_PAGE  # the weights begin on a 2 MB boundary
    del whole
    with torch.inference_mode(False), torch.no_grad():  # normal tensors, usable for training afterwards
        for ptr, group in storages.items():
            n = sizes[ptr]
            new = torch.frombuffer(arena, dtype=torch.uint8, count=n, offset=offset)  # its own storage
            new.copy_(torch.empty(0, dtype=torch.uint8).set_(group[0].untyped_storage()))
            storage = new.untyped_storage()
            for t in group:
                t.data = torch.empty(0, dtype=t.dtype).set_(storage, t.storage_offset(), t.shape, t.stride())
            offset += -(-n // 64) * 64
    arenas.append((start, start + total + HUGE_PAGE))
    return total
