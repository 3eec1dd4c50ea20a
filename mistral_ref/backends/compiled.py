"""Compiled decoding: one torch.compile'd graph per decode step, built from compile-friendly versions of the
"torch" backend's functions.

Every decode step of a request has the same shapes (batch, cache capacity) and passes positions as tensors, so all
steps reuse one compiled graph (a new batch size or cache size compiles again).  What differs from "torch":
* linear: the thread count of split_linear is fixed when compiling (torch.get_num_threads() inside a graph breaks
  it); a one-row bf16/fp16 product on a CPU without native support is multiply-and-sum, which inductor turns into
  one loop that converts weights as they stream;
* rope: real cos/sin (the reference functions): inductor has no complex arithmetic;
* attention: one query per row uses the reference math, which fuses (the SDPA kernel's fixed cost dominates);
* update_cache: the masked scatter of LayerCache.write_one (no host reads inside the graph);
* moe (and mix_experts, the fine-grained layers' form): a single token gathers its k experts from the stacked
  weights inside the graph (moe_one_token / mix_one_token); more tokens run the grouped dispatch eagerly (it reads
  expert counts on the host: a graph break).
Each of these equals the reference function; tests/test_backends_compiled.py checks the eager versions.
Compiling takes a minute or more on a small CPU; `make bench` measures what it buys.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from mistral_ref.attention import attention
from mistral_ref.backends import Backend, get_backend
from mistral_ref.backends.linear import linear, multiply_sum_linear, upcast_on_cpu
from mistral_ref.backends.moe import (
    mix_experts_grouped,
    mix_one_token,
    moe_forward_grouped,
    moe_one_token,
    stack_all_experts,
)
from mistral_ref.backends.reference import rotate
from mistral_ref.backends.sdpa import sdpa_attention
from mistral_ref.cache import KVCache, LayerCache
from mistral_ref.rope import rope_angles

if TYPE_CHECKING:  # typing only: the model imports this module, not the other way round
    from mistral_ref.model import Transformer


def compiled_linear(x: torch.Tensor, weight: torch.Tensor, threads: int) -> torch.Tensor:
    """backends.linear.linear with a fixed thread count and multiply-and-sum for one reduced-precision row."""
    if upcast_on_cpu(x) and x.numel() == x.shape[-1]:
        return multiply_sum_linear(x, weight)
    return linear(x, weight, threads)


def compiled_attention(q, k, v, q_pos, k_pos, window):
    """attention.attention for one query per row (fuses), sdpa_attention for more."""
    if q.shape[1] == 1:
        return attention(q, k, v, q_pos, k_pos, window)
    return sdpa_attention(q, k, v, q_pos, k_pos, window)


def compiled_moe(x: torch.Tensor, gate_weight: torch.Tensor, w1: Sequence[torch.Tensor] | torch.Tensor,
                 w2: Sequence[torch.Tensor] | torch.Tensor, w3: Sequence[torch.Tensor] | torch.Tensor, top_k: int):
    """moe_one_token for one token with stacked experts; the grouped dispatch, run eagerly, otherwise."""
    if x.shape[0] == 1 and isinstance(w1, torch.Tensor):
        return moe_one_token(x, gate_weight, w1, w2, w3, top_k)
    return _eager_grouped(x, gate_weight, w1, w2, w3, top_k)


_eager_grouped = torch.compiler.disable(moe_forward_grouped)  # data-dependent: a graph break


def compiled_mix_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                         w1: Sequence[torch.Tensor] | torch.Tensor, w2: Sequence[torch.Tensor] | torch.Tensor,
                         w3: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """compiled_moe for a precomputed routing (fine_moe.py): mix_one_token or the eager grouped mix."""
    if x.shape[0] == 1 and isinstance(w1, torch.Tensor):
        return mix_one_token(x, weights, experts, w1, w2, w3)
    return _eager_grouped_mix(x, weights, experts, w1, w2, w3)


_eager_grouped_mix = torch.compiler.disable(mix_experts_grouped)


def compiled_update_cache(cache: LayerCache, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
    """cache.update without its host-side capacity check for a decode step (checked once per step, before the
    graph runs: see compile_decode); the masked scatter of LayerCache.write_one compiles into one loop."""
    if k.shape[1] == 1:
        cache.write_one(k, v, positions)
        return cache.k, cache.v, cache.pos
    return cache.update(k, v, positions)


def compiled_backend(threads: int) -> Backend:
    """The "torch" backend's functions in their compile-friendly forms, for a fixed thread count."""
    torch_ops = get_backend("torch")
    return Backend(name="torch-compiled", linear=functools.partial(compiled_linear, threads=threads),
                   rms_norm=torch_ops.rms_norm, rope_table=rope_angles, rope=rotate, attention=compiled_attention,
                   moe=compiled_moe, mix_experts=compiled_mix_experts, update_cache=compiled_update_cache,
                   latent_attention=torch_ops.latent_attention)  # absorbed einsums for a decode step: they fuse


def compile_decode(model: Transformer, enabled: bool = True, freeze: bool = False) -> Transformer:
    """Compile `model`'s decode steps (see the module docstring); enabled=False returns to eager decoding.

    Needs the "torch" backend (the compiled functions are its variants).  MoE layers get their experts stacked
    (backends.moe.stack_experts).  Compile after converting or moving the model.  freeze=True compiles with
    inductor's freezing: the weights become constants of the compiled code, so later changes to them are not seen;
    decode must then run without autograd (generate does).
    """
    if not enabled:
        model.compiled_decode = None
        return model
    if model.ops.name != "torch":
        raise ValueError(f"compile_decode compiles the 'torch' backend's functions; this model uses "
                         f"{model.ops.name!r} (call model.set_backend('torch') first)")
    stack_all_experts(model)  # the chosen experts are gathered inside the graph
    ops = compiled_backend(torch.get_num_threads())
    options = {"freezing": True} if freeze else None
    compiled = torch.compile(functools.partial(model.forward_with, ops), dynamic=False, options=options)

    def decode_step(tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, logits_at=None) -> torch.Tensor:
        cache.check_fits(positions)  # on the host, once per step, outside the graph
        return compiled(tokens, positions, cache, logits_at=logits_at)

    model.compiled_decode = decode_step
    return model
