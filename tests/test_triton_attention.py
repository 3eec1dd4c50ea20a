"""triton_kernels prefill_attention / decode_attention against the fp32 reference mistral_ref.attention."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: no GPU on CI machines

import random

import pytest
import torch

from mistral_ref.attention import attention as reference_attention
from mistral_ref.cache import LayerCache
from triton_kernels import attention, decode_attention, prefill_attention
from triton_kernels._common import interpreting, new_output, poisoning
from triton_kernels.flash_attention import contiguous_base

pytestmark = pytest.mark.triton
DEVICE = "cpu" if interpreting() else "cuda"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def make_qkv(B, T, S, H, H_kv, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g)
    k = torch.randn(B, S, H_kv, D, generator=g)
    v = torch.randn(B, S, H_kv, D, generator=g)
    return [t.to(DEVICE, dtype) for t in (q, k, v)]


def prompt_positions(B, T, S):
    """Queries are the last T of S contiguous positions (chunked prefill when T < S)."""
    q_pos = torch.arange(S - T, S, device=DEVICE).expand(B, T).clone()
    k_pos = torch.arange(S, device=DEVICE).expand(B, S).clone()
    return q_pos, k_pos


def check(out, q, k, v, q_pos, k_pos, window):
    """Compare with the reference run in fp32 on the same (possibly rounded) inputs."""
    ref = reference_attention(q.float(), k.float(), v.float(), q_pos, k_pos, window)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), "kernel left unwritten (NaN-poisoned) or non-finite elements"
    err = (out.float() - ref).abs().max().item()
    assert err <= ATOL[q.dtype], f"max abs error {err:.3g} > {ATOL[q.dtype]}"


@pytest.mark.skipif(not interpreting(), reason="poisoning is on by default only under the interpreter")
def test_outputs_are_poisoned_under_the_interpreter():
    """Every kernel output starts as NaN, so an element a kernel forgets to write fails the comparisons."""
    assert poisoning()
    assert new_output((2, 3), torch.float16, torch.device(DEVICE)).isnan().all()


# ---- prefill: edge cases named in the issue ----------------------------------------------------------------
@pytest.mark.parametrize(
    "B, T, S, H, H_kv, D, window",
    [
        (2, 5, 5, 4, 4, 64, None),  # sequence shorter than a block, MHA (GQA ratio 1)
        (1, 37, 37, 8, 2, 128, 8),  # length not a multiple of the block, window smaller than a block, ratio 4
        (2, 20, 20, 8, 1, 16, 64),  # window larger than the sequence, ratio 8
        (1, 12, 40, 4, 2, 32, 10),  # chunked prefill: 12 new queries against 40 keys
        (1, 23, 23, 2, 1, 24, 7),  # head_dim not a power of two (padded to 32)
    ],
)
def test_flash_prefill_edge_cases(B, T, S, H, H_kv, D, window):
    q, k, v = make_qkv(B, T, S, H, H_kv, D)
    q_pos, k_pos = prompt_positions(B, T, S)
    out = prefill_attention(q, k, v, q_pos, k_pos, window, block_m=16, block_n=16)
    check(out, q, k, v, q_pos, k_pos, window)


def test_flash_prefill_seeded_sweep():
    rng = random.Random(1234)
    for case in range(5):
        H_kv = rng.choice([1, 2])
        H = H_kv * rng.choice([1, 4, 8])
        D = rng.choice([16, 32, 64, 128])
        S = rng.randint(1, 40)
        T = rng.randint(1, S)
        window = rng.choice([None, rng.randint(1, 48)])
        B = rng.randint(1, 2)
        q, k, v = make_qkv(B, T, S, H, H_kv, D, seed=case)
        q_pos, k_pos = prompt_positions(B, T, S)
        check(prefill_attention(q, k, v, q_pos, k_pos, window, block_m=16, block_n=16), q, k, v, q_pos, k_pos,
              window)


def test_flash_prefill_padding_rows_are_uniform_like_the_reference():
    """Left-padded ragged batch: padding queries (position -1) see nothing: uniform average of all values."""
    B, T, H, H_kv, D, window = 2, 19, 4, 2, 32, 6
    q, k, v = make_qkv(B, T, T, H, H_kv, D)
    pos = torch.arange(T, device=DEVICE).expand(B, T).clone()
    pos[1] = torch.arange(T, device=DEVICE) - 7  # row 1: 7 padding tokens, then positions 0..11
    pos[1, :7] = -1
    out = prefill_attention(q, k, v, pos, pos, window, block_m=16, block_n=16)
    check(out, q, k, v, pos, pos, window)
    torch.testing.assert_close(out[1, :7], v[1].mean(0).repeat_interleave(H // H_kv, 0).expand(7, H, D),
                               atol=1e-5, rtol=0)


def test_flash_prefill_against_a_rolling_cache_chunk():
    """Chunked prefill into a rolling window buffer: keys = old (wrapped) buffer + new chunk."""
    B, H, H_kv, D, W = 2, 4, 2, 32, 8
    cache = LayerCache(B, W, True, H_kv, D, torch.float32, DEVICE)
    for start, T in ((0, 11), (11, 13)):  # the second chunk sees a buffer that has already wrapped
        q, k, v = make_qkv(B, T, T, H, H_kv, D, seed=start)
        pos = torch.arange(start, start + T, device=DEVICE).expand(B, T).clone()
        keys, values, k_pos = cache.update(k, v, pos)
        assert keys.shape[1] == W + T
        out = prefill_attention(q, keys, values, pos, k_pos, W, block_m=16, block_n=16)
        check(out, q, keys, values, pos, k_pos, W)


def test_flash_prefill_skips_tiles_nobody_may_see():
    """NaN in key/value tiles that no query of a block may see is never read (the reference would be NaN)."""
    B, T, H, D, W = 1, 64, 2, 16, 8
    q, k, v = make_qkv(B, T, T, H, H, D)
    q_pos, k_pos = prompt_positions(B, T, T)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, :16] = float("nan")  # keys 0..15: outside the window of queries 32..63
    v_bad[:, :16] = float("nan")
    out = prefill_attention(q, k_bad, v_bad, q_pos, k_pos, W, block_m=32, block_n=16)
    ref = reference_attention(q, k, v, q_pos, k_pos, W)
    torch.testing.assert_close(out[:, 32:], ref[:, 32:], atol=1e-5, rtol=0)


def test_flash_prefill_skips_tiles_in_any_layout():
    """Keys stored in reverse order (not contiguous): invisible tiles are skipped by their positions alone."""
    B, T, H, D, W = 1, 48, 2, 16, 8
    q, k, v = make_qkv(B, T, T, H, H, D)
    q_pos = torch.arange(T, device=DEVICE)[None]
    k_pos = q_pos.flip(1)  # slot s holds position T-1-s
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, -16:] = float("nan")  # the last tile holds positions 0..15, invisible to queries 32..47
    v_bad[:, -16:] = float("nan")
    out = prefill_attention(q, k_bad, v_bad, q_pos, k_pos, W, block_m=16, block_n=16)
    ref = reference_attention(q, k, v, q_pos, k_pos, W)
    torch.testing.assert_close(out[:, 32:], ref[:, 32:], atol=1e-5, rtol=0)


def test_contiguous_base():
    prompt = torch.arange(6)[None].repeat(2, 1)
    assert contiguous_base(prompt).tolist() == [0, 0]
    padded = prompt.clone()
    padded[1] = torch.tensor([-1, -1, 0, 1, 2, 3])  # left padding: slot s holds s - 2
    assert contiguous_base(padded).tolist() == [0, -2]
    cache = torch.tensor([[0, 1, 2, -1, -1, -1], [-1] * 6])  # a full cache with empty slots; an empty row
    assert contiguous_base(cache).tolist() == [0, 0]
    rolling = torch.tensor([[6, 7, 2, 3, 4, 5]])  # a wrapped rolling buffer
    assert contiguous_base(rolling) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flash_prefill_half_precision(dtype):
    B, T, S, H, H_kv, D, window = 1, 21, 30, 8, 2, 64, 12
    q, k, v = make_qkv(B, T, S, H, H_kv, D, dtype=dtype)
    q_pos, k_pos = prompt_positions(B, T, S)
    out = prefill_attention(q, k, v, q_pos, k_pos, window, block_m=16, block_n=16)
    check(out, q, k, v, q_pos, k_pos, window)


# ---- decode ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "H, H_kv, D, window, num_splits",
    [(4, 4, 64, None, 1), (8, 2, 128, None, 3), (8, 1, 32, 9, 2), (16, 2, 16, 40, 5)],
)
def test_decode_ragged_full_cache(H, H_kv, D, window, num_splits):
    """A full cache, one row per sequence of its own length (empty slots -1), one of them a padding row."""
    lengths = [50, 7, 1, 0]  # keys already cached per row; the last row is padding (position -1)
    B, S = len(lengths), 56
    q, k, v = make_qkv(B, 1, S, H, H_kv, D)
    k_pos = torch.full((B, S), -1, device=DEVICE)
    q_pos = torch.full((B, 1), -1, device=DEVICE)
    for b, n in enumerate(lengths[:-1]):
        k_pos[b, : n + 1] = torch.arange(n + 1)  # the cache writes the new token first
        q_pos[b, 0] = n
    out = decode_attention(q, k, v, q_pos, k_pos, window, num_splits=num_splits, block_n=16)
    check(out, q, k, v, q_pos, k_pos, window)


@pytest.mark.parametrize("H, H_kv", [(4, 4), (8, 2), (8, 1)])
def test_decode_rolling_window_buffer(H, H_kv):
    """Sliding-window layer: W slots, position p in slot p % W, decode long after the buffer wrapped."""
    B, D, W = 2, 32, 24
    cache = LayerCache(B, W, True, H_kv, D, torch.float32, DEVICE)
    _, k0, v0 = make_qkv(B, 1, 29, H, H_kv, D, seed=1)
    prompt = torch.arange(29, device=DEVICE).expand(B, 29).clone()
    cache.update(k0, v0, prompt)
    for step in range(3):
        p = 29 + step
        q, k, v = make_qkv(B, 1, 1, H, H_kv, D, seed=10 + step)
        pos = torch.full((B, 1), p, device=DEVICE)
        keys, values, k_pos = cache.update(k, v, pos)
        assert keys.shape[1] == W and k_pos.min() > p - W - 1
        out = decode_attention(q, keys, values, pos, k_pos, W, num_splits=2, block_n=16)
        check(out, q, keys, values, pos, k_pos, W)


def test_decode_long_context_many_splits_and_tile_skipping():
    """LSE merge over many splits, some of which see no key; NaN in never-visible slots is never read."""
    B, S, H, H_kv, D, W = 1, 300, 8, 2, 64, 20
    q, k, v = make_qkv(B, 1, S, H, H_kv, D)
    k_pos = torch.arange(S, device=DEVICE)[None].clone()
    q_pos = torch.tensor([[S - 1]], device=DEVICE)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, : S - 64] = float("nan")  # far outside the window: whole tiles the kernel must skip
    v_bad[:, : S - 64] = float("nan")
    out = decode_attention(q, k_bad, v_bad, q_pos, k_pos, W, num_splits=7, block_n=32)
    check(out, q, k, v, q_pos, k_pos, W)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_half_precision(dtype):
    B, S, H, H_kv, D = 2, 45, 8, 2, 128
    q, k, v = make_qkv(B, 1, S, H, H_kv, D, dtype=dtype)
    q_pos = torch.full((B, 1), S - 1, device=DEVICE)
    k_pos = torch.arange(S, device=DEVICE).expand(B, S).clone()
    out = decode_attention(q, k, v, q_pos, k_pos, None, num_splits=2, block_n=16)
    check(out, q, k, v, q_pos, k_pos, None)


@pytest.mark.slow
def test_decode_seeded_sweep():
    rng = random.Random(99)
    for case in range(4):
        H_kv = rng.choice([1, 2])
        H = H_kv * rng.choice([1, 4, 8])
        D = rng.choice([16, 64, 128])
        S = rng.randint(1, 80)
        B = rng.randint(1, 3)
        window = rng.choice([None, rng.randint(1, 90)])
        q, k, v = make_qkv(B, 1, S, H, H_kv, D, seed=case)
        perm = torch.randperm(S, generator=torch.Generator().manual_seed(case))
        k_pos = perm.to(DEVICE).expand(B, S).clone()
        k_pos[k_pos > S - 1 - rng.randint(0, S - 1)] = -1  # a random set of empty slots, scattered
        q_pos = torch.full((B, 1), S - 1, device=DEVICE)
        out = decode_attention(q, k, v, q_pos, k_pos, window, num_splits=rng.randint(1, 4), block_n=16)
        check(out, q, k, v, q_pos, k_pos, window)


# ---- the model's entry point -------------------------------------------------------------------------------
def test_attention_dispatches_decode_and_prefill():
    B, S, H, H_kv, D, W = 2, 33, 4, 2, 32, 16
    q, k, v = make_qkv(B, 1, S, H, H_kv, D)
    q_pos, k_pos = prompt_positions(B, 1, S)
    check(attention(q, k, v, q_pos, k_pos, W), q, k, v, q_pos, k_pos, W)  # T == 1: decode kernel
    q, k, v = make_qkv(B, 3, S, H, H_kv, D)
    q_pos, k_pos = prompt_positions(B, 3, S)
    check(attention(q, k, v, q_pos, k_pos, W), q, k, v, q_pos, k_pos, W)  # T > 1: flash kernel


def test_bad_inputs_raise_clear_errors():
    q, k, v = make_qkv(1, 4, 4, 4, 2, 16)
    q_pos, k_pos = prompt_positions(1, 4, 4)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        k3 = k[:, :, :1].expand(1, 4, 3, 16)
        prefill_attention(q, k3, k3, q_pos, k_pos, None)
    with pytest.raises(ValueError, match="q_pos must be"):
        prefill_attention(q, k, v, q_pos[:, :2], k_pos, None)
    with pytest.raises(ValueError, match="window"):
        prefill_attention(q, k, v, q_pos, k_pos, 0)
    with pytest.raises(TypeError, match="share one dtype"):
        prefill_attention(q, k.half(), v.half(), q_pos, k_pos, None)
    with pytest.raises(ValueError, match="T == 1"):
        decode_attention(q, k, v, q_pos, k_pos, None)
    with pytest.raises(ValueError, match="power of two"):
        prefill_attention(q, k, v, q_pos, k_pos, None, block_m=8)
