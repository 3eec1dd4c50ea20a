"""A prompt's causal attention on a CPU as two matrix products a block of queries: the scores by one batched GEMM,
the reference's softmax in C (cpu_gemv.c: softmax_causal), the weighted values by a second batched GEMM.

Equals: attention.attention(q, k, v, q_pos, k_pos, window) where a prompt, or a later chunk of it, attends to its
own keys and those of the chunks before it, nothing else (:func:`causal_span`: a forward pass without cache, a
first chunk into an empty cache, a later chunk into a full-attention layer's cache), with the reference's
roundings in bf16: the scores rounded to bf16 as its einsum returns them, then scaled and rounded, the softmax in
fp32, the probabilities rounded, the weighted values summed in fp32 and rounded (the GEMMs' sums in another order
than the reference's einsums; fp32 within 1e-6).  tests/test_cpu_gemv.py checks it against the reference in
every build, in bf16 and fp32, with GQA, head_dim != dim / n_heads, over blocks and after earlier chunks.  Latent
attention's expanded form (backends/mla.py) calls it too, with mla.latent_attention's scale, its scores scaled in
fp32 (scaled_fp32) and value heads of their own size (tests/test_mla_absorbed.py).

Why: on a CPU without AMX, F.scaled_dot_product_attention runs PyTorch's flash-attention loops, which keep the
scores in registers but multiply far below the machine's GEMM rate; here the scores of a block of `block` queries
(times the query heads of a key-value head) against the keys they see are one (rows x head_dim) x (head_dim x
keys) product, as the reference's einsum computes them, and each row's softmax costs one pass over its scores.
The keys after a block's last query are never multiplied (causal: half the work of a full matrix).  Where the CPU
has AMX tiles, SDPA's flash kernel's micro-kernels multiply with them and it outruns the two GEMMs, whose scores go
through memory: there (FLASH_FIRST) a prompt whose mask is plain causal keeps that kernel (:func:`flash_takes`),
and only the prompts that SDPA would need a mask for (later chunks, windows shorter than the prompt, ragged rows)
come here; and where this process may use the tiles, a C flash kernel on them takes every such span before either
(:func:`amx_takes`, cpu_gemv.prompt_attention_amx: faster than SDPA's up to AMX_MAX_KEYS keys).
`make bench` and benchmarks/bench_attention.py time them (README, "Speed on a CPU").
"""

from __future__ import annotations

import torch

from mistral_ref.backends import cpu_gemv
from mistral_ref.backends.sdpa import causal_sdpa, sdpa_attention

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
# CPUs with AMX tiles: a plain causal prompt goes to the flash kernel (module docstring).  Fixed per machine (not
# timed), so that a machine's bf16 results are the same from run to run.
FLASH_FIRST = cpu_gemv.AMX


# CPUs with AMX tiles this process may use: a bf16 prompt's attention, any span prompt_rows finds (later chunks,
# windows) or latent attention's expanded form, goes to the flash kernel on the tiles (cpu_gemv.prompt_attention_amx)
# where it takes the shapes; False: SDPA / the GEMMs as below (benchmarks/bench_attention.py times both)
AMX_ATTENTION = True
# ... up to this many keys, and this many bytes of a row's keys and values: each block of 32 queries streams its
# head's keys and values from L2 or L3, and past these SDPA's kernel (whose query blocks are larger) caught up
# (bench_attention.py part 7: Mistral 7B's 8 key / value heads of 128 at 4096 tokens, 16 MB, 0.93x SDPA; 4 MB
# at 4096 tokens 1.21-1.24x, 8 MB at 2048 1.36x)
AMX_MAX_KEYS = 4096
AMX_MAX_KV_BYTES = 8 << 20


def amx_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether one span's queries, keys and values go to cpu_gemv.prompt_attention_amx (AMX_ATTENTION, the kernel
    takes them: bf16, head sizes multiples of 32 / 16, tiles this process may use; and at most AMX_MAX_KEYS keys
    and AMX_MAX_KV_BYTES of a row's keys and values)."""
    return (AMX_ATTENTION and k.shape[1] <= AMX_MAX_KEYS
            and k.shape[1] * k.shape[2] * (k.shape[3] + v.shape[3]) * k.element_size() <= AMX_MAX_KV_BYTES
            and cpu_gemv.prompt_attention_amx_applies(q, k, v))


def flash_takes(tokens: int, offset: int, window: int | None) -> bool:
    """Whether `tokens` queries at positions offset .. offset + tokens - 1 of a prompt go to the flash kernel's
    causal mode instead of prompt_attention: on a CPU with AMX tiles (FLASH_FIRST), where they have no earlier keys
    and no window shorter than themselves (their mask is plain causal, which that mode computes without a mask)."""
    return FLASH_FIRST and offset == 0 and (window is None or window >= tokens)


def causal_span(q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[int, int] | None:
    """Where every row's T queries sit at the positions offset .. offset + T - 1 (the same in every row) and the
    keys are slots start .. start + offset + T - 1 holding positions 0 .. offset + T - 1 in order, every other
    slot empty (-1): (start, offset), else None.  Then attention_mask is exactly "query offset + i sees keys
    0 .. offset + i" (and within the last `window` positions, if the layer has a window): a forward pass without
    cache and a prompt's first chunk into an empty cache (offset 0; a rolling layer's empty buffer in front), and
    each later chunk of it in a full-attention layer's cache (the earlier chunks' keys in front of it).  Checked on
    the host.

    q_pos: (B, T); k_pos: (B, S), -1 for empty slots.  (One C call where the kernels are loaded:
    cpu_gemv.causal_span.)"""
    if cpu_gemv.positions_apply(q_pos, k_pos):
        return cpu_gemv.causal_span(q_pos, k_pos)
    B, T = q_pos.shape
    offset = int(q_pos[0, 0])
    span = offset + T
    if offset < 0 or span > k_pos.shape[1]:
        return None
    positions = torch.arange(span, device=q_pos.device).expand(B, -1)  # (B, offset + T)
    if not torch.equal(q_pos, positions[:, offset:]):
        return None
    first = (k_pos[0] == 0).nonzero()
    if first.numel() == 0:
        return None
    start = int(first[0])
    if (torch.equal(k_pos[:, start:start + span], positions) and bool((k_pos[:, :start] < 0).all())
            and bool((k_pos[:, start + span:] < 0).all())):
        return start, offset
    return None


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether prompt_attention takes these queries and keys: several queries and at least as many keys (at most
    MAX_KEYS), on a CPU with the C kernels loaded, q, k and v all bf16 or all fp32 ((B, T, heads, head_dim),
    (B, offset + T, kv_heads, head_dim) and (B, offset + T, kv_heads, v_head_dim)), whole groups of query heads, no
    autograd."""
    return (q.ndim == 4 and k.ndim == 4 and v.ndim == 4 and 1 < q.shape[1] <= k.shape[1] <= MAX_KEYS
            and k.shape[:3] == v.shape[:3] and q.shape[0] == k.shape[0] and q.shape[3] == k.shape[3]
            and k.shape[2] > 0 and v.shape[3] > 0
            and q.shape[2] % k.shape[2] == 0 and q.dtype in (torch.bfloat16, torch.float32)
            and k.dtype is q.dtype and v.dtype is q.dtype
            and q.device.type == "cpu" and k.device.type == "cpu" and v.device.type == "cpu"
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and cpu_gemv.library() is not None)


def block_size(groups: int, rep: int, keys: int, element_size: int, window: int | None = None) -> int:
    """Queries a block for `groups` (batch x kv_heads) groups of `rep` query heads against `keys` keys (or, with a
    window, at most window + block of them)."""
    block = BLOCK
    while block > MIN_BLOCK and groups * rep * block * (keys if window is None else min(keys, window + block)) \
            * element_size > SCORE_BYTES:
        block //= 2
    return block


def prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, threads: int | None = None,
                     scale: float | None = None, scaled_fp32: bool = False,
                     window: int | None = None) -> torch.Tensor:
    """Causal attention of T queries over their prompt's keys (:func:`applies`): with offset = keys - T (the keys
    of earlier chunks), query t sees keys 0 .. offset + t, the last `window` of them if window is set.  scale: of
    the scores (None: head_dim ** -0.5, as attention.attention); scaled_fp32: the scaled scores are not rounded to
    bf16 (mla.latent_attention's rule).

    q: (B, T, n_heads, head_dim); k: (B, offset + T, n_kv_heads, head_dim); v: (B, offset + T, n_kv_heads,
    v_head_dim) -> (B, T, n_heads, v_head_dim) in q's dtype."""
    if not applies(q, k, v):
        raise ValueError(f"prompt_attention: q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}, v "
                         f"{tuple(v.shape)} {v.dtype} are not one prompt's bf16 or fp32 queries, keys and values "
                         f"on a CPU with the C kernels loaded ({cpu_gemv.status()})")
    threads = torch.get_num_threads() if threads is None else threads
    B, T, H, D = q.shape
    S, kv_heads, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = D ** -0.5 if scale is None else scale
    offset = S - T  # keys before the first query's own
    rep = H // kv_heads  # query heads per key-value head
    groups = B * kv_heads
    keys = k.transpose(1, 2).reshape(groups, S, D)  # (B x kv_heads, S, D): a group's keys in rows
    values = v.transpose(1, 2).reshape(groups, S, Dv)
    q = q.reshape(B, T, kv_heads, rep, D)  # (a view where q is contiguous)
    out = torch.empty(B, T, kv_heads, rep, Dv, dtype=q.dtype)
    window = None if window is not None and window >= S else window  # (a window over every key: none)
    block = block_size(groups, rep, S, q.element_size(), window)
    # one buffer for every block's scores (a fresh one per block would be new pages, faulted in and zeroed each time)
    buffer = torch.empty(groups * rep * block * (S if window is None else min(S, window + block)), dtype=q.dtype)
    for first in range(0, T, block):
        n = min(block, T - first)
        last = offset + first + n  # keys .. last - 1: the last query of the block sees them
        lo = 0 if window is None else max(0, offset + first - window + 1)  # the first key its first query sees
        queries = q[:, first:first + n].permute(0, 2, 3, 1, 4).reshape(groups, rep * n, D)  # rows: head, position
        scores = buffer[:groups * rep * n * (last - lo)].view(groups, rep * n, last - lo)
        torch.bmm(queries, keys[:, lo:last].transpose(1, 2), out=scores)  # (groups, rep x n, last - lo)
        if cpu_gemv.library().softmax_causal(scores.data_ptr(), scores.data_ptr(), int(q.dtype == torch.bfloat16),
                                             groups, rep * n, last - lo, n, offset + first - lo,
                                             -1 if window is None else window, scale, int(scaled_fp32), threads):
            raise MemoryError(f"prompt_attention: no memory for {threads} rows of {last - lo} scores")
        o = torch.bmm(scores, values[:, lo:last])  # (groups, rep x n, Dv)
        out[:, first:first + n] = o.view(B, kv_heads, rep, n, Dv).permute(0, 3, 1, 2, 4)
    return out.view(B, T, H, Dv)


def prompt_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                window: int | None) -> torch.Tensor | None:
    """attention.attention for a batch of prompts (or later chunks of them), each row's queries followed by padding
    (-1), as the server's scheduler prefills them: one call where every row has the same span (:func:`causal_span`),
    else row by row, each row with MIN_TOKENS or more queries that see their prompt's keys through the AMX flash
    kernel where :func:`amx_takes` them, else prompt_attention, or SDPA's causal mode where :func:`flash_takes` them
    (its padding queries, which see no key, get the reference's uniform average of every slot's value), and the
    other rows through sdpa_attention.  None where no row qualifies (the caller then runs SDPA on the batch).

    q: (B, T, n_heads, head_dim); k, v: (B, S, n_kv_heads, head_dim); q_pos: (B, T); k_pos: (B, S)."""
    B, T = q_pos.shape
    span = causal_span(q_pos, k_pos)
    if span is not None:  # every row alike (one prompt, or prompts of one length)
        start, stop = span[0], span[0] + span[1] + T
        if amx_takes(q, k[:, start:stop], v[:, start:stop]):
            return cpu_gemv.prompt_attention_amx(q, k[:, start:stop], v[:, start:stop], window)
        if flash_takes(T, span[1], window):
            return causal_sdpa(q, k[:, start:stop], v[:, start:stop])
        if applies(q, k[:, start:stop], v[:, start:stop]):
            return prompt_attention(q, k[:, start:stop], v[:, start:stop], window=window)
        return None
    plans = []  # per row: (queries before its padding, where its keys are) or None: SDPA
    for b in range(B):
        n = int((q_pos[b] >= 0).sum())
        row_span = None
        if n >= MIN_TOKENS and bool((q_pos[b, n:] < 0).all()):
            row_span = causal_span(q_pos[b:b + 1, :n], k_pos[b:b + 1])
        if row_span is not None:
            start, stop = row_span[0], row_span[0] + row_span[1] + n
            if not applies(q[b:b + 1, :n], k[b:b + 1, start:stop], v[b:b + 1, start:stop]):
                row_span = None
        plans.append(None if row_span is None else (n, row_span[0], row_span[0] + row_span[1] + n))
    if all(plan is None for plan in plans):
        return None
    rows = []
    for b, plan in enumerate(plans):
        if plan is None:
            rows.append(sdpa_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], q_pos[b:b + 1], k_pos[b:b + 1], window))
            continue
        n, start, stop = plan
        row = (q[b:b + 1, :n], k[b:b + 1, start:stop], v[b:b + 1, start:stop])
        if amx_takes(*row):
            out = cpu_gemv.prompt_attention_amx(*row, window)
        elif flash_takes(n, stop - start - n, window):
            out = causal_sdpa(*row)
        else:
            out = prompt_attention(*row, window=window)
        if n < T:  # padding queries: the softmax of S equal scores, 1 / S each, rounded as the reference rounds it
            S, H = k.shape[1], q.shape[2]
            uniform = torch.full((S,), 1.0 / S).to(q.dtype)
            average = torch.einsum("s,bskd->bkd", uniform, v[b:b + 1])  # (1, kv_heads, D)
            average = average.repeat_interleave(H // k.shape[2], dim=1)  # (1, H, D)
            out = torch.cat([out, average[:, None].expand(1, T - n, H, out.shape[3])], dim=1)
        rows.append(out)
    return torch.cat(rows)
