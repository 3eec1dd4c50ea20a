"""CPU kernels for the products of decoding (cpu_gemv.c): bf16, fp32, int8 and int4 weights times a few rows; and
the attention of one query per row to a KV cache (:func:`attention`, equal to attention.attention for T = 1).

Equals: F.linear(x, weight) / F.linear(x, weight.dequantize()) within fp32 rounding, bf16 activations times int8 /
int4 weights within a 2^-16 rounding of each row of x to int16 (the integer path of cpu_gemv.c) and the result's
bf16 rounding (tests/test_cpu_gemv.py).
backends/linear.py sends a product here when it has fewer than MAX_ROWS[kind] rows, runs on a CPU, and its weight
is bf16 (x bf16), fp32 (x fp32, one row: a decode step of batch 1) or a QuantizedWeight (x bf16 or fp32); an fp32
product of more rows keeps PyTorch's BLAS (split_linear).  Compiled decoding calls the same kernels as the custom ops
``torch.ops.mistral_ref.gemv_*`` (opaque to torch.compile, so a compiled step runs them as they are).

Why: PyTorch has no fast path for these on CPUs without bf16 instructions (AVX2): its one-row bf16 product and
its weight-only int8/int4 kernels are well below the memory bandwidth; these kernels stream the weight once,
converting in registers (figures: README "Speed on a CPU", `make bench`).

The C source is compiled on first use with the system's C compiler (``$CC``, default ``cc``; torch.compile
needs one as well): ``-O3 -march=native -fopenmp``, into ``<compile cache>/cpu_gemv/`` (compile_cache.py), named
by a hash of the source, the compiler, its flags and the CPU's feature flags (~3 s once; a later start loads it).
The library shares PyTorch's OpenMP runtime (torch's libgomp is loaded first).  Like a saved compiled step, it
is loaded only from that directory (this user's, 0700) and only if the file is this user's and no one else can
write it.  Where it cannot be built (no compiler, a build error) or is turned off (``MISTRAL_REF_CPU_KERNELS=0``)
:func:`status` says why, one warning says so, and the products stay PyTorch's.  Once loaded, :func:`choose_walk`
times the two ways a one-row product can walk its weight (four rows at a time with prefetching, or one row at a
time; the same bits) and keeps the faster for this process (``MISTRAL_REF_CPU_WALK=four|one`` chooses instead).
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from mistral_ref.backends.compile_cache import compile_cache_dir
from mistral_ref.backends.compiled_steps import trusted
from mistral_ref.quantize import QuantizedExperts, QuantizedWeight, scales_name

log = logging.getLogger("mistral_ref.cpu_gemv")

SOURCE = Path(__file__).with_name("cpu_gemv.c")
ENV_SWITCH = "MISTRAL_REF_CPU_KERNELS"  # "0": never build or use the kernels
OPS_SWITCH = "MISTRAL_REF_CPU_OPS"  # "0": the operators stay in Python (no C++ build)
#: What cpu_gemv_isa() returns, by name.
ISA_NAMES = {1: "portable", 2: "AVX2", 3: "AVX-512 + AVX2"}
WALK_SWITCH = "MISTRAL_REF_CPU_WALK"  # "four" / "one": how one-row products walk their weight, instead of timing it
#: cpu_gemv_walk(), by name (cpu_gemv.c, four_rows): the same results bitwise, read at different rates per CPU.
WALKS = {1: "four rows at a time, prefetching", 0: "one row at a time"}
# (-ffp-contract=off: no compiler fuses a * b + c that the C writes apart, as clang would by default: the scalar
# and vector forms of a loop give the same bits, cpu_gemv.c: exp_poly)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-ffp-contract=off", "-lm")
#: The CPU has AMX tiles (Sapphire Rapids and later Xeons), read once from torch: there oneDNN multiplies bf16
#: with them, at a cost that hardly grows with the rows, and beats these kernels beyond a few rows (below).
AMX = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
# A product with this many rows or more goes elsewhere (backends/linear.py): the kernels re-read their slice of
# the weight for every 4 rows, which loses to a GEMM (bf16: upcast + fp32 GEMM, or oneDNN's AMX tiles from 9 rows
# on, where those exist: benchmarks/bench_attention.py part 6 times both by rows; quantized: dequantizing).
MAX_ROWS = {"bf16": 9 if AMX else 32, "int8": 32, "int4": 2, "fp32": 2}  # fp32: a BLAS reads its weight once
# bf16 products of AMX_LINEAR_MIN_ROWS to AMX_LINEAR_MAX_ROWS rows, on AMX tiles, go to linear_amx (cpu_gemv.c)
# instead of oneDNN's GEMM: a prompt of 32-256 tokens.  Fewer rows (a batch of decode steps) gained nothing, and
# from ~512 rows oneDNN is faster (benchmarks/bench_attention.py part 8 times both, alone and in the models).
AMX_LINEAR_MIN_ROWS, AMX_LINEAR_MAX_ROWS = 32, 256

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {  # (x, weight..., y, io_bf16, rows, out, in[, group], threads) -> 0 or -1 (out of memory)
    "gemv_float": [_P, _P, _INT, _P, _INT, _I64, _I64, _I64, _INT],  # (x, w, w_f32, y, io_bf16, ...): bf16 or fp32 w
    "gemv_int8": [_P, _P, _P, _INT, _P, _INT, _I64, _I64, _I64, _INT],
    "gemv_int4": [_P, _P, _P, _INT, _P, _INT, _I64, _I64, _I64, _I64, _INT],
    "gemv_bf16_experts": [_P, _I64, _P, _I64, _P, _I64, _P, _INT, _I64, _I64, _INT],
    # (x, x_rows, codes, scales, scales_bf16, E, index, k, y, io_bf16, out, in, group (0: int8), threads)
    "gemv_quantized_experts": [_P, _I64, _P, _P, _INT, _I64, _P, _I64, _P, _INT, _I64, _I64, _I64, _INT],
    # several products of one x: (x, n, weights[n]..., y[n], outs[n], io_bf16, rows, in[, group], threads)
    "gemv_float_many": [_P, _I64, _P, _INT, _P, _P, _INT, _I64, _I64, _INT],  # (x, n, w[n], w_f32, y[n], ...)
    "gemv_int8_many": [_P, _I64, _P, _P, _INT, _P, _P, _INT, _I64, _I64, _INT],
    "gemv_int4_many": [_P, _I64, _P, _P, _INT, _P, _P, _INT, _I64, _I64, _I64, _INT],
    # one token's experts: (x, io_bf16, kind (0 bf16, 1 int8, 2 int4), w1, s1, w3, s3, w2, s2, scales_bf16, group,
    # E, index, weights, k, hidden, dim, out, threads); with the router first: (x, io_bf16, gate, gate_bf16, top_k,
    # kind, w1 ... s2, scales_bf16, group, E, hidden, dim, out, logits, threads)
    "swiglu_experts": [_P, _INT, _INT, _P, _P, _P, _P, _P, _P, _INT, _I64, _I64, _P, _P, _I64, _I64, _I64, _P, _INT],
    # the same for the chosen experts' own tensors: (x, io_bf16, kind, w1[k], s1[k], w3[k], s3[k], w2[k], s2[k],
    # scales_bf16, group, weights, k, hidden, dim, out, threads)
    "swiglu_chosen": [_P, _INT, _INT, _P, _P, _P, _P, _P, _P, _INT, _I64, _P, _I64, _I64, _I64, _P, _INT],
    # (x, io_bf16, gate, gate_bf16, E, dim, k, logits, index, weights): moe.route for one token
    "route_one_token": [_P, _INT, _P, _INT, _I64, _I64, _I64, _P, _P, _P],
    "moe_one_token": [_P, _INT, _P, _INT, _I64, _INT, _P, _P, _P, _P, _P, _P, _INT, _I64, _I64, _I64, _I64, _P, _P,
                      _INT],
    # (x, weight, out, io_bf16, rows, dim, eps)
    "rms_norm_rows": [_P, _P, _P, _INT, _I64, _I64, ctypes.c_float],
    "rms_norm_prompt": [_P, _P, _P, _INT, _I64, _I64, ctypes.c_float, _INT],  # (... eps, threads)
    # (x, out, io_bf16, rows, heads, head_dim, rotations, x's row stride, threads)
    "rope_prompt": [_P, _P, _INT, _I64, _I64, _I64, _P, _I64, _INT],
    # (q_pos, k_pos, B, T, S, found[2]): prompt_attention.causal_span's test; (positions, B, T): the first position
    # of rows at consecutive positions (pytorch.update_cache's test)
    "causal_span": [_P, _P, _I64, _I64, _I64, _P],
    "consecutive_rows": [_P, _I64, _I64],
    "silu_mul": [_P, _P, _P, _INT, _I64, _INT],  # (gate, up, out, io_bf16, n, threads)
    # (q, k, v, k_pos, q_pos, window, out, io_bf16, batch, slots, heads, kv_heads, head_dim, threads)
    "attend_one": [_P, _P, _P, _P, _P, _I64, _P, _INT, _I64, _I64, _I64, _I64, _I64, _INT],
    # (scores, probs, io_bf16, groups, rows, cols, n, first, window, scale, scaled_fp32, threads): prompt_attention
    "softmax_causal": [_P, _P, _INT, _I64, _I64, _I64, _I64, _I64, _I64, ctypes.c_float, _INT, _INT],
    # (x, token, counts, E, w1[E], w3[E], w2[E], hidden, dim, y, threads): a prompt's experts on AMX tiles
    "experts_amx": [_P, _P, _P, _I64, _P, _P, _P, _I64, _I64, _P, _INT],
    # (x, w, y, rows, in, out, threads): bf16 products of a few hundred rows on AMX tiles
    "linear_amx": [_P, _P, _P, _I64, _I64, _I64, _INT],
    # (q, k, v, out, B, T, S, heads, kv_heads, d, dv, window, scale, threads): a prompt's attention on AMX tiles
    "attention_amx": [_P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64, ctypes.c_float, _INT],
}

_lib: ctypes.CDLL | None = None
_status: str | None = None  # None: not tried yet
_loading = threading.Lock()  # (a background compile thread may ask at the same time as the caller)


class CpuKernelError(RuntimeError):
    """The C kernels could not be built or loaded (the message says why)."""


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's feature flags (Linux), else the platform's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def library_path(compiler: str, extra_flags: tuple[str, ...] = ()) -> Path:
    """Where the library built by `compiler` with FLAGS + extra_flags is kept (see the module docstring)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = repr((SOURCE.read_bytes(), compiler, version, FLAGS, extra_flags, _cpu_id()))
    return compile_cache_dir() / "cpu_gemv" / f"cpu_gemv-{hashlib.sha256(key.encode()).hexdigest()[:32]}.so"


def build(extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile cpu_gemv.c (unless built already) and return the library's path; CpuKernelError if it cannot.

    extra_flags: more compiler flags (the tests build the portable loops with -DCPU_GEMV_PORTABLE)."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise CpuKernelError(f"no C compiler: {compiler!r} is not on PATH (set CC, or install gcc)")
    try:
        path = library_path(compiler, extra_flags)
    except (OSError, subprocess.SubprocessError) as e:
        raise CpuKernelError(f"cannot run the C compiler {compiler!r}: {e}") from e
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    command = [compiler, *FLAGS, *extra_flags, "-o", tmp, str(SOURCE)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines() or ["(no output)"]
            raise CpuKernelError(f"building {SOURCE.name} failed ({' '.join(command)}): {lines[-1]}")
        os.chmod(tmp, 0o700)
        os.replace(tmp, path)  # atomic: a process building at the same time finds a whole file or none
    except subprocess.TimeoutExpired as e:
        raise CpuKernelError(f"building {SOURCE.name} took over 300 s ({compiler})") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load(path: Path) -> ctypes.CDLL:
    """Load a library built by :func:`build` (only a trusted file: see the module docstring)."""
    if not trusted(path):
        raise CpuKernelError(f"{path} is not a file of this user's that only this user can write: not loaded")
    lib = ctypes.CDLL(str(path))
    for name, argtypes in _SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = ctypes.c_int
    lib.cpu_gemv_set_walk.argtypes, lib.cpu_gemv_set_walk.restype = [_INT], None
    lib.cpu_gemv_walk.argtypes, lib.cpu_gemv_walk.restype = [], _INT
    lib.cpu_gemv_set_bf16_dot.argtypes, lib.cpu_gemv_set_bf16_dot.restype = [_INT], None
    lib.cpu_gemv_bf16_dot.argtypes, lib.cpu_gemv_bf16_dot.restype = [], _INT
    lib.cpu_gemv_amx.argtypes, lib.cpu_gemv_amx.restype = [], _INT
    lib.consecutive_rows.restype = _I64
    return lib


def largest_cache_bytes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """The largest CPU cache the machine reports (Linux sysfs: index*/size, e.g. "491520K"); 0 where unknown."""
    sizes = [0]
    for index in root.glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
            sizes.append(int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]] if text[-1] in "KMG" else int(text))
        except (OSError, ValueError, IndexError):
            continue
    return max(sizes)


PROBE_BYTES = (48 << 20, 128 << 20)  # choose_walk's weights: twice the largest cache, within these bounds
WALK_MARGIN = 0.95  # one row at a time is chosen only where its median pass takes under this share of four rows'


def choose_walk(lib: ctypes.CDLL, threads: int | None = None) -> int:
    """How one-row products walk their weight on this machine (cpu_gemv.c, four_rows): WALK_SWITCH if set, else
    timed once: bf16 weights of twice the largest cache (PROBE_BYTES bounds it: 48-128 MB) in rows of 1024 inputs
    (decode's rows are 0.5-2 KB; from 4 KB rows on the two walks came closer on the Zen 4), 7 alternating passes
    each walk with `threads` threads (default torch.get_num_threads()); four rows at a time (the default) unless
    one row's median pass is under WALK_MARGIN of four rows'.  Both give the same results bitwise: on the
    AVX-512 and AMX Xeons four rows at a time with prefetching read faster, on the Zen 4 EPYC one row at a time
    did by 1.4-1.7x (README, "Speed on a CPU").  (The AMX Xeon's 480 MB cache held the former 48 MB probe: the
    walks tied there and the fastest single pass picked one row at a time in some runs, with decode 1.1-1.3x
    slower.)  Returns 1 (four rows) or 0 (one row); the caller sets it (cpu_gemv_set_walk)."""
    forced = os.environ.get(WALK_SWITCH)
    if forced is not None:
        if forced not in ("four", "one"):
            raise CpuKernelError(f"{WALK_SWITCH}={forced!r}: expected 'four' or 'one'")
        return int(forced == "four")
    import time

    threads = torch.get_num_threads() if threads is None else threads
    rows, cols = 4096, 1024
    probe = min(max(2 * largest_cache_bytes(), PROBE_BYTES[0]), PROBE_BYTES[1])
    weights = [torch.ones(rows, cols, dtype=torch.bfloat16) for _ in range(probe // (rows * cols * 2))]  # 8 MB each
    x, y = torch.ones(1, cols, dtype=torch.bfloat16), torch.empty(1, rows, dtype=torch.bfloat16)  # a bf16 model's
    times: dict[int, list[float]] = {1: [], 0: []}
    previous = lib.cpu_gemv_walk()
    try:
        for r in range(8):
            for walk in (1, 0) if r % 2 == 0 else (0, 1):
                lib.cpu_gemv_set_walk(walk)
                t0 = time.perf_counter()
                for w in weights:
                    lib.gemv_float(x.data_ptr(), w.data_ptr(), 0, y.data_ptr(), 1, 1, rows, cols, threads)
                if r > 0:  # the first round warms up
                    times[walk].append(time.perf_counter() - t0)
    finally:
        lib.cpu_gemv_set_walk(previous)
    return int(statistics.median(times[0]) >= WALK_MARGIN * statistics.median(times[1]))


def walk() -> str:
    """How the kernels' one-row products walk their weights (WALKS), or "off (why)" without the kernels."""
    lib = library()
    return WALKS[lib.cpu_gemv_walk()] if lib is not None else status()


def set_walk(four_rows: bool) -> None:
    """Make one-row products walk their weights four rows at a time (True) or one (False), in the C kernels and in
    the operators' library if loaded (its own copy of cpu_gemv.c); the results are the same bitwise."""
    _set_in_both("cpu_gemv_set_walk", int(four_rows))


def set_bf16_dot(on: bool) -> None:
    """Let bf16 products use AVX512-BF16's vdpbf16ps where the build has it (True, the default), or do the same
    arithmetic with fp32 fused multiply-adds (False: for comparisons; cpu_gemv.c, CPU_GEMV_BF16_DOT), in the C
    kernels and in the operators' library if loaded.  The results are the same bitwise (denormals aside)."""
    _set_in_both("cpu_gemv_set_bf16_dot", int(on))


def _set_in_both(setter: str, value: int) -> None:
    """Call the C switch `setter` in the kernels and in the operators' library if loaded (its own copy of
    cpu_gemv.c)."""
    getattr(_checked_library(), setter)(value)
    if _ops_status == "C++" and _ops_built is not None:
        getattr(ctypes.CDLL(str(_ops_built)), setter)(ctypes.c_int(value))


def library() -> ctypes.CDLL | None:
    """The kernels, built and loaded on the first call; None where they are unavailable (:func:`status`)."""
    global _lib, _status
    if _status is not None:
        return _lib
    with _loading:
        _load_once()
    return _lib


def _load_once() -> None:
    global _lib, _status
    if _status is None:
        if os.environ.get(ENV_SWITCH, "1") == "0":
            _status = f"off ({ENV_SWITCH}=0)"
        elif platform.system() == "Windows":
            _status = "off (not built on Windows)"
        else:
            try:
                lib = load(build())
                lib.cpu_gemv_set_walk(choose_walk(lib))
                _lib = lib
                dot = ", bf16 products by vdpbf16ps" if _lib.cpu_gemv_bf16_dot() else ""
                dot += ", a prompt's experts on AMX tiles" if _lib.cpu_gemv_amx() else ""
                _status = f"on ({ISA_NAMES[_lib.cpu_gemv_isa()]} loops{dot}, {SOURCE.name})"
                if os.environ.get(OPS_SWITCH, "1") != "0":  # the operators' C++ kernels, built in the background
                    _start_ops()
            except (CpuKernelError, OSError) as e:
                _status = f"off ({e})"
                warnings.warn(f"mistral-ref: the C kernels for CPU decoding are unavailable, PyTorch's products "
                              f"are used instead (slower in bf16 and int8/int4): {e}", stacklevel=2)
        log.info("CPU decode kernels: %s", _status)


# ---- the operators' C++ kernels (cpu_gemv_ops.cpp) ----------------------------------------------------------

OPS_SOURCE = Path(__file__).with_name("cpu_gemv_ops.cpp")
BUILDER = Path(__file__).with_name("ops_builder.py")  # runs the compilers in a process of its own
_ops_status: str | None = None  # None: not asked for yet; "C++", "building", "Python (why)"
_ops_thread: threading.Thread | None = None
_ops_lock = threading.Lock()
_ops_built: Path | None = None  # the library, built and not loaded yet
_ops_handed_off = threading.Event()  # the build runs in its own process (or needs none): exiting will not stop it


def ops_library_path(compiler: str, cxx: str) -> Path:
    """Where the operators' library built with these compilers for this torch is kept (the compile cache)."""
    versions = [subprocess.run([c, "--version"], capture_output=True, text=True, timeout=30).stdout
                for c in (compiler, cxx)]
    key = repr((SOURCE.read_bytes(), OPS_SOURCE.read_bytes(), versions, FLAGS, _cpu_id(), torch.__version__,
                torch.__file__))
    return compile_cache_dir() / "cpu_gemv" / f"cpu_gemv_ops-{hashlib.sha256(key.encode()).hexdigest()[:32]}.so"


def build_ops() -> Path:
    """Compile cpu_gemv_ops.cpp with cpu_gemv.c against the running torch (unless built already; ~15 s on two
    cores, at low priority) and return the library's path; CpuKernelError if it cannot.

    The compilers run in a process of their own (ops_builder.py, a new session): if this process exits first (a
    short chat), the build still completes and the next start loads it."""
    compiler, cxx = os.environ.get("CC") or "cc", os.environ.get("CXX") or "c++"
    for c in (compiler, cxx):
        if shutil.which(c) is None:
            raise CpuKernelError(f"no compiler: {c!r} is not on PATH (set CC / CXX, or install gcc and g++)")
    try:
        path = ops_library_path(compiler, cxx)
    except (OSError, subprocess.SubprocessError) as e:
        raise CpuKernelError(f"cannot run the compilers {compiler!r} / {cxx!r}: {e}") from e
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    torch_dir = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    spec = {"target": str(path), "lock": str(path.with_suffix(".lock")), "built": "ops.so", "commands": [
        [compiler, *[f for f in FLAGS if f not in ("-shared", "-lm")], "-c", str(SOURCE), "-o", "{tmp}/cpu_gemv.o"],
        [cxx, "-O2", "-std=c++17", "-fPIC", "-shared", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
         f"-I{torch_dir / 'include'}", str(OPS_SOURCE), "{tmp}/cpu_gemv.o", "-o", "{tmp}/ops.so",
         f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}", "-lm"],
    ]}
    fd, spec_file = tempfile.mkstemp(suffix=".json", dir=path.parent)  # (the builder deletes it once read)
    with os.fdopen(fd, "w") as f:
        json.dump(spec, f)
    try:
        builder = subprocess.Popen([sys.executable, "-I", str(BUILDER), spec_file], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)  # not this process's signals, not its exit
    except OSError as e:
        os.unlink(spec_file)
        raise CpuKernelError(f"cannot start {BUILDER.name}: {e}") from e
    _ops_handed_off.set()
    output = builder.communicate()[0]  # (one line, written when the build has failed)
    if builder.returncode != 0 or not path.exists():
        raise CpuKernelError(f"building {OPS_SOURCE.name} {output.strip() or f'exited with {builder.returncode}'}")
    return path


def operators(wait: bool = False) -> str:
    """Which code serves the torch.ops.mistral_ref.gemv_* operators: "C++" (cpu_gemv_ops.cpp, loaded), "building"
    (in a background thread, started when the C kernels load; the Python functions serve meanwhile) or "Python
    (why)".  wait: wait for the build.  A built library is loaded here, in the caller's thread, between two
    products (the dispatcher's table is not changed under a product running in another thread): the decode loops
    call this once a step (CompiledDecode) or the products do (:func:`_as_operator`)."""
    if _ops_status is not None:
        return _ops_status
    if library() is None:
        _set_ops(f"Python (the C kernels are off: {status()})")
    elif os.environ.get(OPS_SWITCH, "1") == "0":
        _set_ops(f"Python ({OPS_SWITCH}=0)")
    thread = _start_ops()
    if wait and thread is not None:
        thread.join()
    if _ops_built is not None and _ops_status is None:
        with _ops_lock:  # one thread loads it (registering the kernels twice is an error)
            if _ops_status is None:
                try:
                    torch.ops.load_library(str(_ops_built))
                    # its own copy of cpu_gemv.c: the walk chosen for the C kernels (the same file handle)
                    ctypes.CDLL(str(_ops_built)).cpu_gemv_set_walk(ctypes.c_int(library().cpu_gemv_walk()))
                    _set_ops("C++")
                except (OSError, RuntimeError) as e:
                    _set_ops(f"Python (loading {_ops_built.name}: {e})")
    return _ops_status or "building"


def _start_ops() -> threading.Thread | None:
    global _ops_thread
    with _ops_lock:
        if _ops_status is None and _ops_thread is None:
            _ops_thread = threading.Thread(target=_build_in_background, name="mistral-ref-cpu-ops", daemon=True)
            _ops_thread.start()
            atexit.register(_wait_for_builder, os.getpid())
        return _ops_thread


def _wait_for_builder(pid: int) -> None:
    """At exit: a process exiting at once waits (milliseconds) until the builder has started, not for the build.
    Not in a forked child (pid differs), where no thread of this process's build runs to say so."""
    if os.getpid() == pid:
        _ops_handed_off.wait(30)


def _set_ops(value: str) -> None:
    global _ops_status
    _ops_status = value


def _build_in_background() -> None:
    global _ops_built
    try:
        path = build_ops()
        if not trusted(path):
            raise CpuKernelError(f"{path} is not a file of this user's that only this user can write: not loaded")
        _ops_built = path
    except (CpuKernelError, OSError) as e:
        _set_ops(f"Python ({e})")
        log.info("CPU decode operators stay in Python: %s", e)
    finally:
        _ops_handed_off.set()


def status() -> str:
    """"on (...)" or "off (why)": whether products go to these kernels (builds them on the first call)."""
    library()
    assert _status is not None
    return _status


def _tensors(weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of a QuantizedWeight, read from its buffers directly: a module's attribute lookup costs about a
    microsecond, and a decode step asks at every product."""
    buffers = weight._buffers
    return buffers["qweight"], buffers[scales_name(weight.scheme)]


def kind(weight: torch.Tensor | QuantizedWeight) -> str | None:
    """"bf16", "fp32", "int8" or "int4": which kernel multiplies by `weight`; None for weights they do not take."""
    if isinstance(weight, QuantizedWeight):
        qweight, scales = _tensors(weight)
        return weight.scheme if qweight.is_contiguous() and scales.is_contiguous() else None
    if weight.dtype in _FLOATS and weight.dim() == 2 and weight.is_contiguous():
        return "bf16" if weight.dtype == torch.bfloat16 else "fp32"
    return None


def applies(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight) -> bool:
    """True if linear(x, weight) is a product these kernels take (see the module docstring); whether they are
    available is :func:`library`'s question."""
    which = kind(weight)
    if which is None or x.device.type != "cpu":
        return False
    tensor = _tensors(weight)[1] if isinstance(weight, QuantizedWeight) else weight  # the float tensor, on its device
    if tensor.device.type != "cpu" or x.dtype != tensor.dtype:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or tensor.requires_grad):
        return False  # the kernels have no backward: training keeps PyTorch's products
    if not 0 < x.numel() // max(1, x.shape[-1]) < MAX_ROWS[which]:
        return False
    return x.dtype in _FLOATS  # (and the weight's or its scales' dtype)


def handles(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight) -> bool:
    """True if linear(x, weight) goes to these kernels: :func:`applies` and they are available."""
    return applies(x, weight) and library() is not None


def gemv(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, threads: int | None = None) -> torch.Tensor:
    """x @ weight.T (weight: bf16 or fp32 (out, in), or a QuantizedWeight) with the C kernels.  x: (..., in) ->
    (..., out) in x's dtype.  For products :func:`applies` accepts; threads: default torch.get_num_threads()."""
    quantized = isinstance(weight, QuantizedWeight)
    qweight, scales = _tensors(weight) if quantized else (weight, None)
    out_features, in_features = qweight.shape[0], x.shape[-1]
    x2 = x.reshape(-1, in_features)
    if x2.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], out_features)
    threads = torch.get_num_threads() if threads is None else threads
    # inside a graph the operators (opaque to the compiler); eagerly the Python functions below, or the operators
    # once their C++ kernels are loaded (:func:`operators`)
    if quantized:
        parts = (qweight, scales, weight.group_size or 0, threads)
        y = torch.ops.mistral_ref.gemv_quantized(x2, *parts) if _as_operator() else gemv_quantized(x2, *parts)
    else:
        y = torch.ops.mistral_ref.gemv_float(x2, weight, threads) if _as_operator() else \
            gemv_float(x2, weight, threads)
    return y.view(*x.shape[:-1], out_features)


def _as_operator() -> bool:
    """Call the operators (in a graph being compiled, or eagerly once their C++ kernels are loaded) rather than
    the Python functions.  (is_compiling first: a graph must not read, and be guarded on, the load status.)"""
    if torch.compiler.is_compiling():
        return True
    return (_ops_status or operators()) == "C++"


def applies_many(x: torch.Tensor, weights: Sequence[torch.Tensor | QuantizedWeight]) -> bool:
    """True if every product of :func:`gemv_many` is one :func:`applies` takes, all with the same kernel (and, when
    quantized, the same group size and scale dtype; else one dtype: one call reads them all)."""
    if not weights or not all(applies(x, w) for w in weights):
        return False
    first = weights[0]
    if isinstance(first, QuantizedWeight):  # (applies: the scales have x's dtype)
        return all(isinstance(w, QuantizedWeight) and w.scheme == first.scheme and w.group_size == first.group_size
                   for w in weights)
    return all(not isinstance(w, QuantizedWeight) and w.dtype == first.dtype for w in weights)


def gemv_many(x: torch.Tensor, weights: Sequence[torch.Tensor | QuantizedWeight],
              threads: int | None = None) -> list[torch.Tensor]:
    """[x @ w.T for w in weights] in one call (x converted once): for products :func:`applies_many` accepts.
    x: (..., in) -> [(..., out_p)] in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    threads = torch.get_num_threads() if threads is None else threads
    compiling = _as_operator()
    if isinstance(weights[0], QuantizedWeight):
        qweights, scales = (list(t) for t in zip(*map(_tensors, weights)))
        group_size = weights[0].group_size or 0
        ys = torch.ops.mistral_ref.gemv_quantized_many(x2, qweights, scales, group_size, threads) if compiling \
            else gemv_quantized_many(x2, qweights, scales, group_size, threads)
    else:
        ys = torch.ops.mistral_ref.gemv_float_many(x2, list(weights), threads) if compiling else \
            gemv_float_many(x2, list(weights), threads)
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in ys]


def experts_gemv(x: torch.Tensor, weights: torch.Tensor | QuantizedExperts, index: torch.Tensor,
                 threads: int) -> torch.Tensor:
    """Row s = x_s @ weights[index[s]].T for one token's chosen experts: stacked bf16 experts (E, out, in) (see
    :func:`gemv_bf16_experts`) or stacked quantized ones (:func:`gemv_quantized_experts`); as an operator inside a
    graph.  x: (1 or k, in) -> (k, out)."""
    compiling = _as_operator()
    if isinstance(weights, torch.Tensor):
        if compiling:
            return torch.ops.mistral_ref.gemv_bf16_experts(x, weights, index, threads)
        return gemv_bf16_experts(x, weights, index, threads)
    parts = (weights.qweight, weights.scales, index, weights.group_size or 0, threads)
    if compiling:
        return torch.ops.mistral_ref.gemv_quantized_experts(x, *parts)
    return gemv_quantized_experts(x, *parts)


def experts_swiglu(x: torch.Tensor, w1: torch.Tensor | QuantizedExperts, w3: torch.Tensor | QuantizedExperts,
                   w2: torch.Tensor | QuantizedExperts, index: torch.Tensor, weights: torch.Tensor,
                   threads: int) -> torch.Tensor:
    """One token's routed experts, summed: sum_s weights[s] * w2[e_s](silu(w1[e_s] x) * w3[e_s] x), e_s =
    index[s], with stacked experts (all three bf16 or fp32 like x, or all three quantized alike, as
    :func:`experts_gemv` takes them) in one operator call (a compiled step calls one operator per MoE layer
    instead of three, and two generated kernels between them).  x: (1, dim) bf16 or fp32, index: (k,) int64,
    weights: (k,) fp32 -> (1, dim) in x's dtype, rounded as the reference rounds a layer in x's dtype (gate, up,
    SiLU, hidden activations, each expert's output), the k weighted outputs summed in fp32: one C function (cpu_gemv.c,
    swiglu_experts), equal to those torch operations on the same products within a rounding of x's dtype where
    SiLU's exp (cpu_gemv.c: exp_poly) and torch's differ in the last bits (tests/test_cpu_gemv.py)."""
    compiling = _as_operator()
    if isinstance(w1, torch.Tensor):
        parts = (x, w1, w3, w2, index, weights, threads)
        return torch.ops.mistral_ref.swiglu_float_experts(*parts) if compiling else swiglu_float_experts(*parts)
    parts = (x, w1.qweight, w1.scales, w3.qweight, w3.scales, w2.qweight, w2.scales, index, weights,
             w1.group_size or 0, threads)
    if compiling:
        return torch.ops.mistral_ref.swiglu_quantized_experts(*parts)
    return swiglu_quantized_experts(*parts)


def experts_moe(x: torch.Tensor, gate_weight: torch.Tensor, w1: torch.Tensor | QuantizedExperts,
                w3: torch.Tensor | QuantizedExperts, w2: torch.Tensor | QuantizedExperts, top_k: int,
                threads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's MoE layer for one token in one operator call, without a torch operation inside: the router
    (moe.route's fp32 logits, top-k, softmax over the k, as C loops: cpu_gemv.c, route_one_token) and
    :func:`experts_swiglu` of the chosen experts.  x: (1, dim), gate_weight: (E, dim) -> out (1, dim) in x's
    dtype and the router logits (1, E) fp32.  The logits equal moe.route's within fp32 rounding (another order of
    sums), so the experts chosen are route's but where two logits tie to ~1e-7 (tests/test_cpu_gemv.py)."""
    compiling = _as_operator()
    if isinstance(w1, torch.Tensor):
        parts = (x, gate_weight, w1, w3, w2, top_k, threads)
        out = torch.ops.mistral_ref.moe_float_experts(*parts) if compiling else moe_float_experts(*parts)
    else:
        parts = (x, gate_weight, w1.qweight, w1.scales, w3.qweight, w3.scales, w2.qweight, w2.scales, top_k,
                 w1.group_size or 0, threads)
        out = torch.ops.mistral_ref.moe_quantized_experts(*parts) if compiling else moe_quantized_experts(*parts)
    return out[0], out[1]


def moe_float_experts(x: torch.Tensor, gate_weight: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                      w2: torch.Tensor, top_k: int, threads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """experts_moe for stacked bf16 experts, or fp32 ones with fp32 x."""
    return _moe(x, gate_weight, top_k, _float_kind(w1), (w1, None, w3, None, w2, None), 0, threads)


def moe_quantized_experts(x: torch.Tensor, gate_weight: torch.Tensor, q1: torch.Tensor, s1: torch.Tensor,
                          q3: torch.Tensor, s3: torch.Tensor, q2: torch.Tensor, s2: torch.Tensor, top_k: int,
                          group_size: int, threads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """experts_moe for stacked quantized experts."""
    return _moe(x, gate_weight, top_k, _scheme(q1), (q1, s1, q3, s3, q2, s2), group_size, threads)


def swiglu_float_experts(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, index: torch.Tensor,
                         weights: torch.Tensor, threads: int) -> torch.Tensor:
    """experts_swiglu for stacked bf16 experts w1, w3 (E, hidden, dim), w2 (E, dim, hidden), or fp32 ones with fp32
    x."""
    return _swiglu(x, _float_kind(w1), (w1, None, w3, None, w2, None), 0, index, weights, threads)


def swiglu_quantized_experts(x: torch.Tensor, q1: torch.Tensor, s1: torch.Tensor, q3: torch.Tensor,
                             s3: torch.Tensor, q2: torch.Tensor, s2: torch.Tensor, index: torch.Tensor,
                             weights: torch.Tensor, group_size: int, threads: int) -> torch.Tensor:
    """experts_swiglu for stacked quantized experts (codes and scales of w1, w3, w2, one scheme)."""
    return _swiglu(x, _scheme(q1), (q1, s1, q3, s3, q2, s2), group_size, index, weights, threads)


def chosen_apply(x: torch.Tensor, w1: Sequence[torch.Tensor | QuantizedWeight],
                 w3: Sequence[torch.Tensor | QuantizedWeight], w2: Sequence[torch.Tensor | QuantizedWeight]) -> bool:
    """True if :func:`swiglu_chosen` takes one token x (1, dim) with its chosen experts' weights (one tensor or
    QuantizedWeight an expert); whether the kernels are available is :func:`library`'s question."""
    return not isinstance(_chosen(x, w1, w3, w2), str)


def swiglu_chosen(x: torch.Tensor, w1: Sequence[torch.Tensor | QuantizedWeight],
                  w3: Sequence[torch.Tensor | QuantizedWeight], w2: Sequence[torch.Tensor | QuantizedWeight],
                  weights: torch.Tensor, threads: int, checked: tuple | None = None) -> torch.Tensor:
    """:func:`experts_swiglu` for experts kept as separate weights (a model whose experts are not stacked, decoding
    eagerly): sum_s weights[s] * w2[s](silu(w1[s] x) * w3[s] x) over the k chosen experts, whose w1[s], w3[s]
    (hidden, dim) and w2[s] (dim, hidden) are bf16 or fp32 tensors like x or QuantizedWeights of one scheme and
    group size with scales in x's dtype, in one C call (cpu_gemv.c: swiglu_chosen, the function experts_swiglu
    runs on its stacks).  x: (1, dim), weights: (k,) fp32 -> (1, dim) in x's dtype, rounded as experts_swiglu
    rounds.  checked: what :func:`chosen_or_none` found for these weights (not checked again)."""
    lib, k = _checked_library(), len(w1)
    if not (tuple(weights.shape) == (k,) and weights.dtype == torch.float32 and weights.is_cpu):
        raise ValueError(f"swiglu_chosen: k fp32 weights for k experts, got {tuple(weights.shape)} {weights.dtype} "
                         f"for {k}")
    parts = checked or _chosen(x, w1, w3, w2)
    if isinstance(parts, str):
        raise ValueError(f"swiglu_chosen: {parts}")
    which, group, scales_bf16, codes, scales = parts
    x, weights, dim = x.contiguous(), weights.contiguous(), x.shape[1]
    out = torch.empty(1, dim, dtype=x.dtype)
    p = [_pointers(codes[i * k:(i + 1) * k]) for i in range(3)]
    ps = [_pointers(scales[i * k:(i + 1) * k]) if scales else None for i in range(3)]
    _done(lib.swiglu_chosen(x.data_ptr(), int(x.dtype == torch.bfloat16), which, p[0], ps[0], p[1], ps[1], p[2],
                            ps[2], scales_bf16, group, weights.data_ptr(), k, w1[0].shape[0], dim, out.data_ptr(),
                            threads), 1, dim)
    return out


def chosen_or_none(x: torch.Tensor, w1: Sequence[torch.Tensor | QuantizedWeight],
                   w3: Sequence[torch.Tensor | QuantizedWeight], w2: Sequence[torch.Tensor | QuantizedWeight]
                   ) -> tuple | None:
    """What :func:`swiglu_chosen` needs of these weights (pass it as `checked`), or None where it does not take
    them (:func:`chosen_apply`): one pass of checks for a decode step's MoE layer."""
    parts = _chosen(x, w1, w3, w2)
    return None if isinstance(parts, str) else parts


def _chosen(x: torch.Tensor, w1: Sequence, w3: Sequence, w2: Sequence) -> tuple | str:
    """(kind, group, scales_bf16, codes, scales) of the chosen experts' weights for swiglu_chosen (codes: the 3k
    weight or code tensors, w1's then w3's then w2's; scales: theirs, quantized), or why it cannot take them.
    A decode step asks at every MoE layer for 3k weights: attributes are read once, compared as plain values."""
    k = len(w1)
    if not (k and len(w3) == k and len(w2) == k):
        return f"k weights of w1, w3 and w2 each, got {len(w1)} / {len(w3)} / {len(w2)}"
    dtype, shape = x.dtype, x.shape
    if not (len(shape) == 2 and shape[0] == 1 and dtype in _FLOATS and x.is_cpu):
        return f"x must be one row (1, dim) of bf16 or fp32 on the CPU, got {tuple(shape)} {dtype} {x.device}"
    grad = torch.is_grad_enabled()
    if grad and x.requires_grad:
        return "x requires grad (the kernels have no backward)"
    dim, first = shape[1], w1[0]
    quantized = isinstance(first, QuantizedWeight)
    hidden = first.shape[0]
    if hidden == 0:
        return "experts of zero width (hidden 0)"
    if quantized:
        which, group = _scheme(first.qweight), first.group_size or 0
    else:
        which, group = (3 if dtype is torch.float32 else 0), 0
    codes, scales = [], []
    for ws, out, inp in ((w1, hidden, dim), (w3, hidden, dim), (w2, dim, hidden)):
        for w in ws:
            if quantized:
                if not isinstance(w, QuantizedWeight) or (w.group_size or 0) != group:
                    return f"experts of one kind and group size, got {first!r} and {w!r}"
                q, sc = _tensors(w)
                if not (_scheme(q) == which and sc.dtype is dtype and q.shape[0] == out and q.is_cpu and sc.is_cpu
                        and q.is_contiguous() and sc.is_contiguous()
                        and _fits_quantized(inp, q.dtype, q.shape, sc.shape, group)):
                    return f"a quantized expert that does not fit ({out}, {inp}) with {dtype} scales: {w!r}"
                codes.append(q)
                scales.append(sc)
                continue
            if not isinstance(w, torch.Tensor):
                return f"experts of one kind, got {first!r} and {w!r}"
            ws_shape = w.shape
            if not (w.dtype is dtype and len(ws_shape) == 2 and ws_shape[0] == out and ws_shape[1] == inp
                    and w.is_cpu and w.is_contiguous()):
                return (f"expert weights ({out}, {inp}) {dtype}, contiguous, on the CPU, got {tuple(ws_shape)} "
                        f"{w.dtype}")
            if grad and w.requires_grad:
                return "an expert's weight requires grad (the kernels have no backward)"
            codes.append(w)
    return which, group, int(quantized and dtype is torch.bfloat16), codes, scales


def _scheme(codes: torch.Tensor) -> int:
    """The C functions' `kind` of quantized experts: 1 int8, 2 int4."""
    return 1 if codes.dtype == torch.int8 else 2


def _float_kind(weights: torch.Tensor) -> int:
    """The C functions' `kind` of unquantized experts: 0 bf16, 3 fp32."""
    return 3 if weights.dtype == torch.float32 else 0


def _check_experts(x: torch.Tensor, kind: int, parts: tuple, group_size: int) -> tuple[int, int, int]:
    """The three stacked experts of a SwiGLU layer fit x (1, dim): w1, w3 (E, hidden, dim), w2 (E, dim, hidden),
    bf16 (kind 0) or fp32 (kind 3) like x, or quantized alike (codes and scales).  Returns (E, hidden, dim)."""
    w1, s1, w3, s3, w2, s2 = parts
    if x.ndim != 2 or x.shape[0] != 1 or w1.ndim != 3 or (kind in (1, 2) and s1.ndim < 2):
        raise ValueError(f"experts: x must be one row (got {tuple(x.shape)}) and the experts stacked (E, out, in) "
                         f"(got {tuple(w1.shape)})")
    n_experts, dim = w1.shape[0], x.shape[1]
    hidden = w1.shape[1]
    for w, s, out, inp in ((w1, s1, hidden, dim), (w3, s3, hidden, dim), (w2, s2, dim, hidden)):
        if w.ndim != 3 or w.shape[0] != n_experts or w.dtype != w1.dtype:
            raise ValueError(f"experts: w1, w3 and w2 must stack as many experts of one dtype, got "
                             f"{tuple(w1.shape)} {w1.dtype} and {tuple(w.shape)} {w.dtype}")
        if kind in (0, 3):  # bf16 experts with bf16 x, fp32 ones with fp32 x
            dtype = torch.bfloat16 if kind == 0 else torch.float32
            _check(x, w, dim, dtype, w.dtype == dtype and tuple(w.shape[1:]) == (out, inp) and w.is_contiguous())
            continue
        if (s.ndim < 2 or s.shape[0] != n_experts or s.dtype != s1.dtype or s.dtype not in _FLOATS
                or x.dtype not in _FLOATS):
            raise ValueError(f"experts: scales of {n_experts} experts of one dtype, bf16 or fp32, for bf16 or fp32 "
                             f"x, got {tuple(s.shape)} {s.dtype}, x {x.dtype}")
        _check(x, w, dim, x.dtype, _fits_quantized(inp, w.dtype, w.shape[1:], s.shape[1:], group_size)
               and w.shape[1] == out and w.is_contiguous() and s.is_contiguous() and s.is_cpu)
    return n_experts, hidden, dim


def _pointers_of(parts: tuple) -> list[int | None]:
    return [None if t is None else t.data_ptr() for t in parts]


def _swiglu(x: torch.Tensor, kind: int, parts: tuple, group_size: int, index: torch.Tensor, weights: torch.Tensor,
            threads: int) -> torch.Tensor:
    lib, x, index, weights = _checked_library(), x.contiguous(), index.contiguous(), weights.contiguous()
    if index.ndim != 1 or index.dtype != torch.int64 or weights.shape != index.shape \
            or weights.dtype != torch.float32 or not index.is_cpu or not weights.is_cpu:
        raise ValueError(f"swiglu experts: index (k,) int64 and weights (k,) fp32 on the CPU (got index "
                         f"{tuple(index.shape)} {index.dtype}, weights {tuple(weights.shape)} {weights.dtype})")
    n_experts, hidden, dim = _check_experts(x, kind, parts, group_size)
    out = torch.empty(1, dim, dtype=x.dtype)
    scales_bf16 = int(parts[1] is not None and parts[1].dtype == torch.bfloat16)
    _done(lib.swiglu_experts(x.data_ptr(), int(x.dtype == torch.bfloat16), kind, *_pointers_of(parts), scales_bf16,
                             group_size, n_experts, index.data_ptr(), weights.data_ptr(), index.shape[0], hidden,
                             dim, out.data_ptr(), threads), 1, dim)
    return out


def _moe(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, kind: int, parts: tuple, group_size: int,
         threads: int) -> tuple[torch.Tensor, torch.Tensor]:
    lib, x = _checked_library(), x.contiguous()
    n_experts, hidden, dim = _check_experts(x, kind, parts, group_size)
    if gate_weight.shape != (n_experts, dim) or gate_weight.dtype not in _FLOATS or not gate_weight.is_cpu:
        raise ValueError(f"experts: the router's weight must be ({n_experts}, {dim}) bf16 or fp32 on the CPU, got "
                         f"{tuple(gate_weight.shape)} {gate_weight.dtype}")
    if not 1 <= top_k <= min(n_experts, 64):
        raise ValueError(f"experts: top_k must be 1 .. {min(n_experts, 64)}, got {top_k}")
    gate_weight = gate_weight.contiguous()
    out, logits = torch.empty(1, dim, dtype=x.dtype), torch.empty(1, n_experts)
    scales_bf16 = int(parts[1] is not None and parts[1].dtype == torch.bfloat16)
    _done(lib.moe_one_token(x.data_ptr(), int(x.dtype == torch.bfloat16), gate_weight.data_ptr(),
                            int(gate_weight.dtype == torch.bfloat16), top_k, kind, *_pointers_of(parts), scales_bf16,
                            group_size, n_experts, hidden, dim, out.data_ptr(), logits.data_ptr(), threads), 1, dim)
    return out, logits


def quantized_experts(x: torch.Tensor, weights: object) -> bool:
    """True if `weights` are stacked quantized experts (QuantizedExperts) that :func:`experts_gemv` takes with x
    (one token; x in the weights' dtype, bf16 or fp32; on a CPU)."""
    return (isinstance(weights, QuantizedExperts) and x.device.type == "cpu" and weights.qweight.device.type == "cpu"
            and x.dtype == weights.dtype in (torch.bfloat16, torch.float32)
            and weights.qweight.is_contiguous() and weights.scales.is_contiguous())


def _checked_library() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise CpuKernelError(f"the C kernels are unavailable: {status()}")
    return lib


# The checks below run at every product of a decode step (a compiled step calls these functions through its
# operators ~40-50 times), so they read each tensor attribute once and compare plain ints: a torch.Size compared
# with a tuple, or a tensor's .device, costs ~1-2 us, and the checks of a step once cost ~3 ms of its ~11
# (Mixtral-140M int8, one-off; README "Speed on a CPU").
_FLOATS = (torch.bfloat16, torch.float32)


def _check(x: torch.Tensor, weight: torch.Tensor, in_features: int, dtype: torch.dtype, fits: bool) -> None:
    """The kernels read memory by these shapes: refuse arguments that do not match them."""
    if not (fits and x.ndim == 2 and x.shape[1] == in_features and x.dtype is dtype and x.is_cpu and weight.is_cpu):
        raise ValueError(f"cpu_gemv: arguments that do not fit: x {tuple(x.shape)} {x.dtype}, weight "
                         f"{tuple(weight.shape)} {weight.dtype} (in_features {in_features}, x dtype {dtype})")


def _fits_quantized(in_features: int, codes: torch.dtype, q: Sequence[int], s: Sequence[int], group_size: int
                    ) -> bool:
    """The shapes of one quantized weight: int8 codes q (out, in) with scales s (out,), or int4's packed codes
    (out, in / 2) uint8 with scales_and_zeros (in / group_size, out, 2)."""
    if len(q) != 2:
        return False
    if codes is torch.int8:
        return q[1] == in_features and len(s) == 1 and s[0] == q[0]
    return (codes is torch.uint8 and group_size > 0 and in_features % group_size == 0 and q[0] % 16 == 0
            and 2 * q[1] == in_features and len(s) == 3 and s[0] == in_features // group_size and s[1] == q[0]
            and s[2] == 2)


def _check_quantized(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> None:
    """_check for a quantized weight's tensors (see _fits_quantized)."""
    if scales.dtype not in _FLOATS or x.dtype not in _FLOATS:
        raise CpuKernelError(f"the C kernels take bf16 or fp32 inputs and scales, not {x.dtype} / {scales.dtype}")
    fits = _fits_quantized(x.shape[-1], qweight.dtype, qweight.shape, scales.shape, group_size)
    _check(x, qweight, x.shape[-1], x.dtype, fits and qweight.is_contiguous() and scales.is_contiguous()
           and scales.is_cpu)


def _done(code: int, rows: int, in_features: int) -> None:
    if code == -2:
        raise IndexError("cpu_gemv: an expert index is out of range")
    if code != 0:
        raise MemoryError(f"cpu_gemv: no memory for the fp32 copies of a ({rows}, {in_features}) product")


def gemv_float(x: torch.Tensor, weight: torch.Tensor, threads: int) -> torch.Tensor:
    """x (rows, in) @ weight (out, in) .T -> (rows, out), all bf16 or all fp32."""
    lib, x = _checked_library(), x.contiguous()
    _check(x, weight, weight.shape[1], weight.dtype, weight.dtype in _FLOATS and weight.is_contiguous())
    y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
    _done(lib.gemv_float(x.data_ptr(), weight.data_ptr(), int(weight.dtype == torch.float32), y.data_ptr(),
                         int(x.dtype == torch.bfloat16), x.shape[0], weight.shape[0], x.shape[1], threads), *x.shape)
    return y


def gemv_quantized(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                   threads: int) -> torch.Tensor:
    """x (rows, in) @ the QuantizedWeight of these tensors .T -> (rows, out) in x's dtype (bf16 or fp32): int8 if
    qweight is int8 (scales (out,)), else int4 (qweight uint8 (out, in / 2), scales_and_zeros (groups, out, 2))."""
    lib, x = _checked_library(), x.contiguous()
    _check_quantized(x, qweight, scales, group_size)
    rows, in_features = x.shape
    out_features, scales_bf16, io_bf16 = qweight.shape[0], int(scales.dtype == torch.bfloat16), \
        int(x.dtype == torch.bfloat16)
    y = torch.empty(rows, out_features, dtype=x.dtype)
    if qweight.dtype == torch.int8:
        code = lib.gemv_int8(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), scales_bf16, y.data_ptr(),
                             io_bf16, rows, out_features, in_features, threads)
    else:
        code = lib.gemv_int4(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), scales_bf16, y.data_ptr(),
                             io_bf16, rows, out_features, in_features, group_size, threads)
    _done(code, rows, in_features)
    return y


def _pointers(tensors: Sequence[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def gemv_float_many(x: torch.Tensor, weights: list[torch.Tensor], threads: int) -> list[torch.Tensor]:
    """[x (rows, in) @ w (out_p, in) .T -> (rows, out_p) for w in weights], all bf16 or all fp32, in one call."""
    lib, x = _checked_library(), x.contiguous()
    if not weights:
        raise ValueError("gemv_float_many: no weights")
    dtype = weights[0].dtype
    for w in weights:
        _check(x, w, w.shape[-1], dtype, w.dtype is dtype in _FLOATS and w.dim() == 2 and w.is_contiguous())
    ys = [torch.empty(x.shape[0], w.shape[0], dtype=x.dtype) for w in weights]
    outs = (ctypes.c_int64 * len(weights))(*[w.shape[0] for w in weights])
    _done(lib.gemv_float_many(x.data_ptr(), len(weights), _pointers(weights), int(dtype == torch.float32),
                              _pointers(ys), outs, int(x.dtype == torch.bfloat16), x.shape[0], x.shape[1], threads),
          *x.shape)
    return ys


def gemv_quantized_many(x: torch.Tensor, qweights: list[torch.Tensor], scales: list[torch.Tensor],
                        group_size: int, threads: int) -> list[torch.Tensor]:
    """[x (rows, in) @ W_p.T for the QuantizedWeights W_p of these tensors (see gemv_quantized), one scheme, group
    size and scale dtype] in one call -> [(rows, out_p)] in x's dtype."""
    lib, x = _checked_library(), x.contiguous()
    if not qweights or len(qweights) != len(scales):
        raise ValueError("gemv_quantized_many: every weight needs a code tensor and a scale tensor")
    codes, floats = qweights[0].dtype, scales[0].dtype
    for q, s in zip(qweights, scales):
        if q.dtype is not codes or s.dtype is not floats:
            raise ValueError(f"gemv_quantized_many: weights of one scheme and one scale dtype, got "
                             f"{sorted({f'{q.dtype}/{s.dtype}' for q, s in zip(qweights, scales)})}")
        _check_quantized(x, q, s, group_size)
    rows, in_features = x.shape
    scales_bf16, io_bf16 = int(scales[0].dtype == torch.bfloat16), int(x.dtype == torch.bfloat16)
    ys = [torch.empty(rows, q.shape[0], dtype=x.dtype) for q in qweights]
    outs = (ctypes.c_int64 * len(qweights))(*[q.shape[0] for q in qweights])
    n, qs, ss, yp = len(qweights), _pointers(qweights), _pointers(scales), _pointers(ys)
    if qweights[0].dtype == torch.int8:
        code = lib.gemv_int8_many(x.data_ptr(), n, qs, ss, scales_bf16, yp, outs, io_bf16, rows, in_features, threads)
    else:
        code = lib.gemv_int4_many(x.data_ptr(), n, qs, ss, scales_bf16, yp, outs, io_bf16, rows, in_features,
                                  group_size, threads)
    _done(code, rows, in_features)
    return ys


def gemv_bf16_experts(x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, threads: int) -> torch.Tensor:
    """Row s of the result = x_s @ weights[index[s]].T: the chosen experts of one token.  x: (1 or k, in) bf16,
    weights: (E, out, in) bf16 (stacked experts), index: (k,) int64 -> (k, out) bf16.  x_s is row s of x, or its
    only row."""
    lib, x, index = _checked_library(), x.contiguous(), index.contiguous()
    k = index.shape[0]
    if x.shape[0] not in (1, k) or index.dtype != torch.int64 or not weights.is_contiguous():
        raise ValueError(f"gemv_bf16_experts: x {tuple(x.shape)} must have 1 or {k} rows, index int64 "
                         f"(got {index.dtype}), weights contiguous")
    n_experts, out_features, in_features = weights.shape
    _check(x, weights, in_features, torch.bfloat16, weights.dtype == torch.bfloat16 and weights.dim() == 3)
    y = torch.empty(k, out_features, dtype=x.dtype)
    _done(lib.gemv_bf16_experts(x.data_ptr(), x.shape[0], weights.data_ptr(), n_experts, index.data_ptr(), k,
                                y.data_ptr(), 1, out_features, in_features, threads), k, in_features)
    return y


def gemv_quantized_experts(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, index: torch.Tensor,
                           group_size: int, threads: int) -> torch.Tensor:
    """Row s = x_s @ W[index[s]].T for stacked quantized experts (QuantizedExperts' tensors): int8 codes (E, out,
    in) with scales (E, out), or int4 codes (E, out, in / 2) with scales_and_zeros (E, in / G, out, 2).  One
    token's chosen experts in one call.  x: (1 or k, in) bf16 or fp32, index: (k,) int64 -> (k, out) in x's dtype;
    x_s is row s of x, or its only row."""
    lib, x, index = _checked_library(), x.contiguous(), index.contiguous()
    k = index.shape[0] if index.ndim == 1 else -1
    (n_experts, *q), (n_scales, *sz) = qweight.shape or (0,), scales.shape or (-1,)
    if x.ndim != 2 or x.shape[0] not in (1, k) or index.dtype is not torch.int64 or not n_experts \
            or n_scales != n_experts or not index.is_cpu:
        raise ValueError(f"gemv_quantized_experts: x {tuple(x.shape)} must have 1 or {k} rows, index int64 on the "
                         f"CPU (got {index.dtype}), codes (E, out, in) and scales of E experts (got "
                         f"{tuple(qweight.shape)}, {tuple(scales.shape)})")
    if scales.dtype not in _FLOATS or x.dtype not in _FLOATS:
        raise CpuKernelError(f"the C kernels take bf16 or fp32 inputs and scales, not {x.dtype} / {scales.dtype}")
    _check(x, qweight, x.shape[1], x.dtype, _fits_quantized(x.shape[1], qweight.dtype, q, sz, group_size)
           and qweight.is_contiguous() and scales.is_contiguous() and scales.is_cpu)
    out_features = q[0]
    y = torch.empty(k, out_features, dtype=x.dtype)
    group = group_size if qweight.dtype == torch.uint8 else 0
    _done(lib.gemv_quantized_experts(x.data_ptr(), x.shape[0], qweight.data_ptr(), scales.data_ptr(),
                                     int(scales.dtype == torch.bfloat16), n_experts, index.data_ptr(), k, y.data_ptr(),
                                     int(x.dtype == torch.bfloat16), out_features, x.shape[1], group, threads),
          k, x.shape[1])
    return y


# ---- RMSNorm and RoPE (a decode step's few rows, a prompt's many) ----------------------------------------------

RMS_NORM_ROWS = 32  # up to this many rows: one thread (rms_norm_rows); more: split among threads (rms_norm_prompt)


def experts_rows_apply(x: torch.Tensor, w1: object, w2: object, w3: object) -> bool:
    """Whether :func:`experts_rows` takes these experts: x bf16 (tokens, dim) on a CPU whose tiles this process may
    use (cpu_gemv_amx), no autograd; w1, w3 (E, hidden, dim) and w2 (E, dim, hidden) bf16, each a stacked tensor
    (backends/moe.py: stack_experts) or indexable by expert into contiguous (out, in) bf16 tensors
    (fine_moe.ExpertWeights), hidden and dim multiples of 16 (and x's words below 2^31: the kernel gathers rows by
    32-bit offsets)."""
    lib = library()
    if (lib is None or not lib.cpu_gemv_amx() or x.dtype != torch.bfloat16 or x.device.type != "cpu"
            or x.dim() != 2 or x.shape[1] % 16 or x.numel() // 2 >= 2 ** 31
            or (torch.is_grad_enabled() and x.requires_grad)):
        return False
    dim = x.shape[1]
    first = [w if isinstance(w, torch.Tensor) and w.dim() == 3 else w[0] if len(w) else None for w in (w1, w3, w2)]
    if any(not isinstance(f, torch.Tensor) or isinstance(f, QuantizedWeight) for f in first):
        return False
    hidden = first[0].shape[-2]
    return (hidden % 16 == 0 and all(f.dtype == torch.bfloat16 and f.device.type == "cpu" for f in first)
            and first[0].shape[-2:] == first[1].shape[-2:] == (hidden, dim) and first[2].shape[-2:] == (dim, hidden)
            and not (torch.is_grad_enabled() and any(f.requires_grad for f in first)))


def _expert_pointers(w: object, counts: list[int], shape: tuple[int, int]) -> ctypes.Array | None:
    """The data pointers of the E experts' (out, in) bf16 weights: slices of a stack, or each expert's tensor
    (looked up for the experts with rows only; the others' pointers are not read); None where one of those is not
    a contiguous bf16 CPU tensor of that shape (an expert of another rank's, parallel.py: zero-width)."""
    n_experts = len(counts)
    if isinstance(w, torch.Tensor):
        if w.shape != (n_experts, *shape) or w.dtype != torch.bfloat16 or not w.is_contiguous():
            raise ValueError(f"experts_rows: stacked weights {tuple(w.shape)} {w.dtype} are not {n_experts} "
                             f"contiguous {shape} bf16 experts")
        step = w[0].numel() * w.element_size()
        return (ctypes.c_void_p * n_experts)(*(w.data_ptr() + e * step for e in range(n_experts)))
    pointers = (ctypes.c_void_p * n_experts)()
    for e, n in enumerate(counts):
        if n:
            t = w[e]
            if (not isinstance(t, torch.Tensor) or isinstance(t, QuantizedWeight) or t.dtype != torch.bfloat16
                    or t.device.type != "cpu" or tuple(t.shape) != shape or not t.is_contiguous()):
                return None
            pointers[e] = t.data_ptr()
    return pointers


def linear_amx_takes(x: torch.Tensor, weight: object) -> bool:
    """Whether :func:`linear_amx` computes x @ weight.T: x (..., in) and weight (out, in) bf16 CPU tensors, weight
    contiguous, in and out multiples of 32, no autograd, on a CPU whose AMX tiles this process may use."""
    if not (isinstance(weight, torch.Tensor) and not isinstance(weight, QuantizedWeight) and weight.dim() == 2
            and x.dtype == weight.dtype == torch.bfloat16 and x.device.type == weight.device.type == "cpu"
            and weight.is_contiguous() and x.shape[-1] == weight.shape[1] and x.numel() > 0
            and x.shape[-1] % 32 == 0 and weight.shape[0] % 32 == 0):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    lib = library()
    return lib is not None and bool(lib.cpu_gemv_amx())


def linear_amx_applies(x: torch.Tensor, weight: object) -> bool:
    """Whether linear (backends/linear.py) sends x @ weight.T to :func:`linear_amx`: a product it takes
    (:func:`linear_amx_takes`) of AMX_LINEAR_MIN_ROWS to AMX_LINEAR_MAX_ROWS rows."""
    rows = x.numel() // max(1, x.shape[-1])
    return AMX_LINEAR_MIN_ROWS <= rows <= AMX_LINEAR_MAX_ROWS and linear_amx_takes(x, weight)


def linear_amx(x: torch.Tensor, weight: torch.Tensor, threads: int | None = None,
               checked: bool = False) -> torch.Tensor:
    """F.linear(x, weight) for bf16 on AMX tiles (cpu_gemv.c: linear_amx): fp32 sums in the tiles' order, each
    rounded once to bf16, as F.linear rounds its own (within one bf16 rounding of it).  Threads (default
    torch.get_num_threads()) take the output's columns 32 at a time.  For the products :func:`linear_amx_takes`
    accepts (any number of rows; checked: the caller has just asked it, as linear does through
    :func:`linear_amx_applies`).  x: (..., in); weight: (out, in) -> (..., out) bf16"""
    lib = _checked_library()
    if not (checked or linear_amx_takes(x, weight)):
        raise ValueError(f"linear_amx: x {tuple(x.shape)} {x.dtype} and weight {tuple(getattr(weight, 'shape', ()))} "
                         f"{getattr(weight, 'dtype', type(weight).__name__)} are not a bf16 product it takes here")
    out_features, in_features = weight.shape
    x2 = x.reshape(-1, in_features).contiguous()
    y = torch.empty(x2.shape[0], out_features, dtype=torch.bfloat16)
    code = lib.linear_amx(x2.data_ptr(), weight.data_ptr(), y.data_ptr(), x2.shape[0], in_features, out_features,
                          torch.get_num_threads() if threads is None else threads)
    if code == -3:
        raise CpuKernelError("linear_amx: this build or process has no AMX tiles")
    if code:
        raise MemoryError(f"linear_amx: no memory for a thread's buffers ({in_features} inputs)")
    return y.view(*x.shape[:-1], out_features)


def experts_rows(x: torch.Tensor, token: torch.Tensor, counts: list[int], w1: object, w3: object, w2: object,
                 threads: int | None = None) -> torch.Tensor | None:
    """Every expert's SwiGLU (moe.swiglu, rounded as it rounds in bf16) over the rows routed to it, in one call on
    AMX tiles (cpu_gemv.c: experts_amx): expert e takes the counts[e] rows of x that token names from
    start_e = sum(counts[:e]) on, and its results are rows start_e .. of the output.  For experts
    :func:`experts_rows_apply` accepts; None (nothing computed) where an expert with rows has weights of another
    kind or shape than the first's.  x: (tokens, dim) bf16; token: (sum(counts),) int64 -> (sum(counts), dim)."""
    lib = _checked_library()
    n_experts, dim = len(counts), x.shape[1]
    hidden = (w1 if isinstance(w1, torch.Tensor) and w1.dim() == 3 else w1[0]).shape[-2]
    x = x.contiguous()
    token = token.to(torch.int64).contiguous()
    total = sum(counts)
    if token.shape != (total,) or min(counts, default=0) < 0 or len(counts) != len(w1):
        raise ValueError(f"experts_rows: {tuple(token.shape)} rows for counts summing to {total} over "
                         f"{len(counts)} experts ({len(w1)} weights)")
    if total and not 0 <= int(token.min()) <= int(token.max()) < x.shape[0]:
        raise ValueError(f"experts_rows: a row index outside x's {x.shape[0]} rows")
    counts_t = torch.tensor(counts, dtype=torch.int64)
    pointers = [_expert_pointers(w, counts, shape)
                for w, shape in ((w1, (hidden, dim)), (w3, (hidden, dim)), (w2, (dim, hidden)))]
    if any(p is None for p in pointers):
        return None
    y = torch.empty(total, dim, dtype=torch.bfloat16)
    code = lib.experts_amx(x.data_ptr(), token.data_ptr(), counts_t.data_ptr(), n_experts, *pointers, hidden, dim,
                           y.data_ptr(), torch.get_num_threads() if threads is None else threads)
    if code == -3:
        raise CpuKernelError("experts_rows: this build or process has no AMX tiles (experts_rows_apply says so)")
    _done(code, total, dim)
    return y


def prompt_attention_amx_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`prompt_attention_amx` takes these queries, keys and values: bf16 on a CPU whose AMX tiles this
    process may use, no autograd; q (B, T, heads, d), k (B, S, kv_heads, d), v (B, S, kv_heads, dv) with T <= S,
    d a multiple of 32, dv of 16, whole groups of query heads."""
    lib = library()
    return (lib is not None and bool(lib.cpu_gemv_amx()) and q.ndim == 4 and k.ndim == 4 and v.ndim == 4
            and q.dtype == k.dtype == v.dtype == torch.bfloat16
            and q.device.type == k.device.type == v.device.type == "cpu"
            and q.shape[0] == k.shape[0] == v.shape[0] and 0 < q.shape[1] <= k.shape[1] == v.shape[1]
            and k.shape[2] == v.shape[2] > 0 and q.shape[2] % k.shape[2] == 0 and q.shape[3] == k.shape[3]
            and q.shape[3] % 32 == 0 and v.shape[3] % 16 == 0
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))


def prompt_attention_amx(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None,
                         scale: float | None = None, threads: int | None = None) -> torch.Tensor:
    """Causal attention of T queries at positions S - T .. S - 1 over their S keys (a prompt, or a later chunk of it
    after the earlier chunks' keys), query p seeing keys 0 .. p (the last `window` of them if window is set), on
    AMX tiles (cpu_gemv.c: attention_amx, flash attention: the roundings of a fused kernel, within bf16 rounding of
    attention.attention).  scale: of the scores (None: d ** -0.5).  For inputs
    :func:`prompt_attention_amx_applies` accepts.
    q: (B, T, heads, d); k: (B, S, kv_heads, d); v: (B, S, kv_heads, dv) -> (B, T, heads, dv) bf16."""
    lib = _checked_library()
    if not prompt_attention_amx_applies(q, k, v):
        raise ValueError(f"prompt_attention_amx: q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}, v "
                         f"{tuple(v.shape)} {v.dtype} are not bf16 queries, keys and values it takes on this CPU")
    B, T, H, D = q.shape
    S, kv_heads, Dv = k.shape[1], k.shape[2], v.shape[3]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(B, T, H, Dv, dtype=torch.bfloat16)
    code = lib.attention_amx(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), B, T, S, H, kv_heads, D, Dv,
                             0 if window is None else int(window), D ** -0.5 if scale is None else float(scale),
                             torch.get_num_threads() if threads is None else threads)
    if code == -3:
        raise CpuKernelError("prompt_attention_amx: this build or process has no AMX tiles")
    if code:
        raise MemoryError(f"prompt_attention_amx: no memory for the keys and values laid out for the tiles "
                          f"({B} x {S} keys x {kv_heads} heads)")
    return out


def rms_norm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True if the "torch" backend sends norm.rms_norm(x, weight, eps) to :func:`rms_norm`: bf16 rows on a CPU
    (:func:`_rms_norm_fits`).  fp32 stays with F.rms_norm, bitwise the reference's fp32 sums: the C loop's
    other order of the sum of squares moves a norm by ~1e-7, which the layers of a random test model amplify past
    the 1e-5 the fp32 parity tests allow; in bf16 the normalised row's rounding hides it."""
    return x.dtype is torch.bfloat16 and _rms_norm_fits(x, weight)


def _rms_norm_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Rows of x on a CPU, x and weight (dim,) both bf16 or both fp32, no autograd."""
    return (x.dtype in _FLOATS and weight.dtype is x.dtype and x.is_cpu and weight.is_cpu and weight.ndim == 1
            and x.ndim >= 1 and weight.shape[0] == x.shape[-1] > 0
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, checked: bool = False,
             threads: int | None = None) -> torch.Tensor:
    """norm.rms_norm for rows of bf16 or fp32 (:func:`_rms_norm_fits`) in one C call (cpu_gemv.c: rms_norm_rows,
    and rms_norm_prompt, the same bits, for more than RMS_NORM_ROWS rows, split among `threads`, default
    torch.get_num_threads()): the reference's roundings in x's dtype, its sums in another order (fp32: within
    1e-6).  checked: the caller has just asked :func:`rms_norm_applies` (a decode step asks once, not twice).
    x: (..., dim) -> (..., dim)"""
    lib = _checked_library()
    if not (checked or _rms_norm_fits(x, weight)):
        raise ValueError(f"rms_norm: x {tuple(x.shape)} {x.dtype} and weight {tuple(weight.shape)} {weight.dtype} "
                         f"are not rows of bf16 or fp32 with their (dim,) weight on the CPU")
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)
    dim = x.shape[-1]
    rows, io_bf16 = x.numel() // dim, int(x.dtype == torch.bfloat16)
    if rows <= RMS_NORM_ROWS:
        lib.rms_norm_rows(x.data_ptr(), weight.data_ptr(), out.data_ptr(), io_bf16, rows, dim, eps)
    else:
        lib.rms_norm_prompt(x.data_ptr(), weight.data_ptr(), out.data_ptr(), io_bf16, rows, dim, eps,
                            threads or torch.get_num_threads())
    return out


def rope_applies(x: torch.Tensor, rotations: torch.Tensor) -> bool:
    """True if backends/rope.py's apply_rotary_emb_complex(x, rotations) is one :func:`rope` takes: x (B, T, H, D)
    bf16 or fp32 on a CPU, each token's heads contiguous and the tokens evenly apart (:func:`_token_stride`: x
    contiguous, or the queries or keys of a joint product's output), rotations (B, T, D/2) complex64
    (rope_rotations' table), no autograd."""
    return (x.ndim == 4 and x.dtype in _FLOATS and x.is_cpu and _token_stride(x) is not None and x.shape[-1] % 2 == 0
            and rotations.dtype is torch.complex64 and rotations.is_cpu
            and tuple(rotations.shape) == (*x.shape[:2], x.shape[-1] // 2)
            and not (torch.is_grad_enabled() and x.requires_grad))


def rope(x: torch.Tensor, rotations: torch.Tensor, threads: int | None = None, checked: bool = False) -> torch.Tensor:
    """apply_rotary_emb_complex(x, rotations) (backends/rope.py) in one C call (cpu_gemv.c: rope_prompt), tokens
    split among `threads` (default torch.get_num_threads()): the same fp32 products, added without a fused
    multiply-add and rounded to x's dtype, as torch's complex multiplication.  x must satisfy
    :func:`rope_applies` (checked: the caller has just asked it).  x (B, T, H, D) -> (B, T, H, D) in x's dtype"""
    lib = _checked_library()
    if not (checked or rope_applies(x, rotations)):
        raise ValueError(f"rope: x {tuple(x.shape)} {x.dtype} and rotations {tuple(rotations.shape)} "
                         f"{rotations.dtype} are not contiguous bf16 or fp32 heads with their (B, T, D/2) complex64 "
                         f"rotations on the CPU")
    table = torch.view_as_real(rotations.contiguous())  # (B, T, D/2, 2): (cos, sin) of each pair
    B, T, H, D = x.shape
    out = torch.empty(B, T, H, D, dtype=x.dtype)
    lib.rope_prompt(x.data_ptr(), out.data_ptr(), int(x.dtype == torch.bfloat16), B * T, H, D, table.data_ptr(),
                    _token_stride(x), threads or torch.get_num_threads())
    return out


def positions_apply(q_pos: torch.Tensor, k_pos: torch.Tensor | None = None) -> bool:
    """Whether :func:`causal_span` (q_pos and k_pos) or :func:`consecutive_rows` (q_pos alone) reads these
    positions: (B, T) and (B, S) int64 tensors, contiguous, on the CPU, with the kernels loaded."""
    return (library() is not None and all(p.dtype is torch.int64 and p.dim() == 2 and p.is_cpu and p.is_contiguous()
                                          for p in (q_pos, q_pos if k_pos is None else k_pos))
            and (k_pos is None or k_pos.shape[0] == q_pos.shape[0]))


def causal_span(q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[int, int] | None:
    """prompt_attention.causal_span's answer in one C call (cpu_gemv.c: causal_span) instead of a dozen tensor
    operations (a prompt asks it once a layer), for positions :func:`positions_apply` takes."""
    found = (ctypes.c_int64 * 2)()
    B, T = q_pos.shape
    if _checked_library().causal_span(q_pos.data_ptr(), k_pos.data_ptr(), B, T, k_pos.shape[1], found):
        return None
    return int(found[0]), int(found[1])


def consecutive_rows(positions: torch.Tensor) -> int | None:
    """p where every row of positions (B, T) holds p .. p + T - 1 (p >= 0), else None: one C call, for positions
    :func:`positions_apply` takes."""
    first = _checked_library().consecutive_rows(positions.data_ptr(), *positions.shape)
    return None if first < 0 else int(first)


def _token_stride(x: torch.Tensor) -> int | None:
    """Values from one token's heads to the next token's in x (B, T, H, D), where each token's H x D values are
    contiguous and the B x T tokens evenly apart (x contiguous: H x D); else None."""
    B, T, H, D = x.shape
    if x.stride(3) != 1 or (H > 1 and x.stride(2) != D) or min(x.shape) == 0:
        return None
    step = x.stride(1) if T > 1 else x.stride(0) if B > 1 else H * D
    return step if step >= H * D and (B == 1 or T == 1 or x.stride(0) == T * step) else None


def swiglu_applies(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """True if :func:`swiglu` takes F.silu(gate) * up: gate and up of one shape, contiguous, bf16 on a CPU, no
    autograd.  (fp32 stays with torch's SiLU: the C exp may differ from it in fp32's last bit, which the fp32 parity
    tests would see; bf16's rounding of SiLU hides it but for a rare one-step difference.)"""
    return (gate.dtype is torch.bfloat16 and up.dtype is torch.bfloat16 and gate.shape == up.shape
            and gate.is_cpu and up.is_cpu and gate.is_contiguous() and up.is_contiguous()
            and not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)))


def swiglu(gate: torch.Tensor, up: torch.Tensor, in_place: bool = False, threads: int | None = None,
           checked: bool = False) -> torch.Tensor:
    """F.silu(gate) * up (SwiGLU's hidden activations, moe.swiglu) in one C pass (cpu_gemv.c: silu_mul), SiLU and
    the product each rounded to bf16 as torch rounds them, shares of the values split among `threads` (default
    torch.get_num_threads()).  in_place: written into gate's memory (a caller that no longer needs gate) instead
    of a new tensor.  gate, up: (..., hidden) satisfying :func:`swiglu_applies` (checked: the caller has just asked
    it) -> (..., hidden)"""
    lib = _checked_library()
    if not (checked or swiglu_applies(gate, up)):
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} are not "
                         f"contiguous bf16 tensors of one shape on the CPU")
    out = gate if in_place else torch.empty_like(gate)
    lib.silu_mul(gate.data_ptr(), up.data_ptr(), out.data_ptr(), 1, gate.numel(), threads or torch.get_num_threads())
    return out


# ---- attention of one query per row (a decode step) -----------------------------------------------------------

def attention_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True if attention.attention(q, k, v, ...) is one these kernels take: one query per row (q (B, 1, H, D)),
    on a CPU, q, k and v all bf16 or all fp32, whole groups of query heads per key-value head, no autograd."""
    return (q.ndim == 4 and q.shape[1] == 1 and k.ndim == 4 and q.device.type == "cpu" and k.device.type == "cpu"
            and v.device.type == "cpu" and q.dtype in _FLOATS and k.dtype is q.dtype and v.dtype is q.dtype
            and k.shape[2] > 0 and q.shape[2] % k.shape[2] == 0 and k.shape == v.shape and k.shape[3] == q.shape[3]
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
              window: int | None, threads: int | None = None) -> torch.Tensor:
    """attention.attention for one query per row (:func:`attention_applies`) in one C call (cpu_gemv.c,
    attend_one): q (B, 1, H, D), k, v (B, S, kv_heads, D), q_pos (B, 1), k_pos (B, S) -> (B, 1, H, D); as an
    operator inside a graph."""
    threads = torch.get_num_threads() if threads is None else threads
    window = -1 if window is None else window
    if _as_operator():
        return torch.ops.mistral_ref.attend_one(q, k, v, q_pos, k_pos, window, threads)
    return attend_one(q, k, v, q_pos, k_pos, window, threads)


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
               window: int, threads: int) -> torch.Tensor:
    """:func:`attention` through ctypes (window -1: none)."""
    lib = _checked_library()
    q, k, v, q_pos, k_pos = (t.contiguous() for t in (q, k, v, q_pos, k_pos))
    if not (attention_applies(q, k, v) and q_pos.shape == (q.shape[0], 1) and k_pos.shape == k.shape[:2]
            and q_pos.dtype is torch.int64 and k_pos.dtype is torch.int64 and q.shape[0] == k.shape[0]
            and q_pos.is_cpu and k_pos.is_cpu and window >= -1):
        raise ValueError(f"attend_one: arguments that do not fit: q {tuple(q.shape)} {q.dtype}, k / v "
                         f"{tuple(k.shape)} {k.dtype} / {tuple(v.shape)} {v.dtype}, q_pos {tuple(q_pos.shape)} "
                         f"{q_pos.dtype}, k_pos {tuple(k_pos.shape)} {k_pos.dtype}, window {window}")
    out = torch.empty_like(q)
    B, S, kv_heads, D = k.shape
    if lib.attend_one(q.data_ptr(), k.data_ptr(), v.data_ptr(), k_pos.data_ptr(), q_pos.data_ptr(), window,
                      out.data_ptr(), int(q.dtype == torch.bfloat16), B, S, q.shape[2], kv_heads, D, threads):
        raise MemoryError(f"attend_one: no memory for the scores of {B} x {q.shape[2]} heads x {S} slots")
    return out


# ---- the same products as operators, for compiled decode steps ----------------------------------------------
# (torch.library.Library rather than the custom_op decorator, whose Python wrapper costs several times more per
# call: README, "Speed on a CPU").  The Python functions above serve them under CompositeExplicitAutograd; the C++
# kernels of cpu_gemv_ops.cpp, once built and loaded (:func:`operators`), register for the CPU key, which the
# dispatcher prefers: a compiled step then calls them without Python, with no recompilation.

_PYTHON_KEY = "CompositeExplicitAutograd"
_OPS = torch.library.Library("mistral_ref", "DEF")
_OPS.define("gemv_float(Tensor x, Tensor weight, int threads) -> Tensor")
_OPS.define("gemv_quantized(Tensor x, Tensor qweight, Tensor scales, int group_size, int threads) -> Tensor")
_OPS.define("gemv_bf16_experts(Tensor x, Tensor weights, Tensor index, int threads) -> Tensor")
_OPS.impl("gemv_float", gemv_float, _PYTHON_KEY)
_OPS.impl("gemv_bf16_experts", gemv_bf16_experts, _PYTHON_KEY)
_OPS.define("gemv_quantized_experts(Tensor x, Tensor qweight, Tensor scales, Tensor index, int group_size, "
            "int threads) -> Tensor")
_OPS.impl("gemv_quantized_experts", gemv_quantized_experts, _PYTHON_KEY)
_OPS.impl("gemv_quantized", gemv_quantized, _PYTHON_KEY)
_OPS.define("swiglu_float_experts(Tensor x, Tensor w1, Tensor w3, Tensor w2, Tensor index, Tensor weights, "
            "int threads) -> Tensor")
_OPS.impl("swiglu_float_experts", swiglu_float_experts, _PYTHON_KEY)
_OPS.define("swiglu_quantized_experts(Tensor x, Tensor q1, Tensor s1, Tensor q3, Tensor s3, Tensor q2, Tensor s2, "
            "Tensor index, Tensor weights, int group_size, int threads) -> Tensor")
_OPS.impl("swiglu_quantized_experts", swiglu_quantized_experts, _PYTHON_KEY)
_OPS.define("moe_float_experts(Tensor x, Tensor gate_weight, Tensor w1, Tensor w3, Tensor w2, int top_k, "
            "int threads) -> (Tensor, Tensor)")
_OPS.impl("moe_float_experts", moe_float_experts, _PYTHON_KEY)
_OPS.define("moe_quantized_experts(Tensor x, Tensor gate_weight, Tensor q1, Tensor s1, Tensor q3, Tensor s3, "
            "Tensor q2, Tensor s2, int top_k, int group_size, int threads) -> (Tensor, Tensor)")
_OPS.impl("moe_quantized_experts", moe_quantized_experts, _PYTHON_KEY)
_OPS.define("gemv_float_many(Tensor x, Tensor[] weights, int threads) -> Tensor[]")
_OPS.impl("gemv_float_many", gemv_float_many, _PYTHON_KEY)
_OPS.define("gemv_quantized_many(Tensor x, Tensor[] qweights, Tensor[] scales, int group_size, int threads) "
            "-> Tensor[]")
_OPS.impl("gemv_quantized_many", gemv_quantized_many, _PYTHON_KEY)
_OPS.define("attend_one(Tensor q, Tensor k, Tensor v, Tensor q_pos, Tensor k_pos, int window, int threads) -> Tensor")
_OPS.impl("attend_one", attend_one, _PYTHON_KEY)
# a whole decode step (backends/decode_step.py): C++ only, no Python form (eager decoding calls it only once the
# operators' C++ kernels are loaded); it writes every layer's cache
_OPS.define("decode_model(Tensor tokens, Tensor position, Tensor rot, Tensor[] weights, int[] layout, float[] scalars, "
            "Tensor(a!)[] caches, bool fold, int threads) -> Tensor")


@torch.library.register_fake("mistral_ref::gemv_float", lib=_OPS)
def _(x, weight, threads):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.register_fake("mistral_ref::gemv_quantized", lib=_OPS)
def _(x, qweight, scales, group_size, threads):
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.register_fake("mistral_ref::gemv_bf16_experts", lib=_OPS)
def _(x, weights, index, threads):
    return x.new_empty(index.shape[0], weights.shape[1])


@torch.library.register_fake("mistral_ref::gemv_quantized_experts", lib=_OPS)
def _(x, qweight, scales, index, group_size, threads):
    return x.new_empty(index.shape[0], qweight.shape[1])


@torch.library.register_fake("mistral_ref::swiglu_float_experts", lib=_OPS)
def _(x, w1, w3, w2, index, weights, threads):
    return x.new_empty(1, w2.shape[1])


@torch.library.register_fake("mistral_ref::swiglu_quantized_experts", lib=_OPS)
def _(x, q1, s1, q3, s3, q2, s2, index, weights, group_size, threads):
    return x.new_empty(1, q2.shape[1])


@torch.library.register_fake("mistral_ref::moe_float_experts", lib=_OPS)
def _(x, gate_weight, w1, w3, w2, top_k, threads):
    return x.new_empty(1, w2.shape[1]), x.new_empty(1, gate_weight.shape[0], dtype=torch.float32)


@torch.library.register_fake("mistral_ref::moe_quantized_experts", lib=_OPS)
def _(x, gate_weight, q1, s1, q3, s3, q2, s2, top_k, group_size, threads):
    return x.new_empty(1, q2.shape[1]), x.new_empty(1, gate_weight.shape[0], dtype=torch.float32)


@torch.library.register_fake("mistral_ref::gemv_float_many", lib=_OPS)
def _(x, weights, threads):
    return [x.new_empty(x.shape[0], w.shape[0]) for w in weights]


@torch.library.register_fake("mistral_ref::gemv_quantized_many", lib=_OPS)
def _(x, qweights, scales, group_size, threads):
    return [x.new_empty(x.shape[0], q.shape[0]) for q in qweights]


@torch.library.register_fake("mistral_ref::attend_one", lib=_OPS)
def _(q, k, v, q_pos, k_pos, window, threads):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
