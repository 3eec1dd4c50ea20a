"""Latent attention, the latent cache and fine-grained routing: the pieces on their own (no oracle).

tests/test_parity_mistral4.py checks the whole models against transformers."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import pytest
import torch

from mistral_ref.cache import KVCache, LatentLayerCache, cache_nbytes
from mistral_ref.checkpoint.names import hf_to_native_name, native_to_hf_name
from mistral_ref.config import ConfigError, FineMoeArgs, Llama4Scaling, MlaArgs, ModelArgs, YarnArgs
from mistral_ref.family import PRESETS, kv_cache_bytes, parameter_counts
from mistral_ref.fine_moe import route_fine
from mistral_ref.mla import mla_softmax_scale
from mistral_ref.model import Transformer, meta_model

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(scoring: str = "softmax", q_lora_rank: int | None = 12, **kw) -> ModelArgs:
    yarn = YarnArgs(factor=4.0, original_max_position_embeddings=8, apply_scale=False)
    return ModelArgs(**{**dict(
        dim=32, n_layers=2, hidden_dim=40, n_heads=4, n_kv_heads=4, head_dim=10, vocab_size=50, rope_theta=1e4,
        yarn=yarn, llama_4_scaling=Llama4Scaling(8, 0.1) if scoring == "softmax" else None,
        mla=MlaArgs(kv_lora_rank=8, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5, q_lora_rank=q_lora_rank,
                    mscale_all_dim=1.0),
        fine_moe=FineMoeArgs(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
                             n_group=4 if scoring == "sigmoid" else 1, topk_group=2 if scoring == "sigmoid" else 1,
                             routed_scaling_factor=2.5 if scoring == "sigmoid" else 1.0, scoring_func=scoring)),
        **kw})


def test_latent_cache_holds_latent_and_rotary_key_only():
    args = tiny()
    cache = KVCache(args, batch_size=3, max_seq_len=20, dtype=torch.bfloat16)
    assert all(isinstance(c, LatentLayerCache) for c in cache.layers)
    per_token = 8 + 4  # kv_lora_rank + qk_rope_head_dim, not 2 x 4 heads x 10
    assert cache.nbytes() == cache_nbytes(args, 3, 20, torch.bfloat16) == 2 * 3 * 20 * per_token * 2
    assert kv_cache_bytes(args, 20, 2, 3) == cache.nbytes()


def test_small4_cache_is_far_smaller_than_grouped_query_attention():
    """Mistral Small 4 caches 256 + 64 numbers per token and layer; the same model with 8 kv heads of 128 would
    cache 2 x 8 x 128 = 2048 (6.4x more); with its 32 full heads 8192 (25.6x)."""
    a = PRESETS["mistral-small-4-2603"]
    mla = kv_cache_bytes(a, 1)
    assert mla == 36 * 320 * 2
    gqa = kv_cache_bytes(replace(a, mla=None, n_kv_heads=8), 1)
    mha = kv_cache_bytes(replace(a, mla=None), 1)
    assert (gqa / mla, mha / mla) == (6.4, 25.6)
    assert cache_nbytes(a, 1, 1000, torch.bfloat16) == kv_cache_bytes(a, 1000)


def test_small4_counts_match_the_published_totals():
    """119B total (the model card); active 6.63B with both embedding matrices (published: 6.5B)."""
    c = parameter_counts(PRESETS["mistral-small-4-2603"])
    assert c["total"] == pytest.approx(119e9, rel=0.005)
    assert c["active"] == pytest.approx(6.5e9, rel=0.03)


def test_parameter_formula_equals_the_meta_model_on_random_latent_shapes():
    rng = random.Random(0)
    for _ in range(12):
        E = rng.choice([4, 8])
        args = ModelArgs(
            dim=rng.randint(1, 4) * 8, n_layers=rng.randint(1, 3), hidden_dim=rng.randint(1, 30),
            n_heads=(h := rng.randint(1, 4)), n_kv_heads=h, vocab_size=rng.randint(1, 40),
            head_dim=(n := rng.randint(1, 4)) + (r := 2 * rng.randint(1, 3)),
            mla=MlaArgs(kv_lora_rank=rng.randint(1, 9), qk_nope_head_dim=n, qk_rope_head_dim=r,
                        v_head_dim=rng.randint(1, 6), q_lora_rank=rng.choice([None, rng.randint(1, 9)])),
            fine_moe=FineMoeArgs(num_experts=E, num_experts_per_tok=rng.randint(1, E // 2),
                                 moe_intermediate_size=rng.randint(1, 9), n_shared_experts=rng.randint(0, 2),
                                 first_k_dense_replace=rng.randint(0, 2), n_group=2, topk_group=1,
                                 scoring_func=rng.choice(["softmax", "sigmoid"])),
            tied_embeddings=rng.random() < 0.3)
        model = meta_model(args)
        total = sum(p.numel() for p in model.parameters())
        idle = 0
        for layer in model.layers:
            if hasattr(layer.feed_forward, "shared_experts"):
                idle += (E - args.fine_moe.num_experts_per_tok) * sum(
                    p.numel() for p in layer.feed_forward.experts[0].parameters())
        assert parameter_counts(args) == {"total": total, "active": total - idle}, args


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_expert_choice_does_not_depend_on_the_batch(scoring):
    """A token's experts are the same alone, in a batch of 64 and anywhere in it (its weights too, up to the
    fp32 rounding of the router product, which a matrix-product kernel may block differently by batch size)."""
    moe = tiny(scoring).fine_moe
    torch.manual_seed(0)
    x, gate, bias = torch.randn(64, 32), torch.randn(8, 32), 0.1 * torch.randn(8)
    weights, experts, _ = route_fine(x, gate, moe, bias if scoring == "sigmoid" else None)
    perm = torch.randperm(64)
    w_perm, e_perm, _ = route_fine(x[perm], gate, moe, bias if scoring == "sigmoid" else None)
    assert torch.equal(e_perm, experts[perm]) and torch.equal(w_perm, weights[perm])
    for i in (0, 17, 63):
        w1, e1, _ = route_fine(x[i:i + 1], gate, moe, bias if scoring == "sigmoid" else None)
        assert torch.equal(e1, experts[i:i + 1]) and torch.allclose(w1, weights[i:i + 1], rtol=0, atol=1e-6)
    if scoring == "sigmoid":  # group limit: the k experts lie in at most topk_group of the n_group groups
        groups = experts // (moe.num_experts // moe.n_group)
        assert max(len(set(g.tolist())) for g in groups) <= moe.topk_group
        assert torch.allclose(weights.sum(-1), torch.full((64,), 2.5))  # renormalised, then scaled


def test_softmax_scale_has_yarn_mscale_correction():
    m = MlaArgs(kv_lora_rank=8, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=128, mscale_all_dim=1.0)
    yarn = YarnArgs(factor=128.0, original_max_position_embeddings=8192)
    assert mla_softmax_scale(m, None) == 128 ** -0.5
    mscale = 0.1 * math.log(128) + 1
    assert mla_softmax_scale(m, yarn) == pytest.approx(128 ** -0.5 * mscale**2, rel=1e-15)
    assert mla_softmax_scale(replace(m, mscale_all_dim=0.0), yarn) == 128 ** -0.5


@pytest.mark.parametrize("scoring,q_lora_rank", [("softmax", 12), ("sigmoid", None)])
def test_config_and_names_round_trip(scoring, q_lora_rank, tmp_path):
    args = tiny(scoring, q_lora_rank, max_seq_len=64)
    (tmp_path / "config.json").write_text(json.dumps(args.to_hf_config()))
    assert ModelArgs.from_hf_config(tmp_path) == args
    assert args.to_hf_config()["model_type"] == ("mistral4" if scoring == "softmax" else "deepseek_v3")
    (tmp_path / "params.json").write_text(json.dumps(args.to_params_json()))
    assert ModelArgs.from_params_json(tmp_path) == args
    names = list(Transformer(args).state_dict())
    hf = [native_to_hf_name(n, args) for n in names]
    assert len(set(hf)) == len(names) and [hf_to_native_name(n, args) for n in hf] == names
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in hf and "model.layers.1.mlp.gate.weight" in hf
    assert ("model.layers.1.mlp.gate.e_score_correction_bias" in hf) == (scoring == "sigmoid")


def test_bad_latent_configs_are_refused(tmp_path):
    cfg = tiny().to_hf_config()
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "rope_interleave": False}))
    with pytest.raises(ConfigError, match="rope_interleave"):
        ModelArgs.from_hf_config(tmp_path)
    with pytest.raises(ConfigError, match="n_group=3 must divide"):
        FineMoeArgs(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=4, n_group=3)
    with pytest.raises(ConfigError, match="qk_rope_head_dim must be even"):
        MlaArgs(kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=3, v_head_dim=4)
    with pytest.raises(ConfigError, match="n_kv_heads == n_heads"):
        tiny(n_kv_heads=2)


def test_compute_loss_counts_the_fine_grained_router():
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    tokens = torch.randint(0, 50, (2, 9))
    out = model.compute_loss(tokens[:, :-1], tokens[:, 1:])
    assert out.aux_loss > 0 and torch.isfinite(out.loss)


def test_multimodal_wrapper_with_a_latent_text_model(tmp_path):
    """Mistral3ForConditionalGeneration configs carry the language model in text_config: a deepseek_v3 /
    mistral4 text_config is read like the plain config (the vision tower is skipped with a warning)."""
    args = tiny("sigmoid", None, max_seq_len=64)
    wrapper = {"model_type": "mistral3", "architectures": ["Mistral3ForConditionalGeneration"],
               "text_config": args.to_hf_config(), "vision_config": {"model_type": "pixtral"}}
    (tmp_path / "config.json").write_text(json.dumps(wrapper))
    with pytest.warns(UserWarning, match="language model"):
        assert ModelArgs.from_hf_config(tmp_path) == args
