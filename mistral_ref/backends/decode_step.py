"""A decode step of batch 1 with each transformer block in one operator call: ``torch.ops.mistral_ref.decode_block``
(cpu_gemv_ops.cpp), the "torch" backend's eager decode step without the Python between a block's functions.

Equals: the "torch" backend's eager step (model.TransformerBlock with backends/pytorch.py's functions, in the model's
dtype): the same C kernels for the products, RMSNorm, Mixtral's experts and attention, the same roundings; RoPE's
complex product, the KV-cache write, the residual additions and SiLU as C loops (SiLU with C's expf, which may
differ from torch's exp in the last bit of fp32).  tests/test_decode_step.py checks it against that step and the
"reference" backend, beyond a sliding window, with GQA, head_dim != dim / n_heads, experts, int8 and int4.

Why: an eager step calls ~10 functions a block from Python (~10-20 us each besides the arithmetic); a small
model's step is then a third Python, and a compiled step (backends/compiled.py) still runs its wrapper's Python
between the operators.  Here a block is one call (figures: README "Speed on a CPU", `make bench`).

Transformer.forward asks :func:`decode_step` (the "torch" backend's Backend.decode_step) first for every decode
step; it returns None, and the layers run as usual, unless every one of these holds:
* one row, one token, a KV cache; no autograd (generate runs in inference mode); on the CPU;
* the C kernels are loaded with their C++ operators (cpu_gemv.operators() == "C++": while those build, the step
  is the usual one);
* every block has grouped-query attention with RoPE over the whole head (no latent attention, no query scaling
  by position) and a dense SwiGLU or Mixtral's experts (stacked here, as compiled decoding stacks them: the
  parameters become views of the stacks); every weight is of the model's dtype (bf16 or fp32) or quantized
  (int8 / int4) with scales of that dtype, one scheme for the whole block;
* every layer's cache is a plain batch-1 LayerCache of the model's dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mistral_ref.attention import Attention
from mistral_ref.backends import cpu_gemv
from mistral_ref.backends.moe import stack_experts
from mistral_ref.backends.rope import rope_rotations
from mistral_ref.cache import KVCache, LayerCache
from mistral_ref.moe import FeedForward, MoeLayer
from mistral_ref.quantize import QuantizedExperts, QuantizedWeight

if TYPE_CHECKING:  # typing only: the model imports the backends, not the other way round
    from mistral_ref.model import Transformer, TransformerBlock

_FLOATS = (torch.bfloat16, torch.float32)


def decode_step(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | None,
                logits_at: torch.Tensor | None = None) -> torch.Tensor | None:
    """model(tokens, positions, cache, logits_at=logits_at) for one token of one row, each block in one operator
    call; None where this step does not apply (see the module docstring: the caller then runs the layers).
    tokens, positions: (1, 1) int64 -> logits (1, 1, vocab) fp32."""
    if (tokens.shape != (1, 1) or cache is None or torch.is_grad_enabled() or tokens.device.type != "cpu"
            or len(cache.layers) != len(model.layers)):
        return None
    if cpu_gemv.library() is None or cpu_gemv.operators() != "C++":
        return None
    blocks = plan(model)
    if blocks is None:
        return None
    caches = []
    for layer_cache in cache.layers:
        if (type(layer_cache) is not LayerCache or layer_cache.k.dtype != model.dtype or layer_cache.k.shape[0] != 1
                or not (layer_cache.k.is_contiguous() and layer_cache.v.is_contiguous())):
            return None
        caches.append((layer_cache.k, layer_cache.v, layer_cache.pos))
    position = int(positions[0, 0])
    for layer_cache in cache.layers:  # a full layer's cache must hold the position (cache.LayerCache.check_fits)
        if not layer_cache.rolling and position >= layer_cache.capacity:
            layer_cache.check_fits(positions)
    rot = rotations(model, position)
    threads = torch.get_num_threads()
    h = model.tok_embeddings(tokens)  # (1, 1, dim)
    for (norms, args, window), (k, v, pos) in zip(blocks, caches):
        h, _ = torch.ops.mistral_ref.decode_block(h, positions, rot, *norms, *args, k, v, pos, window, threads)
    ops = model.ops
    return ops.linear(model.norm(h, ops), model.output_weight).float()  # (1, 1, vocab)


# ---- what a step reads, kept between steps -------------------------------------------------------------------

_registrations = 0  # parameters, buffers and submodules assigned to any module in this process so far


def _registered(*_) -> None:
    global _registrations
    _registrations += 1


# any assignment of a weight or a module anywhere (quantize_model, load_state_dict(assign=True), stacking experts,
# replacing a layer by hand) makes the kept plans stale; Transformer._apply (.to, .half, ...) drops them itself
torch.nn.modules.module.register_module_parameter_registration_hook(_registered)
torch.nn.modules.module.register_module_buffer_registration_hook(_registered)
torch.nn.modules.module.register_module_module_registration_hook(_registered)

PLAN = "_decode_step_plan"  # where a model keeps its plan (forget() drops it)


def plan(model: Transformer) -> list | None:
    """Per block: ((attention_norm, ffn_norm, eps), decode_block's weight arguments, window), or None if a block
    is not one decode_block takes.  Kept on the model until a module is assigned anywhere or the model's dtype,
    backend or kind (quantization) changes; stacks Mixtral's experts on first use (backends/moe.py)."""
    key = (_registrations, model.dtype, id(model.ops), len(model.layers))
    kept = model.__dict__.get(PLAN)
    if kept is not None and kept[0] == key:
        return kept[1]
    a, blocks = model.args, []
    if a.rope_dim != a.head_dim or model.dtype not in _FLOATS:
        blocks = None
    else:
        for layer in model.layers:
            args = block_arguments(layer, model.dtype)
            if args is None:
                blocks = None
                break
            window = -1 if layer.attention.window is None else layer.attention.window
            blocks.append(((layer.attention_norm.weight, layer.ffn_norm.weight, layer.attention_norm.eps), args,
                           window))
    key = (_registrations, model.dtype, id(model.ops), len(model.layers))  # (stacking the experts registers)
    model.__dict__[PLAN] = (key, blocks)
    return blocks


def forget(model: torch.nn.Module) -> None:
    """Drop the plan a model keeps (Transformer._apply: its weights change dtype or device in place)."""
    model.__dict__.pop(PLAN, None)
    model.__dict__.pop(ROTATIONS, None)


ROTATIONS = "_decode_step_rotations"  # where a model keeps its table of rotations


def rotations(model: Transformer, position: int) -> torch.Tensor:
    """The rotations of positions 0 .. N-1 (N > position; a power of two, grown as positions grow), as
    rope_rotations computes them (elementwise: the same numbers as a table of one position), as (N, head_dim / 2,
    2) fp32 (cos, sin) pairs."""
    a = model.args
    key = (a.rope_dim, a.rope_theta, a.yarn)
    kept = model.__dict__.get(ROTATIONS)
    if kept is not None and kept[0] == key and kept[1].shape[0] > position:
        return kept[1]
    n = 1 << max(position, 255).bit_length()
    table = torch.view_as_real(rope_rotations(torch.arange(n)[None], a.rope_dim, a.rope_theta, a.yarn))[0]
    model.__dict__[ROTATIONS] = (key, table.contiguous())
    return table


def block_arguments(layer: TransformerBlock, dtype: torch.dtype) -> tuple | None:
    """decode_block's weight arguments for one block (attn, attn_scales, ffn, ffn_scales, gate, top_k, group_size),
    or None if the block is not one it takes."""
    attention, ff = layer.attention, layer.feed_forward
    if (type(attention) is not Attention or attention.llama_4_scaling is not None
            or layer.attention_norm.weight.dtype != dtype or layer.ffn_norm.weight.dtype != dtype):
        return None
    attn = weights_of([attention.wq.weight, attention.wk.weight, attention.wv.weight, attention.wo.weight], dtype)
    if attn is None:
        return None
    gate, top_k = None, 0
    if type(ff) is FeedForward:
        ffn = weights_of([ff.w1.weight, ff.w3.weight, ff.w2.weight], dtype)
    elif type(ff) is MoeLayer:
        if ff.stacked is None:
            stack_experts(ff)  # (experts of different shapes stay unstacked: not taken)
        if ff.stacked is None or ff.gate.weight.dtype != dtype:
            return None
        w1, w2, w3 = ff.stacked
        ffn = experts_of([w1, w3, w2], dtype)
        gate, top_k = ff.gate.weight, ff.top_k
    else:
        return None
    if ffn is None or (attn[2] != ffn[2] and attn[1] and ffn[1]):  # one group size where both are int4
        return None
    return attn[0], attn[1], ffn[0], ffn[1], gate, top_k, max(attn[2], ffn[2])


def weights_of(weights: list, dtype: torch.dtype) -> tuple[list, list, int] | None:
    """(tensors, scales, group_size) for decode_block: float weights of `dtype` (scales []), or quantized ones of
    one scheme and group size with scales of `dtype`; None otherwise."""
    first = weights[0]
    if isinstance(first, QuantizedWeight):
        if not all(isinstance(w, QuantizedWeight) and w.scheme == first.scheme and w.group_size == first.group_size
                   for w in weights):
            return None
        pairs = [cpu_gemv._tensors(w) for w in weights]
        if any(s.dtype != dtype or not q.is_contiguous() or not s.is_contiguous() for q, s in pairs):
            return None
        return [q for q, _ in pairs], [s for _, s in pairs], first.group_size or 0
    if all(isinstance(w, torch.Tensor) and not isinstance(w, QuantizedWeight) and w.dtype == dtype
           and w.is_contiguous() and w.dim() == 2 for w in weights):
        return weights, [], 0
    return None


def experts_of(stacks: list, dtype: torch.dtype) -> tuple[list, list, int] | None:
    """weights_of for stacked experts (w1, w3, w2): (E, out, in) tensors of `dtype`, or QuantizedExperts."""
    first = stacks[0]
    if isinstance(first, QuantizedExperts):
        if not all(isinstance(s, QuantizedExperts) and s.scheme == first.scheme and s.group_size == first.group_size
                   and s.scales.dtype == dtype for s in stacks):
            return None
        return [s.qweight for s in stacks], [s.scales for s in stacks], first.group_size or 0
    if all(isinstance(s, torch.Tensor) and s.dtype == dtype and s.is_contiguous() for s in stacks):
        return stacks, [], 0
    return None
