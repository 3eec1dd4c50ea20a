"""Tensor- and expert-parallel inference on torch.distributed: one model spread over the ranks of a group.

Mixtral-8x22B (141B parameters) and Mistral Large 2 (123B) do not fit one device.  Each of N ranks therefore
holds a slice of every large weight and runs *the same forward code* (model.py, attention.py, moe.py) on its
slice.  A few collectives join the partial results; they are all in this file.

The plan (Megatron-LM's tensor parallelism, Shoeybi et al. 2019; N = world size, r = this rank):

  attention   wq, wk, wv  split by whole heads (rows):   rank r holds query heads  r*H/N .. (r+1)*H/N - 1
                                                        and key-value heads       r*KV/N .. (r+1)*KV/N - 1
              wo          split by the same heads (columns); each rank's wo gives a partial sum -> all-reduce
  dense FFN   w1, w3      split by hidden units (rows);  w2 by the same units (columns)          -> all-reduce
  MoE         gate        replicated: every rank routes every token to the same experts
              experts     moe="expert": rank r holds whole experts r*E/N .. (r+1)*E/N - 1      -> all-reduce
                          moe="tensor": every rank holds hidden/N units of every expert        -> all-reduce
  latent      (args.mla: Mistral Small 4 / Large 3) q_a_proj, kv_a_proj_with_mqa and their norms replicated (every
  attention   rank computes the whole latent and caches it); q_b_proj / q_proj and kv_b_proj split by whole heads
              (rows), wo by the same heads (columns)                                          -> all-reduce
  fine MoE    (args.fine_moe) gate (+ e_score_correction_bias) replicated: every rank routes every token alike
              routed experts: moe="expert" whole experts r*E/N .. (r+1)*E/N - 1, moe="tensor" every expert's
              moe_intermediate_size/N units; the shared expert is SPLIT by hidden units in both modes (a
              replicated one would be added N times by the all-reduce); the first first_k_dense_replace
              layers are dense FFNs, split by hidden units                                     -> all-reduce
  embedding   rows split by vocabulary: a rank looks up the ids it holds, zeros for the rest    -> all-reduce
  output      rows split by vocabulary: each rank computes its vocab/N logits                   -> all-gather
  norms       replicated

So a block costs two all-reduces of (B, T, dim) — one after wo, one after the feed-forward (w2 / the experts)
— and the model one more for the embedding and one all-gather of the logits.  Every sum that an all-reduce
finishes is a sum of whole products split into N groups, so fp32 results match one device to rounding (~1e-7
relative).

How the same code runs on a slice: a rank builds a Transformer from *local* ModelArgs (n_heads/N,
n_kv_heads/N, hidden_dim/N; see :func:`local_args`), so attention.py reshapes into its local heads and
cache.KVCache built from ``model.args`` holds only this rank's key-value heads.  GQA grouping survives the
split because rank r's query heads use exactly rank r's key-value heads.  Expert parallelism reuses the same
trick one level down: an expert that lives on another rank is a FeedForward with a *zero-width* hidden layer —
(0, dim) and (dim, 0) weights that cost nothing and contribute exact zeros — so moe.moe_forward routes over
all E experts, computes only the local ones, and the all-reduce adds the other ranks' experts.  Parameter
names stay those of the checkpoints (layers.3.feed_forward.experts.5.w1.weight), so a rank's state dict is
just the slices of the full one.

Why explicit collectives in forward hooks and not DTensor's ``parallelize_module`` (ColwiseParallel /
RowwiseParallel)?  (1) attention.py reshapes with the module's n_heads, so with DTensor we would still have to
build modules with local head counts — at which point plain tensors plus one all-reduce say everything; (2)
expert parallelism is not one of DTensor's layer styles; (3) reading a rank's slice of each tensor from the
safetensors files (mistral_ref.checkpoint.load_weights) gives a plain tensor that needs no wrapping; (4) plain
tensors keep the state dict, the KV cache, the Triton backends and every shape comment of the model code
unchanged, and the hooks that build_local_model registers show every byte that moves between ranks.  The same
code runs on CPU gloo (what tests/test_parallel.py checks) and on CUDA NCCL.

Inference only: the collectives are not differentiated through (no Megatron f/g autograd pair), so a backward
pass through a sharded model gives wrong gradients.  Every rank must be given the same tokens and positions;
logits come out complete and equal on every rank (so greedy decoding agrees; for sampling, seed every rank
alike).

Launch (see README): ``torchrun --nproc-per-node N -m mistral_ref generate CHECKPOINT --prompt ...``, or
``torchrun --nproc-per-node N benchmarks/parallel_generate.py CHECKPOINT``.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mistral_ref.checkpoint import (
    TensorSlice,
    checkpoint_index,
    dominant_dtype,
    find_checkpoint,
    load_weights,
    parse_dtype,
    read_model_args,
)
from mistral_ref.config import ModelArgs
from mistral_ref.fine_moe import FineMoeLayer
from mistral_ref.model import Transformer, meta_model
from mistral_ref.moe import FeedForward

MOE_MODES = ("expert", "tensor")


class ShardingError(ValueError):
    """A model that cannot be split over the requested number of ranks."""


# ---- the plan: which slice of which tensor a rank holds ----------------------------------------------------
def check_divisible(args: ModelArgs, world_size: int, moe: str = "expert") -> None:
    """Raise ShardingError naming the first quantity that does not split evenly over `world_size` ranks."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ShardingError(f"world_size must be a positive integer, found {world_size!r}")
    if moe not in MOE_MODES:
        raise ShardingError(f"moe must be one of {MOE_MODES}, found {moe!r}")
    quantities = [("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads), ("vocab_size", args.vocab_size)]
    fm = args.fine_moe
    if fm is not None:  # routed experts whole or split; the shared expert and the dense layers split
        if moe == "expert":
            quantities.append(("fine_moe.num_experts", fm.num_experts))
            if fm.n_shared_experts:
                quantities.append(("shared expert width (fine_moe.moe_intermediate_size x n_shared_experts)",
                                   fm.moe_intermediate_size * fm.n_shared_experts))
        else:
            quantities.append(("fine_moe.moe_intermediate_size", fm.moe_intermediate_size))
        if fm.first_k_dense_replace:
            quantities.append(("hidden_dim", args.hidden_dim))
    elif args.moe is not None and moe == "expert":
        quantities.append(("moe.num_experts", args.moe.num_experts))
    else:  # dense FFN, or every expert's hidden layer split
        quantities.append(("hidden_dim", args.hidden_dim))
    for name, value in quantities:
        if value % world_size:
            hint = ""
            if name in ("moe.num_experts", "fine_moe.num_experts"):
                hint = " (try moe='tensor' to split every expert's hidden_dim instead)"
            raise ShardingError(
                f"cannot shard the model over world_size={world_size} ranks: {name}={value} is not divisible "
                f"by {world_size}{hint}")


def local_args(args: ModelArgs, world_size: int, moe: str = "expert") -> ModelArgs:
    """The ModelArgs one rank builds its modules from: its share of the heads and of the hidden units.

    n_heads and n_kv_heads become n_heads/N and n_kv_heads/N (head_dim is unchanged; latent attention keeps its
    whole latent); hidden_dim becomes hidden_dim/N for dense models, fine-grained models' dense layers and
    moe="tensor" (with Mixtral's moe="expert" each held expert stays whole); fine_moe.moe_intermediate_size becomes
    1/N with moe="tensor" (with moe="expert" build_local_model narrows only the shared expert).
    dim and vocab_size stay global: the residual stream is replicated and logits are gathered to full width.
    """
    check_divisible(args, world_size, moe)
    fm = args.fine_moe
    hidden = args.hidden_dim if (args.moe is not None and moe == "expert") else args.hidden_dim // world_size
    if fm is not None:
        hidden = args.hidden_dim // world_size if fm.first_k_dense_replace else args.hidden_dim
        if moe == "tensor":
            fm = replace(fm, moe_intermediate_size=fm.moe_intermediate_size // world_size)
    return replace(args, n_heads=args.n_heads // world_size, n_kv_heads=args.n_kv_heads // world_size,
                   hidden_dim=hidden, fine_moe=fm)


_EXPERT_NAME = re.compile(r"layers\.\d+\.feed_forward\.experts\.(\d+)\.(w[123])\.weight")


def tensor_shard(name: str, args: ModelArgs, rank: int, world_size: int, moe: str = "expert") -> TensorSlice:
    """Which part of the full (native-named) tensor `name` rank `rank` of `world_size` holds.

    args: the global ModelArgs.  Rows of a weight (out_features, in_features) are output features, columns are
    input features (TensorSlice: dim 0 or 1, start, stop; dim None: the whole tensor).  A non-local expert
    (moe="expert") holds a zero-width slice of its hidden units: TensorSlice(0, 0, 0) for w1 / w3,
    TensorSlice(1, 0, 0) for w2.
    """
    check_divisible(args, world_size, moe)
    if not 0 <= rank < world_size:
        raise ShardingError(f"rank={rank} is outside 0..{world_size - 1}")

    def part(total: int) -> tuple[int, int]:  # rank's contiguous 1/N of `total`
        n = total // world_size
        return rank * n, (rank + 1) * n

    hd = args.head_dim
    if name in ("tok_embeddings.weight", "output.weight"):
        return TensorSlice(0, *part(args.vocab_size))
    mla, fm = args.mla, args.fine_moe
    if mla is not None:  # latent attention: the per-head projections split by heads, the latent path replicated
        h0, h1 = part(args.n_heads)
        per_head = {"attention.q_proj.weight": (0, mla.qk_head_dim), "attention.q_b_proj.weight": (0, mla.qk_head_dim),
                    "attention.kv_b_proj.weight": (0, mla.qk_nope_head_dim + mla.v_head_dim),
                    "attention.wo.weight": (1, mla.v_head_dim)}
        for suffix, (dim, width) in per_head.items():
            if name.endswith(suffix):
                return TensorSlice(dim, h0 * width, h1 * width)
        if name.endswith(("attention.q_a_proj.weight", "attention.kv_a_proj_with_mqa.weight")):
            return TensorSlice(None)
    if fm is not None:
        if name.endswith("feed_forward.gate.e_score_correction_bias"):
            return TensorSlice(None)
        shared = re.fullmatch(r"layers\.\d+\.feed_forward\.shared_experts\.(w[123])\.weight", name)
        if shared:  # split by hidden units in both modes
            start, stop = part(fm.moe_intermediate_size * fm.n_shared_experts)
            return TensorSlice(1 if shared[1] == "w2" else 0, start, stop)
        expert = _EXPERT_NAME.fullmatch(name)
        if expert:
            if moe == "expert":
                e0, e1 = part(fm.num_experts)
                start, stop = (0, fm.moe_intermediate_size) if e0 <= int(expert[1]) < e1 else (0, 0)
            else:
                start, stop = part(fm.moe_intermediate_size)
            return TensorSlice(1 if expert[2] == "w2" else 0, start, stop)
    if name.endswith("attention.wq.weight"):
        h0, h1 = part(args.n_heads)
        return TensorSlice(0, h0 * hd, h1 * hd)
    if name.endswith(("attention.wk.weight", "attention.wv.weight")):
        h0, h1 = part(args.n_kv_heads)
        return TensorSlice(0, h0 * hd, h1 * hd)
    if name.endswith("attention.wo.weight"):
        h0, h1 = part(args.n_heads)
        return TensorSlice(1, h0 * hd, h1 * hd)
    expert = _EXPERT_NAME.fullmatch(name)
    dense_ffn = ("feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight")
    if expert or name.endswith(dense_ffn):
        weight = name.rsplit(".", 2)[-2]  # w1 / w2 / w3
        if expert and moe == "expert":
            e0, e1 = part(args.moe.num_experts)
            start, stop = (0, args.hidden_dim) if e0 <= int(expert[1]) < e1 else (0, 0)
        else:
            start, stop = part(args.hidden_dim)
        return TensorSlice(1 if weight == "w2" else 0, start, stop)
    if name.endswith(("norm.weight", "feed_forward.gate.weight")):
        return TensorSlice(None)
    raise KeyError(f"no sharding rule for tensor {name!r}")


def take_shard(w: torch.Tensor, shard: TensorSlice) -> torch.Tensor:
    """The part of the full tensor w that `shard` names (a view)."""
    return w if shard.dim is None else w.narrow(shard.dim, shard.start, shard.stop - shard.start)


# ---- the modules: a Transformer of local shapes, plus the collectives --------------------------------------
class VocabParallelEmbedding(nn.Embedding):
    """Embedding rows vocab_start .. vocab_start + num_embeddings - 1; other ranks' ids give zero vectors.

    The all-reduce hook on this module adds the ranks' outputs, so each token gets exactly its one real row.
    The weight is left uninitialised (empty): it is always assigned from a checkpoint or a full model.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, vocab_start: int):
        super().__init__(num_embeddings, embedding_dim, _weight=torch.empty(num_embeddings, embedding_dim))
        self.vocab_start = vocab_start

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, T) global ids -> (B, T, dim), zero rows for ids outside this rank's range."""
        local = tokens - self.vocab_start
        mine = (local >= 0) & (local < self.num_embeddings)  # (B, T)
        h = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)  # (B, T, dim)
        return h.masked_fill(~mine[..., None], 0.0)


def _all_reduce_output(group: dist.ProcessGroup | None):
    """Forward hook: sum a module's partial output over ranks in place (MoeLayer: out of (out, logits))."""

    def hook(module: nn.Module, inputs, output):
        out = output[0] if isinstance(output, tuple) else output  # (B, T, dim)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return output

    return hook


def _all_gather_vocab(group: dist.ProcessGroup | None, world_size: int):
    """Forward hook on the model: join the ranks' vocab slices of the logits, (B, T, V/N) -> (B, T, V).

    (On the model, not on `output`: the model multiplies by output.weight through its backend's `linear`.)"""

    def hook(module: nn.Module, inputs, output):
        logits = output[0] if isinstance(output, tuple) else output  # (B, T, V/N); or (logits, router logits)
        parts = [torch.empty_like(logits) for _ in range(world_size)]
        dist.all_gather(parts, logits.contiguous(), group=group)
        gathered = torch.cat(parts, dim=-1)
        return (gathered, *output[1:]) if isinstance(output, tuple) else gathered

    return hook


def build_local_model(args: ModelArgs, rank: int, world_size: int, moe: str = "expert",
                      group: dist.ProcessGroup | None = None) -> Transformer:
    """This rank's Transformer on the meta device (no memory): local shapes, checkpoint names, hooks attached.

    args: the global ModelArgs.  The returned model's ``args`` are :func:`local_args` (so a KVCache built from
    them holds this rank's key-value heads); fill it from files with ``checkpoint.load_weights(model, ...,
    select=tensor_shard...)`` (:func:`load_sharded_model`) or from memory with ``load_state_dict(shards,
    assign=True)`` (:func:`shard_model`).
    """
    largs = local_args(args, world_size, moe)
    v0, v1 = tensor_shard("output.weight", args, rank, world_size, moe)[1:]
    model = meta_model(largs)
    with torch.device("meta"), warnings.catch_warnings():  # the modules that differ from meta_model's
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        model.tok_embeddings = VocabParallelEmbedding(v1 - v0, args.dim, vocab_start=v0)
        if not args.tied_embeddings:  # (tied: the logits use the embedding's vocab slice)
            model.output = nn.Linear(args.dim, v1 - v0, bias=False)
        experts = args.moe or args.fine_moe  # both name num_experts
        if experts is not None and moe == "expert":
            n = experts.num_experts // world_size
            mine = range(rank * n, (rank + 1) * n)  # as in tensor_shard
            for layer in model.layers:
                if not hasattr(layer.feed_forward, "experts"):  # a fine-grained model's dense layer
                    continue
                for k in range(experts.num_experts):
                    if k not in mine:  # another rank's expert: a zero-width hidden layer, exact zeros
                        layer.feed_forward.experts[k] = FeedForward(args.dim, 0)
                if isinstance(layer.feed_forward, FineMoeLayer) and layer.feed_forward.shared_experts is not None:
                    width = args.fine_moe.moe_intermediate_size * args.fine_moe.n_shared_experts
                    layer.feed_forward.shared_experts = FeedForward(args.dim, width // world_size)
    if world_size > 1:
        all_reduce = _all_reduce_output(group)
        model.tok_embeddings.register_forward_hook(all_reduce)
        for layer in model.layers:
            layer.attention.register_forward_hook(all_reduce)  # after wo
            layer.feed_forward.register_forward_hook(all_reduce)  # after w2 / the experts
        model.register_forward_hook(_all_gather_vocab(group, world_size))
    return model


def _group_rank_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call mistral_ref.parallel.init_from_env() "
                           "under torchrun (or dist.init_process_group) before sharding a model")
    return dist.get_rank(group), dist.get_world_size(group)


def shard_model(model: Transformer, moe: str = "expert",
                group: dist.ProcessGroup | None = None) -> Transformer:
    """This rank's shard of a full in-memory model (every rank passes an identical `model`, e.g. one seed).

    Returns a new Transformer holding copies of this rank's slices (same dtype and device as `model`), which
    computes the same logits as `model` when every rank of `group` runs it on the same tokens.
    """
    rank, world_size = _group_rank_size(group)
    local = build_local_model(model.args, rank, world_size, moe, group)
    full = model.state_dict()
    shards = {name: take_shard(full[name], tensor_shard(name, model.args, rank, world_size, moe)).clone()
              for name in local.state_dict()}
    local.load_state_dict(shards, assign=True)
    return local.eval()


# ---- loading: each rank reads only its slices of the safetensors files --------------------------------------
def load_sharded_model(path: str | Path, dtype: torch.dtype | str | None = None, *, moe: str = "expert",
                       device: torch.device | str | None = None,
                       group: dist.ProcessGroup | None = None) -> Transformer:
    """Load this rank's shard of a native or Hugging Face checkpoint (directory or .safetensors file).

    The files are found, checked and read by mistral_ref.checkpoint exactly as load_model does (find_checkpoint;
    checkpoint_index: names, shapes and dtypes against the config, before a byte of weights is read;
    load_weights), with one difference: for each tensor only this rank's rows (:func:`tensor_shard`) are read
    — a column slice (wo, w2) reads whole rows through the small reused buffer and keeps its columns — so a
    rank holds ~1/N of the weights, each slice copied into private memory (no memory-map views).  HF q_proj /
    k_proj are sliced by whole heads, so putting their rows in native order slice by slice is exact.
    dtype: torch dtype or name ("bf16"); None keeps the checkpoint's (the dtype holding most of its bytes).
    device: default cuda:LOCAL_RANK under NCCL, else cpu.  moe: "expert" (whole experts per rank) or
    "tensor" (every expert's hidden units split).
    Returns an eval-mode Transformer whose ``args`` are this rank's local ModelArgs.
    """
    rank, world_size = _group_rank_size(group)
    files = find_checkpoint(path)
    args = read_model_args(files)
    check_divisible(args, world_size, moe)
    index = checkpoint_index(files, args)  # {native name: TensorInfo(file, key, dtype, full shape)}
    dtype = parse_dtype(dtype) or dominant_dtype(index.values())
    if device is None:
        on_nccl = "nccl" in str(dist.get_backend(group))
        device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}") if on_nccl else torch.device("cpu")
    model = build_local_model(args, rank, world_size, moe, group)
    return load_weights(model, files, index, dtype, device, mmap=False, progress=False,
                        select=lambda name: tensor_shard(name, args, rank, world_size, moe))


# ---- launching ---------------------------------------------------------------------------------------------
class DistEnv(NamedTuple):
    """Where this process sits: rank and world size of the default group, local rank, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def init_from_env(backend: str | None = None) -> DistEnv:
    """Join the process group torchrun describes in RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.

    backend: default "nccl" when CUDA is available (each rank then uses cuda:LOCAL_RANK), else "gloo" (CPU).
    Calling it again once the group exists just returns the DistEnv.
    """
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(f"environment variables {missing} are not set: launch with "
                           "`torchrun --nproc-per-node N ...` (it sets them for every rank)")
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://")
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)
