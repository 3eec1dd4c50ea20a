"""Where compiled decode steps are kept on disk, and whether a compilation found them there.

torch.compile's inductor keeps its caches in one directory: the FX graph cache (generated code per graph), the
AOTAutograd cache, the built C++ kernels and its probe of the CPU's vector instructions, each keyed by the graph,
the torch version and the CPU.  Compiled decoding adds its ahead-of-time compiled steps there, under steps/
(compiled_steps.py): a later process with the same model shape, dtype, batch size, cache capacity and thread count
loads them instead of tracing and compiling again.

inductor's default directory, /tmp/torchinductor_$USER, is lost at reboot; compiled decoding uses
``$XDG_CACHE_HOME/mistral-ref/compile/torch-<version>`` (``~/.cache/...`` when XDG_CACHE_HOME is unset) unless
TORCHINDUCTOR_CACHE_DIR is set, which then wins (a fresh temporary directory gives a cold start, as the benchmark
does).  Clear it with ``rm -rf ~/.cache/mistral-ref/compile``: everything there is rebuilt on demand.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

ENV = "TORCHINDUCTOR_CACHE_DIR"  # inductor reads its cache directory from this variable


def compile_cache_dir() -> Path:
    """The directory compiled decode steps are cached in (see the module docstring); not created here."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mistral-ref" / "compile" / f"torch-{torch.__version__}"


def use_compile_cache() -> Path:
    """Point inductor at compile_cache_dir() (before the first compilation of the process) and return it."""
    path = compile_cache_dir()
    path.mkdir(parents=True, exist_ok=True, mode=0o700)  # (compiled steps are loaded from here: this user's)
    os.environ[ENV] = str(path)
    return path
