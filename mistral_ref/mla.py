"""Multi-head latent attention (MLA; DeepSeek-V2 2024, section 2.1), as Mistral Small 4 and Mistral Large 3 use it.

Grouped-query attention shrinks the KV cache by sharing key-value heads.  MLA shrinks it further: each token is
compressed to ONE small latent vector c (kv_lora_rank wide, e.g. 256) from which every head's key and value are
re-expanded by a learned matrix (kv_b_proj).  Only c — plus one small rotary key shared by all heads — is cached.

Rotary embedding cannot pass through the re-expansion (a rotation between c and kv_b_proj would have to be
undone per position), so each head is split: a "nope" part (qk_nope_head_dim, no rotation) computed from the
latent, and a "rope" part (qk_rope_head_dim) that is rotated: per head for queries, ONE rotary key per token
shared by all heads (it comes straight from the input, beside the latent: kv_a_proj_with_mqa, "multi-query").

Per token, with H heads, n = qk_nope_head_dim, r = qk_rope_head_dim, v = v_head_dim, c = kv_lora_rank:
  queries:  x -> [q_a_proj -> q_a_layernorm -> q_b_proj | q_proj] -> (H, n + r) = q_nope | q_rope -> rotate q_rope
  keys/values: x -> kv_a_proj_with_mqa -> (c + r) = latent | k_rope;  rotate k_rope (shared by the heads)
            latent -> kv_a_layernorm -> kv_b_proj -> (H, n + v) = k_nope | value
  scores:   (q_nope . k_nope + q_rope . k_rope) * scale,  scale = (n + r) ** -0.5 x YaRN's mscale ** 2
  out:      softmax(scores) @ value -> (H * v) -> wo (HF o_proj)
The cache keeps the normed latent (c) and the rotated k_rope (r): (c + r) numbers per token and layer, against
2 x n_kv_heads x head_dim for grouped-query attention (family.kv_cache_bytes; README "Latent attention").
The layer attends through ``ops.latent_attention``: :func:`latent_attention` below with backend "reference"; the
engine's forms attend in latent space instead (backends/mla.py, triton_kernels/latent_decode.py).

Parameter names are Hugging Face mistral4 / deepseek_v3's (q_a_proj, kv_a_proj_with_mqa, ...), except the output
projection, `wo` as in every Mistral model (HF o_proj).  The
rotary part uses interleaved pairs as rope.apply_rotary_emb does: that is HF's ``rope_interleave: true`` (both
published models); the half-split layout (rope_interleave false) would need the rope rows permuted on load.
The query scaling of Mistral Small 4 (llama_4_scaling) multiplies the whole query, as in attention.py.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from mistral_ref.attention import at_rows, attention_mask, llama4_query_scale
from mistral_ref.config import MlaArgs, ModelArgs, YarnArgs
from mistral_ref.norm import RMSNorm

if TYPE_CHECKING:  # typing only
    from mistral_ref.backends import Backend
    from mistral_ref.cache import LayerCache


def mla_softmax_scale(mla: MlaArgs, yarn: YarnArgs | None) -> float:
    """qk_head_dim ** -0.5, times (0.1 * mscale_all_dim * ln(factor) + 1) ** 2 with YaRN and mscale_all_dim > 0.

    YaRN stretches the rotary part; DeepSeek's rule corrects the attention temperature on the softmax scale
    (not on cos / sin, which stay unscaled when HF's mscale == mscale_all_dim)."""
    scale = mla.qk_head_dim ** -0.5
    if yarn is not None and mla.mscale_all_dim and yarn.factor > 1:
        m = 0.1 * mla.mscale_all_dim * math.log(yarn.factor) + 1.0
        scale *= m * m
    return scale


def latent_attention(q_nope: torch.Tensor, q_rope: torch.Tensor, latents: torch.Tensor, k_rope: torch.Tensor,
                     kv_b_weight: torch.Tensor, v_head_dim: int, q_pos: torch.Tensor, k_pos: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Reference attention of MLA, in plain einsums: expand every latent into per-head keys and values, attend.

    q_nope: (B, T, H, n); q_rope: (B, T, H, r); latents: (B, S, c) (kv_a_layernorm'd); k_rope: (B, S, r) shared
    by the heads; kv_b_weight: (H * (n + v), c), kv_b_proj.weight; q_pos (B, T), k_pos (B, S) (-1 = padding /
    empty slot).  returns (B, T, H, v) in q's dtype.  Softmax in fp32; a query that sees no key gets a uniform
    average instead of NaN (as attention.attention).  The layer calls it as ``ops.latent_attention``; the engine's
    forms (backends/mla.py: the absorbed decode in latent space) compute the same.
    """
    B, S, _ = latents.shape
    H, n = q_nope.shape[2], q_nope.shape[3]
    kv = F.linear(latents, kv_b_weight).view(B, S, H, n + v_head_dim)  # every cached token re-expanded
    k_nope, v = kv.split([n, v_head_dim], dim=-1)  # (B, S, H, n), (B, S, H, v)
    scores = torch.einsum("bthd,bshd->bhts", q_nope, k_nope)  # (B, H, T, S) the un-rotated part
    scores = scores + torch.einsum("bthd,bsd->bhts", q_rope, k_rope)  # + the rotated part (one key for all heads)
    mask = attention_mask(q_pos, k_pos, None)[:, None]  # (B, 1, T, S)
    scores = (scores.float() * scale).masked_fill(~mask, torch.finfo(torch.float32).min)
    probs = F.softmax(scores, dim=-1).to(q_nope.dtype)  # (B, H, T, S)
    return torch.einsum("bhts,bshd->bthd", probs, v)


class LatentAttention(nn.Module):
    """The attention half of a Mistral Small 4 / Mistral Large 3 block (names as in HF checkpoints)."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        mla = args.mla
        assert mla is not None
        self.n_heads, self.mla = args.n_heads, mla
        self.scale = mla_softmax_scale(mla, args.yarn)
        self.llama_4_scaling = args.llama_4_scaling
        H, qk = args.n_heads, mla.qk_head_dim
        if mla.q_lora_rank is None:
            self.q_proj = nn.Linear(args.dim, H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(args.dim, mla.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, 1e-6)  # HF: the default eps, not rms_norm_eps
            self.q_b_proj = nn.Linear(mla.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(args.dim, mla.kv_lora_rank + mla.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(mla.kv_lora_rank, H * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False)
        self.wo = nn.Linear(H * mla.v_head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: Any, ops: Backend,
                cache: LayerCache | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, dim); positions: (B, T) (-1 = padding); rope: the rotation table of qk_rope_head_dim
        (ops.rope_table); cache: a cache.LatentLayerCache or None; rows: (B,) the one query a row whose output is
        wanted, or None for all (as Attention.forward).  -> (B, T, dim), or (B, 1, dim) with rows"""
        B, T, _ = x.shape
        m, H = self.mla, self.n_heads
        n, r = m.qk_nope_head_dim, m.qk_rope_head_dim
        if m.q_lora_rank is None:  # q: (B, T, H * (n + r)), kv: (B, T, c + r)
            q, kv = ops.linears(x, (self.q_proj.weight, self.kv_a_proj_with_mqa.weight))
        else:  # queries through a low-rank bottleneck (q_lora_rank) with its own norm
            q_a, kv = ops.linears(x, (self.q_a_proj.weight, self.kv_a_proj_with_mqa.weight))
            q = ops.linear(self.q_a_layernorm(q_a, ops), self.q_b_proj.weight)
        q = q.view(B, T, H, n + r)
        q_nope, q_rope = q.split([n, r], dim=-1)  # (B, T, H, n), (B, T, H, r)
        latent, k_rope = kv.split([m.kv_lora_rank, r], dim=-1)  # (B, T, c), (B, T, r)
        latent = self.kv_a_layernorm(latent, ops)
        q_rope = ops.rope(q_rope, rope)
        k_rope = ops.rope(k_rope[:, :, None, :], rope)  # (B, T, 1, r): one rotary key per token
        if self.llama_4_scaling is not None:  # Mistral Small 4: the whole query grows with its position
            s = llama4_query_scale(positions, self.llama_4_scaling).to(q.dtype)[:, :, None, None]
            q_nope, q_rope = q_nope * s, q_rope * s
        if cache is None:
            latents, k_ropes, k_pos = latent, k_rope[:, :, 0], positions  # (B, T, c), (B, T, r)
        else:  # the latent cache keeps (latent, k_rope) per token, not per-head keys and values
            latents, k_ropes, k_pos = ops.update_cache(cache, latent[:, :, None, :], k_rope, positions)
            latents, k_ropes = latents[:, :, 0], k_ropes[:, :, 0]  # (B, S, c), (B, S, r)
        if rows is not None:  # one query a row: (B, 1, H, n), (B, 1, H, r), (B, 1)
            q_nope, q_rope, positions = at_rows(q_nope, rows), at_rows(q_rope, rows), at_rows(positions, rows)
        out = ops.latent_attention(q_nope, q_rope, latents, k_ropes, self.kv_b_proj.weight, m.v_head_dim,
                                   positions, k_pos, self.scale)  # (B, T or 1, H, v)
        return ops.linear(out.flatten(2), self.wo.weight)
