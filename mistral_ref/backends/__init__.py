"""The one dispatch point: backends, i.e. records of the functions a model computes with, looked up by name.

A model's layers (model.py, attention.py, moe.py, mla.py, fine_moe.py) never call a fast path directly: they call
``ops.linear`` (``ops.linears``: several products of one input), ``ops.rms_norm``, ``ops.rope_table`` /
``ops.rope``, ``ops.attention``, ``ops.moe`` / ``ops.mix_experts`` (fine_moe.py's routed experts),
``ops.swiglu`` (the feed-forward's silu(gate) * up), ``ops.update_cache`` (the KV cache write) and
``ops.latent_attention`` (mla.py) on the :class:`Backend` chosen by ``Transformer.set_backend(name)``.  Every
backend computes the same functions as "reference" (the plain math of the reference modules), within
floating-point rounding; the tests check each one against it.

| name        | where                  | what                                                                     |
|-------------|------------------------|--------------------------------------------------------------------------|
| "reference" | backends/reference.py  | the plain functions of norm.py, rope.py, attention.py, moe.py, cache.py, |
|             |                        | mla.py (latent attention expanded into per-head keys and values)         |
| "torch"     | backends/pytorch.py    | SDPA attention (a CPU decode step: C kernel; a bf16 prompt on AMX tiles: |
|             |                        | C flash kernel), CPU products, grouped MoE (bf16 on AMX tiles: one C     |
|             |                        | call), complex RoPE, latent attention absorbed for decode steps and      |
|             |                        | short chunks (mla.py)                                                    |
| "triton"    | triton_kernels (extra) | Triton kernels; registers itself (entry point `mistral_ref.backends`)    |

Compiled decoding (Transformer.compile_decode) uses a compile-friendly variant of "torch" (backends/compiled.py).
Other packages add a backend with :func:`register_backend` or an entry point in the group ``mistral_ref.backends``
naming a :class:`Backend` object.  This module imports nothing from the rest of mistral_ref.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib.metadata import entry_points
from typing import Any

ENTRY_POINT_GROUP = "mistral_ref.backends"
# the families that set_backend can take from different backends
PARTS = ("linear", "rms_norm", "rope", "attention", "moe", "swiglu", "update_cache", "latent_attention")


class BackendError(ValueError):
    """An unknown backend, or one that cannot run here (its message says what to install)."""


@dataclass(frozen=True)
class Backend:
    """The functions a model computes with.  Shapes as in the reference functions they equal:

    linear(x (..., in), weight (out, in)) -> (..., out)                     F.linear without bias
    linears(x, weights) -> tuple of linear(x, w) for w in weights           a method: several products of
        one input (q, k, v; w1, w3), in one pass where the linear function has a `many` attribute
    rms_norm(x (..., dim), weight (dim,), eps) -> (..., dim)                norm.rms_norm
    rope_table(positions (B, T), head_dim, theta, yarn) -> table            rope.rope_angles (yarn: YarnArgs
                                                                            or None), once per forward
    rope(x (B, T, H, head_dim), table) -> x rotated                         rope.apply_rotary_emb
    attention(q, k, v, q_pos, k_pos, window) -> (B, T, n_heads, head_dim)   attention.attention
    moe(x (N, dim), gate_weight, w1, w2, w3, top_k) -> (N, dim), logits     moe.moe_forward
    mix_experts(x (N, dim), weights (N, k), experts (N, k), w1, w2, w3)     moe.mix_experts: the experts of a
        -> (N, dim)                                                         precomputed routing (fine_moe.py)
    swiglu(gate (..., hidden), up (..., hidden)) -> (..., hidden)           moe.swiglu: silu(gate) * up
    update_cache(layer_cache, k, v, positions) -> keys, values, k_pos       cache.LayerCache.update
    latent_attention(q_nope, q_rope, latents, k_rope, kv_b_weight,          mla.latent_attention
                     v_head_dim, q_pos, k_pos, scale) -> (B, T, H, v)
    prepare(model) -> None: run by set_backend, e.g. to lay experts out as the backend reads them.
    decode_step(model, tokens (B, 1), positions (B, 1), cache, logits_at) -> logits (B, 1, vocab) or None:
        optional, a whole decode step in the backend's own way (model.forward asks it first; None: the layers
        run); dropped when with_parts replaces any family, since it would not call the replacement.
    prompt_step(model, tokens (B, T), positions (B, T), cache, logits_at) -> logits or None: the same for a pass of
        T > 1 tokens a row with a cache (the torch backend's adds the residuals inside the products); dropped
        likewise.
    """

    name: str
    linear: Callable
    rms_norm: Callable
    rope_table: Callable
    rope: Callable
    attention: Callable
    moe: Callable
    mix_experts: Callable
    swiglu: Callable
    update_cache: Callable
    latent_attention: Callable
    prepare: tuple[Callable, ...] = field(default=())
    decode_step: Callable | None = None
    prompt_step: Callable | None = None
    # linear's form for several products of one input, kept as an attribute `many` of the linear function itself
    # (so that replacing `linear` replaces both); read here once, not inside compiled code
    _many: Callable | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_many", getattr(self.linear, "many", None))

    def linears(self, x: Any, weights: Sequence[Any]) -> tuple:
        """(linear(x, w) for w in weights): in one pass where `linear` has a `many` form (the C kernels take
        several products of one input in one call), else one product at a time."""
        if self._many is not None:
            return tuple(self._many(x, weights))
        return tuple(self.linear(x, w) for w in weights)

    def with_parts(self, parts: dict[str, Backend]) -> Backend:
        """This backend with some families taken from others, e.g. {"attention": triton} ("rope" brings
        rope_table along, "moe" mix_experts)."""
        if not parts:
            return self
        changes: dict = {}
        for part, other in parts.items():
            if part not in PARTS:
                raise BackendError(f"unknown function family {part!r}; choose from {', '.join(PARTS)}")
            changes[part] = getattr(other, part)
            if part == "rope":
                changes["rope_table"] = other.rope_table
            if part == "moe":
                changes["mix_experts"] = other.mix_experts
        prepare = tuple(dict.fromkeys([*self.prepare, *(p for o in parts.values() for p in o.prepare)]))
        name = self.name + "".join(f"+{part}={other.name}" for part, other in parts.items() if other.name != self.name)
        return replace(self, name=name, prepare=prepare, decode_step=None, prompt_step=None, **changes)


_BUILTIN = {"reference": "mistral_ref.backends.reference", "torch": "mistral_ref.backends.pytorch"}
_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Make `backend` available to set_backend under backend.name (replacing one of that name)."""
    if not isinstance(backend, Backend):
        raise TypeError(f"register_backend takes a Backend, got {type(backend).__name__}")
    _REGISTRY[backend.name] = backend


def available_backends() -> list[str]:
    """Names that get_backend may resolve: built-in, registered, and advertised by installed entry points."""
    return sorted({*_BUILTIN, *_REGISTRY, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})


def get_backend(name: str) -> Backend:
    """The backend called `name`: built in, registered, or loaded from its entry point on first use."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _BUILTIN:
        register_backend(importlib.import_module(_BUILTIN[name]).BACKEND)
        return _REGISTRY[name]
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        raise BackendError(f"unknown backend {name!r}; available: {', '.join(available_backends())}. "
                           + _INSTALL_HINTS.get(name, ""))
    try:
        backend = found[0].load()
    except ImportError as e:  # the package behind it is missing something (e.g. Triton itself)
        raise BackendError(f"backend {name!r} ({found[0].value}) cannot be imported: {e}. "
                           + _INSTALL_HINTS.get(name, "Install the package that provides it.")) from e
    register_backend(backend)
    return backend


_INSTALL_HINTS = {
    "triton": "Install Triton with `pip install 'mistral-ref[kernels]'` (Linux x86_64/aarch64; it runs on NVIDIA "
              "GPUs, and on a CPU only under its slow interpreter).",
}
