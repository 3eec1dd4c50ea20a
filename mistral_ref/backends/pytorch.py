"""Backend "torch" (the default): PyTorch fast paths, each equal to the reference function it replaces.

| op         | function                                   | equals (backend "reference")             |
|------------|--------------------------------------------|------------------------------------------|
| linear     | backends/linear.py: linear                 | F.linear                                 |
| rms_norm   | rms_norm below: F.rms_norm (bitwise), and  | norm.rms_norm                            |
|            | bf16 rows (CPU): cpu_gemv.rms_norm         |                                          |
| rope       | backends/rope.py: complex rotations, and   | rope.rope_angles + rope.apply_rotary_emb |
|            | on a CPU: cpu_gemv.rope (torch's rounding) |                                          |
| attention  | attention below: sdpa_attention, and one   | attention.attention                      |
|            | query per row on a CPU: cpu_gemv.attention |                                          |
|            | a bf16 prompt on a CPU: prompt_attention   |                                          |
|            | (with AMX, plain causal ones: SDPA)        |                                          |
| moe        | backends/moe.py: moe_forward_grouped       | moe.moe_forward                          |
| mix_experts | backends/moe.py: mix_experts_grouped      | moe.mix_experts                          |
| swiglu     | swiglu below: one C pass for bf16 on a CPU | moe.swiglu                               |
| update_cache | update_cache below                       | cache.LayerCache.update                  |
| latent_attention | backends/mla.py: absorbed (decode,     | mla.latent_attention                     |
|              | short chunks) / expanded + SDPA (prompts)  |                                          |

Importing this module has glibc keep freed memory for reuse (backends/heap.py: one process-wide setting;
MISTRAL_REF_KEEP_FREED=0 leaves it), so that a long prompt's temporaries do not fault their pages in anew.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mistral_ref.backends import Backend, cpu_gemv, heap, prompt_attention
from mistral_ref.backends.decode_step import decode_step
from mistral_ref.backends.linear import linear
from mistral_ref.backends.mla import latent_attention
from mistral_ref.backends.moe import mix_experts_grouped, moe_forward_grouped
from mistral_ref.backends.prompt_step import prompt_step
from mistral_ref.backends.rope import apply_rotary_emb_complex, rope_rotations
from mistral_ref.backends.sdpa import sdpa_attention
from mistral_ref.cache import LayerCache


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """norm.rms_norm: bf16 rows on a CPU in one C call (cpu_gemv.rms_norm: a decode step's few rows on one thread,
    a prompt's split among threads) where the kernels are available, else :func:`rms_norm_torch`.
    x: (..., dim) -> (..., dim)"""
    if cpu_gemv.rms_norm_applies(x, weight) and cpu_gemv.library() is not None:
        return cpu_gemv.rms_norm(x, weight, eps, checked=True)
    return rms_norm_torch(x, weight, eps)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """norm.rms_norm in one call: F.rms_norm is the same fp32 formula (bitwise).  x: (..., dim) -> (..., dim)"""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x)


def rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """apply_rotary_emb_complex: bf16 or fp32 heads on a CPU in one C call (cpu_gemv.rope: each product and sum
    rounded as torch's vectorized complex product rounds them, bitwise it wherever torch runs that loop) where the
    kernels are available, instead of the complex product's casts and passes over memory.
    x (B, T, H, D), rotations (B, T, D/2) complex64 -> (B, T, H, D)"""
    if cpu_gemv.rope_applies(x, rotations) and cpu_gemv.library() is not None:
        return cpu_gemv.rope(x, rotations, checked=True)
    return apply_rotary_emb_complex(x, rotations)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
              window: int | None) -> torch.Tensor:
    """sdpa_attention; a decode step (one query per row) on a CPU goes to the C kernel (cpu_gemv.attention: the
    keys the query sees, nothing else) where it is available, and MIN_TOKENS or more bf16 queries of a prompt on a
    CPU that see their prompt's keys and nothing else (prompt_attention.causal_span: a prompt, or a later chunk of
    it in a full-attention layer; prompt_rows: row by row in a batch of them with padding) to prompt_attention
    (two GEMMs a block of queries; in fp32, and for fewer queries, PyTorch's kernel is as fast or faster; on a CPU
    with AMX tiles a C flash kernel on them, prompt_attention.amx_takes, or else a plain causal prompt keeps SDPA's
    causal mode: prompt_attention.flash_takes).
    q (B, T, H, D), k, v (B, S, kv, D) -> (B, T, H, D)"""
    T = q.shape[1]
    if T == 1 and cpu_gemv.attention_applies(q, k, v) and cpu_gemv.library() is not None:
        return cpu_gemv.attention(q, k, v, q_pos, k_pos, window)
    if T >= prompt_attention.MIN_TOKENS and q.dtype is torch.bfloat16 and q.device.type == "cpu":
        out = prompt_attention.prompt_rows(q, k, v, q_pos, k_pos, window)  # None: no row of the batch qualifies
        if out is not None:
            return out
    return sdpa_attention(q, k, v, q_pos, k_pos, window)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """moe.swiglu, silu(gate) * up: bf16 on a CPU in one C pass (cpu_gemv.swiglu: no fp32 SiLU tensor in between)
    where the kernels are available.  gate, up: (..., hidden) -> (..., hidden)"""
    if cpu_gemv.swiglu_applies(gate, up) and cpu_gemv.library() is not None:
        return cpu_gemv.swiglu(gate, up, checked=True)
    return F.silu(gate) * up


def update_cache(cache: LayerCache, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
    """cache.update, with one shortcut on the CPU (host reads are free there): where every row sits at the same
    consecutive positions p .. p + T - 1 (batch 1, an unragged batch), the T slots are written as one slice
    instead of a masked scatter: a decode step's one token (slot p % capacity: a rolling layer too), a chunk of a
    prompt into a full layer's slots.  A chunk into a rolling layer needs cache.update's old-buffer view."""
    T = k.shape[1]
    if positions.device.type == "cpu" and (T == 1 or not cache.rolling):
        first = consecutive(positions)
        if first is not None:
            if not cache.rolling:
                cache.check_fits(positions)  # (a position past the slots: cache.update's error)
            slot = first % cache.capacity  # (a full layer: first itself)
            cache.k[:, slot:slot + T] = k
            cache.v[:, slot:slot + T] = v
            cache.pos[:, slot:slot + T] = positions
            return cache.k, cache.v, cache.pos
    return cache.update(k, v, positions)


def consecutive(positions: torch.Tensor) -> int | None:
    """p where every row of positions (B, T) (CPU) holds p .. p + T - 1, p >= 0; else None."""
    if cpu_gemv.positions_apply(positions):
        return cpu_gemv.consecutive_rows(positions)
    first = int(positions[0, 0])
    T = positions.shape[1]
    return first if first >= 0 and torch.equal(positions, torch.arange(first, first + T).expand_as(positions)) else None


heap.keep_freed_memory()  # glibc keeps freed memory for the next tensor: no page faults (backends/heap.py)

BACKEND = Backend(name="torch", linear=linear, rms_norm=rms_norm, rope_table=rope_rotations,
                  rope=rope, attention=attention, moe=moe_forward_grouped, mix_experts=mix_experts_grouped,
                  swiglu=swiglu, update_cache=update_cache, latent_attention=latent_attention,
                  decode_step=decode_step, prompt_step=prompt_step)
