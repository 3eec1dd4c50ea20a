"""Native <-> Hugging Face names and the q/k row permutation (mistral_ref.checkpoint.names)."""

from __future__ import annotations

import pytest
import torch
from checkpoint_helpers import tiny_args

from mistral_ref.checkpoint import (
    hf_to_native_name,
    is_qk,
    native_to_hf_name,
    permute_qk,
    permute_to_hf,
    permute_to_native,
    to_hf_tensor,
    to_native_tensor,
)
from mistral_ref.config import MoeArgs
from mistral_ref.model import Transformer


@pytest.mark.parametrize("moe", [False, True])
def test_every_parameter_name_maps_both_ways(moe):
    args = tiny_args(moe=MoeArgs(4, 2) if moe else None)
    names = list(Transformer(args).state_dict())
    hf = [native_to_hf_name(n) for n in names]
    assert len(set(hf)) == len(names)
    assert [hf_to_native_name(n) for n in hf] == names
    assert "model.layers.1.self_attn.q_proj.weight" in hf and "lm_head.weight" in hf
    if moe:
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in hf
    with pytest.raises(KeyError, match="layers.0.attention.wz.weight"):
        native_to_hf_name("layers.0.attention.wz.weight")
    with pytest.raises(KeyError, match="model.layers.0.mlp.experts.gate_up_proj"):
        hf_to_native_name("model.layers.0.mlp.experts.gate_up_proj")


@pytest.mark.parametrize("n_heads,head_dim,dim", [(4, 16, 48), (2, 128, 40), (8, 4, 32), (1, 2, 3)])
def test_permutation_round_trip_and_layout(n_heads, head_dim, dim):
    w = torch.randn(n_heads * head_dim, dim)
    hf = permute_to_hf(w, n_heads, head_dim)
    assert torch.equal(permute_to_native(hf, n_heads, head_dim), w)
    assert torch.equal(permute_to_hf(permute_to_native(w, n_heads, head_dim), n_heads, head_dim), w)
    # Within each head, native row 2i + j (pair i, component j) becomes HF row j * head_dim/2 + i.
    for h in range(n_heads):
        for i in range(head_dim // 2):
            for j in range(2):
                assert torch.equal(hf[h * head_dim + j * head_dim // 2 + i], w[h * head_dim + 2 * i + j])


def test_permutation_uses_head_dim_and_kv_heads():
    # Nemo-like: head_dim (16) != dim / n_heads (12) and 2 kv heads for 4 query heads.
    args = tiny_args()
    wq, wk = torch.randn(4 * 16, 48), torch.randn(2 * 16, 48)
    _, hq = to_hf_tensor("layers.0.attention.wq.weight", wq, args)
    _, hk = to_hf_tensor("layers.0.attention.wk.weight", wk, args)
    assert torch.equal(hq, permute_to_hf(wq, 4, 16)) and torch.equal(hk, permute_to_hf(wk, 2, 16))
    assert not torch.equal(hk, permute_to_hf(wk, 1, 32))  # the wrong grouping really differs
    assert torch.equal(to_native_tensor("model.layers.0.self_attn.k_proj.weight", hk, args)[1], wk)
    wv = torch.randn(32, 48)
    assert to_hf_tensor("layers.0.attention.wv.weight", wv, args)[1] is wv  # wv is never permuted


def test_one_permutation_both_directions_and_in_place():
    """permute_qk is the one reordering; permute_to_hf / permute_to_native are its two directions."""
    w = torch.randn(2 * 8, 5)  # 2 heads of 8
    hf = permute_qk(w, 8, "hf")
    assert torch.equal(hf, permute_to_hf(w, 2, 8)) and torch.equal(permute_qk(hf, 8, "native"), w)
    # head 0, head_dim 8: HF rows hold native rows 0 2 4 6 1 3 5 7 (first the pairs' first components)
    assert torch.equal(hf[:8], w[[0, 2, 4, 6, 1, 3, 5, 7]])
    out = torch.empty(16, 5, dtype=torch.bfloat16)  # writes into `out`, casting
    assert permute_qk(hf, 8, "native", out=out) is out and torch.equal(out, w.bfloat16())
    with pytest.raises(ValueError, match="expected 3 heads x 8 = 24 rows, got 16"):
        permute_to_hf(w, 3, 8)
    assert is_qk("layers.0.attention.wq.weight") and is_qk("layers.9.attention.wk.weight")
    assert not is_qk("layers.0.attention.wv.weight") and not is_qk("output.weight")
