"""The Mistral / Mixtral transformer: embeddings -> n_layers x (attention, feed-forward) -> RMSNorm -> logits
(through output.weight, or through the embedding matrix itself for models with tied_embeddings).

Read in this order: norm.py, rope.py, attention.py, moe.py, then this file.  Module and parameter names are those of the
native checkpoints (tok_embeddings, layers.N.attention.wq, layers.N.feed_forward.w1, ...), so a state dict loads
without renaming.

The layers do their arithmetic (products, norms, rotations, attention, expert dispatch) through `self.ops`, the
function record of a backend looked up by name in mistral_ref.backends: "reference" is the plain functions of
these files; "torch" (the default) and "triton" compute the same functions faster.  See :meth:`set_backend`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from mistral_ref.attention import Attention, at_rows
from mistral_ref.backends import Backend, get_backend
from mistral_ref.cache import KVCache, LayerCache
from mistral_ref.config import ModelArgs
from mistral_ref.fine_moe import FineMoeLayer
from mistral_ref.mla import LatentAttention
from mistral_ref.moe import FeedForward, MoeLayer, load_balancing_loss
from mistral_ref.norm import RMSNorm


class TransformerBlock(nn.Module):
    """Pre-norm residual block: h = x + attention(norm(x)); out = h + feed_forward(norm(h))."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        # latent attention (args.mla: Mistral Small 4, Large 3) or grouped-query attention
        self.attention: nn.Module = LatentAttention(args, layer_id) if args.mla else Attention(args, layer_id)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward: nn.Module = (FeedForward(args.dim, args.hidden_dim) if args.is_dense_layer(layer_id)
                                        else FineMoeLayer(args) if args.fine_moe else MoeLayer(args))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: object, ops: Backend,
                cache: LayerCache | None = None, rows: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, T, dim) -> (B, T, dim), router logits (B*T, E) or None for a dense block.
        rope: the rotation table shared by all layers (see Attention.forward); ops: the backend's functions;
        rows: (B,) the one position a row whose output is wanted (-> (B, 1, dim)), or None for all."""
        h = self.attention(self.attention_norm(x, ops), positions, rope, ops, cache, rows)
        h = h + (x if rows is None else at_rows(x, rows))
        ff = self.feed_forward(self.ffn_norm(h, ops), ops)
        router_logits = None
        if isinstance(ff, tuple):
            ff, router_logits = ff
        return h + ff, router_logits


class LossOutput(NamedTuple):
    loss: torch.Tensor  # lm_loss + aux_loss_coef * aux_loss
    lm_loss: torch.Tensor  # mean next-token cross-entropy (nats)
    aux_loss: torch.Tensor  # MoE load-balancing loss (0 for dense models)
    logits: torch.Tensor  # (B, T, vocab) fp32


class Transformer(nn.Module):
    """A Mistral-family language model built from `ModelArgs`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # tied_embeddings (Ministral 3 3B): the logits are h @ tok_embeddings.weight.T, no output.weight at all
        self.output = None if args.tied_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.ops: Backend = get_backend("torch")  # see set_backend
        self.compiled_decode = None  # a compiled decode step (backends.compiled.CompiledDecode)

    def _apply(self, fn, recurse=True):
        if self.compiled_decode is not None:  # compiled steps are keyed by the weights' dtypes and shapes
            self.compiled_decode.forget_modules()
        return super()._apply(fn, recurse)

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def output_weight(self) -> torch.Tensor:
        """The output projection (vocab_size, dim): output.weight, or tok_embeddings.weight when the model ties
        them (args.tied_embeddings)."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None,
                return_router_logits: bool = False, logits_at: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Next-token logits.  tokens: (B, T) int64; positions: (B, T) int64 absolute positions, -1 for padding
        (default 0 .. T-1); cache: a KVCache to read past keys from and write this chunk's keys to.
        logits_at: (B,) int64, the one index along T per row whose logits are wanted (a prefill's last token: the
        others only write their keys and values to the cache, skipping the last layer's rest); default: every one.
        returns logits (B, T, vocab_size) fp32 — (B, 1, vocab_size) with logits_at — (and the list of per-layer
        router logits if asked: the last layer's of the rows of logits_at only)."""
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        if self.compiled_decode is not None and T == 1 and cache is not None and not return_router_logits:
            return self.compiled_decode(tokens, positions, cache, logits_at)
        step = self.ops.decode_step if T == 1 else self.ops.prompt_step  # the engine's own pass, if it has one
        if step is not None and cache is not None and not return_router_logits:
            logits = step(self, tokens, positions, cache, logits_at)  # None where it does not apply
            if logits is not None:
                return logits
        return self.forward_with(self.ops, tokens, positions, cache, return_router_logits, logits_at)

    def forward_with(self, ops: Backend, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                     return_router_logits: bool = False, logits_at: torch.Tensor | None = None):
        """:meth:`forward` computed with the functions of `ops` (positions required)."""
        B, T = tokens.shape
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        a = self.args
        rope = ops.rope_table(positions, a.rope_dim, a.rope_theta, a.yarn)  # the same for every layer
        router_logits = []
        for i, layer in enumerate(self.layers):  # the last one computes only the rows of logits_at: (B, 1, dim)
            h, rl = layer(h, positions, rope, ops, None if cache is None else cache[i],
                          logits_at if i == len(self.layers) - 1 else None)
            if rl is not None:
                router_logits.append(rl)
        logits = ops.linear(self.norm(h, ops), self.output_weight).float()  # (B, T, vocab)
        return (logits, router_logits) if return_router_logits else logits

    def compute_loss(self, tokens: torch.Tensor, targets: torch.Tensor, aux_loss_coef: float = 0.02) -> LossOutput:
        """Training loss: next-token cross-entropy plus, for MoE models, aux_loss_coef x the load-balancing loss.

        tokens: (B, T); targets: (B, T) the token that should follow each input token (-100 = ignore).
        """
        logits, router_logits = self(tokens, return_router_logits=True)
        lm_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        if router_logits:
            moe = self.args.moe or self.args.fine_moe  # both name num_experts, num_experts_per_tok
            aux = load_balancing_loss(router_logits, moe.num_experts, moe.num_experts_per_tok)
        else:
            aux = torch.zeros((), device=logits.device)
        return LossOutput(lm_loss + aux_loss_coef * aux, lm_loss, aux, logits)

    def compile_decode(self, enabled: bool = True, freeze: bool = False, mode: str = "regional", **options):
        """Run decode steps (one token per row, with a KV cache) through torch.compile (backends/compiled.py, whose
        compile_decode documents mode "regional" / "full", freeze and the options); enabled=False: eager again.
        Returns self."""
        from mistral_ref.backends.compiled import compile_decode
        return compile_decode(self, enabled, freeze, mode, **options)

    def set_backend(self, backend: str = "torch", *, attention: str | None = None, moe: str | None = None,
                    linear: str | None = None, rope: str | None = None, rms_norm: str | None = None,
                    swiglu: str | None = None, latent_attention: str | None = None) -> Transformer:
        """Choose the functions the layers compute with, by backend name (mistral_ref.backends):

        "reference" — the plain functions of rope.py, attention.py, moe.py and this file, F.linear for products;
        "torch" (default) — PyTorch fast paths that equal them (SDPA, split/upcast CPU products, grouped MoE);
        "triton" — the Triton kernels (installed with the `kernels` extra; registers itself).
        `backend` sets every function; the keywords override one family each, e.g.
        ``set_backend("torch", attention="triton", moe="triton")``.  Returns the model.
        """
        chosen = {"attention": attention, "moe": moe, "linear": linear, "rope": rope, "rms_norm": rms_norm,
                  "swiglu": swiglu, "latent_attention": latent_attention}
        base = get_backend(backend)
        self.ops = base.with_parts({part: get_backend(name) for part, name in chosen.items() if name is not None})
        for prepare in self.ops.prepare:
            prepare(self)  # e.g. lay the experts out as the backend's MoE dispatch reads them
        return self


class _SkipInit(TorchFunctionMode):
    """Turn the torch.nn.init functions into no-ops while a model is built on the meta device (initialising meta
    tensors is pointless, and normal_ on one imports torch._dynamo: seconds, ~150 MB); other ops pass through."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def meta_model(args: ModelArgs) -> Transformer:
    """Transformer(args) with every parameter on the meta device: shapes and names, no memory, no init.

    The one way to build a model without memory: parameter counts, checkpoint loading, parallel ranks."""
    with torch.device("meta"), _SkipInit():
        return Transformer(args)
