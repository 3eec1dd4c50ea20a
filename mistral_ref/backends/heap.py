"""Freed memory kept for reuse (glibc): a long prompt's temporaries without page faults.

A forward pass over T tokens allocates tensors of T x dim and T x hidden values, layer after layer, and frees them
soon after (2048 tokens of a 768-dim model: 3-8 MB each).  glibc's malloc serves a request above its mmap
threshold with a new mapping, and returns the free top of its heap to the kernel once it exceeds its trim threshold;
both thresholds start small (128 KB, 256 KB) and move with the sizes freed, up to 32 MB.  Either way the next
tensor lands on pages the kernel has not handed out yet: the first write to each 4 KB page is a fault, in which the
kernel zeroes the page.  A 2048-token prompt of a 125M-parameter model takes ~100,000 of them, 0.1 s of system time
at every forward (README, "Speed on a CPU").

:func:`keep_freed_memory` sets both thresholds once per process (mallopt): requests below MMAP_THRESHOLD come from
the heap, and freed memory stays in it for the next request, as PyTorch's GPU caching allocator keeps its blocks.
The cost: the process keeps its peak heap (resident memory does not shrink after a long prompt).  The setting is
the process's, not the model's: every library in it allocates the same way from then on (transformers too, in a
benchmark that runs both).  backends/pytorch.py calls it when it is first imported (the first Transformer a process
builds); MISTRAL_REF_KEEP_FREED=0 leaves glibc's thresholds as they are, and so does a process started with its
own (glibc's MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_, or GLIBC_TUNABLES naming either).  Other C libraries
(musl, macOS, Windows) are left alone.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

SWITCH = "MISTRAL_REF_KEEP_FREED"
MMAP_THRESHOLD = 1 << 30  # bytes: smaller requests come from the heap (glibc's default: 128 KB, dynamic to 32 MB)
MMAP_THRESHOLD_CAPPED = 32 << 20  # where glibc refuses more (mallopt(3) documents this maximum on 64 bits)
TRIM_THRESHOLD = (1 << 31) - 1  # bytes of free heap top kept (mallopt takes an int)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
# the environment's own thresholds: glibc's variables and their GLIBC_TUNABLES names
_GLIBC_SETTINGS = (("MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
                   ("MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"))


@functools.cache
def keep_freed_memory() -> str | None:
    """Have glibc keep freed memory for reuse (module docstring), once per process.  Returns None where it does
    (this call or an earlier one), else why not (a short phrase): switched off, thresholds the environment set,
    another C library, or mallopt refusing a value."""
    return _set_thresholds()


def _set_thresholds() -> str | None:
    if os.environ.get(SWITCH, "1") == "0":
        return f"{SWITCH}=0"
    for variable, tunable in _GLIBC_SETTINGS:
        if variable in os.environ or tunable in os.environ.get("GLIBC_TUNABLES", ""):
            return f"the environment sets {variable} ({tunable})"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "no mallopt"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_CAPPED) != 1:
        return "mallopt refused the mmap threshold"
    if mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return "mallopt refused the trim threshold"
    return None
