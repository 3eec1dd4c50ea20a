"""The model's parts against independent formulas: RMSNorm, RoPE (both layouts), the sliding-window mask and
attention, per-layer windows, the MoE router and dispatch, the load-balancing loss, gradients, the KV cache.
Whole-model parity with transformers lives in test_parity.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from model_helpers import random_model

from mistral_ref.attention import attention, attention_mask
from mistral_ref.backends import get_backend
from mistral_ref.cache import KVCache
from mistral_ref.checkpoint import permute_to_hf
from mistral_ref.config import ModelArgs, MoeArgs
from mistral_ref.model import Transformer
from mistral_ref.moe import load_balancing_loss, moe_forward, route
from mistral_ref.norm import RMSNorm
from mistral_ref.rope import apply_rotary_emb, apply_rotary_emb_half, rope_angles, rope_frequencies


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_args(**overrides) -> ModelArgs:
    kw = dict(dim=48, n_layers=2, hidden_dim=64, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=80,
              norm_eps=1e-6, rope_theta=1e4, sliding_window=4)
    kw.update(overrides)
    return ModelArgs(**kw)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ---- RMSNorm ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_rmsnorm_matches_the_formula_in_float64(backend):
    x = torch.randn(3, 5, 32, generator=gen(0)) * 3
    norm = RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32, generator=gen(1)))
    xd = x.double()
    expected = xd / torch.sqrt((xd**2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    assert rel_err(norm(x, get_backend(backend)), expected) < 1e-6


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_rmsnorm_bf16_normalises_in_fp32_then_casts_before_the_weight(backend):
    x = (torch.randn(4, 64, generator=gen(2)) * 5).bfloat16()
    norm = RMSNorm(64, eps=1e-6).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=gen(3)))
    out = norm(x, get_backend(backend))
    assert out.dtype == torch.bfloat16
    xd = x.double()
    normed = (xd / torch.sqrt((xd**2).mean(-1, keepdim=True) + 1e-6)).bfloat16()  # rounded once, here
    assert torch.equal(out, norm.weight * normed)


@pytest.mark.oracle
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_rmsnorm_equals_transformers_bitwise_in_bf16(backend):
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm

    x = (torch.randn(4, 7, 64, generator=gen(4)) * 5).bfloat16()
    ours, theirs = RMSNorm(64, 1e-6).bfloat16(), MistralRMSNorm(64, eps=1e-6).bfloat16()
    with torch.no_grad():
        w = torch.randn(64, generator=gen(5)).bfloat16()
        ours.weight.copy_(w)
        theirs.weight.copy_(w)
    assert torch.equal(ours(x, get_backend(backend)), theirs(x))


# ---- RoPE ------------------------------------------------------------------------------------------------------
def test_rope_frequencies():
    f = rope_frequencies(8, 1e4)
    assert f.dtype == torch.float32
    expected = torch.tensor([1e4 ** (-2 * i / 8) for i in range(4)], dtype=torch.float64)
    assert rel_err(f, expected) < 1e-6


def test_interleaved_rope_is_the_complex_rotation():
    """mistral-inference's formulation: pairs as complex numbers multiplied by exp(i * pos * freq)."""
    x = torch.randn(2, 9, 3, 16, generator=gen(6))
    pos = torch.arange(9).expand(2, 9) + torch.tensor([[0], [100]])
    cos, sin = rope_angles(pos, 16, 1e6)
    angles = pos.double()[..., None] * rope_frequencies(16, 1e6).double()  # (B, T, 8)
    z = torch.view_as_complex(x.double().reshape(2, 9, 3, 8, 2).contiguous())
    expected = torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[:, :, None]).flatten(-2)
    assert rel_err(apply_rotary_emb(x, cos, sin), expected) < 1e-5


def test_interleaved_rope_equals_half_layout_after_the_checkpoint_permutation():
    head_dim = 16
    x = torch.randn(2, 7, 4, head_dim, generator=gen(7))
    cos, sin = rope_angles(torch.arange(7).expand(2, 7), head_dim, 1e4)
    # the row order permute_to_hf gives one head: HF feature j holds native feature perm[j]
    perm = permute_to_hf(torch.arange(head_dim, dtype=torch.float32)[:, None], 1, head_dim)[:, 0].long()
    assert sorted(perm.tolist()) == list(range(head_dim)) and perm.tolist() != list(range(head_dim))
    native = apply_rotary_emb(x, cos, sin)
    half = apply_rotary_emb_half(x[..., perm], cos, sin)
    assert torch.allclose(native[..., perm], half, atol=1e-6)
    assert not torch.allclose(apply_rotary_emb_half(x, cos, sin), native, atol=1e-3)  # layouts really differ


def test_rope_scores_depend_only_on_relative_position():
    q, k = torch.randn(1, 1, 1, 32, generator=gen(8)), torch.randn(1, 1, 1, 32, generator=gen(9))

    def score(m: int, n: int) -> float:
        cq, sq = rope_angles(torch.tensor([[m]]), 32, 1e4)
        ck, sk = rope_angles(torch.tensor([[n]]), 32, 1e4)
        return (apply_rotary_emb(q, cq, sq) * apply_rotary_emb(k, ck, sk)).sum().item()

    assert score(10, 3) == pytest.approx(score(107, 100), abs=1e-4)
    assert score(10, 3) != pytest.approx(score(10, 4), abs=1e-3)


# ---- attention ---------------------------------------------------------------------------------------------------
def test_window_mask_gives_exactly_w_keys_including_the_query():
    W, T = 4, 11
    pos = torch.arange(T)[None]
    mask = attention_mask(pos, pos, W)[0]  # (T, T)
    for p in range(T):
        keys = mask[p].nonzero().flatten().tolist()
        assert keys == list(range(max(0, p - W + 1), p + 1))
        assert len(keys) == min(p + 1, W)
    causal = attention_mask(pos, pos, None)[0]
    assert torch.equal(causal, torch.ones(T, T, dtype=torch.bool).tril())


def test_mask_uses_positions_not_indices():
    """A decode step at position 9 against a rolling buffer: slots hold positions 8, 9, 6, 7 and one empty."""
    k_pos = torch.tensor([[8, 9, 6, 7, -1]])
    mask = attention_mask(torch.tensor([[9]]), k_pos, window=3)
    assert mask.tolist() == [[[True, True, False, True, False]]]


def test_reference_attention_equals_sdpa_with_an_explicit_mask():
    B, T, H, KV, D, W = 2, 10, 4, 2, 16, 3
    q = torch.randn(B, T, H, D, generator=gen(10))
    k, v = torch.randn(B, T, KV, D, generator=gen(11)), torch.randn(B, T, KV, D, generator=gen(12))
    pos = torch.arange(T).expand(B, T)
    out = attention(q, k, v, pos, pos, W)
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & ~torch.ones(T, T, dtype=torch.bool).tril(-W)
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(H // KV, 2).transpose(1, 2),
        v.repeat_interleave(H // KV, 2).transpose(1, 2), attn_mask=allowed).transpose(1, 2)
    assert rel_err(out, expected) < 1e-5


def test_per_layer_windows_apply_cyclically():
    # (a pattern's length must divide n_layers, as in mistral-inference: 3 windows over 6 layers)
    args = tiny_args(n_layers=6, sliding_window=[3, None, 5])
    model = random_model(args)
    assert [layer.attention.window for layer in model.layers] == [3, None, 5, 3, None, 5]
    assert [args.window_for_layer(i) for i in range(6)] == [3, None, 5, 3, None, 5]
    # the same weights with the windows set by hand give the same logits; one window fewer does not
    tokens = torch.randint(0, 80, (1, 12), generator=gen(13))
    by_hand = random_model(tiny_args(n_layers=6, sliding_window=None))
    for layer, w in zip(by_hand.layers, [3, None, 5, 3, None, 5]):
        layer.attention.window = w
    with torch.no_grad():
        assert torch.equal(model(tokens), by_hand(tokens))
        by_hand.layers[3].attention.window = None
        assert not torch.allclose(model(tokens), by_hand(tokens), atol=1e-4)


# ---- mixture of experts --------------------------------------------------------------------------------------
def hf_style_route(x: torch.Tensor, gate_weight: torch.Tensor, k: int):
    """transformers' Mixtral router: softmax over all experts, top-k, renormalise."""
    probs = F.softmax(x.double() @ gate_weight.double().T, dim=-1)
    weights, experts = probs.topk(k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), experts


@pytest.mark.parametrize("k", [1, 2, 3])
def test_router_topk_softmax_equals_softmax_topk_renormalise(k):
    x, gate = torch.randn(64, 32, generator=gen(14)), torch.randn(8, 32, generator=gen(15))
    weights, experts, logits = route(x, gate, k)
    hf_weights, hf_experts = hf_style_route(x, gate, k)
    assert torch.equal(experts, hf_experts)
    assert rel_err(weights, hf_weights) < 1e-6
    assert logits.shape == (64, 8) and weights.dtype == torch.float32


def test_router_runs_in_fp32_and_does_not_depend_on_the_batch():
    x, gate = torch.randn(40, 32, generator=gen(16)).bfloat16(), torch.randn(8, 32, generator=gen(17)).bfloat16()
    weights, experts, logits = route(x, gate, 2)
    assert weights.dtype == logits.dtype == torch.float32
    ref_w, ref_e = hf_style_route(x.float(), gate.float(), 2)  # the bf16 inputs, exactly, in high precision
    assert torch.equal(experts, ref_e) and rel_err(weights, ref_w) < 1e-5
    for i in range(0, 40, 7):  # one token alone picks what it picked in the batch
        w1, e1, _ = route(x[i:i + 1], gate, 2)
        assert torch.equal(e1[0], experts[i]) and torch.allclose(w1[0], weights[i], atol=1e-6)


def test_moe_forward_equals_the_dense_mixture():
    E, k, dim, hidden = 4, 2, 16, 24
    x = torch.randn(30, dim, generator=gen(18))
    gate = torch.randn(E, dim, generator=gen(19))
    w1, w3 = torch.randn(E, hidden, dim, generator=gen(20)), torch.randn(E, hidden, dim, generator=gen(21))
    w2 = torch.randn(E, dim, hidden, generator=gen(22))
    out, logits = moe_forward(x, gate, w1, w2, w3, k)
    # dense: every expert on every token, weighted by the renormalised top-k probabilities (0 elsewhere)
    hf_w, hf_e = hf_style_route(x, gate, k)
    mix = torch.zeros(30, E, dtype=torch.float64).scatter(1, hf_e, hf_w)
    xd = x.double()
    ys = torch.stack([F.linear(F.silu(F.linear(xd, w1[e].double())) * F.linear(xd, w3[e].double()),
                               w2[e].double()) for e in range(E)], dim=1)  # (N, E, dim)
    assert rel_err(out, (mix[..., None] * ys).sum(1)) < 1e-5
    assert torch.equal(logits, F.linear(x, gate))


@pytest.mark.oracle
def test_load_balancing_loss_equals_transformers():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = tuple(torch.randn(50, 8, generator=gen(23 + i)) * 2 for i in range(3))
    for top_k in (1, 2):
        ours = load_balancing_loss(list(logits), num_experts=8, top_k=top_k)
        theirs = load_balancing_loss_func(logits, num_experts=8, top_k=top_k)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)


def test_load_balancing_loss_is_top_k_for_a_balanced_router_and_grows_when_unbalanced():
    # token i picks expert i first and i+1 second: every slot's choices are uniform, so the loss is
    # E * sum_k sum_e (1/E) P[e] = top_k whatever the probabilities
    E = 4
    logits = torch.full((E, E), -3.0)
    logits[torch.arange(E), torch.arange(E)] = 2.0
    logits[torch.arange(E), (torch.arange(E) + 1) % E] = 1.0
    assert load_balancing_loss([logits], E, 2).item() == pytest.approx(2.0, rel=1e-6)
    collapsed = logits.clone()
    collapsed[:, 0] = 5.0  # every token's first choice is expert 0
    assert load_balancing_loss([collapsed], E, 2).item() > 2.5


# ---- training and caching ------------------------------------------------------------------------------------
def test_compute_loss_gradients_reach_every_parameter():
    args = tiny_args(moe=MoeArgs(4, 2))
    model = random_model(args).train()
    tokens = torch.randint(0, 80, (2, 24), generator=gen(30))
    out = model.compute_loss(tokens[:, :-1], tokens[:, 1:], aux_loss_coef=0.02)
    assert out.aux_loss > 0
    assert out.loss.item() == pytest.approx(out.lm_loss.item() + 0.02 * out.aux_loss.item(), rel=1e-6)
    assert out.lm_loss.item() == pytest.approx(
        F.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten()).item(), rel=1e-6)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the router is trained by both terms: the aux loss alone already reaches it
    model.zero_grad()
    model.compute_loss(tokens[:, :-1], tokens[:, 1:]).aux_loss.backward()
    assert model.layers[0].feed_forward.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("moe", [False, True])
def test_chunked_forward_through_the_kv_cache_equals_the_full_forward(moe):
    args = tiny_args(moe=MoeArgs(4, 2) if moe else None, sliding_window=[4, None])  # rolling + full layers
    model = random_model(args)
    T = 19
    tokens = torch.randint(0, 80, (2, T), generator=gen(31))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(args, batch_size=2, max_seq_len=T)
        chunks, start = [], 0
        for size in (5, 1, 3, 6, 1, 1, 2):  # prefill, decode steps and chunks longer than the window
            pos = torch.arange(start, start + size).expand(2, size)
            chunks.append(model(tokens[:, start:start + size], positions=pos, cache=cache))
            start += size
    assert start == T
    assert rel_err(torch.cat(chunks, dim=1), full) < 1e-5


def test_embedding_init_is_random_on_real_devices():
    """meta_model skips random init; a real model must still get a random embedding (nn.Embedding's N(0, 1))."""
    model = Transformer(tiny_args())
    w = model.tok_embeddings.weight
    assert w.std().item() == pytest.approx(1.0, rel=0.2) and math.isfinite(w.sum().item())
