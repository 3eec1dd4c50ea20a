"""A prompt's causal attention on a CPU as two matrix products a block of queries: the scores by one batched GEMM,
the reference's softmax in C (cpu_gemv.c: softmax_causal), the weighted values by a second batched GEMM.

Equals: attention.attention(q, k, v, q_pos, k_pos, window) where the prompt attends only to itself
(sdpa.causal_prompt: a forward pass without cache, or a prompt's first chunk into an empty cache), with the
reference's roundings in bf16: the scores rounded to bf16 as its einsum returns them, then scaled and rounded,
the softmax in fp32, the probabilities rounded, the weighted values summed in fp32 and rounded (the GEMMs' sums in
another order than the reference's einsums; fp32 within 1e-6).  tests/test_backends_attention.py checks it
against the reference and against SDPA, in bf16 and fp32, with GQA, head_dim != dim / n_heads, and over blocks.

Why: on a CPU, F.scaled_dot_product_attention runs PyTorch's flash-attention loops, which keep the scores in
registers but multiply far below the machine's GEMM rate; here the scores of a block of `block` queries (times
the query heads of a key-value head) against the keys they see are one (rows x head_dim) x (head_dim x keys)
product, as the reference's einsum computes them, and each row's softmax costs one pass over its scores.  The
keys after a block's last query are never multiplied (causal: half the work of a full matrix).  `make bench` and
benchmarks/bench_operators.py time it against SDPA (README, "Speed on a CPU").
"""

from __future__ import annotations

import torch

from mistral_ref.backends import cpu_gemv

# Queries a block: the scores of one block are (B x kv_heads, rep x block, keys) values, kept below SCORE_BYTES;
# longer prompts take smaller blocks, down to MIN_BLOCK, and beyond MAX_KEYS keys the flash-attention kernel
# (sdpa.py), which needs no scores at all.
BLOCK = 128
MIN_BLOCK = 16
SCORE_BYTES = 32 << 20
MAX_KEYS = 16384
# Shorter prompts go to SDPA (backends/pytorch.py): below ~64 queries the GEMMs' fixed costs are larger than the
# flash kernel's (benchmarks/bench_attention.py)
MIN_TOKENS = 64


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether prompt_attention takes this prompt: several queries, on a CPU with the C kernels loaded, q, k and v
    all bf16 or all fp32 with as many keys as queries (B, T, heads / kv_heads, head_dim), whole groups of query
    heads, no autograd, at most MAX_KEYS positions."""
    return (q.ndim == 4 and k.ndim == 4 and 1 < q.shape[1] <= MAX_KEYS and k.shape == v.shape
            and q.shape[:2] == k.shape[:2] and q.shape[3] == k.shape[3] and k.shape[2] > 0
            and q.shape[2] % k.shape[2] == 0 and q.dtype in (torch.bfloat16, torch.float32)
            and k.dtype is q.dtype and v.dtype is q.dtype
            and q.device.type == "cpu" and k.device.type == "cpu" and v.device.type == "cpu"
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and cpu_gemv.library() is not None)


def block_size(groups: int, rep: int, keys: int, element_size: int) -> int:
    """Queries a block for `groups` (batch x kv_heads) groups of `rep` query heads against `keys` keys."""
    block = BLOCK
    while block > MIN_BLOCK and groups * rep * block * keys * element_size > SCORE_BYTES:
        block //= 2
    return block


def prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """Causal attention of a prompt over its own keys (:func:`applies`): query t sees keys 0 .. t.

    q: (B, T, n_heads, head_dim); k, v: (B, T, n_kv_heads, head_dim) -> (B, T, n_heads, head_dim) in q's dtype."""
    if not applies(q, k, v):
        raise ValueError(f"prompt_attention: q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}, v "
                         f"{tuple(v.shape)} {v.dtype} are not one prompt's bf16 or fp32 queries, keys and values "
                         f"on a CPU with the C kernels loaded ({cpu_gemv.status()})")
    threads = torch.get_num_threads() if threads is None else threads
    B, T, H, D = q.shape
    kv_heads = k.shape[2]
    rep = H // kv_heads  # query heads per key-value head
    groups = B * kv_heads
    keys = k.transpose(1, 2).reshape(groups, T, D)  # (B x kv_heads, T, D): a group's keys in rows
    values = v.transpose(1, 2).reshape(groups, T, D)
    q = q.reshape(B, T, kv_heads, rep, D)  # (a view where q is contiguous)
    out = torch.empty(B, T, kv_heads, rep, D, dtype=q.dtype)
    block = block_size(groups, rep, T, q.element_size())
    # one buffer for every block's scores (a fresh one per block would be new pages, faulted in and zeroed each time)
    buffer = torch.empty(groups * rep * block * T, dtype=q.dtype)
    for first in range(0, T, block):
        n = min(block, T - first)
        last = first + n  # keys 0 .. last - 1: the last query of the block sees them all
        queries = q[:, first:last].permute(0, 2, 3, 1, 4).reshape(groups, rep * n, D)  # rows: head, then position
        scores = buffer[:groups * rep * n * last].view(groups, rep * n, last)
        torch.bmm(queries, keys[:, :last].transpose(1, 2), out=scores)  # (groups, rep x n, last)
        if cpu_gemv.library().softmax_causal(scores.data_ptr(), scores.data_ptr(), int(q.dtype == torch.bfloat16),
                                             groups, rep * n, last, n, first, D, threads):
            raise MemoryError(f"prompt_attention: no memory for {threads} rows of {last} scores")
        o = torch.bmm(scores, values[:, :last])  # (groups, rep x n, D)
        out[:, first:last] = o.view(B, kv_heads, rep, n, D).permute(0, 3, 1, 2, 4)
    return out.view(B, T, H, D)
