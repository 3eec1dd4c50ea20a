"""Latent attention, fast: the absorbed form for decode steps and short chunks, SDPA (or, for a bf16 prompt on a CPU,
backends/prompt_attention.py) over expanded keys for long prompts.

Equals: mla.latent_attention(q_nope, q_rope, latents, k_rope, kv_b_weight, v_head_dim, q_pos, k_pos, scale)
(backend "reference"), tested in tests/test_mla_absorbed.py.  It is the "torch" backend's ``latent_attention``.

The absorbed form (DeepSeek-V2, appendix "MLA inference").  mla.latent_attention expands every cached latent into
k_nope = W_UK latent and v = W_UV latent (S x H x (n + v) numbers, recomputed at every decode step).  Since

    q_nope . k_nope = q_nope . (W_UK latent) = (W_UK^T q_nope) . latent          (per head, W_UK: (n, c))
    probs @ v       = probs @ (W_UV latent)  = W_UV (probs @ latent)              (per head, W_UV: (v, c))

the same scores and output come from folding W_UK into the query and W_UV into the output: the work per cached
token drops from H x (n + v) x c (expansion) to 2 x H x c (two dot products in latent space), which is what makes
a long-context decode step cheap.  But every query pays 2 x H x c per key that way, against H x (n + r + v) on
expanded keys: for T queries the expansion costs S H (n + v) c once, the absorbed form T S H (2c - n - v) more in
attention.  :func:`latent_attention` takes the form with fewer multiply-adds: absorbed while
T (2c - n - v) < (n + v) c (Mistral Small 4: T < 154 queries a row), expanded + PyTorch's fused kernel beyond.
Measured here (one CPU thread, fp32, H = 32, 2048 cached tokens): T = 1: absorbed 12 ms vs expanded 824 ms;
T = 16: 150 vs 684 ms; T = 256: 1899 vs 1261 ms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mistral_ref.attention import attention_mask
from mistral_ref.backends import cpu_gemv, prompt_attention
from mistral_ref.backends.linear import linear, upcast_on_cpu
from mistral_ref.backends.sdpa import causal_prompt


def absorbed_latent_attention(q_nope: torch.Tensor, q_rope: torch.Tensor, latents: torch.Tensor,
                              k_rope: torch.Tensor, kv_b_weight: torch.Tensor, v_head_dim: int,
                              q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """Latent attention computed in latent space (arguments and result as mla.latent_attention).

    q_nope: (B, T, H, n); q_rope: (B, T, H, r); latents: (B, S, c); k_rope: (B, S, r); kv_b_weight: (H * (n + v),
    c); q_pos (B, T), k_pos (B, S).  returns (B, T, H, v) in q_nope's dtype.
    """
    H, n = q_nope.shape[2], q_nope.shape[3]
    w = kv_b_weight.view(H, n + v_head_dim, -1)  # (H, n + v, c)
    w_uk, w_uv = w[:, :n], w[:, n:]  # (H, n, c), (H, v, c)
    q_latent = torch.einsum("bthn,hnc->bthc", q_nope, w_uk)  # the query moved into latent space
    scores = torch.einsum("bthc,bsc->bhts", q_latent, latents)  # = q_nope . k_nope
    scores = scores + torch.einsum("bthd,bsd->bhts", q_rope, k_rope)
    mask = attention_mask(q_pos, k_pos, None)[:, None]  # (B, 1, T, S)
    scores = (scores.float() * scale).masked_fill(~mask, torch.finfo(torch.float32).min)
    probs = F.softmax(scores, dim=-1).to(q_nope.dtype)  # (B, H, T, S)
    out_latent = torch.einsum("bhts,bsc->bthc", probs, latents)  # (B, T, H, c)
    return torch.einsum("bthc,hvc->bthv", out_latent, w_uv)  # (B, T, H, v)


def expanded_sdpa_latent_attention(q_nope: torch.Tensor, q_rope: torch.Tensor, latents: torch.Tensor,
                                   k_rope: torch.Tensor, kv_b_weight: torch.Tensor, v_head_dim: int,
                                   q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """mla.latent_attention with the expansion by the fast CPU product and the attention by
    F.scaled_dot_product_attention (the mask as an additive bias, as backends/sdpa.py; plain causal prompts use
    the kernel's causal mode), or, for MIN_TOKENS or more bf16 queries on a CPU that see their prompt's keys and
    nothing else, by the AMX flash kernel where prompt_attention.amx_takes them (cpu_gemv.prompt_attention_amx),
    else by prompt_attention (two GEMMs a block, the reference's softmax in C with its fp32 scaling) unless
    prompt_attention.flash_takes them (plain causal prompts on a CPU with AMX).
    Same arguments and result."""
    B, S, _ = latents.shape
    T, H, n = q_nope.shape[1], q_nope.shape[2], q_nope.shape[3]
    kv = linear(latents, kv_b_weight).view(B, S, H, n + v_head_dim)
    k_nope, v = kv.split([n, v_head_dim], dim=-1)  # (B, S, H, n), (B, S, H, v)
    if T >= prompt_attention.MIN_TOKENS and q_nope.dtype is torch.bfloat16 and q_nope.device.type == "cpu":
        span = prompt_attention.causal_span(q_pos, k_pos)
        if span is not None:
            start, stop = span[0], span[0] + span[1] + T  # the slots of the prompt's keys
            q = torch.cat([q_nope, q_rope], dim=-1)  # (B, T, H, n + r)
            k = torch.cat([k_nope[:, start:stop], k_rope[:, start:stop, None, :].expand(-1, -1, H, -1)], dim=-1)
            if prompt_attention.amx_takes(q, k, v[:, start:stop]):
                return cpu_gemv.prompt_attention_amx(q, k, v[:, start:stop], scale=scale)
            if not prompt_attention.flash_takes(T, span[1], None) and prompt_attention.applies(q, k, v[:, start:stop]):
                return prompt_attention.prompt_attention(q, k, v[:, start:stop], scale=scale, scaled_fp32=True)
    q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # (B, H, T, n + r)
    k = torch.cat([k_nope, k_rope[:, :, None, :].expand(B, S, H, -1)], dim=-1).transpose(1, 2)  # (B, H, S, n + r)
    v = v.transpose(1, 2)  # (B, H, S, v)
    start = causal_prompt(q_pos, k_pos, None)
    if start is not None:
        out = F.scaled_dot_product_attention(q, k[:, :, start:start + T], v[:, :, start:start + T], is_causal=True,
                                             scale=scale)
    else:
        bias = torch.where(attention_mask(q_pos, k_pos, None), 0.0, torch.finfo(q.dtype).min).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None], scale=scale)  # (B, H, T, v)
    return out.transpose(1, 2)


def latent_attention(q_nope: torch.Tensor, q_rope: torch.Tensor, latents: torch.Tensor, k_rope: torch.Tensor,
                     kv_b_weight: torch.Tensor, v_head_dim: int, q_pos: torch.Tensor, k_pos: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """The "torch" backend's latent attention: absorbed while that does fewer multiply-adds (a decode step, a short
    chunk; in fp32 on a CPU without native reduced-precision products), expanded + SDPA for longer prompts (module
    docstring).  Arguments and result as mla.latent_attention."""
    T, n, c = q_nope.shape[1], q_nope.shape[3], latents.shape[2]
    if T * (2 * c - n - v_head_dim) < (n + v_head_dim) * c and not isinstance(kv_b_weight, torch.Tensor):
        kv_b_weight = kv_b_weight.dequantize()  # a QuantizedWeight (quantize.py): absorbing needs the matrix itself
    if T * (2 * c - n - v_head_dim) >= (n + v_head_dim) * c:
        return expanded_sdpa_latent_attention(q_nope, q_rope, latents, k_rope, kv_b_weight, v_head_dim, q_pos,
                                              k_pos, scale)
    if upcast_on_cpu(q_nope):
        out = absorbed_latent_attention(q_nope.float(), q_rope.float(), latents.float(), k_rope.float(),
                                        kv_b_weight.float(), v_head_dim, q_pos, k_pos, scale)
        return out.to(q_nope.dtype)
    return absorbed_latent_attention(q_nope, q_rope, latents, k_rope, kv_b_weight, v_head_dim, q_pos, k_pos, scale)
