"""Every fast path equals the plain reference it sits beside (fp32 within 1e-5 relative; bf16 same argmax).

The model runs the fast paths by default (backend "torch"); backend "reference" runs the readable functions
(attention.attention, rope.apply_rotary_emb, moe.moe_forward).  Shapes cover GQA, sliding windows shorter than
the sequence, head_dim != dim / n_heads (Nemo), experts, ragged batches and fully masked padding rows.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from mistral_ref.attention import (
    UPCAST_MIN_ROWS,
    _causal_prompt,
    attention,
    attention_mask,
    linear,
    multiply_sum_linear,
    sdpa_attention,
    split_linear,
    upcast_on_cpu,
)
from mistral_ref.cache import KVCache
from mistral_ref.config import ModelArgs, MoeArgs
from mistral_ref.model import Transformer
from mistral_ref.moe import FeedForward, MoeLayer, moe_forward, moe_forward_grouped, moe_one_token
from mistral_ref.rope import apply_rotary_emb, apply_rotary_emb_complex, rope_angles, rope_rotations


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: threads only fight over the shared cores
    yield
    torch.set_num_threads(n)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


GQA_WINDOW = ModelArgs(dim=48, n_layers=3, hidden_dim=96, n_heads=6, n_kv_heads=2, head_dim=8, vocab_size=101,
                       norm_eps=1e-5, rope_theta=1e4, sliding_window=(5, None))
NEMO = ModelArgs(dim=40, n_layers=2, hidden_dim=64, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=97,
                 norm_eps=1e-5, rope_theta=1e6)  # head_dim 16 != 40 / 4
MOE = ModelArgs(dim=32, n_layers=2, hidden_dim=48, n_heads=4, n_kv_heads=1, head_dim=8, vocab_size=89,
                norm_eps=1e-5, rope_theta=1e6, sliding_window=6, moe=MoeArgs(5, 2))
MODELS = {"gqa_window": GQA_WINDOW, "nemo": NEMO, "moe": MOE}


def make_model(args: ModelArgs, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args).eval()
    with torch.no_grad():  # weights larger than the default init: attention and routing far from uniform
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 1.0)
    return model


# ---- the functions ------------------------------------------------------------------------------------------------
def ragged_positions(B: int, T: int) -> torch.Tensor:
    """Row b starts 3*b positions later, its first 3*b slots are padding (-1): some rows see no key at all."""
    pos = torch.arange(T).repeat(B, 1) - 3 * torch.arange(B)[:, None]
    return pos.masked_fill(pos < 0, -1)


@pytest.mark.parametrize("window", [None, 1, 4])
@pytest.mark.parametrize("T", [1, 7])
def test_sdpa_attention_equals_reference(window, T):
    """GQA (6 query heads over 2 kv heads), a window shorter than the keys, padded rows whose queries see no key:
    the reference gives those a uniform average of the values, and so must the fast path."""
    g = torch.Generator().manual_seed(T)
    B, S, H, K, D = 3, 11, 6, 2, 16
    q, k, v = (torch.randn(B, n, h, D, generator=g) for n, h in ((T, H), (S, K), (S, K)))
    k_pos = ragged_positions(B, S)
    q_pos = k_pos[:, -T:].clone()
    q_pos[2] = -1  # a whole row of padding queries
    assert not attention_mask(q_pos, k_pos, window)[2].any()
    ref = attention(q, k, v, q_pos, k_pos, window)
    out = sdpa_attention(q, k, v, q_pos, k_pos, window)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < 1e-5
    torch.testing.assert_close(out[2], v.mean(dim=1, keepdim=True).repeat_interleave(H // K, 2)[2].expand(T, H, D))
    ref16 = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), q_pos, k_pos, window)
    out16 = sdpa_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), q_pos, k_pos, window)
    assert out16.dtype == torch.bfloat16
    assert rel_err(out16, ref) < 3e-2 and rel_err(ref16, ref) < 3e-2


@pytest.mark.parametrize("case", ["no_cache", "empty_full_cache", "empty_rolling_cache", "second_chunk",
                                  "padded", "window_shorter"])
def test_sdpa_causal_mode_only_where_the_mask_is_plain_causal(case):
    """A prompt attending only to itself runs SDPA's is_causal (no mask); anything else keeps the mask.  Both
    equal the reference."""
    g = torch.Generator().manual_seed(7)
    B, T, H, K, D = 2, 6, 4, 2, 8
    q_pos = torch.arange(T).repeat(B, 1) + torch.tensor([[0], [3]])  # rows at different offsets
    window, start = None, None
    if case == "no_cache":
        k_pos, start = q_pos, 0
    elif case == "empty_full_cache":  # slots 0..T-1 written, the rest empty
        k_pos, start = torch.cat([q_pos, torch.full((B, 5), -1)], 1), 0
    elif case == "empty_rolling_cache":  # an empty buffer of W slots, then the chunk
        window = 8
        k_pos, start = torch.cat([torch.full((B, window), -1), q_pos], 1), window
    elif case == "second_chunk":  # earlier keys are visible: needs the mask
        k_pos = torch.cat([q_pos - T, q_pos], 1)
    elif case == "padded":
        q_pos = q_pos.clone()
        q_pos[1, :2] = -1
        k_pos = q_pos
    else:  # a window shorter than the prompt
        window, k_pos = 3, q_pos
    assert _causal_prompt(q_pos, k_pos, window) == start
    S = k_pos.shape[1]
    q, k, v = (torch.randn(B, n, h, D, generator=g) for n, h in ((T, H), (S, K), (S, K)))
    assert rel_err(sdpa_attention(q, k, v, q_pos, k_pos, window), attention(q, k, v, q_pos, k_pos, window)) < 1e-5


def test_complex_rope_equals_reference():
    pos = ragged_positions(2, 9) + 1000
    x = torch.randn(2, 9, 5, 24)  # head_dim 24: not a power of two
    cos, sin = rope_angles(pos, 24, 1e6)
    rot = rope_rotations(pos, 24, 1e6)
    assert rot.shape == (2, 9, 12) and rot.dtype == torch.complex64
    assert rel_err(apply_rotary_emb_complex(x, rot), apply_rotary_emb(x, cos, sin)) < 1e-6
    xb = x.bfloat16()
    out = apply_rotary_emb_complex(xb, rot)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, apply_rotary_emb(xb, cos, sin))  # same fp32 arithmetic, same rounding


@pytest.mark.parametrize("N", [1, 2, 9, 64])
def test_grouped_moe_equals_reference(N):
    """One token (decode: only its k experts run), a few tokens (some experts idle), many tokens; one expert of
    zero width (how parallel.py places an expert held by another rank) contributes exact zeros in both."""
    g = torch.Generator().manual_seed(N)
    E, dim, hidden = 6, 16, 24
    x = torch.randn(N, dim, generator=g)
    gate = torch.randn(E, dim, generator=g)
    w1 = [torch.randn(hidden, dim, generator=g) * 0.3 for _ in range(E)]
    w3 = [torch.randn(hidden, dim, generator=g) * 0.3 for _ in range(E)]
    w2 = [torch.randn(dim, hidden, generator=g) * 0.3 for _ in range(E)]
    w1[3], w3[3], w2[3] = torch.zeros(0, dim), torch.zeros(0, dim), torch.zeros(dim, 0)
    ref, ref_logits = moe_forward(x, gate, w1, w2, w3, top_k=2)
    out, logits = moe_forward_grouped(x, gate, w1, w2, w3, top_k=2)
    assert torch.equal(logits, ref_logits)
    assert rel_err(out, ref) < 1e-6
    xb = x.bfloat16()
    ws = [[w.bfloat16() for w in ws] for ws in (w1, w2, w3)]
    out16 = moe_forward_grouped(xb, gate.bfloat16(), *ws, top_k=2)[0]
    assert out16.dtype == torch.bfloat16 and rel_err(out16, moe_forward(xb, gate.bfloat16(), *ws, top_k=2)[0]) < 2e-2


def test_grouped_moe_accepts_stacked_experts():
    g = torch.Generator().manual_seed(1)
    E, dim, hidden, N = 4, 8, 12, 10
    x, gate = torch.randn(N, dim, generator=g), torch.randn(E, dim, generator=g)
    w1, w3, w2 = (torch.randn(E, a, b, generator=g) for a, b in ((hidden, dim), (hidden, dim), (dim, hidden)))
    for n in (1, N):
        ref = moe_forward(x[:n], gate, w1, w2, w3, 2)[0]
        assert rel_err(moe_forward_grouped(x[:n], gate, w1, w2, w3, 2)[0], ref) < 1e-6


@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_linear_matches_the_native_product(rows):
    """bf16 products with more than one row run in fp32 on CPUs without native bf16: same values up to the
    final rounding; fp32 is F.linear itself."""
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 64, generator=g), torch.randn(32, 64, generator=g)
    assert torch.equal(linear(x, w), torch.nn.functional.linear(x, w))
    out = linear(x.bfloat16(), w.bfloat16())
    assert out.dtype == torch.bfloat16
    exact = torch.nn.functional.linear(x.bfloat16().double(), w.bfloat16().double())
    assert rel_err(out, exact) < 1e-2
    if upcast_on_cpu(out) and rows >= UPCAST_MIN_ROWS:  # computed in fp32, rounded once: within 1 ulp
        assert rel_err(out, exact) < 4e-3
    w_big = torch.randn(5000, 512, generator=g).bfloat16()  # upcast in two blocks of rows
    x_big = torch.randn(rows, 512, generator=g).bfloat16()
    exact = torch.nn.functional.linear(x_big.double(), w_big.double())
    assert rel_err(linear(x_big, w_big), exact) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_one_token_with_stacked_experts_equals_the_reference(dtype):
    """The single-token path a compiled decode step runs (experts gathered by index from stacked weights)."""
    g = torch.Generator().manual_seed(2)
    E, dim, hidden = 6, 16, 24
    gate = torch.randn(E, dim, generator=g)
    w1, w3 = torch.randn(E, hidden, dim, generator=g) / 4, torch.randn(E, hidden, dim, generator=g) / 4
    w2 = torch.randn(E, dim, hidden, generator=g) / 4
    for _ in range(20):
        x = torch.randn(1, dim, generator=g)
        for k in (1, 2, 3):
            ref, ref_logits = moe_forward(x.to(dtype), gate, w1.to(dtype), w2.to(dtype), w3.to(dtype), k)
            out, logits = moe_one_token(x.to(dtype), gate, w1.to(dtype), w2.to(dtype), w3.to(dtype), k)
            assert out.dtype == dtype and out.shape == (1, dim) and torch.equal(logits, ref_logits)
            assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 2e-2)


def test_stack_experts_keeps_parameters_names_and_outputs():
    """stack_experts moves the weights into (E, ...) tensors that the parameters view: same state dict, same
    outputs, no second copy; converting the module afterwards drops the (then stale) stacks."""
    args = ModelArgs(dim=32, n_layers=1, hidden_dim=48, n_heads=4, n_kv_heads=2, head_dim=8, vocab_size=64,
                     norm_eps=1e-5, rope_theta=1e4, moe=MoeArgs(4, 2))
    torch.manual_seed(0)
    layer = MoeLayer(args).eval()
    x = torch.randn(1, 5, 32)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    ref = layer(x)[0]
    layer.stack_experts()
    after = layer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for name in ("w1", "w2", "w3"):
        stacked = layer.stacked[name]
        assert stacked.shape[0] == 4
        for i, e in enumerate(layer.experts):
            w = getattr(e, name).weight
            assert isinstance(w, torch.nn.Parameter) and w.data_ptr() == stacked[i].data_ptr()
    assert torch.equal(layer(x)[0], ref)
    layer.to(torch.bfloat16)
    assert layer.stacked is None
    with warnings.catch_warnings():  # torch warns that initialising a zero-element tensor does nothing
        warnings.simplefilter("ignore")
        layer.experts[3] = FeedForward(32, 0)  # as on an expert-parallel rank: a remote expert is a placeholder
    layer.stack_experts()
    assert layer.stacked is None  # experts of different shapes cannot be stacked: the eager dispatch stays


def test_multiply_sum_linear_is_the_product_accumulated_in_fp32():
    """What a compiled bf16 decode step multiplies with: F.linear's product, summed in fp32, rounded once."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(40, 64, generator=g)
    for x in (torch.randn(1, 64, generator=g), torch.randn(2, 1, 64, generator=g)):
        assert rel_err(multiply_sum_linear(x, w), torch.nn.functional.linear(x, w)) < 1e-6
        out = multiply_sum_linear(x.bfloat16(), w.bfloat16())
        exact = torch.nn.functional.linear(x.bfloat16().double(), w.bfloat16().double())
        assert out.dtype == torch.bfloat16 and out.shape == (*x.shape[:-1], 40)
        assert rel_err(out, exact) < 4e-3  # one bf16 rounding of an fp32 sum


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("rows", [1, 2, 8, 31, 32])
def test_split_linear_equals_f_linear(threads, rows):
    """The weight split into one block of rows per thread gives F.linear's products (fp32: the same dot products;
    asserted within 1e-6), for any leading shape, whether or not the rows divide evenly (then: F.linear)."""
    g = torch.Generator().manual_seed(rows)
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for out_features in (96, 100, 3000):
            w = torch.randn(out_features, 64, generator=g)
            for x in (torch.randn(rows, 64, generator=g), torch.randn(1, rows, 64, generator=g)):
                out = split_linear(x, w)
                assert out.shape == (*x.shape[:-1], out_features)
                assert rel_err(out, torch.nn.functional.linear(x, w)) < 1e-6
                assert rel_err(linear(x, w), torch.nn.functional.linear(x, w)) < 1e-6
                bf = linear(x.bfloat16(), w.bfloat16())  # the bf16 upcast path splits its fp32 products too
                exact = torch.nn.functional.linear(x.bfloat16().double(), w.bfloat16().double())
                assert bf.dtype == torch.bfloat16 and rel_err(bf, exact) < 1e-2
        w = torch.randn(64, 96, generator=g).t()  # a non-contiguous view: no block view of it, F.linear instead
        x = torch.randn(rows, 64, generator=g)
        assert rel_err(split_linear(x, w), torch.nn.functional.linear(x, w)) < 1e-6
    finally:
        torch.set_num_threads(n)


def test_split_linear_decode_matches_the_reference_model():
    """A KV-cache decode on 2 threads (split products, fused paths) equals the reference backend on 1 thread."""
    args = ModelArgs(dim=64, n_layers=2, hidden_dim=96, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=200,
                     norm_eps=1e-5, rope_theta=1e4, sliding_window=5, moe=MoeArgs(4, 2))
    torch.manual_seed(0)
    model = Transformer(args).eval()
    tokens = torch.randint(0, 200, (2, 12))
    ref = run(model, "reference", lambda: model(tokens))
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            cache = KVCache(args, 2, 12)
            steps = [model(tokens[:, t:t + 1], torch.full((2, 1), t), cache) for t in range(12)]
    finally:
        torch.set_num_threads(n)
        model.set_backend()
    assert rel_err(torch.cat(steps, dim=1), ref) < 1e-5


# ---- the model ----------------------------------------------------------------------------------------------------
def run(model: Transformer, backend: str, fn):
    model.set_backend(attention=backend, moe=backend)
    try:
        with torch.inference_mode():
            return fn()
    finally:
        model.set_backend()


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_equals_reference(name):
    """A ragged batch longer than the window, no cache: fast and reference logits agree to 1e-5 (fp32) and on
    every argmax (bf16 model against its own reference)."""
    args = MODELS[name]
    model = make_model(args)
    tokens = torch.randint(0, args.vocab_size, (3, 14), generator=torch.Generator().manual_seed(2))
    positions = ragged_positions(3, 14)
    ref = run(model, "reference", lambda: model(tokens, positions))
    out = run(model, "torch", lambda: model(tokens, positions))
    assert rel_err(out, ref) < 1e-5
    valid = positions >= 0
    assert torch.equal(out.argmax(-1)[valid], ref.argmax(-1)[valid])
    model.to(torch.bfloat16)
    ref16 = run(model, "reference", lambda: model(tokens, positions))
    out16 = run(model, "torch", lambda: model(tokens, positions))
    # bf16 argmax: wherever the fp32 top-2 margin exceeds the bf16 reference's own error (random models have
    # near-ties elsewhere), the fast path picks the same token as both references.
    top2 = ref.topk(2, dim=-1).values
    clear = valid & (top2[..., 0] - top2[..., 1] > 2 * (ref16 - ref).abs().amax(-1))
    assert clear.sum() >= valid.sum() // 3
    assert torch.equal(out16.argmax(-1)[clear], ref.argmax(-1)[clear])
    assert torch.equal(ref16.argmax(-1)[clear], ref.argmax(-1)[clear])


@pytest.mark.parametrize("name", MODELS)
def test_unpadded_prompt_equals_reference(name):
    """The common prefill: one unpadded prompt, no cache (causal mode on full layers; the masked path on layers
    whose window is shorter than the prompt)."""
    args = MODELS[name]
    model = make_model(args, seed=3)
    tokens = torch.randint(0, args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(6))
    ref = run(model, "reference", lambda: model(tokens))
    assert rel_err(run(model, "torch", lambda: model(tokens)), ref) < 1e-5


def cached_greedy(model: Transformer, prompt: torch.Tensor, chunk: int, steps: int):
    """Chunked prefill into a KV cache (rolling on windowed layers), then greedy cached decode."""
    B, T = prompt.shape
    cache = KVCache(model.args, B, T + steps, dtype=model.dtype)
    for start in range(0, T, chunk):
        pos = torch.arange(start, min(start + chunk, T)).expand(B, -1)
        logits = model(prompt[:, start:start + chunk], pos, cache)[:, -1]
    tokens, all_logits = [], [logits]
    for step in range(steps):
        nxt = all_logits[-1].argmax(-1, keepdim=True)  # (B, 1)
        tokens.append(nxt)
        all_logits.append(model(nxt, torch.full((B, 1), T + step), cache)[:, -1])
    return torch.cat(tokens, 1), torch.stack(all_logits, 1)


@pytest.mark.parametrize("name", MODELS)
def test_cached_greedy_decode_equals_reference(name):
    """Prefill in chunks of 4, then 10 decode steps past the window: the same tokens and fp32 logits to 1e-5;
    in bf16 the same greedy tokens."""
    args = MODELS[name]
    model = make_model(args, seed=1)
    prompt = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    ref_tokens, ref_logits = run(model, "reference", lambda: cached_greedy(model, prompt, 4, 10))
    tokens, logits = run(model, "torch", lambda: cached_greedy(model, prompt, 4, 10))
    assert torch.equal(tokens, ref_tokens)
    assert rel_err(logits, ref_logits) < 1e-5
    model.to(torch.bfloat16)
    ref16, _ = run(model, "reference", lambda: cached_greedy(model, prompt, 4, 4))
    out16, _ = run(model, "torch", lambda: cached_greedy(model, prompt, 4, 4))
    assert torch.equal(out16, ref16)


def test_logits_at_equals_picking_from_all_logits():
    model = make_model(GQA_WINDOW)
    tokens = torch.randint(0, GQA_WINDOW.vocab_size, (3, 8), generator=torch.Generator().manual_seed(4))
    at = torch.tensor([7, 0, 4])
    with torch.inference_mode():
        full = model(tokens)
        picked = model(tokens, logits_at=at)
    assert picked.shape == (3, 1, GQA_WINDOW.vocab_size)
    assert rel_err(picked[:, 0], full[torch.arange(3), at]) < 1e-6


def test_fast_paths_keep_gradients():
    """Training runs the same default backend: gradients flow through SDPA, complex RoPE and grouped experts and
    equal the reference's."""
    model = make_model(MOE)
    tokens = torch.randint(0, MOE.vocab_size, (2, 10), generator=torch.Generator().manual_seed(5))
    grads = {}
    for backend in ("reference", "torch"):
        model.set_backend(attention=backend, moe=backend)
        model.zero_grad()
        model.compute_loss(tokens[:, :-1], tokens[:, 1:]).loss.backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.set_backend()
    for n, g in grads["reference"].items():
        assert rel_err(grads["torch"][n], g) < 1e-4, n


def test_set_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="reference"):
        make_model(NEMO).set_backend(attention="fast")
