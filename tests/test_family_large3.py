"""The Mistral Large 3 preset against its published params.json and published parameter counts, against the
meta-device model and against transformers' own Mistral4 model built on the meta device.

The shape is Mistral-Large-3-675B-Instruct-2512's params.json as vLLM's and unsloth's tests of their params.json
readers quote it (README "The family"): the numbers below are that file's, in its own spelling.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace

import pytest

from mistral_ref.config import ModelArgs
from mistral_ref.family import PRESETS, family_table, kv_cache_bytes, parameter_counts

LARGE3 = PRESETS["mistral-large-3-2512"]
PUBLISHED_PARAMS = {  # params.json (text part), Mistral's spelling
    "dim": 7168, "n_layers": 61, "head_dim": 192, "hidden_dim": 16384, "n_heads": 128, "n_kv_heads": 128,
    "norm_eps": 1e-6, "vocab_size": 131072, "rope_theta": 10000.0, "tied_embeddings": False,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "moe": {"num_experts": 128, "num_experts_per_tok": 4, "expert_hidden_dim": 4096, "num_shared_experts": 1,
            "first_k_dense_replace": 3, "routed_scale": 1.0, "num_expert_groups": 1,
            "num_expert_groups_per_tok": 1, "route_every_n": 1},
    "llama_4_scaling": {"beta": 0.1, "original_max_position_embeddings": 8192},
    "yarn": {"alpha": 1, "apply_scale": False, "beta": 32, "factor": 36, "original_max_position_embeddings": 8192},
}


def test_preset_is_the_published_params_json():
    p, a, m, fm = PUBLISHED_PARAMS, LARGE3, LARGE3.mla, LARGE3.fine_moe
    assert (a.dim, a.n_layers, a.head_dim, a.hidden_dim, a.n_heads, a.n_kv_heads, a.norm_eps, a.vocab_size,
            a.rope_theta, a.tied_embeddings) == tuple(p[k] for k in (
                "dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "norm_eps", "vocab_size",
                "rope_theta", "tied_embeddings"))
    assert (m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == tuple(
        p[k] for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    assert m.qk_head_dim == p["head_dim"]
    moe = p["moe"]
    assert (fm.num_experts, fm.num_experts_per_tok, fm.moe_intermediate_size, fm.n_shared_experts,
            fm.first_k_dense_replace, fm.routed_scaling_factor, fm.n_group, fm.topk_group) == tuple(moe[k] for k in (
                "num_experts", "num_experts_per_tok", "expert_hidden_dim", "num_shared_experts",
                "first_k_dense_replace", "routed_scale", "num_expert_groups", "num_expert_groups_per_tok"))
    assert fm.scoring_func == "softmax" and fm.norm_topk_prob  # vLLM's reading of Mistral's moe section
    y = p["yarn"]
    assert (a.yarn.factor, a.yarn.original_max_position_embeddings, a.yarn.beta, a.yarn.alpha,
            a.yarn.apply_scale) == (y["factor"], y["original_max_position_embeddings"], y["beta"], y["alpha"],
                                    y["apply_scale"])
    assert (a.llama_4_scaling.beta, a.llama_4_scaling.original_max_position_embeddings) == (0.1, 8192)


def test_counts_match_the_published_totals():
    """The model card: a 673B-parameter language model with 39B active, plus a 2.5B vision encoder = 675B / 41B.
    Ours: 673.42B total; 39.01B active without the input embedding lookup (39.95B counting both matrices);
    + 2.5B: 675.9B / 41.5B."""
    c = parameter_counts(LARGE3)
    assert c["total"] == pytest.approx(673e9, rel=0.002)
    lookup = LARGE3.vocab_size * LARGE3.dim
    assert c["active"] - lookup == pytest.approx(39e9, rel=0.002)
    assert int((c["total"] + 2.5e9) / 1e9) == 675
    assert int((c["active"] - lookup + 2.5e9) / 1e9) == 41
    assert "| mistral-large-3-2512 |" in family_table() and "| 673.42B | 39.95B |" in family_table()


def test_latent_cache_per_token():
    """512 + 64 numbers per token and layer: 61 x 576 x 2 bytes = 68.6 KiB per token in bf16, against
    2 x 128 heads x 192 (4 x 128 wider) for the same model with full keys and values."""
    assert kv_cache_bytes(LARGE3, 1) == 61 * 576 * 2
    full = kv_cache_bytes(replace(LARGE3, mla=None, head_dim=128), 1)
    assert full / kv_cache_bytes(LARGE3, 1) == pytest.approx(2 * 128 * 128 / 576)


def test_preset_as_transformers_builds_it():
    """transformers' Mistral4ForCausalLM (softmax routing + llama-4 query scaling: what Mistral's own params.json
    reader translates Large 3 into) built on the meta device from the config.json we write has our count, and
    that config.json reads back to the preset."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = LARGE3.to_hf_config()
    assert cfg["model_type"] == "mistral4"
    config = transformers.Mistral4Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = transformers.Mistral4ForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == parameter_counts(LARGE3)["total"]
    with tempfile.TemporaryDirectory() as d:
        config.save_pretrained(d)
        assert replace(ModelArgs.from_hf_config(d), tokenizer=LARGE3.tokenizer) == LARGE3


def test_the_published_params_json_reads_to_the_preset(tmp_path):
    """Mistral's own spelling (MLA widths at the top level, a `moe` section with expert_hidden_dim,
    num_shared_experts, routed_scale...) reads to the preset, not to a Mixtral with 128 experts of 16384."""
    import json

    (tmp_path / "params.json").write_text(json.dumps({**PUBLISHED_PARAMS, "max_position_embeddings": 294912}))
    args = ModelArgs.from_params_json(tmp_path)
    assert args.moe is None
    assert replace(args, max_seq_len=LARGE3.max_seq_len, tokenizer=LARGE3.tokenizer) == LARGE3
    assert args.max_seq_len == 294912


@pytest.mark.parametrize("edit,message", [
    (lambda p: p["moe"].update(route_every_n=2), "moe.route_every_n=2"),
    (lambda p: p["moe"].update(use_load_balancing_bias=True), "use_load_balancing_bias"),
    (lambda p: p["yarn"].update(apply_scale=True), "yarn.apply_scale=true"),
    (lambda p: p.update(head_dim=128), "head_dim=128 must be qk_nope_head_dim"),
    (lambda p: p.pop("kv_lora_rank"), "kv_lora_rank"),
    (lambda p: p["moe"].pop("expert_hidden_dim") and p["moe"].update(num_shared_experts=1), "expert_hidden_dim"),
])
def test_what_the_published_spelling_does_not_cover_is_named(tmp_path, edit, message):
    import json

    from mistral_ref.config import ConfigError

    params = json.loads(json.dumps(PUBLISHED_PARAMS))
    edit(params)
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(ConfigError, match=rf"params\.json: .*{message}"):
        ModelArgs.from_params_json(tmp_path)
