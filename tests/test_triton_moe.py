"""triton_kernels.moe (sorted dispatch + grouped GEMMs) against the fp32 reference mistral_ref.moe: Mixtral's
routing (moe_forward) and a routing computed elsewhere (mix_experts: fine_moe.route_fine, 128 experts, top-4)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: no GPU on CI machines

import random

import pytest
import torch

from mistral_ref.config import FineMoeArgs
from mistral_ref.fine_moe import route_fine
from mistral_ref.moe import mix_experts as reference_mix
from mistral_ref.moe import moe_forward as reference_moe
from triton_kernels import mix_experts, moe_align_block_size, moe_forward
from triton_kernels._common import interpreting
from triton_kernels.moe import stack_experts

pytestmark = pytest.mark.triton
DEVICE = "cpu" if interpreting() else "cuda"
TOL = {torch.float32: (1e-4, 1e-3), torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2)}  # atol, rtol
SMALL_BLOCKS = dict(block_m=16, block_n=32, block_k=32)


def make_moe(N, dim, hidden, E, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, dim, generator=g)
    gate = torch.randn(E, dim, generator=g)
    w1 = [torch.randn(hidden, dim, generator=g) * dim**-0.5 for _ in range(E)]
    w3 = [torch.randn(hidden, dim, generator=g) * dim**-0.5 for _ in range(E)]
    w2 = [torch.randn(dim, hidden, generator=g) * hidden**-0.5 for _ in range(E)]
    cast = lambda ts: [t.to(DEVICE, dtype) for t in ts]  # noqa: E731
    return x.to(DEVICE, dtype), gate.to(DEVICE, dtype), cast(w1), cast(w2), cast(w3)


def check(x, gate, w1, w2, w3, top_k, **blocks):
    out, logits = moe_forward(x, gate, w1, w2, w3, top_k, **blocks)
    f32 = lambda ts: [t.float() for t in ts]  # noqa: E731
    ref, ref_logits = reference_moe(x.float(), gate.float(), f32(w1), f32(w2), f32(w3), top_k)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert torch.isfinite(out).all(), "kernel left unwritten (NaN-poisoned) or non-finite elements"
    atol, rtol = TOL[x.dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    return out


# ---- sorting slots by expert -------------------------------------------------------------------------------
def reference_align(experts, E, block_m):
    """Stable sort of the slots by expert, each expert's run padded to block_m with the sentinel N*k."""
    flat = experts.flatten().cpu()
    runs, owners = [], []
    for e in range(E):
        slots = torch.nonzero(flat == e).flatten().to(torch.int32)
        if len(slots) == 0:
            continue
        n_blocks = -(-len(slots) // block_m)
        runs.append(torch.cat([slots, torch.full((n_blocks * block_m - len(slots),), flat.numel(),
                                                 dtype=torch.int32)]))
        owners += [e] * n_blocks
    return torch.cat(runs), torch.tensor(owners, dtype=torch.int32)


@pytest.mark.parametrize("N, k, E, block_m", [(1, 2, 8, 16), (37, 2, 8, 16), (50, 3, 5, 16), (30, 1, 7, 32)])
def test_align_is_a_stable_padded_sort(N, k, E, block_m):
    g = torch.Generator().manual_seed(N)
    experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)]).to(DEVICE)
    sorted_slots, block_expert = moe_align_block_size(experts, E, block_m)
    ref_slots, ref_owner = reference_align(experts, E, block_m)
    used = len(ref_owner)
    assert torch.equal(sorted_slots[: used * block_m].cpu(), ref_slots)
    assert torch.equal(block_expert[:used].cpu(), ref_owner)
    assert (block_expert[used:] == -1).all() and (sorted_slots[used * block_m:] == N * k).all()


# ---- the whole layer ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "N, dim, hidden, E, top_k",
    [
        (1, 48, 80, 8, 2),  # a single token (decode)
        (23, 40, 72, 5, 1),  # top-1, a prime number of experts, sizes not multiples of the blocks
        (9, 32, 48, 4, 4),  # top-k = number of experts
        (17, 24, 56, 7, 7),  # top-k = a prime number of experts
    ],
)
def test_moe_edge_cases(N, dim, hidden, E, top_k):
    check(*make_moe(N, dim, hidden, E), top_k, **SMALL_BLOCKS)


@pytest.mark.parametrize("top_k", [1, 2])
def test_all_tokens_routed_to_one_expert(top_k):
    N, dim, hidden, E = 40, 32, 48, 8
    x, gate, w1, w2, w3 = make_moe(N, dim, hidden, E)
    x = x.abs() + 0.1  # positive inputs and a router that prefers expert 3 for every token
    gate = -torch.ones_like(gate)
    gate[3] = 1.0
    gate[5] = 0.5  # second choice of every token when top_k = 2
    assert ((x @ gate.T).argmax(-1) == 3).all()
    check(x, gate, w1, w2, w3, top_k, **SMALL_BLOCKS)


@pytest.mark.slow
def test_moe_seeded_sweep():
    rng = random.Random(7)
    for case in range(4):
        E = rng.choice([2, 3, 5, 8])
        top_k = rng.randint(1, E)
        N, dim, hidden = rng.randint(1, 40), rng.randint(8, 64), rng.randint(8, 96)
        check(*make_moe(N, dim, hidden, E, seed=case), top_k, block_m=16, block_n=32, block_k=16)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_moe_half_precision(dtype):
    check(*make_moe(21, 64, 96, 8, dtype=dtype), 2, **SMALL_BLOCKS)


def test_stacked_weights_and_default_blocks():
    x, gate, w1, w2, w3 = make_moe(70, 64, 128, 8)
    check(x, gate, torch.stack(w1), torch.stack(w2), torch.stack(w3), 2)  # block_m=64, the GPU default


# ---- the stacked-weight cache ------------------------------------------------------------------------------
def test_stack_cache_reuses_and_invalidates():
    x, gate, w1, w2, w3 = make_moe(5, 32, 48, 4)
    a = stack_experts(w1)
    assert stack_experts(w1) is a  # same tensors: cached copy
    assert torch.equal(a, torch.stack(w1))
    with torch.no_grad():
        w1[2].mul_(2.0)  # in-place update (e.g. load_state_dict) bumps the version counter
    b = stack_experts(w1)
    assert b is not a and torch.equal(b[2], w1[2])
    check(x, gate, w1, w2, w3, 2, **SMALL_BLOCKS)  # and the layer uses the new weights


def test_bad_inputs_raise_clear_errors():
    x, gate, w1, w2, w3 = make_moe(4, 16, 32, 3)
    with pytest.raises(ValueError, match="top_k must be in 1..3"):
        moe_forward(x, gate, w1, w2, w3, 4)
    with pytest.raises(ValueError, match="gate_weight"):
        moe_forward(x, gate[:2], w1, w2, w3, 1)
    with pytest.raises(ValueError, match="expected w1, w3"):
        moe_forward(x, gate, w1, w1, w3, 1)
    with pytest.raises(TypeError, match="share one dtype"):
        moe_forward(x.half(), gate, w1, w2, w3, 1)
    with pytest.raises(ValueError, match=r"x must be \(N, dim\)"):
        moe_forward(x[None], gate, w1, w2, w3, 1)


# ---- a precomputed routing: fine-grained experts ------------------------------------------------------------
@pytest.mark.parametrize("N, scoring", [(1, "softmax"), (13, "sigmoid")])
def test_mix_experts_with_fine_grained_routing(N, scoring):
    """Mistral Small 4's 128 experts, top-4 (softmax) and a group-limited sigmoid router with correction bias
    and routed scaling (Large 3): the kernels given route_fine's choice equal moe.mix_experts."""
    fine = FineMoeArgs(num_experts=128, num_experts_per_tok=4, moe_intermediate_size=16, scoring_func=scoring,
                       n_group=8 if scoring == "sigmoid" else 1, topk_group=3 if scoring == "sigmoid" else 1,
                       routed_scaling_factor=2.5 if scoring == "sigmoid" else 1.0)
    x, gate, w1, w2, w3 = make_moe(N, 16, 16, 128, seed=N)
    bias = torch.rand(128, generator=torch.Generator().manual_seed(3)).to(DEVICE) if scoring == "sigmoid" else None
    weights, experts, _ = route_fine(x, gate, fine, bias)
    out = mix_experts(x, weights, experts, torch.stack(w1), torch.stack(w2), torch.stack(w3), **SMALL_BLOCKS)
    ref = reference_mix(x, weights, experts, w1, w2, w3)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    wrong = mix_experts(x, weights.flip(1), experts, w1, w2, w3, **SMALL_BLOCKS)  # listed experts, stacked once
    assert (wrong - ref).abs().max() > 1e-3


def test_mix_experts_bad_routing_raises_clear_errors():
    x, gate, w1, w2, w3 = make_moe(4, 16, 32, 3)
    weights, experts = torch.ones(4, 2, device=DEVICE), torch.zeros(4, 2, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match=r"weights and experts must both be \(N, k\)"):
        mix_experts(x, weights[:3], experts[:3], w1, w2, w3)
    with pytest.raises(ValueError, match="expert ids must be in 0..2"):
        mix_experts(x, weights, experts + 3, w1, w2, w3)
    with pytest.raises(ValueError, match="integer ids"):
        mix_experts(x, weights, experts.float(), w1, w2, w3)
