"""The KV cache: rolling buffers of W slots, chunked prefill and ragged batches equal a full recomputation."""

from __future__ import annotations

import pytest
import torch

from mistral_ref.cache import CacheOverflowError, KVCache
from mistral_ref.config import ModelArgs, MoeArgs
from mistral_ref.model import Transformer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only fight over the shared cores
    yield
    torch.set_num_threads(n)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def tiny_model(window, moe: bool = False, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(dim=32, n_layers=2, hidden_dim=64, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=64,
                     sliding_window=window, moe=MoeArgs(4, 2) if moe else None)
    return Transformer(args).eval()


def cached_logits(model: Transformer, seqs: list[torch.Tensor], prompt_lens: list[int], n_decode: int,
                  chunk_size: int | None) -> list[torch.Tensor]:
    """Teacher-forced cached run of a ragged batch: prefill each prompt (right-padded, in chunks), then decode
    `n_decode` tokens one per row per step.  Returns per row the logits at positions len-1 .. len+n_decode-1.
    """
    B, T = len(seqs), max(prompt_lens)
    tokens = torch.zeros(B, T, dtype=torch.long)
    positions = torch.full((B, T), -1)
    for i, (s, n) in enumerate(zip(seqs, prompt_lens)):
        tokens[i, :n], positions[i, :n] = s[:n], torch.arange(n)
    cache = KVCache(model.args, B, T + n_decode)
    step = chunk_size or T
    prompt_logits = torch.cat([model(tokens[:, a:a + step], positions[:, a:a + step], cache)
                               for a in range(0, T, step)], dim=1)  # (B, T, V)
    out = [[prompt_logits[i, n - 1]] for i, n in enumerate(prompt_lens)]
    lens = torch.tensor(prompt_lens)
    for t in range(n_decode):
        tok = torch.stack([s[n + t] for s, n in zip(seqs, prompt_lens)])[:, None]  # (B, 1)
        logits = model(tok, (lens + t)[:, None], cache)  # (B, 1, V)
        for i in range(B):
            out[i].append(logits[i, 0])
    return [torch.stack(o) for o in out]


@pytest.mark.parametrize("W", [4, 7, 16])
def test_cached_decode_equals_full_forward(W: int) -> None:
    """Prompts of W-1, W, W+1 and 2W+3 tokens (one ragged batch), 3W decoded tokens, five prefill chunk sizes:
    every logit equals the no-cache forward of the whole sequence, and the rolling buffers hold W slots."""
    model = tiny_model(W, moe=W == 7)
    lens = [W - 1, W, W + 1, 2 * W + 3]
    n_decode = 3 * W
    g = torch.Generator().manual_seed(W)
    seqs = [torch.randint(0, 64, (n + n_decode,), generator=g) for n in lens]
    with torch.no_grad():
        full = [model(s[None])[0, n - 1:] for s, n in zip(seqs, lens)]  # (n_decode + 1, V) each
        runs = {}
        for chunk in (None, 1, W // 2, W, 3 * W // 2):
            runs[chunk] = cached_logits(model, seqs, lens, n_decode, chunk)
            for row, (got, want) in enumerate(zip(runs[chunk], full)):
                assert got.shape == want.shape
                assert rel_err(got, want) < 1e-5, (chunk, row, rel_err(got, want))
        for chunk, rows in runs.items():  # chunk sizes agree with each other, not only with the reference
            for a, b in zip(rows, runs[None]):
                assert rel_err(a, b) < 1e-5, chunk
    cache = KVCache(model.args, 4, max(lens) + n_decode)
    for layer in cache.layers:
        assert layer.rolling and layer.capacity == W
        assert layer.k.shape == layer.v.shape == (4, W, 2, 16)
        assert layer.pos.shape == (4, W)


def test_per_layer_windows_mix_rolling_and_full_layers() -> None:
    model = tiny_model((5, None))
    lens, n_decode = [3, 11], 12
    seqs = [torch.randint(0, 64, (n + n_decode,)) for n in lens]
    with torch.no_grad():
        for chunk in (None, 2, 5):
            got = cached_logits(model, seqs, lens, n_decode, chunk)
            for s, n, g in zip(seqs, lens, got):
                assert rel_err(g, model(s[None])[0, n - 1:]) < 1e-5
    cache = KVCache(model.args, 2, 11 + n_decode)
    assert [(c.rolling, c.capacity) for c in cache.layers] == [(True, 5), (False, 23)]
    assert cache[1].k.shape == (2, 23, 2, 16)
    assert cache.nbytes() == 2 * 2 * (5 + 23) * 2 * 16 * 4


def test_window_at_least_the_request_is_a_plain_buffer() -> None:
    args = tiny_model(32).args
    cache = KVCache(args, 1, 20)  # the request never leaves the window: no wrap-around needed
    assert all(not c.rolling and c.capacity == 20 for c in cache.layers)


def test_rolling_buffer_keeps_exactly_the_last_window() -> None:
    model = tiny_model(4)
    cache = KVCache(model.args, 1, 20)
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 6)), torch.arange(6)[None], cache)
        assert sorted(cache[0].pos[0].tolist()) == [2, 3, 4, 5]
        for p in range(6, 11):
            model(torch.randint(0, 64, (1, 1)), torch.tensor([[p]]), cache)
            assert sorted(cache[0].pos[0].tolist()) == list(range(p - 3, p + 1))
            assert int(cache[0].pos[0, p % 4]) == p  # slot = position % W


def test_padding_rows_leave_the_cache_untouched() -> None:
    """Position -1 (padding, or a finished row of a batch) writes nothing, in decode and in prefill."""
    model = tiny_model(4)
    cache = KVCache(model.args, 2, 12)
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 5)), torch.arange(5).expand(2, 5), cache)
        before = [(c.k.clone(), c.v.clone(), c.pos.clone()) for c in cache.layers]
        model(torch.randint(0, 64, (2, 1)), torch.tensor([[5], [-1]]), cache)
        model(torch.randint(0, 64, (2, 3)), torch.tensor([[6, 7, 8], [-1, -1, -1]]), cache)
    for (k, v, pos), c in zip(before, cache.layers):
        assert torch.equal(c.k[1], k[1]) and torch.equal(c.v[1], v[1]) and torch.equal(c.pos[1], pos[1])
        assert not torch.equal(c.k[0], k[0])
        assert sorted(c.pos[0].tolist()) == [5, 6, 7, 8]


def test_overflow_is_a_clear_error() -> None:
    model = tiny_model(None)
    cache = KVCache(model.args, 1, 6)
    with torch.no_grad():
        model(torch.zeros(1, 6, dtype=torch.long), torch.arange(6)[None], cache)
        with pytest.raises(CacheOverflowError, match="position 6 does not fit a KV cache allocated for 6"):
            model(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[6]]), cache)
        with pytest.raises(CacheOverflowError, match="position 7"):
            model(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[6, 7]]), KVCache(model.args, 1, 6))


def test_bad_sizes_are_rejected() -> None:
    args = tiny_model(4).args
    with pytest.raises(ValueError, match="max_seq_len must be >= 1"):
        KVCache(args, 1, 0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        KVCache(args, 0, 8)
