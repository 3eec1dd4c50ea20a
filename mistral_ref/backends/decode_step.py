"""A decode step with each transformer block in one operator call: ``torch.ops.mistral_ref.decode_block``
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
* one token per row, a KV cache; no autograd (generate runs in inference mode); on the CPU; one row, or up to
  MAX_ROWS rows of a bf16 model whose blocks are dense with bf16 or int8 weights (the products the C kernels take
  for several rows in the layers' step too; rows may sit at different positions, -1 for padding);
* the C kernels are loaded with their C++ operators (cpu_gemv.operators() == "C++": while those build, the step
  is the usual one);
* every block has grouped-query attention with RoPE over the whole head (no latent attention, no query scaling
  by position) and a dense SwiGLU or Mixtral's experts (stacked by backends/moe.py's stack_experts, as the CLI
  and compiled decoding lay them out, or each expert's own weights: the step never replaces a parameter); every
  weight is of the model's dtype (bf16 or fp32) or quantized
  (int8 / int4) with scales of that dtype, one scheme for the whole block;
* every layer's cache is a plain LayerCache of the model's dtype with a row for each token;
* no module whose forward the layers' step calls (:func:`called_modules`: a block, its norms, its attention, its
  feed-forward) has a forward hook (tensor parallelism's all-reduce after wo and w2, a probe) or a forward replaced
  on its class or on itself (a patch, an intervention), and no global forward hook is registered: the step calls
  no block's forward, so it would skip them.  (The weights' modules, wq .. w3, the router and each expert, are
  never called as modules, in the layers' step either: their hooks would not run there.)
"""

from __future__ import annotations

import itertools
import operator
import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn.modules.module as nn_module

from mistral_ref.attention import Attention
from mistral_ref.backends import cpu_gemv, huge_pages
from mistral_ref.backends.rope import rope_rotations
from mistral_ref.cache import KVCache, LayerCache
from mistral_ref.moe import FeedForward, MoeLayer
from mistral_ref.quantize import QuantizedExperts, QuantizedWeight

if TYPE_CHECKING:  # typing only: the model imports the backends, not the other way round
    from mistral_ref.model import Transformer, TransformerBlock

_DTYPE, _CODES = operator.attrgetter("dtype"), operator.itemgetter("qweight")
_FORWARD = itertools.repeat("forward")  # ("forward" in d for each instance dict d, as map(operator.contains, ...))
# rows of a step: the layers' step sends bf16 and int8 products of fewer rows than these to the C kernels too
MAX_ROWS = min(cpu_gemv.MAX_ROWS["bf16"], cpu_gemv.MAX_ROWS["int8"]) - 1
# forward hooks registered for every module (nn.modules.module.register_module_forward_hook): the step skips the
# blocks' forward calls, so it is not taken while there are any
_GLOBAL_HOOKS = tuple(getattr(nn_module, name, {}) for name in ("_global_forward_hooks", "_global_forward_pre_hooks"))


def decode_step(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | None,
                logits_at: torch.Tensor | None = None) -> torch.Tensor | None:
    """model(tokens, positions, cache, logits_at=logits_at) for one token per row, each block in one operator
    call; None where this step does not apply (see the module docstring: the caller then runs the layers).
    tokens, positions: (B, 1) int64 -> logits (B, 1, vocab) fp32."""
    rows = tokens.shape[0] if tokens.dim() == 2 and tokens.shape[1] == 1 else 0
    if (not 0 < rows <= MAX_ROWS or cache is None or torch.is_grad_enabled() or tokens.device.type != "cpu"
            or len(cache.layers) != len(model.layers)):
        return None
    if cpu_gemv.library() is None or cpu_gemv.operators() != "C++":
        return None
    blocks, dtype = plan(model), model.dtype
    if blocks is None or any(_GLOBAL_HOOKS) or (rows > 1 and not (dtype == torch.bfloat16
                                                                  and all(b.batchable for b in blocks))):
        return None
    _, _, _, hooks, instances = model.__dict__[PLAN]
    if any(hooks) or any(map(operator.contains, instances, _FORWARD)):
        return None  # a hook on a part of a block (tensor parallelism's all-reduce, a probe) or a patched forward
    steps = []
    for block, layer_cache in zip(blocks, cache.layers):
        args = block.arguments(dtype)
        k, v = layer_cache.k, layer_cache.v
        if (args is None or type(layer_cache) is not LayerCache or k.dtype != dtype or k.shape[0] != rows
                or not (k.is_contiguous() and v.is_contiguous())):
            if args is None:  # a weight changed dtype or layout under the plan: plan again at the next step
                model.__dict__.pop(PLAN, None)
            return None
        steps.append((*block.norms, *args, k, v, layer_cache.pos, block.window))
    position = int(positions.max())
    for layer_cache in cache.layers:  # a full layer's cache must hold the position (cache.LayerCache.check_fits)
        if not layer_cache.rolling and position >= layer_cache.capacity:
            layer_cache.check_fits(positions)
    rot = rotations(model, position)
    threads = torch.get_num_threads()
    h = model.tok_embeddings(tokens)  # (B, 1, dim)
    for step in steps:  # (the norms, the block's weights, its cache, its window)
        h, _ = torch.ops.mistral_ref.decode_block(h, positions, rot, *step, threads)
    ops = model.ops
    return ops.linear(model.norm(h, ops), model.output_weight).float()  # (B, 1, vocab)


# ---- what a step reads, kept between steps -------------------------------------------------------------------

_registrations = 0  # parameters, buffers and submodules assigned to any module in this process so far
_planned: weakref.WeakSet = weakref.WeakSet()  # models that keep a plan


def _registered(*_) -> None:
    global _registrations
    _registrations += 1
    for model in list(_planned):  # a kept plan holds the weights it read: the replaced ones may go now
        model.__dict__.pop(PLAN, None)
    _planned.clear()


# assigning a weight or a module anywhere (quantize_model, load_state_dict(assign=True), stacking experts,
# replacing a layer by hand) makes the kept plans stale.  Converting or moving (.to, .half: nn.Module._apply) keeps
# the Parameter objects and the modules' buffer dicts, which a plan holds, and drops the experts' stacks, which
# Block.arguments checks: the tensors themselves are looked up at every step.
nn_module.register_module_parameter_registration_hook(_registered)
nn_module.register_module_buffer_registration_hook(_registered)
nn_module.register_module_module_registration_hook(_registered)

PLAN = "_decode_step_plan"  # where a model keeps its plan


class Weights:
    """A block's weights of one kind, as decode_block takes them: float Parameters (held: converting the model
    changes their data, not them), or QuantizedWeights' buffer dicts (held: converting replaces the tensors in
    them), the codes and scales read at each step."""

    def __init__(self, weights: list):
        first = weights[0]
        self.quantized = isinstance(first, QuantizedWeight)
        self.int4 = self.quantized and first.scheme == "int4"
        self.group = (first.group_size or 0) if self.quantized else 0
        self.items = [(w._buffers, "scales" if w.scheme == "int8" else "scales_and_zeros") for w in weights] \
            if self.quantized else list(weights)
        self.dicts = [d for d, _ in self.items] if self.quantized else []
        self.names = [n for _, n in self.items] if self.quantized else []

    @staticmethod
    def of(weights: list, dtype: torch.dtype) -> Weights | None:
        """Weights of float tensors of `dtype`, or of quantized ones of one scheme and group size with scales of
        `dtype`; None otherwise."""
        first = weights[0]
        if isinstance(first, QuantizedWeight):
            if not all(isinstance(w, QuantizedWeight) and w.scheme == first.scheme
                       and w.group_size == first.group_size for w in weights):
                return None
        elif not all(isinstance(w, torch.Tensor) and not isinstance(w, QuantizedWeight) for w in weights):
            return None
        found = Weights(weights)
        tensors = found.tensors(dtype)
        if tensors is None:
            return None
        codes, scales = tensors
        fits = all(t.dim() == 2 and t.is_contiguous() for t in codes) and all(s.is_contiguous() for s in scales)
        return found if fits else None

    def tensors(self, dtype: torch.dtype) -> tuple[list, list] | None:
        """(weights or codes, scales ([] for float weights)) as they are now; None if their dtype no longer fits
        (decode_block checks every shape and layout itself: a clear error, never a wrong read)."""
        # (map with operator's getters: loops in C, read at every step for every block)
        if not self.quantized:
            ws = self.items
            return (ws, []) if all(map(dtype.__eq__, map(_DTYPE, ws))) else None
        codes, scales = list(map(_CODES, self.dicts)), list(map(dict.__getitem__, self.dicts, self.names))
        return (codes, scales) if all(map(dtype.__eq__, map(_DTYPE, scales))) else None


class Block:
    """What decode_block needs of one transformer block besides the activations and the cache."""

    def __init__(self, layer: TransformerBlock, attn: Weights, ffn: Weights | None):
        self.norms = (layer.attention_norm.weight, layer.ffn_norm.weight, layer.attention_norm.eps)
        self.attn, self.ffn = attn, ffn
        self.window = -1 if layer.attention.window is None else layer.attention.window
        ff = layer.feed_forward
        self.moe = ff if type(ff) is MoeLayer else None
        self.stacked = None if self.moe is None else ff.stacked  # (E, ...) stacks: replaced when the layer converts
        self.gate, self.top_k = (ff.gate.weight, ff.top_k) if self.moe is not None else (None, 0)
        # several rows: dense blocks whose products the C kernels take for several rows, as the layers' do
        self.batchable = self.moe is None and not (attn.int4 or ffn.int4)

    def arguments(self, dtype: torch.dtype) -> tuple | None:
        """(attn, attn_scales, ffn, ffn_scales, gate, top_k, group_size) now; None if they no longer fit."""
        attn = self.attn.tensors(dtype)
        if attn is None or any(w.dtype != dtype for w in self.norms[:2]):
            return None
        if self.moe is not None and (self.moe.stacked is not self.stacked or self.gate.dtype != dtype):
            return None  # (the experts were stacked, or their stacks dropped by a conversion: plan again)
        if self.stacked is None:
            ffn = self.ffn.tensors(dtype)
            group = max(self.attn.group, self.ffn.group)
        else:
            ffn = experts_of(self.stacked, dtype)
            experts_group = self.stacked[0].group_size if isinstance(self.stacked[0], QuantizedExperts) else 0
            group = max(self.attn.group, experts_group or 0)
        if ffn is None:
            return None
        return attn[0], attn[1], ffn[0], ffn[1], self.gate, self.top_k, group


def plan(model: Transformer) -> list[Block] | None:
    """A Block for every layer, or None if a layer is not one decode_block takes.  Kept on the model until a
    module, parameter or buffer is assigned anywhere, or the model's dtype or backend changes."""
    key = (_registrations, model.dtype, id(model.ops), len(model.layers))
    kept = model.__dict__.get(PLAN)
    if kept is not None and kept[0] == key and all(cls.forward is f for cls, f in kept[2]):
        return kept[1]
    a, dtype, blocks = model.args, model.dtype, []
    modules = [m for layer in model.layers for m in called_modules(layer)]
    forwards = tuple((cls, cls.forward) for cls in {type(m) for m in modules})
    if a.rope_dim != a.head_dim or dtype not in cpu_gemv._FLOATS or not all(own(cls, f) for cls, f in forwards):
        blocks = None
    else:
        for layer in model.layers:
            block = block_of(layer, dtype)
            if block is None or block.arguments(dtype) is None:
                blocks = None
                break
            blocks.append(block)
    if blocks is not None:
        huge_pages.place(model)  # the weights this step streams, on 2 MB pages (once; see backends/huge_pages.py)
    # (the forward-hook dicts and the instance dicts of every module inside the blocks, checked at every step)
    skipped = tuple(d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks))
    model.__dict__[PLAN] = (key, blocks, forwards, skipped, tuple(vars(m) for m in modules))
    _planned.add(model)
    return blocks


def called_modules(layer: TransformerBlock) -> list[torch.nn.Module]:
    """The modules of a block whose forward the layers' step calls (TransformerBlock.forward): the block, its two
    norms, its attention and its feed-forward, which multiply by their weights through the backend's functions and
    call no module of theirs.  Their hooks and patched forwards are the ones this step would skip
    (tests/test_decode_step.py hooks every module of a block and checks that the step is declined exactly where the
    layers' step runs the hook)."""
    return [layer, layer.attention_norm, layer.attention, layer.ffn_norm, layer.feed_forward]


def own(cls: type, forward) -> bool:
    """Whether cls.forward is the one its class defines (not replaced or wrapped by a patch: the step skips it)."""
    defining = next(c for c in cls.__mro__ if "forward" in vars(c))  # (nn.ModuleList: nn.Module's placeholder)
    return getattr(forward, "__module__", None) == defining.__module__ and not hasattr(forward, "__wrapped__")


def block_of(layer: TransformerBlock, dtype: torch.dtype) -> Block | None:
    """The Block of a layer decode_block takes: grouped-query attention without query scaling, a dense SwiGLU
    or Mixtral's experts (stacked, or each expert's own weights); None for any other."""
    attention, ff = layer.attention, layer.feed_forward
    if type(attention) is not Attention or attention.llama_4_scaling is not None:
        return None
    attn = Weights.of([attention.wq.weight, attention.wk.weight, attention.wv.weight, attention.wo.weight], dtype)
    if type(ff) is FeedForward:
        ffn = Weights.of([ff.w1.weight, ff.w3.weight, ff.w2.weight], dtype)
        if ffn is None:
            return None
    elif type(ff) is MoeLayer:  # stacked (backends/moe.py: stack_experts), or each expert's own tensors
        ffn = None if ff.stacked is not None else Weights.of(
            [getattr(e, name).weight for name in ("w1", "w3", "w2") for e in ff.experts], dtype)
        if ff.stacked is None and ffn is None:
            return None
    else:
        return None
    if attn is None or (ffn is not None and attn.group and ffn.group and attn.group != ffn.group):
        return None  # (one group size for the block's int4 products)
    return Block(layer, attn, ffn)


def experts_of(stacks: tuple, dtype: torch.dtype) -> tuple[list, list] | None:
    """A MoeLayer's stacks (w1, w2, w3) as decode_block takes them, (w1, w3, w2) and their scales: (E, out, in)
    tensors of `dtype`, or QuantizedExperts with scales of `dtype`; None otherwise."""
    w1, w2, w3 = stacks
    ordered = [w1, w3, w2]
    if isinstance(w1, QuantizedExperts):
        if not all(isinstance(s, QuantizedExperts) and s.scheme == w1.scheme and s.group_size == w1.group_size
                   and s.scales.dtype == dtype for s in ordered):
            return None
        return [s.qweight for s in ordered], [s.scales for s in ordered]
    if all(isinstance(s, torch.Tensor) and s.dtype == dtype and s.is_contiguous() for s in ordered):
        return ordered, []
    return None


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
    with torch.inference_mode(False):  # a normal tensor, kept across modes
        table = torch.view_as_real(rope_rotations(torch.arange(n)[None], a.rope_dim, a.rope_theta, a.yarn))[0]
        model.__dict__[ROTATIONS] = (key, table.contiguous())
    return model.__dict__[ROTATIONS][1]
