"""A prompt's pass through the model with each block's residual additions inside its last products: the "torch"
backend's Backend.prompt_step.

Equals: the "torch" backend's layers (model.Transformer's blocks with backends/pytorch.py's functions), except
that h + a @ wo.T and h + g @ w2.T (a: the heads' outputs, Attention.attend; g: SwiGLU's hidden activations,
FeedForward.hidden) are each one product that adds into the residual stream h (linear.add_linear: torch.addmm_,
where oneDNN adds h to the fp32 sums before their one rounding to bf16; the layers round the product, then the
sum).  So in bf16 a prompt's hidden states are within a rounding of the layers' (in fp32 within the sums' order),
and where backends/linear.py sends a product to its C kernels (a few rows; 32-256 rows of bf16 on AMX tiles) the
addition is the layers' own: the same bits.  Every other function is the layers' (the norms, Attention.attend,
FeedForward.hidden, latent attention, the experts, the final norm and the output product).
tests/test_prompt_step.py checks it against the layers and the "reference" backend, beyond a sliding window,
with GQA, head_dim != dim / n_heads, Mixtral's experts, Ministral 3's query scaling, Mistral Small 4's latent
attention and fine-grained experts, ragged rows, a later chunk after cached keys, fp32 and bf16.

Why: a separate addition reads the product's output and h again and writes a third tensor, twice a block
(figures: README "Speed on a CPU", `make bench`).

Transformer.forward asks :func:`prompt_step` first for every pass of more than one token a row with a KV cache
(decode steps go to backends/decode_step.py); it returns None, and the layers run as usual, unless all hold:
* no autograd (the residual stream is written in place), a KV cache with a layer for each block, the CPU;
* the embedding is an nn.Embedding (its output is a new tensor, the step's to write into);
* no module whose forward the layers call has a forward hook or a replaced forward, and no global forward hook is
  registered (decode_step.untouched: the step calls the blocks' parts, not the blocks, so it would skip them; read
  from the decode step's kept plan, whose first making also moves the weights onto huge pages, backends/huge_pages.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from mistral_ref.attention import Attention, at_rows
from mistral_ref.backends.decode_step import untouched
from mistral_ref.backends.linear import add_linear
from mistral_ref.moe import FeedForward

if TYPE_CHECKING:  # typing only: the model imports the backends, not the other way round
    from mistral_ref.backends import Backend
    from mistral_ref.cache import KVCache, LayerCache
    from mistral_ref.model import Transformer, TransformerBlock


def prompt_step(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | None,
                logits_at: torch.Tensor | None = None) -> torch.Tensor | None:
    """model(tokens, positions, cache, logits_at=logits_at) with the residual additions in the products; None
    where this pass does not apply (see the module docstring: the caller then runs the layers).
    tokens, positions: (B, T) int64, T > 1 -> logits (B, T, vocab) fp32, (B, 1, vocab) with logits_at."""
    if (cache is None or torch.is_grad_enabled() or tokens.dim() != 2 or tokens.shape[1] < 2
            or tokens.device.type != "cpu" or len(cache.layers) != len(model.layers)
            or type(model.tok_embeddings) is not nn.Embedding or not untouched(model)):
        return None
    ops, a = model.ops, model.args
    h = model.tok_embeddings(tokens)  # (B, T, dim)
    rope = ops.rope_table(positions, a.rope_dim, a.rope_theta, a.yarn)  # the same for every layer
    last = len(model.layers) - 1
    for i, layer in enumerate(model.layers):  # the last one computes only the rows of logits_at: (B, 1, dim)
        h = block(layer, h, positions, rope, ops, cache[i], logits_at if i == last else None)
    return ops.linear(model.norm(h, ops), model.output_weight).float()


def block(layer: TransformerBlock, x: torch.Tensor, positions: torch.Tensor, rope: object, ops: Backend,
          cache: LayerCache, rows: torch.Tensor | None) -> torch.Tensor:
    """TransformerBlock.forward (without router logits) with its additions in the products where the parts are
    Attention and FeedForward (else the part's forward, then the addition).  x: (B, T, dim), written into (the
    caller's to give) -> (B, T, dim), or (B, 1, dim) with rows."""
    attention, ff = layer.attention, layer.feed_forward
    normed = layer.attention_norm(x, ops)
    h = x if rows is None else at_rows(x, rows)  # (a copy of those rows)
    if type(attention) is Attention:
        heads = attention.attend(normed, positions, rope, ops, cache, rows)  # (B, T or 1, n_heads, head_dim)
        h = add_linear(h, heads.flatten(2), attention.wo.weight)
    else:
        h = _add(h, attention(normed, positions, rope, ops, cache, rows))
    normed = layer.ffn_norm(h, ops)
    if type(ff) is FeedForward:
        return add_linear(h, ff.hidden(normed, ops), ff.w2.weight)
    out = ff(normed, ops)
    return _add(h, out[0] if isinstance(out, tuple) else out)  # (experts: their output, router logits)


def _add(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """h + y, into h where the sum keeps h's dtype and shape."""
    return h.add_(y) if y.dtype == h.dtype and y.shape == h.shape else h + y
