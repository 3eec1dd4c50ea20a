"""The Mistral / Mixtral transformer: embeddings -> n_layers x (attention, feed-forward) -> RMSNorm -> logits.

Read in this order: rope.py, attention.py, moe.py, then this file.  Module and parameter names are those of the
native checkpoints (tok_embeddings, layers.N.attention.wq, layers.N.feed_forward.w1, ...), so a state dict loads
without renaming.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from mistral_ref.attention import Attention, Linear
from mistral_ref.cache import KVCache, LayerCache
from mistral_ref.config import ModelArgs
from mistral_ref.moe import FeedForward, MoeLayer, load_balancing_loss
from mistral_ref.rope import rope_rotations


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, normalised in fp32 and cast back before the weight multiplies."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) -> (..., dim)"""
        # normed = x * rsqrt(mean(x ** 2) + eps) in fp32: F.rms_norm is that formula in one call (bitwise equal)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.type_as(x)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: h = x + attention(norm(x)); out = h + feed_forward(norm(h))."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward: nn.Module = MoeLayer(args) if args.moe else FeedForward(args.dim, args.hidden_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache | None = None,
                rope: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, T, dim) -> (B, T, dim), router logits (B*T, E) or None for a dense block.
        rope: the (B, T, head_dim/2) complex rotations shared by all layers (see Attention.forward)."""
        h = x + self.attention(self.attention_norm(x), positions, cache, rope)
        ff = self.feed_forward(self.ffn_norm(h))
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
        self.compiled_decode = None  # see compile_decode
        self.output = Linear(args.dim, args.vocab_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None,
                return_router_logits: bool = False, logits_at: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Next-token logits.

        tokens: (B, T) int64; positions: (B, T) int64 absolute positions, -1 for padding (default 0 .. T-1);
        cache: a KVCache to read past keys from and write this chunk's keys to (prefill, chunked prefill, decode).
        logits_at: (B,) int64, the one index along T per row whose logits are wanted (a prefill needs only each
        prompt's last token: this skips the vocabulary projection of the others); default: every position.
        returns logits (B, T, vocab_size) fp32 — (B, 1, vocab_size) with logits_at — (and the list of per-layer
        router logits if asked).
        """
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        if self.compiled_decode is not None and T == 1 and cache is not None and not return_router_logits:
            return self.compiled_decode(tokens, positions, cache, logits_at)
        return self._forward(tokens, positions, cache, return_router_logits, logits_at)

    def _forward(self, tokens, positions, cache, return_router_logits=False, logits_at=None):
        B, T = tokens.shape
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        args = self.args  # every layer rotates by the same angles: compute them once
        rope = None  # a compiled step rotates with real cos/sin in each layer (inductor has no complex arithmetic)
        if not torch.compiler.is_compiling():
            rope = rope_rotations(positions, args.head_dim, args.rope_theta)  # (B, T, head_dim/2) complex
        router_logits = []
        for i, layer in enumerate(self.layers):
            h, rl = layer(h, positions, None if cache is None else cache[i], rope)
            if rl is not None:
                router_logits.append(rl)
        if logits_at is not None:
            h = h[torch.arange(B, device=h.device), logits_at][:, None]  # (B, 1, dim)
        logits = self.output(self.norm(h)).float()  # (B, T, vocab)
        return (logits, router_logits) if return_router_logits else logits

    def compute_loss(self, tokens: torch.Tensor, targets: torch.Tensor, aux_loss_coef: float = 0.02) -> LossOutput:
        """Training loss: next-token cross-entropy plus, for MoE models, aux_loss_coef x the load-balancing loss.

        tokens: (B, T); targets: (B, T) the token that should follow each input token (-100 = ignore).
        """
        logits, router_logits = self(tokens, return_router_logits=True)
        lm_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        if router_logits:
            moe = self.args.moe
            aux = load_balancing_loss(router_logits, moe.num_experts, moe.num_experts_per_tok)
        else:
            aux = torch.zeros((), device=logits.device)
        return LossOutput(lm_loss + aux_loss_coef * aux, lm_loss, aux, logits)

    def compile_decode(self, enabled: bool = True, freeze: bool = False) -> Transformer:
        """Run decode steps (one token per row, with a KV cache) through torch.compile; off by default.

        Every step of a request has the same shapes (batch, cache capacity) and passes positions as tensors, so
        all steps reuse one compiled graph (no recompiles per step; a new batch size or cache size compiles
        again).  MoE layers get their experts stacked (MoeLayer.stack_experts) so that a batch-1 step gathers its
        chosen experts inside the graph; a larger batch runs the expert dispatch eagerly (it reads expert counts on
        the host).  Compile after converting or moving the model.  Compiling takes a minute or more on a small CPU;
        it pays where Python overhead is a large share of a step (small models, MoE): measure with
        ``benchmarks/bench.py --compile``.  enabled=False returns to eager decoding.
        freeze=True compiles with inductor's freezing: the weights become constants of the compiled code (folded
        and laid out for it), so later changes to them are not seen; decode must run without autograd
        (generate does).
        """
        if enabled:
            for layer in self.layers:
                if isinstance(layer.feed_forward, MoeLayer):
                    layer.feed_forward.stack_experts()  # the chosen experts are gathered inside the graph
        options = {"freezing": True} if freeze else None
        self.compiled_decode = torch.compile(self._forward, dynamic=False, options=options) if enabled else None
        return self

    def set_backend(self, attention: str = "torch", moe: str = "torch") -> Transformer:
        """Select the implementation of the hot paths.

        "torch" (default): PyTorch with the fast paths that equal the reference (attention.sdpa_attention,
        complex RoPE, moe.moe_forward_grouped); "reference": the plain reference functions (attention.attention,
        rope.apply_rotary_emb, moe.moe_forward); "triton": triton_kernels.
        """
        for name in (attention, moe):
            if name not in ("torch", "reference", "triton"):
                raise ValueError(f"backend must be 'torch', 'reference' or 'triton', got {name!r}")
        for layer in self.layers:
            layer.attention.backend = attention
            if isinstance(layer.feed_forward, MoeLayer):
                layer.feed_forward.backend = moe
        return self


class _SkipInit(TorchFunctionMode):
    """Turn the torch.nn.init functions into no-ops while a model is built on the meta device.

    Initialising meta tensors is pointless, and normal_ on a meta tensor imports torch._dynamo (seconds and
    ~150 MB); every other op passes through unchanged.
    """

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
