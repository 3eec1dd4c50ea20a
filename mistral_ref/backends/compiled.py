"""Compiled decoding: the decode step (one token per row, with a KV cache) through torch.compile, built from
compile-friendly versions of the "torch" backend's functions.

Two ways to compile (compile_decode's `mode`):
* "regional" (default): one TransformerBlock's decode step is compiled once and the same compiled code runs every
  layer (the weights, the layer's cache and the activations are the graph's inputs: layers of the same shape and
  window share one graph); the output head (final norm + vocabulary projection) is a second small graph in
  bf16/fp16 (one product, eager in fp32); the embedding and the RoPE table run eagerly.  Compiling is a block's
  work, not n_layers blocks', and inductor's on-disk caches (compile_cache.py) make a second start warm.
* "full": the whole forward pass as one graph (freeze=True makes the weights constants of the compiled code).
  Slightly less Python per step, but compiling takes a minute or more on a small CPU.
Every step of a request has the same shapes (batch, cache capacity) and passes positions as tensors, so all steps
reuse the compiled code; a new batch size or cache capacity compiles again, which is why generation rounds the
cache capacity up to a power of two (CompiledDecode.capacity): a chat's turns fall into a few sizes.

What differs from "torch":
* linear: the thread count of split_linear is fixed when compiling (torch.get_num_threads() inside a graph breaks
  it); the products the C kernels take (backends/cpu_gemv.py: bf16 / int8 / int4 weights, a few rows; fp32, one
  row) call them as operators (torch.ops.mistral_ref.*), decided when compiling (cpu_kernels); without them a
  one-row bf16/fp16 product on a CPU without native support is multiply-and-sum, which inductor turns into one
  loop that converts weights as they stream; linears (several products of one input) is one operator call where
  the kernels take all of them;
* rope: real cos/sin (the reference functions): inductor has no complex arithmetic;
* attention: one query per row goes to the C kernel's operator (cpu_gemv.attention: the keys the query sees,
  nothing else) where the kernels are loaded, else the reference math, which fuses (the SDPA kernel's fixed cost
  dominates);
* update_cache: the masked scatter of LayerCache.write_one (no host reads inside the graph);
* moe (and mix_experts, the fine-grained layers' form): a single token gathers its k experts from the stacked
  weights inside the graph (moe_one_token / mix_one_token; with the C kernels mix_one_token_gemv, one operator
  call per product for the k experts, bf16 stacked or quantized ones); more tokens run the grouped dispatch
  eagerly (it reads expert counts on the host: a graph break).
Each of these equals the reference function; tests/test_backends.py checks the eager versions and
tests/test_compile.py the compiled steps (with a cheap backend); `make bench` times them.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from mistral_ref.attention import at_rows, attention
from mistral_ref.backends import Backend, cpu_gemv, get_backend, huge_pages
from mistral_ref.backends.compile_cache import use_compile_cache
from mistral_ref.backends.compiled_steps import MEMO, StepCache, describe, described, global_state
from mistral_ref.backends.linear import linear, multiply_sum_linear, split_pays, upcast_on_cpu
from mistral_ref.backends.moe import (
    gemv_experts_apply,
    mix_experts_grouped,
    mix_one_token,
    mix_one_token_gemv,
    moe_forward_grouped,
    moe_one_token,
    stack_all_experts,
)
from mistral_ref.backends.pytorch import rms_norm_torch
from mistral_ref.backends.reference import rotate
from mistral_ref.backends.sdpa import sdpa_attention
from mistral_ref.cache import KVCache, LayerCache
from mistral_ref.moe import swiglu
from mistral_ref.rope import rope_angles

if TYPE_CHECKING:  # typing only: the model imports this module, not the other way round
    from mistral_ref.model import Transformer


def compiled_linear(x: torch.Tensor, weight: torch.Tensor, threads: int, cpu_kernels: bool = False) -> torch.Tensor:
    """backends.linear.linear with a fixed thread count: the C kernels' custom ops where they take the product
    (cpu_kernels: they could be loaded, decided before tracing), else multiply-and-sum for one reduced-precision
    row (quantized weights: the weight-only kernels of backends/quant.py, as eagerly)."""
    if cpu_kernels and cpu_gemv.applies(x, weight):
        return cpu_gemv.gemv(x, weight, threads)
    if upcast_on_cpu(x) and x.numel() == x.shape[-1] and isinstance(weight, torch.Tensor):
        return multiply_sum_linear(x, weight)
    return linear(x, weight, threads)


def compiled_linears(x: torch.Tensor, weights: Sequence[torch.Tensor], threads: int,
                     cpu_kernels: bool = False) -> tuple[torch.Tensor, ...]:
    """backends.linear.linears with a fixed thread count: one operator call for all the products where the C
    kernels take each of them, else compiled_linear one weight at a time."""
    if cpu_kernels and cpu_gemv.applies_many(x, weights):
        return tuple(cpu_gemv.gemv_many(x, weights, threads))
    return tuple(compiled_linear(x, w, threads, cpu_kernels) for w in weights)


def compiled_attention(q, k, v, q_pos, k_pos, window, threads: int = 1, cpu_kernels: bool = False):
    """attention.attention for one query per row: the C kernel's operator where it takes it (cpu_gemv.attention),
    else the reference math (it fuses); sdpa_attention for more."""
    if q.shape[1] == 1 and cpu_kernels and cpu_gemv.attention_applies(q, k, v):
        return cpu_gemv.attention(q, k, v, q_pos, k_pos, window, threads)
    if q.shape[1] == 1:
        return attention(q, k, v, q_pos, k_pos, window)
    return sdpa_attention(q, k, v, q_pos, k_pos, window)


def compiled_moe(x: torch.Tensor, gate_weight: torch.Tensor, w1: Sequence[torch.Tensor] | torch.Tensor,
                 w2: Sequence[torch.Tensor] | torch.Tensor, w3: Sequence[torch.Tensor] | torch.Tensor, top_k: int,
                 threads: int = 1, cpu_kernels: bool = False):
    """moe_one_token for one token with stacked experts (its products on the C kernels where they take them);
    the grouped dispatch, run eagerly, otherwise."""
    if x.shape[0] == 1 and cpu_kernels and gemv_experts_apply(x, w1):
        return cpu_gemv.experts_moe(x, gate_weight, w1, w3, w2, top_k, threads)  # router and experts: one call
    if x.shape[0] == 1 and isinstance(w1, torch.Tensor):
        return moe_one_token(x, gate_weight, w1, w2, w3, top_k)
    return _eager_grouped(x, gate_weight, w1, w2, w3, top_k)


# data-dependent: a graph break (configure_compiler wraps these in torch.compiler.disable, which imports dynamo)
_eager_grouped = moe_forward_grouped


def compiled_mix_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                         w1: Sequence[torch.Tensor] | torch.Tensor, w2: Sequence[torch.Tensor] | torch.Tensor,
                         w3: Sequence[torch.Tensor] | torch.Tensor, threads: int = 1,
                         cpu_kernels: bool = False) -> torch.Tensor:
    """compiled_moe for a precomputed routing (fine_moe.py): mix_one_token (or mix_one_token_gemv) or the eager
    grouped mix."""
    if x.shape[0] == 1 and cpu_kernels and gemv_experts_apply(x, w1):
        return mix_one_token_gemv(x, weights, experts, w1, w2, w3, threads)
    if x.shape[0] == 1 and isinstance(w1, torch.Tensor):
        return mix_one_token(x, weights, experts, w1, w2, w3)
    return _eager_grouped_mix(x, weights, experts, w1, w2, w3)


_eager_grouped_mix = mix_experts_grouped


def compiled_update_cache(cache: LayerCache, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
    """cache.update without its host-side capacity check for a decode step (checked once per step, before the
    graph runs: see compile_decode); the masked scatter of LayerCache.write_one compiles into one loop."""
    if k.shape[1] == 1:
        cache.write_one(k, v, positions)
        return cache.k, cache.v, cache.pos
    return cache.update(k, v, positions)


def compiled_backend(threads: int, cpu_kernels: bool = False) -> Backend:
    """The "torch" backend's functions in their compile-friendly forms, for a fixed thread count (cpu_kernels:
    products go to backends/cpu_gemv.py's kernels where they take them)."""
    torch_ops = get_backend("torch")
    split_pays(threads)  # measured here, eagerly: split_linear reads the answer inside the graph
    fixed = {"threads": threads, "cpu_kernels": cpu_kernels}
    linear = functools.partial(compiled_linear, **fixed)
    linear.many = functools.partial(compiled_linears, **fixed)  # type: ignore[attr-defined]  # Backend.linears
    return Backend(name="torch-compiled", linear=linear, rms_norm=rms_norm_torch, rope_table=rope_angles,
                   rope=rotate, attention=functools.partial(compiled_attention, **fixed),
                   moe=functools.partial(compiled_moe, **fixed),
                   mix_experts=functools.partial(compiled_mix_experts, **fixed), swiglu=swiglu,
                   update_cache=compiled_update_cache,
                   latent_attention=torch_ops.latent_attention)  # absorbed einsums for a decode step: they fuse


# ---- compiled decode steps --------------------------------------------------------------------------------------
MIN_CAPACITY = 256  # the smallest cache a compiled decode step is built for (in positions)
MODES = ("regional", "full")


def bucket_capacity(positions: int, limit: int | None = None) -> int:
    """The cache capacity a compiled step is built for: the next power of two >= positions (at least
    MIN_CAPACITY), capped at `limit` (the model's declared context) but never below `positions`."""
    size = max(MIN_CAPACITY, 1 << (positions - 1).bit_length())
    return size if limit is None else max(positions, min(size, limit))


def configure_compiler() -> None:
    """torch.compile settings for decode steps (imports dynamo and inductor: ~2 s the first time)."""
    import torch._dynamo.config
    import torch._inductor.config

    global _eager_grouped, _eager_grouped_mix
    _eager_grouped = torch.compiler.disable(moe_forward_grouped)
    _eager_grouped_mix = torch.compiler.disable(mix_experts_grouped)
    # one code object serves every layer, model and shape compiled in this process: allow it many entries
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    cpp_config = torch._inductor.config.cpp
    if cpp_config.vec_isa_ok is None:  # (unless TORCHINDUCTOR_VEC_ISA_OK says) trust the CPU's flags rather
        cpp_config.vec_isa_ok = True  # than building a test program per vector ISA: seconds of a cold start
    # the generated code would check every input's size and strides at every call: the step's key (describe())
    # already fixes them, and the checks cost ~0.1 ms a decode step
    torch._inductor.config.size_asserts = False
    torch._inductor.config.alignment_asserts = False
    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:  # a graph or two of one kernel each: no worker pool
        torch._inductor.config.compile_threads = 1


class CompiledDecode:
    """A model's compiled decode step (model.compiled_decode, set by compile_decode): Transformer.forward sends
    every one-token-per-row step with a cache here.

    mode "regional": block(layer, h, positions, rope, layer_cache) is compiled once and runs every layer (the
    layer module, its weights and its cache are inputs of the compiled code, so layers of one shape share it;
    a layer that differs, e.g. another window or a dense layer among MoE ones, gets its own), and
    head(norm, h, output_weight) is a second step for bf16/fp16 models (eager in fp32).  mode "full":
    model.forward_with as one step.  The compiled steps are kept, saved and loaded by a StepCache
    (compiled_steps.py); with background=True they compile in a worker thread while decoding runs eagerly.
    """

    def __init__(self, model: Transformer, mode: str = "regional", freeze: bool = False, backend: str = "inductor",
                 background: bool = False):
        if mode not in MODES:
            raise ValueError(f"compile_decode: mode must be one of {MODES}, got {mode!r}")
        if freeze and mode != "full":
            raise ValueError("compile_decode: freeze=True makes each layer's weights constants of its own graph; "
                             "it needs mode='full'")
        if freeze and background:
            raise ValueError("compile_decode: freeze=True compiles the weights into the code; it has no "
                             "background mode")
        self.model, self.mode = model, mode
        self.cache_dir = use_compile_cache()
        self.threads = torch.get_num_threads()
        self.cpu_kernels = model.device.type == "cpu" and cpu_gemv.library() is not None
        ops = self.ops = compiled_backend(self.threads, self.cpu_kernels)
        self._frozen = None
        if freeze:  # the weights are constants of the code: compiled in memory, never saved (it would hold them)
            configure_compiler()
            self._frozen = torch.compile(functools.partial(model.forward_with, ops), backend=backend,
                                         dynamic=False, options={"freezing": True})
            return
        # (importing the compiler takes seconds: in the background, the worker does it, not the caller)
        self.steps = StepCache(self.cache_dir, backend, background, setup=configure_compiler)
        self._described: dict[int, str] = {}  # id(module) -> digest of describe(module), computed once

        def block(layer, h, positions, rope, layer_cache):  # (B, 1, dim) -> (B, 1, dim)
            return layer(h, positions, rope, ops, layer_cache)[0]

        def head(norm, h, output_weight):  # (B, 1, dim) -> (B, 1, vocab) fp32
            return ops.linear(norm(h, ops), output_weight).float()

        def full(model, tokens, positions, cache, logits_at):  # (B, 1) -> (B, 1, vocab) fp32
            return model.forward_with(ops, tokens, positions, cache, logits_at=logits_at)

        self._block, self._head, self._full = block, head, full
        # the full step's model argument: a shallow copy sharing every parameter and module, without this
        # object (model.compiled_decode holds a lock and a thread, which a saved step cannot refer to)
        self._model = copy.copy(model)
        self._model.compiled_decode = None
        # the head is one product: compiled only where the compiled form is faster, a bf16/fp16 row on a CPU
        # without native support (multiply-and-sum) and without the C kernels (which multiply as fast eagerly);
        # elsewhere PyTorch's kernel is as fast and costs no compile
        reduced = upcast_on_cpu(torch.empty(1, dtype=model.dtype, device=model.device))
        self._compile_head = reduced and not (self.cpu_kernels and model.dtype == torch.bfloat16)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                 logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, positions: (B, 1) -> logits (B, 1, vocab) fp32, as Transformer.forward."""
        cache.check_fits(positions)  # on the host, once per step, outside the compiled code
        if self.cpu_kernels:
            cpu_gemv.operators()  # loads the operators' C++ kernels between two steps once they are built
        model, eager = self.model, self.model.ops
        if self._frozen is not None:
            return self._frozen(tokens, positions, cache, logits_at=logits_at)
        if self.mode == "full":
            step = self._step("full", self._full, (self._model, tokens, positions, cache, logits_at))
            if step is None:  # compiling in the background: this step runs eagerly
                return model.forward_with(eager, tokens, positions, cache, logits_at=logits_at)
            return step(self._model, tokens, positions, cache, logits_at)
        a = model.args
        h = model.tok_embeddings(tokens)  # (B, 1, dim)
        rope = self.ops.rope_table(positions, a.rope_dim, a.rope_theta, a.yarn)  # shared by the layers
        eager_rope = None  # the eager functions' table (complex rotations), for layers not compiled yet
        for layer, layer_cache in zip(model.layers, cache.layers):
            step = self._step("block", self._block, (layer, h, positions, rope, layer_cache))
            if step is not None:
                h = step(layer, h, positions, rope, layer_cache)
                continue
            if eager_rope is None:
                eager_rope = eager.rope_table(positions, a.rope_dim, a.rope_theta, a.yarn)
            h = layer(h, positions, eager_rope, eager, layer_cache)[0]
        if logits_at is not None:
            h = at_rows(h, logits_at)  # (B, 1, dim)
        step = self._step("head", self._head, (model.norm, h, model.output_weight)) if self._compile_head else None
        if step is None:
            return eager.linear(model.norm(h, eager), model.output_weight).float()
        return step(model.norm, h, model.output_weight)

    def _step(self, name: str, fn, args: tuple):
        """The compiled `fn` for these arguments (StepCache.get), or None while it compiles in the background
        (or if two tensor arguments share memory, which the compiled code does not expect: then eagerly).
        Modules are described once, and again after forget_modules() (converting, moving or quantizing the model
        calls it); tensors and caches at every call."""
        pointers = [x.data_ptr() for x in args if isinstance(x, torch.Tensor) and x.numel()]
        if len(set(pointers)) < len(pointers):
            return None
        key = (name, self.threads, self.cpu_kernels, torch.is_inference_mode_enabled(), torch.is_grad_enabled(),
               global_state(),
               tuple(self._module_digest(x) if isinstance(x, torch.nn.Module) else
                     described(x) if isinstance(x, (KVCache, LayerCache)) else describe(x) for x in args))
        return self.steps.get(key, name, fn, lambda: _scratch(args))

    def forget_modules(self) -> None:
        """Describe the modules again at the next step: their weights changed dtype, shape or kind (the model was
        converted, moved or quantized), so the steps compiled for the old ones no longer apply.  Transformer._apply
        and quantize_model call it: steps check their guards at the first call only (compiled_steps.GuardedOnce),
        and the key must then tell the new weights apart."""
        self._described.clear()

    def _module_digest(self, module: torch.nn.Module) -> str:
        digest = self._described.get(id(module))
        if digest is None:
            digest = self._described[id(module)] = hashlib.sha256(repr(describe(module)).encode()).hexdigest()
        return digest

    def capacity(self, positions: int) -> int:
        """The KV-cache capacity to allocate for a request of `positions` positions (bucket_capacity): requests
        of similar lengths share one compiled step instead of compiling again for every length."""
        return bucket_capacity(positions, self.model.args.max_seq_len)

    def warm_up(self, batch_size: int = 1, positions: int = 1) -> tuple[float, str]:
        """Compile now (one step on a scratch cache of capacity(positions)) rather than at the first decode step;
        returns (seconds, what happened: "loaded" (saved steps read from disk), "compiled", ...; with
        background=True the compilation is only queued: "queued")."""
        model = self.model
        t0, seen = time.perf_counter(), len(self.steps.events) if self._frozen is None else 0
        with torch.inference_mode():  # as generation runs (dynamo guards on inference tensors)
            cache = KVCache(model.args, batch_size, self.capacity(positions), model.dtype, model.device)
            tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=model.device)
            self(tokens, torch.zeros_like(tokens), cache)  # (two tensors: compiled code assumes no aliasing)
        if self._frozen is not None:
            return time.perf_counter() - t0, "compiled in memory (freeze=True)"
        if self.steps.background:
            return time.perf_counter() - t0, "queued"
        return time.perf_counter() - t0, self.steps.summary(seen)


def _scratch(args: tuple) -> tuple:
    """Arguments like `args` for compiling in the background: new tensors of the same shapes and strides, and
    cache objects holding such tensors (the live cache keeps being written meanwhile); modules and parameters
    as they are."""
    def fresh(x):
        if isinstance(x, torch.nn.Parameter):  # weights are read, never written: the live ones
            return x
        if isinstance(x, torch.Tensor):
            return x.detach().clone()
        if isinstance(x, (tuple, list)):
            return type(x)(fresh(y) for y in x)
        if isinstance(x, (LayerCache, KVCache)) or (hasattr(x, "__dict__") and not isinstance(x, torch.nn.Module)
                                                     and any(isinstance(v, torch.Tensor) for v in vars(x).values())):
            twin = object.__new__(type(x))
            twin.__dict__.update({k: fresh(v) for k, v in vars(x).items() if k != MEMO})
            return twin
        return x
    return tuple(fresh(x) for x in args)


def compile_decode(model: Transformer, enabled: bool = True, freeze: bool = False,
                   mode: str = "regional", backend: str = "inductor", background: bool = False) -> Transformer:
    """Compile `model`'s decode steps (see the module docstring); enabled=False returns to eager decoding.

    Needs the "torch" backend (the compiled functions are its variants).  MoE layers get their experts stacked
    (backends.moe.stack_experts).  Compile after converting or moving the model.  Compilation happens at the first
    decode step of each new shape, or now with model.compiled_decode.warm_up().  mode: "regional" (one block's
    graph reused by every layer: seconds to compile) or "full" (one graph for the whole step).  freeze=True
    (mode "full" only) compiles with inductor's freezing: the weights become constants of the compiled code, so
    later changes to them are not seen; decode must then run without autograd (generate does).  backend: torch.compile's
    (the tests use "eager" / "aot_eager": dynamo's graphs without inductor's code generation).  Compiled steps are
    saved in the compile cache and loaded by the next start (compiled_steps.py).  background=True: a step not
    compiled yet is compiled by a worker thread and decoding runs eagerly until it is ready (the first token of a
    chat does not wait for the compiler; model.compiled_decode.steps.wait() blocks until it is done).
    """
    if not enabled:
        model.compiled_decode = None
        return model
    if model.ops.name != "torch":
        raise ValueError(f"compile_decode compiles the 'torch' backend's functions; this model uses "
                         f"{model.ops.name!r} (call model.set_backend('torch') first)")
    stack_all_experts(model)  # the chosen experts are gathered inside the graph
    huge_pages.place(model)  # the weights each step streams, on 2 MB pages (CPU; see backends/huge_pages.py)
    model.compiled_decode = CompiledDecode(model, mode, freeze, backend, background)
    return model
