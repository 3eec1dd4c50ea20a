"""A decode step of the whole model in one operator call: ``torch.ops.mistral_ref.decode_model``
(cpu_gemv_ops.cpp), the "torch" backend's eager decode step without the Python between its functions.

Equals: the "torch" backend's eager step (model.Transformer's layers with backends/pytorch.py's functions, in the
model's dtype): the embedding lookup, the same C kernels for the products, RMSNorm, the experts and grouped-query
attention, the same roundings; RoPE's complex product, the query scaling, the KV-cache write, the residual
additions and SiLU as C loops (SiLU with cpu_gemv.c's exp polynomial, which may differ from torch's exp in fp32's
last bits); latent attention absorbed as backends/mla.py absorbs it for a decode step, rounded where its einsums
round; the fine-grained router (fine_moe.route_fine) as a C loop in fp32; the final norm and the output product as
that step computes them (the output product there when the C kernels take it for these rows, as backends/linear.py
sends it: else in Python after the operator).  tests/test_decode_step.py checks it against that step and the
"reference" backend, beyond a sliding window, past YaRN's original context and the query scaling's steps, with
GQA, head_dim != dim / n_heads, Mixtral's experts, latent attention with and without a low-rank query, fine-grained
experts (softmax, or sigmoid with a score-correction bias and groups) with a shared expert, int8 and int4.

Why: an eager step calls ~10 functions a block from Python (~10-20 us each besides the arithmetic); a small
model's step is then a third Python, and a compiled step (backends/compiled.py) still runs its wrapper's Python
between the operators.  Here the step is one call, whose arguments are read from where the model keeps them
(figures: README "Speed on a CPU", `make bench`).

Transformer.forward asks :func:`decode_step` (the "torch" backend's Backend.decode_step) first for every decode
step; it returns None, and the layers run as usual, unless every one of these holds:
* one token per row, a KV cache; no autograd (generate runs in inference mode); on the CPU; one row, or up to
  MAX_ROWS rows of a bf16 model whose blocks are dense, with grouped-query attention and bf16 or int8 weights (the
  products the C kernels take for several rows in the layers' step too: bf16 weights on a CPU with AMX tiles for up
  to 8 rows, cpu_gemv.MAX_ROWS; rows may sit at different positions, -1 for padding);
* the C kernels are loaded with their C++ operators (cpu_gemv.operators() == "C++": while those build, the step
  is the usual one);
* the embedding is an nn.Embedding without max_norm, every norm an RMSNorm; every block has grouped-query attention
  with RoPE over the whole head (with or without Ministral 3's query scaling) or latent attention (Mistral Small 4),
  and a dense SwiGLU, Mixtral's experts or fine-grained ones with their shared expert (stacked by backends/moe.py's
  stack_experts, as the CLI and compiled decoding lay them out, or each expert's own weights: the step never
  replaces a parameter); every weight is of the model's dtype (bf16 or fp32) or quantized
  (int8 / int4) with scales of that dtype, one scheme for the whole block;
* every layer's cache is a plain LayerCache (LatentLayerCache for latent attention) of the model's dtype with a row
  for each token;
* no module whose forward the layers' step calls (:func:`called_modules`: the embedding, the final norm, and in
  every block the block, its norms, its attention, its feed-forward, latent attention's norms, a fine-grained
  feed-forward's shared expert) has a forward hook (tensor parallelism's
  all-reduce after wo and w2, a probe) or a forward replaced on its class or on itself (a patch, an
  intervention), and no global forward hook is registered: the step calls none of their forwards, so it would
  skip them.  (The weights' modules, wq .. w3, the output, the router and each expert, are never called as
  modules, in the layers' step either: their hooks would not run there.)
"""

from __future__ import annotations

import itertools
import operator
import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn.modules.module as nn_module
from torch import nn

from mistral_ref.attention import Attention
from mistral_ref.backends import cpu_gemv, huge_pages
from mistral_ref.backends.linear import upcast_on_cpu
from mistral_ref.backends.rope import rope_rotations
from mistral_ref.cache import KVCache, LatentLayerCache, LayerCache
from mistral_ref.fine_moe import FineMoeLayer
from mistral_ref.mla import LatentAttention
from mistral_ref.moe import FeedForward, MoeLayer
from mistral_ref.norm import RMSNorm
from mistral_ref.quantize import QuantizedExperts, QuantizedWeight, scales_name

if TYPE_CHECKING:  # typing only: the model imports the backends, not the other way round
    from mistral_ref.model import Transformer, TransformerBlock

_DTYPE = operator.attrgetter("dtype")
_FORWARD = itertools.repeat("forward")  # ("forward" in d for each instance dict d, as map(operator.contains, ...))
_STACKED = itertools.repeat("stacked")  # (a MoeLayer's stacks, read from its __dict__ at every step)
# rows of a step at most: the layers' step sends bf16 and int8 products of fewer rows than cpu_gemv.MAX_ROWS to
# the C kernels too (a plan's own limit, Steps.max_rows, is that of its weights' kind: bf16 on an AMX CPU, fewer)
MAX_ROWS = max(cpu_gemv.MAX_ROWS["bf16"], cpu_gemv.MAX_ROWS["int8"]) - 1
# forward hooks registered for every module (nn.modules.module.register_module_forward_hook): the step skips the
# blocks' forward calls, so it is not taken while there are any
_GLOBAL_HOOKS = tuple(getattr(nn_module, name, {}) for name in ("_global_forward_hooks", "_global_forward_pre_hooks"))


def decode_step(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | None,
                logits_at: torch.Tensor | None = None) -> torch.Tensor | None:
    """model(tokens, positions, cache, logits_at=logits_at) for one token per row in one operator call; None
    where this step does not apply (see the module docstring: the caller then runs the layers).
    tokens, positions: (B, 1) int64 -> logits (B, 1, vocab) fp32."""
    rows = tokens.shape[0] if tokens.dim() == 2 and tokens.shape[1] == 1 else 0
    if (not 0 < rows <= MAX_ROWS or cache is None or torch.is_grad_enabled() or tokens.device.type != "cpu"
            or len(cache.layers) != len(model.layers)):
        return None
    if cpu_gemv.library() is None or cpu_gemv.operators() != "C++":
        return None
    steps, dtype = plan(model), model.dtype
    if steps is None or not _unhooked(model.__dict__[PLAN]) or (
            rows > 1 and not (dtype == torch.bfloat16 and steps.batchable and rows <= steps.max_rows)):
        return None  # (a hook on a part of a block: tensor parallelism's all-reduce, a probe; a patched forward)
    weights = steps.weights(dtype)
    if weights is None:  # a weight changed dtype or layout under the plan: plan again at the next step
        model.__dict__.pop(PLAN, None)
        return None
    caches = []
    for layer_cache in cache.layers:
        k, v = layer_cache.k, layer_cache.v
        if (type(layer_cache) not in (LayerCache, LatentLayerCache) or k.dtype != dtype or k.shape[0] != rows
                or not (k.is_contiguous() and v.is_contiguous())):
            return None
        caches += (k, v, layer_cache.pos)
    position = max(map(max, positions.tolist()))
    for layer_cache in cache.layers:  # a full layer's cache must hold the position (cache.LayerCache.check_fits)
        if not layer_cache.rolling and position >= layer_cache.capacity:
            layer_cache.check_fits(positions)
    fold = rows < steps.output_rows  # the output product in the operator: where backends/linear.py sends it to C
    out = torch.ops.mistral_ref.decode_model(tokens, positions, rotations(model, position), weights, steps.layout,
                                             steps.scalars, caches, fold, torch.get_num_threads())
    if fold:
        return out  # (B, 1, vocab) fp32
    ops = model.ops
    return ops.linear(model.norm(out, ops), model.output_weight).float()  # (B, 1, vocab)


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
# the modules' parameter and buffer dicts, which a plan reads the tensors from at every step, and drops the
# experts' stacks, which Steps.weights checks.
nn_module.register_module_parameter_registration_hook(_registered)
nn_module.register_module_buffer_registration_hook(_registered)
nn_module.register_module_module_registration_hook(_registered)

PLAN = "_decode_step_plan"  # where a model keeps its plan
# decode_model's ints for each layer, in cpu_gemv_ops.cpp's order (Lay: what each means), and its floats (Scalar)
LAYOUT_FIELDS = ("n_attn", "attn_scales", "n_ffn", "ffn_scales", "router", "top_k", "group", "window", "latent",
                 "latent_heads", "nope", "query_scaling", "router_kind", "n_group", "topk_group", "norm_topk",
                 "shared", "shared_scales", "router_bias")
SCALAR_FIELDS = ("eps", "q_a_eps", "kv_a_eps", "latent_scale", "query_beta", "routed_scale")
LAYOUT, SCALARS = len(LAYOUT_FIELDS), len(SCALAR_FIELDS)


class Steps:
    """What decode_model reads of a model at every step: where each of its weights is kept (a module's parameter
    or buffer dict and the name in it, read at every step: converting the model replaces the tensors there), and
    the layout of the list they make (cpu_gemv_ops.cpp: op_decode_model)."""

    def __init__(self):
        self.dicts: list[dict] = []  # the weights' dicts and names, in decode_model's order
        self.names: list[str] = []
        self.floats: list[int] = []  # the indexes of the float weights and scales: of the model's dtype
        self.layout: list[int] = []
        self.scalars: list[float] = []
        self.stacks: list[tuple[dict, tuple]] = []  # (a MoeLayer's __dict__, the stacks read from it)
        self.batchable = True  # several rows: dense blocks whose products the C kernels take for several rows
        self.max_rows = MAX_ROWS  # ... up to this many rows: the fewest of its weights' kinds (cpu_gemv.MAX_ROWS)
        self.output_rows = 0  # the output product in the operator for fewer rows than these (0: never)
        self._floats = self._stacked = None

    def add(self, d: dict, name: str, floating: bool = True) -> None:
        if floating:
            self.floats.append(len(self.dicts))
        self.dicts.append(d)
        self.names.append(name)

    def add_weights(self, linears: list, dtype: torch.dtype) -> tuple[int, int] | None:
        """The weights of `linears` (nn.Linear-like modules with their weight of one kind): float weights of
        `dtype`, or quantized ones of one scheme and group size with scales of `dtype` (every code tensor, then
        every scale tensor); (scales added, group size), or None if they do not fit."""
        weights = [lin.weight for lin in linears]
        first = weights[0]
        if isinstance(first, QuantizedWeight):
            if not all(isinstance(w, QuantizedWeight) and w.scheme == first.scheme
                       and w.group_size == first.group_size and w.dtype == dtype for w in weights):
                return None
            name = scales_name(first.scheme)
            if not all(w.qweight.dim() == 2 and w.qweight.is_contiguous() and w._buffers[name].is_contiguous()
                       for w in weights):
                return None
            for w in weights:
                self.add(w._buffers, "qweight", floating=False)
            for w in weights:
                self.add(w._buffers, name)
            return len(weights), first.group_size or 0
        if not all(isinstance(w, torch.Tensor) and not isinstance(w, QuantizedWeight) and w.dtype == dtype
                   and w.dim() == 2 and w.is_contiguous() for w in weights):
            return None
        for lin in linears:
            self.add(lin._parameters, "weight")
        return 0, 0

    def add_stacks(self, ff: MoeLayer, dtype: torch.dtype) -> tuple[int, int] | None:
        """A MoeLayer's stacks (w1, w2, w3) as decode_model takes them, (w1, w3, w2) and their scales: (E, out,
        in) tensors of `dtype`, or QuantizedExperts with scales of `dtype`; (scales added, group size) or None."""
        w1, w2, w3 = stacks = ff.stacked
        ordered = [w1, w3, w2]
        if isinstance(w1, QuantizedExperts):
            if not all(isinstance(s, QuantizedExperts) and s.scheme == w1.scheme and s.group_size == w1.group_size
                       and s.scales.dtype == dtype for s in ordered):
                return None
            # (the stacks themselves are held, each in a dict of its own; weights() checks at every step that the
            # layer still has them)
            for s in ordered:
                self.add({"w": s.qweight}, "w", floating=False)
            for s in ordered:
                self.add({"w": s.scales}, "w")
            found = 3, w1.group_size or 0
        elif all(isinstance(s, torch.Tensor) and s.dtype == dtype and s.is_contiguous() for s in ordered):
            for s in ordered:
                self.add({"w": s}, "w")
            found = 0, 0
        else:
            return None
        self.stacks.append((vars(ff), stacks))
        return found

    def add_block(self, layer: TransformerBlock, dtype: torch.dtype) -> bool:
        """A layer decode_model takes: grouped-query or latent attention; a dense SwiGLU, Mixtral's experts or
        fine-grained ones with a shared expert (stacked, or each expert's own weights); False for any other."""
        norms = (layer.attention_norm, layer.ffn_norm)
        if not (norms_fit(norms, dtype) and layer.attention_norm.eps == layer.ffn_norm.eps):
            return False
        for n in norms:
            self.add(n._parameters, "weight")
        lay, scalars = dict.fromkeys(LAYOUT_FIELDS, 0), dict.fromkeys(SCALAR_FIELDS, 0.0)
        groups: list[int] = []  # the int4 group size of each kind of product (0: not int4)
        if not (self.add_attention(layer.attention, dtype, lay, scalars, groups)
                and self.add_feed_forward(layer.feed_forward, dtype, lay, scalars, groups)):
            return False
        sizes = {g for g in groups if g}
        if len(sizes) > 1:
            return False  # (one group size for the block's int4 products)
        lay["group"] = max(sizes, default=0)
        scalars["eps"] = layer.attention_norm.eps
        self.layout += [lay[f] for f in LAYOUT_FIELDS]
        self.scalars += [scalars[f] for f in SCALAR_FIELDS]
        # several rows: dense grouped-query blocks only, of bf16 or int8 weights (each block's products of one kind)
        dense = type(layer.feed_forward) is FeedForward
        self.batchable = self.batchable and dense and not (lay["latent"] or lay["group"])
        if dense:
            kind = cpu_gemv.kind(layer.feed_forward.w1.weight)
            self.max_rows = min(self.max_rows, cpu_gemv.MAX_ROWS[kind] - 1 if kind else 0)
        return True

    def add_attention(self, attention: nn.Module, dtype: torch.dtype, lay: dict, scalars: dict,
                      groups: list[int]) -> bool:
        """The attention's weights and their scales (and latent attention's norms); its fields of the layout and
        scalars, its group size appended to `groups`."""
        if type(attention) is Attention:
            found = self.add_weights([attention.wq, attention.wk, attention.wv, attention.wo], dtype)
            lay.update(n_attn=4, window=-1 if attention.window is None else attention.window)
        elif type(attention) is LatentAttention:
            m = attention.mla
            low_rank = m.q_lora_rank is not None
            linears = [attention.q_a_proj if low_rank else attention.q_proj, attention.kv_a_proj_with_mqa,
                       attention.kv_b_proj, attention.wo] + ([attention.q_b_proj] if low_rank else [])
            found = self.add_weights(linears, dtype)
            norms = ([attention.q_a_layernorm] if low_rank else []) + [attention.kv_a_layernorm]
            if found is None or not norms_fit(norms, dtype):
                return False
            for n in norms:
                self.add(n._parameters, "weight")
            # 2: its products rounded to bf16, where backends/mla.py's einsums keep bf16 (a CPU with bf16 instructions)
            rounded = dtype == torch.bfloat16 and not upcast_on_cpu(attention.kv_a_layernorm.weight)
            lay.update(n_attn=len(linears), window=-1, latent=2 if rounded else 1, latent_heads=attention.n_heads,
                       nope=m.qk_nope_head_dim)
            scalars.update(q_a_eps=norms[0].eps if low_rank else 0.0, kv_a_eps=norms[-1].eps,
                           latent_scale=attention.scale)
        else:
            return False
        if found is None:
            return False
        lay["attn_scales"] = found[0]
        groups.append(found[1])
        if attention.llama_4_scaling is not None:  # Ministral 3, Mistral Small 4
            lay["query_scaling"] = attention.llama_4_scaling.original_max_position_embeddings
            scalars["query_beta"] = attention.llama_4_scaling.beta
        return True

    def add_feed_forward(self, ff: nn.Module, dtype: torch.dtype, lay: dict, scalars: dict,
                         groups: list[int]) -> bool:
        """The feed-forward's tensors and their scales, a shared expert's, the router and its bias; their fields
        of the layout and scalars, their group sizes appended to `groups`."""
        if type(ff) is FeedForward:
            found, n_ffn = self.add_weights([ff.w1, ff.w3, ff.w2], dtype), 3
        elif type(ff) in (MoeLayer, FineMoeLayer):
            if not (isinstance(ff.gate.weight, torch.Tensor) and not isinstance(ff.gate.weight, QuantizedWeight)
                    and ff.gate.weight.dtype == dtype):
                return False
            if ff.stacked is not None:
                found, n_ffn = self.add_stacks(ff, dtype), 3
            else:  # every expert's own w1, then w3, then w2
                linears = [getattr(e, name) for name in ("w1", "w3", "w2") for e in ff.experts]
                found, n_ffn = self.add_weights(linears, dtype), len(linears)
        else:
            return False
        if found is None:
            return False
        lay.update(n_ffn=n_ffn, ffn_scales=found[0])
        groups.append(found[1])
        shared = ff.shared_experts if type(ff) is FineMoeLayer else None
        if shared is not None:
            found = self.add_weights([shared.w1, shared.w3, shared.w2], dtype) if type(shared) is FeedForward else None
            if found is None:
                return False
            lay.update(shared=1, shared_scales=int(found[0] > 0))
            groups.append(found[1])
        if type(ff) is FeedForward:
            return True
        self.add(ff.gate._parameters, "weight")
        lay.update(router=1, top_k=ff.top_k if type(ff) is MoeLayer else ff.moe.num_experts_per_tok)
        if type(ff) is FineMoeLayer:
            moe = ff.moe
            lay.update(router_kind=1 if moe.scoring_func == "softmax" else 2, n_group=moe.n_group,
                       topk_group=moe.topk_group, norm_topk=int(moe.norm_topk_prob))
            scalars["routed_scale"] = moe.routed_scaling_factor
            bias = getattr(ff.gate, "e_score_correction_bias", None)
            if bias is not None:
                if bias.dtype not in cpu_gemv._FLOATS:
                    return False
                self.add(ff.gate._buffers, "e_score_correction_bias", floating=False)
                lay["router_bias"] = 1
        return True

    def add_ends(self, model: Transformer, dtype: torch.dtype) -> bool:
        """The embedding, the final norm and (where the C kernels take it) the output weight."""
        embedding, norm = model.tok_embeddings, model.norm
        if (type(embedding) is not nn.Embedding or embedding.max_norm is not None or embedding.weight.dtype != dtype
                or type(norm) is not RMSNorm or norm.weight.dtype != dtype):
            return False
        self.add(embedding._parameters, "weight")
        self.add(norm._parameters, "weight")
        self.scalars.append(norm.eps)
        output = model.tok_embeddings if model.output is None else model.output
        which = cpu_gemv.kind(output.weight)
        found = self.add_weights([output], dtype) if which is not None else None
        if found is None:
            self.layout += (0, 0, 0)
        else:
            self.layout += (1, found[0], found[1])
            self.output_rows = cpu_gemv.MAX_ROWS[which]
        self._floats = operator.itemgetter(*self.floats)  # (2 or more: a tuple)
        self._stacked = [d for d, _ in self.stacks], [s for _, s in self.stacks]
        return True

    def weights(self, dtype: torch.dtype) -> list[torch.Tensor] | None:
        """decode_model's weights as they are now; None if they no longer fit the plan (a weight of another
        dtype, the experts' stacks dropped or replaced)."""
        # (map with operator's getters: loops in C, over every weight of the model at every step)
        weights = list(map(dict.__getitem__, self.dicts, self.names))
        if not all(map(dtype.__eq__, map(_DTYPE, self._floats(weights)))):
            return None
        dicts, kept = self._stacked
        if dicts and not all(map(operator.is_, map(dict.__getitem__, dicts, _STACKED), kept)):
            return None
        return weights


def norms_fit(norms: tuple | list, dtype: torch.dtype) -> bool:
    """Every norm an RMSNorm with a weight of `dtype` (what decode_model computes)."""
    return all(type(n) is RMSNorm and n.weight.dtype == dtype for n in norms)


def plan(model: Transformer) -> Steps | None:
    """The Steps of the model, or None if a part of it is not one decode_model takes.  Kept on the model until a
    module, parameter or buffer is assigned anywhere, or the model's dtype or backend changes."""
    key = (_registrations, model.dtype, id(model.ops), len(model.layers))
    kept = model.__dict__.get(PLAN)
    if kept is not None and kept[0] == key and all(cls.forward is f for cls, f in kept[2]):
        return kept[1]
    a, dtype = model.args, model.dtype
    modules = [model.tok_embeddings, model.norm] + [m for layer in model.layers for m in called_modules(layer)]
    forwards = tuple((cls, cls.forward) for cls in {type(m) for m in modules})
    steps = None
    whole_heads = a.mla is not None or a.rope_dim == a.head_dim  # (grouped-query attention: RoPE over the head)
    if whole_heads and dtype in cpu_gemv._FLOATS and all(own(cls, f) for cls, f in forwards):
        steps = Steps()
        if not (all(steps.add_block(layer, dtype) for layer in model.layers) and steps.add_ends(model, dtype)):
            steps = None
    if steps is not None:
        huge_pages.place(model)  # the weights this step streams, on 2 MB pages (once; see backends/huge_pages.py)
    # (the forward-hook dicts and the instance dicts of every module the layers' step calls, checked at every step)
    skipped = tuple(d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks))
    model.__dict__[PLAN] = (key, steps, forwards, skipped, tuple(vars(m) for m in modules))
    _planned.add(model)
    return steps


def called_modules(layer: TransformerBlock) -> list[torch.nn.Module]:
    """The modules of a block whose forward the layers' step calls (TransformerBlock.forward): the block, its two
    norms, its attention (and latent attention's two norms) and its feed-forward (and a fine-grained one's shared
    expert), which multiply by their weights through the backend's functions and call no other module.  Their hooks
    and patched forwards are the ones this step would skip, with those of the model's embedding and final norm
    (tests/test_decode_step.py hooks every module of a block and checks that the step is declined exactly where the
    layers' step runs the hook)."""
    attention, ff = layer.attention, layer.feed_forward
    modules = [layer, layer.attention_norm, attention, layer.ffn_norm, ff]
    if type(attention) is LatentAttention:
        modules += [attention.kv_a_layernorm] + ([attention.q_a_layernorm] if attention.mla.q_lora_rank else [])
    if type(ff) is FineMoeLayer and ff.shared_experts is not None:
        modules.append(ff.shared_experts)
    return modules


def untouched(model: Transformer) -> bool:
    """No forward hook (a global one, or one on the embedding, the final norm or a module of :func:`called_modules`)
    and no replaced forward of those modules (on their class or on themselves): a pass of the engine that computes
    the blocks itself (backends/prompt_step.py; this step checks the same through its plan) then skips nothing the
    layers' pass would run.  Read from the model's kept plan (:func:`plan`, made if there is none)."""
    plan(model)
    kept = model.__dict__[PLAN]
    return _unhooked(kept) and all(own(cls, f) for cls, f in kept[2])


def _unhooked(kept: tuple) -> bool:
    """A kept plan's modules (plan: the embedding, the final norm, called_modules) have no forward hook and no
    forward replaced on themselves, and no global forward hook is registered."""
    _, _, _, hooks, instances = kept
    return not (any(_GLOBAL_HOOKS) or any(hooks) or any(map(operator.contains, instances, _FORWARD)))


def own(cls: type, forward) -> bool:
    """Whether cls.forward is the one its class defines (not replaced or wrapped by a patch: the step skips it)."""
    defining = next(c for c in cls.__mro__ if "forward" in vars(c))  # (nn.ModuleList: nn.Module's placeholder)
    return getattr(forward, "__module__", None) == defining.__module__ and not hasattr(forward, "__wrapped__")


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
