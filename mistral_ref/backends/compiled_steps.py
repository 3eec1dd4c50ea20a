"""Compiled decode steps kept on disk and compiled off the critical path (used by backends/compiled.py).

A compiled step is the code torch.compile generates for one function at one set of input shapes: a transformer
block's decode step, the output head, or the whole decode pass.  This module keeps each one in three places:

* in memory (:class:`StepCache`), keyed by everything the compiled code assumes about its inputs: the source of
  mistral_ref, torch's version, the CPU's vector instructions, the thread count, and the class, plain attributes,
  and every tensor's shape, strides, dtype and device of every argument (modules and caches included).  A loaded
  step checks few of these itself (in a probe it ran on a KV cache of another capacity without complaint), so the
  key must say them all;
* on disk, as an ahead-of-time compiled artifact (``torch.compile(fn, fullgraph=True).aot_compile``, written with
  ``save_compiled_function``) in ``<compile cache>/steps/<name>-<hash of the key>.bin``: a later start loads it
  (0.1-0.8 s once the compiler is imported) instead of tracing and compiling again.  The artifact is serialized
  Python objects (pickle inside torch's format), so it is read only from this user's cache directory (created
  0700), only if the file belongs to this user and nobody else may write it; never from a checkpoint's directory;
* or, for a function dynamo cannot capture whole (a graph break: the MoE dispatch of several tokens runs eagerly),
  a plain ``torch.compile`` in memory, rebuilt at every start.

Compiling in the background (``StepCache(background=True)``): a step that is not ready is queued for one worker
thread and the caller runs the eager step (the same numbers: every compiled function is tested equal to the
reference) until it is; so a new shape never stalls decoding.  A failure to compile is logged and the shape stays
eager.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("mistral_ref.compile")

_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device)


def describe(obj: Any, depth: int = 0) -> Any:
    """What compiled code may assume about an argument, as nested tuples of plain values: a tensor's shape,
    strides, dtype, device and storage offset; a module's class, plain attributes, parameters, buffers and
    children; another object's class and its attributes (a cache layer); sequences element by element."""
    if depth > 8:
        raise ValueError("describe: nested too deeply")
    if isinstance(obj, torch.Tensor):  # (the first test: this runs for every tensor argument of every step)
        return ("T", obj.shape, obj.stride(), obj.dtype, obj.device, obj.storage_offset(), obj.requires_grad)
    if isinstance(obj, _PLAIN):
        return obj
    if isinstance(obj, (os.PathLike, enum.Enum)):
        return repr(obj)
    if isinstance(obj, (tuple, list)):
        return (type(obj).__name__, tuple(describe(x, depth + 1) for x in obj))
    if isinstance(obj, dict):
        return ("dict", tuple((k, describe(v, depth + 1)) for k, v in sorted(obj.items())))
    if isinstance(obj, nn.Module):
        attrs = tuple((k, describe(v, depth + 1)) for k, v in sorted(vars(obj).items())
                      if not k.startswith("_") and (isinstance(v, (*_PLAIN, tuple)) or dataclasses.is_dataclass(v)))
        tensors = tuple((k, describe(v)) for k, v in (*obj._parameters.items(), *obj._buffers.items()))
        children = tuple((k, describe(m, depth + 1)) for k, m in obj._modules.items())
        return (type(obj).__qualname__, attrs, tensors, children)
    if hasattr(obj, "__dict__"):
        return (type(obj).__qualname__,
                tuple((k, describe(v, depth + 1)) for k, v in sorted(vars(obj).items()) if not k.startswith("_")))
    if callable(obj):
        return getattr(obj, "__qualname__", repr(obj))
    raise TypeError(f"describe: cannot describe a {type(obj).__name__} argument of a compiled step")


MEMO = "_compiled_description"  # where described() keeps an object's description (not described itself)


def described(obj: Any) -> str:
    """A digest of describe(obj) for an argument passed at every step that is neither a tensor nor a module (a KV
    cache, a layer's cache), remembered on the object: describing a cache of 8 layers and comparing that
    description inside a step's key took ~130 us a step (one-off, Mixtral-140M), the step itself ~2-5 ms.  It is
    computed again when an attribute of the object, or of an object in a list or tuple attribute (a cache's
    layers), is replaced by another object: the memo keeps the values it was computed from (so their ids are not
    reused) and compares their ids.  A tensor resized in place (resize_, set_) is not noticed; caches never are."""
    values = _public_values(obj)
    ids = list(map(id, values))
    memo = obj.__dict__.get(MEMO)
    if memo is not None and memo[1] == ids:
        return memo[2]
    digest = hashlib.sha256(repr(describe(obj)).encode()).hexdigest()
    obj.__dict__[MEMO] = (values, ids, digest)
    return digest


def _public_values(obj: Any) -> list:
    """The public attributes of obj, and of the objects in its list or tuple attributes (with their lengths)."""
    values = [v for k, v in obj.__dict__.items() if k[0] != "_"]
    for v in tuple(values):
        if type(v) is list or type(v) is tuple:
            values.append(len(v))
            for item in v:
                d = getattr(item, "__dict__", None)
                if d is not None:
                    values += [x for k, x in d.items() if k[0] != "_"]
    return values


_source_digest: str | None = None


def source_digest() -> str:
    """sha256 of every .py file of the mistral_ref package: an edit to the model code invalidates saved steps."""
    global _source_digest
    if _source_digest is None:
        package = Path(__file__).resolve().parent.parent
        h = hashlib.sha256()
        for path in sorted(package.rglob("*.py")):
            h.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
        _source_digest = h.hexdigest()
    return _source_digest


def disk_name(name: str, key: tuple, backend: str) -> str:
    """The file name of a saved step: a hash of `key` (the step's description, see StepCache.get) and of what
    the generated code depends on besides its inputs: the compiler backend, torch, the mistral_ref source, the
    CPU's vector ISA."""
    env = (backend, torch.__version__, source_digest(), torch.backends.cpu.get_cpu_capability())
    return f"{name}-{hashlib.sha256(repr((name, key, env)).encode()).hexdigest()[:40]}.bin"


def trusted(path: Path) -> bool:
    """A saved step may be loaded: a regular file of this user's that no one else can write."""
    try:
        st = path.stat()
    except OSError:
        return False
    if not path.is_file() or st.st_mode & 0o022:
        return False
    return not hasattr(os, "getuid") or st.st_uid == os.getuid()


def global_state() -> tuple:
    """The process-wide settings a compiled step's code may depend on besides its arguments (what dynamo's global
    state guard checks): part of every step's key (with grad and inference mode, which the caller adds)."""
    return (torch.get_num_threads(), torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(),
            torch.is_autocast_enabled("cpu"))


class GuardedOnce:
    """An ahead-of-time compiled step whose dynamo guards run at its first call only.

    A saved step carries dynamo's guards: checks of every argument (each weight of a whole model: its shape,
    strides, dtype, ...) run before every call, ~0.1-0.4 ms a decode step here.  The step's key in a
    StepCache (describe() of every argument, global_state(), grad and inference mode) states what the guards
    check; equal keys give equal guard results.  So the guards run once, at the first call (a loaded file that
    does not fit these arguments fails there, loudly), and the key is the guard afterwards."""

    def __init__(self, step: Callable):
        self.step, self.checked = step, False

    def __call__(self, *args: Any) -> Any:
        out = self.step(*args)
        if not self.checked:
            disable = getattr(self.step, "disable_guard_check", None)  # (torch releases without it: keep them)
            if disable is not None:
                disable()
            self.checked = True
        return out


class StepCache:
    """Compiled steps by key: in memory, on disk under `directory` (None: memory only), compiled in the
    foreground or by one background thread.

    setup() runs once before the first compilation.  get(key, name, fn, example_args) returns the compiled
    function of `fn` for arguments like `example_args`, or None while a background compilation of it is
    pending.  `key` is a hashable description of everything the compiled code may assume (describe() of the
    arguments, the caller's fixed settings, the grad / inference mode): steps are looked up by it in memory,
    and by disk_name(name, key, backend) on disk.  `backend` is torch.compile's ("inductor"; the tests use
    "eager", whose steps are saved and loaded the same way).
    """

    def __init__(self, directory: Path | None, backend: str = "inductor", background: bool = False,
                 setup: Callable[[], None] | None = None):
        self.directory = directory / "steps" if directory is not None else None
        self.backend, self.background = backend, background
        self.steps: dict[tuple, Callable] = {}
        self.failed: dict[tuple, str] = {}  # key -> why it stays eager
        self.events: list[tuple[str, str, float, float]] = []  # (name, "loaded" | ..., seconds, perf_counter at end)
        self.started = time.perf_counter()
        self._pending: set[tuple] = set()
        self._lock = threading.Lock()
        self._queue: queue.Queue | None = None
        self._setup = setup  # run once, before the first compilation (in the thread that compiles)

    def get(self, key: tuple, name: str, fn: Callable, example_args: Callable[[], tuple]) -> Callable | None:
        """The compiled `fn` for `key`; example_args() gives arguments of the right kind to compile with (in the
        background: fresh tensors, not the live cache).  None: not ready yet (background) or failed (eager)."""
        step = self.steps.get(key)
        if step is not None or key in self.failed:
            return step
        if not self.background:
            self._build(key, name, fn, example_args())
            return self.steps.get(key)
        with self._lock:
            if key not in self._pending:
                self._pending.add(key)
                self._worker().put((key, name, fn, example_args()))
        return None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every queued compilation is done (True) or `timeout` seconds pass (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._pending:
                    return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    def summary(self, since: int = 0) -> str:
        """What happened to the steps built since events[since]: e.g. "loaded", "compiled and saved",
        "1 loaded, 1 compiled and saved"; "in memory" if none was built (all were there already)."""
        counts: dict[str, int] = {}
        for _, what, _, _ in self.events[since:]:
            counts[what] = counts.get(what, 0) + 1
        if not counts:
            return "failed: runs eagerly" if self.failed else "in memory"
        if len(counts) == 1:
            return next(iter(counts))
        return ", ".join(f"{n} {what}" for what, n in counts.items())

    def _worker(self) -> queue.Queue:
        if self._queue is None:
            self._queue = queue.Queue()
            threading.Thread(target=self._run, name="mistral-ref-compile", daemon=True).start()
        return self._queue

    def _run(self) -> None:
        while True:
            key, name, fn, args = self._queue.get()
            try:
                with torch.inference_mode():  # as decoding runs (a thread-local mode)
                    self._build(key, name, fn, args)
            finally:
                with self._lock:
                    self._pending.discard(key)

    def _build(self, key: tuple, name: str, fn: Callable, args: tuple) -> None:
        """Load the saved step, else compile it (ahead of time, saved; or a plain torch.compile if it has a
        graph break), else record why it stays eager."""
        t0 = time.perf_counter()
        if self._setup is not None:
            self._setup()
            self._setup = None
        path = None if self.directory is None else self.directory / disk_name(name, key, self.backend)
        try:
            if path is not None and trusted(path):
                try:
                    with open(path, "rb") as f:
                        self.steps[key] = GuardedOnce(torch.compiler.load_compiled_function(f))
                    self._record(name, "loaded", t0)
                    return
                except Exception as e:  # noqa: BLE001 — a stale or damaged file: compile it again
                    log.warning("compiled step %s: could not load %s (%s: %s); compiling it again", name, path,
                                type(e).__name__, e)
            compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend=self.backend)
            try:
                step = compiled.aot_compile((args, {}))
            except torch._dynamo.exc.Unsupported as e:  # a graph break: dynamo's guarded compile, in memory
                log.info("compiled step %s: not captured whole (%s); compiled in memory only", name,
                         str(e).splitlines()[0])
                step = torch.compile(fn, dynamic=False, backend=self.backend)
                step(*args)  # compile now (in the background, not at the caller's next step)
                self.steps[key] = step
                self._record(name, "compiled (in memory)", t0)
                return
            if path is not None:
                self._save(step, path)
            self.steps[key] = GuardedOnce(step)
            self._record(name, "compiled" if path is None else "compiled and saved", t0)
        except Exception as e:  # noqa: BLE001 — this shape stays eager; the reason is kept and logged
            self.failed[key] = f"{type(e).__name__}: {e}"
            log.warning("compiled step %s failed to compile (%s); it runs eagerly", name, self.failed[key])

    def _save(self, step, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            step.save_compiled_function(str(tmp))
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)  # atomic: another process never reads half a file
        except Exception as e:  # noqa: BLE001 — not saved: this start still uses the compiled step
            log.warning("compiled step: could not save %s (%s: %s)", path, type(e).__name__, e)
            tmp.unlink(missing_ok=True)

    def _record(self, name: str, what: str, t0: float) -> None:
        self.events.append((name, what, time.perf_counter() - t0, time.perf_counter()))
        log.info("compiled step %s: %s in %.2f s", name, what, time.perf_counter() - t0)
