"""mistral_ref.family: the presets against the published shapes, parameter counts against the published totals and
against the meta-device model, the trained contexts, and the family table `mistral-ref info` prints."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import replace

import pytest

from mistral_ref.config import ModelArgs, MoeArgs
from mistral_ref.family import (
    PRESETS,
    family_table,
    get_preset,
    kv_cache_bytes,
    parameter_counts,
    with_known_context,
)

# ---- the presets --------------------------------------------------------------------------------------------------
# dim / layers / heads / kv heads / head_dim / hidden / vocab / theta / window / experts (FIELD-NOTES table)
FAMILY = {
    "mistral-7b-v0.1": (4096, 32, 32, 8, 128, 14336, 32000, 1e4, 4096, None),
    "mistral-7b-v0.2": (4096, 32, 32, 8, 128, 14336, 32000, 1e6, None, None),
    "mistral-7b-v0.3": (4096, 32, 32, 8, 128, 14336, 32768, 1e6, None, None),
    "mixtral-8x7b": (4096, 32, 32, 8, 128, 14336, 32000, 1e6, None, (8, 2)),
    "mixtral-8x22b": (6144, 56, 48, 8, 128, 16384, 32768, 1e6, None, (8, 2)),
    "mistral-nemo-12b": (5120, 40, 32, 8, 128, 14336, 131072, 1e6, None, None),
    "mistral-small-2409": (6144, 56, 48, 8, 128, 16384, 32768, 1e6, None, None),
    "mistral-small-2501": (5120, 40, 32, 8, 128, 32768, 131072, 1e8, None, None),
    "mistral-large-2407": (12288, 88, 96, 8, 128, 28672, 32768, 1e6, None, None),
    # 2024-2026 (README "The family" says where each number comes from and which could not be verified)
    "codestral-22b-2405": (6144, 56, 48, 8, 128, 16384, 32768, 1e6, None, None),
    "ministral-8b-2410": (4096, 36, 32, 8, 128, 12288, 131072, 1e8, (None, 32768, 32768, 32768), None),
    "ministral-3-3b-2512": (3072, 26, 32, 8, 128, 9216, 131072, 1e6, None, None),
    "ministral-3-8b-2512": (4096, 34, 32, 8, 128, 14336, 131072, 1e6, None, None),
    "ministral-3-14b-2512": (5120, 40, 32, 8, 128, 16384, 131072, 1e9, None, None),
    "mistral-small-2503": (5120, 40, 32, 8, 128, 32768, 131072, 1e9, None, None),
    "mistral-small-2506": (5120, 40, 32, 8, 128, 32768, 131072, 1e9, None, None),
    "magistral-small-2506": (5120, 40, 32, 8, 128, 32768, 131072, 1e9, None, None),
    "devstral-small-2505": (5120, 40, 32, 8, 128, 32768, 131072, 1e9, None, None),
    "devstral-small-2-2512": (5120, 40, 32, 8, 128, 32768, 131072, 1e8, None, None),
    "mistral-small-4-2603": (4096, 36, 32, 32, 128, 12288, 131072, 1e4, None, None),  # + latent attention (test_mla)
    "mistral-large-3-2512": (7168, 61, 128, 128, 192, 16384, 131072, 1e4, None, None),  # (test_family_large3)
}


@pytest.mark.parametrize("name", list(FAMILY))
def test_presets_match_the_published_shapes(name):
    a = PRESETS[name]
    moe = (a.moe.num_experts, a.moe.num_experts_per_tok) if a.moe else None
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.hidden_dim, a.vocab_size, a.rope_theta,
            a.sliding_window, moe) == FAMILY[name]
    assert set(PRESETS) == set(FAMILY)


# tokenizer version and trained context of each preset (FIELD-NOTES table; v0.2/v0.3 "as v0.1": 32k)
PRESET_TOKENIZER_AND_CONTEXT = {
    "mistral-7b-v0.1": ("v1", 32768),
    "mistral-7b-v0.2": ("v1", 32768),
    "mistral-7b-v0.3": ("v3", 32768),
    "mixtral-8x7b": ("v1", 32768),
    "mixtral-8x22b": ("v3", 65536),
    "mistral-nemo-12b": ("v3-tekken", 131072),
    "mistral-small-2409": ("v3", 32768),
    "mistral-small-2501": ("v7-tekken", 32768),
    "mistral-large-2407": ("v3", 131072),
    "codestral-22b-2405": ("v3", 32768),
    "ministral-8b-2410": ("v3-tekken", 131072),
    "ministral-3-3b-2512": ("v13-tekken", 262144),
    "ministral-3-8b-2512": ("v13-tekken", 262144),
    "ministral-3-14b-2512": ("v13-tekken", 262144),
    "mistral-small-2503": ("v7-tekken", 131072),
    "mistral-small-2506": ("v11-tekken", 131072),
    "magistral-small-2506": ("v11-tekken", 131072),
    "devstral-small-2505": ("v7-tekken", 131072),
    "devstral-small-2-2512": ("v13-tekken", 262144),
    "mistral-small-4-2603": ("v15-tekken", 262144),  # V15: reasoning_effort in [MODEL_SETTINGS] (not verified)
    "mistral-large-3-2512": (None, 262144),  # its tokenizer version was not found (README "The family")
}


@pytest.mark.parametrize("name", list(PRESET_TOKENIZER_AND_CONTEXT))
def test_presets_name_their_tokenizer_version_and_context(name):
    a = PRESETS[name]
    assert (a.tokenizer, a.max_seq_len) == PRESET_TOKENIZER_AND_CONTEXT[name]
    assert set(PRESETS) == set(PRESET_TOKENIZER_AND_CONTEXT)


def test_get_preset_overrides_and_unknown_names():
    assert get_preset("mistral-nemo-12b", n_layers=2).n_layers == 2
    assert PRESETS["mistral-nemo-12b"].n_layers == 40
    with pytest.raises(KeyError, match="unknown preset 'mistral-9b'"):
        get_preset("mistral-9b")


@pytest.mark.parametrize("name,total,active", [
    ("mixtral-8x7b", 46.7e9, 12.9e9),
    ("mixtral-8x22b", 141e9, 39e9),
    ("mistral-nemo-12b", 12.2e9, None),
    ("mistral-7b-v0.1", 7.2e9, None),
    ("mistral-large-2407", 123e9, None),
    ("ministral-8b-2410", 8_019_808_256, None),  # the model card's exact count
    ("codestral-22b-2405", 22.2e9, None),
    ("mistral-small-2501", 23.57e9, None),  # the Small 3.x text model: 23.57B (+ a 0.4B Pixtral tower from 3.1)
    ("devstral-small-2-2512", 23.57e9, None),
])
def test_parameter_counts_reproduce_published_totals(name, total, active):
    counts = parameter_counts(PRESETS[name])
    assert counts["total"] == pytest.approx(total, rel=0.01)
    assert counts["active"] == pytest.approx(active if active else total, rel=0.01)
    if active is None:
        assert counts["active"] == counts["total"]


@pytest.mark.parametrize("size,published", [("3b", 3.4), ("8b", 8.4), ("14b", 13.5)])
def test_ministral3_counts_match_the_model_cards(size, published):
    """The cards give the language model to one decimal, truncated (3.4B + 0.4B vision encoder, 8.4B + 0.4B,
    13.5B + 0.4B): 3.43B (embeddings tied), 8.49B, 13.51B."""
    total = parameter_counts(PRESETS[f"ministral-3-{size}-2512"])["total"]
    assert int(total / 1e8) / 10 == published


def test_parameter_count_is_exact_for_a_small_model():
    a = ModelArgs(dim=8, n_layers=2, hidden_dim=12, n_heads=4, n_kv_heads=2, head_dim=4, vocab_size=10,
                  moe=MoeArgs(3, 1))
    attention = 8 * 16 + 2 * 8 * 8 + 16 * 8  # wq, wk + wv, wo
    expert = 3 * 8 * 12
    per_layer = attention + 3 * expert + 3 * 8 + 2 * 8  # experts, router, two norms
    total = 2 * 10 * 8 + 8 + 2 * per_layer  # embeddings + output, final norm
    assert parameter_counts(a) == {"total": total, "active": total - 2 * 2 * expert}




def test_native_params_without_context_take_it_from_the_matching_preset(tmp_path):
    """Real params.json files omit max_seq_len; a known architecture gets its trained context, others None."""
    raw = PRESETS["mistral-nemo-12b"].to_params_json()
    raw.pop("max_seq_len")
    (tmp_path / "params.json").write_text(json.dumps(raw))
    assert ModelArgs.from_params_json(tmp_path).max_seq_len is None  # parsing reports what the file says
    assert with_known_context(ModelArgs.from_params_json(tmp_path)).max_seq_len == 131072
    raw["n_layers"] = 3  # no preset has this shape
    (tmp_path / "params.json").write_text(json.dumps(raw))
    assert with_known_context(ModelArgs.from_params_json(tmp_path)).max_seq_len is None


def _meta_counts(args: ModelArgs) -> dict[str, int]:
    """Count the parameters of the real module tree on the meta device (shapes only, no memory)."""
    from mistral_ref.model import meta_model

    model = meta_model(args)
    total = sum(p.numel() for p in model.parameters())
    active = total
    if args.moe is not None:
        expert = sum(p.numel() for p in model.layers[0].feed_forward.experts[0].parameters())
        active -= args.n_layers * (args.moe.num_experts - args.moe.num_experts_per_tok) * expert
    if args.fine_moe is not None:  # the routed experts a token does not visit, counted on the modules
        fm = args.fine_moe
        for layer in model.layers:
            if hasattr(layer.feed_forward, "shared_experts"):
                expert = sum(p.numel() for p in layer.feed_forward.experts[0].parameters())
                active -= (fm.num_experts - fm.num_experts_per_tok) * expert
    return {"total": total, "active": active}


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_formula_equals_the_meta_device_model(name):
    assert parameter_counts(PRESETS[name]) == _meta_counts(PRESETS[name])


def test_parameter_formula_equals_the_meta_device_model_on_random_shapes():
    rng = random.Random(0)
    for _ in range(40):
        kv = rng.choice([1, 2, 4])
        moe = MoeArgs(e := rng.randint(2, 6), rng.randint(1, e)) if rng.random() < 0.5 else None
        args = ModelArgs(dim=rng.randint(1, 9) * 8, n_layers=rng.randint(1, 3), hidden_dim=rng.randint(1, 40),
                         n_heads=kv * rng.randint(1, 3), n_kv_heads=kv, head_dim=rng.randint(1, 6) * 2,
                         vocab_size=rng.randint(1, 50), moe=moe)
        assert parameter_counts(args) == _meta_counts(args), args


def test_family_table_has_every_preset_and_published_counts():
    table = family_table()
    for name in ("mistral-7b-v0.1", "mixtral-8x7b", "mixtral-8x22b", "mistral-nemo-12b", "mistral-large-2407"):
        assert f"| {name} |" in table
    assert "| 46.70B | 12.88B |" in table  # Mixtral-8x7B: 46.7B total, 12.9B active
    assert "| 140.63B | 39.16B |" in table  # Mixtral-8x22B: 141B / 39B


def test_family_and_config_import_neither_torch_nor_the_model():
    """`mistral-ref info` prints instantly because the family table needs no torch (measured in test_cli.py)."""
    code = ("import sys, mistral_ref.family, mistral_ref.config; from mistral_ref import PRESETS, parameter_counts; "
            "parameter_counts(PRESETS['mixtral-8x7b']); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m == 'mistral_ref.model'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- the 2024-2026 members: what sets them apart ------------------------------------------------------------------
def test_new_presets_carry_their_attention_and_rope_features():
    m8 = PRESETS["ministral-8b-2410"]
    assert [m8.window_for_layer(i) for i in range(8)] == [None, 32768, 32768, 32768] * 2  # 1 full : 3 windowed
    for size in ("3b", "8b", "14b"):
        a = PRESETS[f"ministral-3-{size}-2512"]
        assert (a.yarn.factor, a.yarn.original_max_position_embeddings, a.yarn.beta, a.yarn.alpha) == (
            16.0, 16384, 32.0, 1.0)
        assert a.yarn.attention_scaling == 1.0  # HF mscale = mscale_all_dim = 1
        assert (a.llama_4_scaling.beta, a.llama_4_scaling.original_max_position_embeddings) == (0.1, 16384)
        assert a.tied_embeddings == (size == "3b")
    for name in ("mistral-small-2503", "mistral-small-2506", "magistral-small-2506", "devstral-small-2505"):
        assert PRESETS[name] == replace(PRESETS["mistral-small-2501"], rope_theta=1e9, max_seq_len=131072)
    assert PRESETS["devstral-small-2-2512"].yarn is not None


def test_tied_embeddings_count_the_matrix_once():
    a = PRESETS["ministral-3-3b-2512"]
    untied = replace(a, tied_embeddings=False)
    assert parameter_counts(untied)["total"] - parameter_counts(a)["total"] == a.vocab_size * a.dim


@pytest.mark.parametrize("name", list(PRESETS))
def test_kv_cache_formula_equals_the_cache(name):
    """family.kv_cache_bytes (no torch, what `mistral-ref info` prints) == cache.cache_nbytes, at a few contexts."""
    import torch

    from mistral_ref.cache import cache_nbytes

    a = PRESETS[name]
    for context in (1, 4096, 32769, a.max_seq_len):
        assert kv_cache_bytes(a, context) == cache_nbytes(a, 1, context, torch.bfloat16)
        assert kv_cache_bytes(a, context, 4, batch_size=3) == cache_nbytes(a, 3, context, torch.float32)


def test_kv_cache_of_interleaved_windows():
    """Ministral 8B at 128k: 9 full layers keep 131072 slots, 27 window layers 32768: 2 x 8 x 128 x 2 bytes each."""
    a = PRESETS["ministral-8b-2410"]
    per_slot = 2 * 8 * 128 * 2
    assert kv_cache_bytes(a, 131072) == (9 * 131072 + 27 * 32768) * per_slot  # 7.9 GiB, not 18 GiB
    assert kv_cache_bytes(replace(a, sliding_window=None), 131072) == 36 * 131072 * per_slot
    table = family_table()
    assert "| ministral-8b-2410 |" in table and "| full/32768/32768/32768 |" in table
    assert "| 8.02B | 8.02B | 128k | 144 KiB | 7.9 GiB |" in table
    assert "| 131072 tied | 1e+06 yarn 16x16384 +q0.1 |" in table  # Ministral 3 3B


def test_parameter_formula_on_random_shapes_with_tied_embeddings_and_windows():
    rng = random.Random(1)
    for _ in range(20):
        n_layers = rng.choice([2, 4])
        args = ModelArgs(dim=rng.randint(1, 6) * 8, n_layers=n_layers, hidden_dim=rng.randint(1, 40), n_heads=4,
                         n_kv_heads=rng.choice([1, 2, 4]), head_dim=rng.randint(1, 4) * 2,
                         vocab_size=rng.randint(1, 50), tied_embeddings=rng.random() < 0.5,
                         sliding_window=rng.choice([None, 3, (None, 3)]))
        assert parameter_counts(args) == _meta_counts(args), args
