"""ModelArgs for the 2024-2026 models: per-layer windows, YaRN, the llama-4 query scaling, tied embeddings and
multimodal configs, read from and written to params.json and config.json, and the errors bad files raise (each
naming the file and the key)."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace
from pathlib import Path

import pytest

from mistral_ref.config import ConfigError, Llama4Scaling, ModelArgs, YarnArgs
from mistral_ref.family import PRESETS, get_preset

BASE_PARAMS = {"dim": 64, "n_layers": 4, "hidden_dim": 96, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16,
               "vocab_size": 100, "norm_eps": 1e-5, "rope_theta": 1e6}
BASE_HF = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 64,
           "num_hidden_layers": 4, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16, "vocab_size": 100, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None,
           "max_position_embeddings": 32768, "tie_word_embeddings": False, "hidden_act": "silu"}
YARN = {"factor": 16.0, "original_max_position_embeddings": 16384, "beta": 32.0, "alpha": 1.0, "apply_scale": False}
MINISTRAL3_ROPE = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 16384,
                   "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                   "llama_4_scaling_beta": 0.1}


def write(tmp_path: Path, name: str, content: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(content))
    return path


def params(tmp_path: Path, **changes) -> ModelArgs:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean file parses without warnings
        return ModelArgs.from_params_json(write(tmp_path, "params.json", {**BASE_PARAMS, **changes}))


def hf(tmp_path: Path, **changes) -> ModelArgs:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return ModelArgs.from_hf_config(write(tmp_path, "config.json", {**BASE_HF, **changes}))


# ---- interleaved windows ------------------------------------------------------------------------------------------
def test_per_layer_window_list_in_params_json(tmp_path):
    args = params(tmp_path, sliding_window=[None, 8, 8, 8])
    assert args.sliding_window == (None, 8, 8, 8)
    assert [args.window_for_layer(i) for i in range(4)] == [None, 8, 8, 8]
    assert params(tmp_path, sliding_window=[None, 8]).sliding_window == (None, 8)  # 2 divides 4


@pytest.mark.parametrize("window", [[None, 8, 8], [1, 2, 3, 4, 5]])
def test_window_list_that_does_not_divide_n_layers_names_file_and_key(tmp_path, window):
    with pytest.raises(ConfigError) as e:
        params(tmp_path, sliding_window=window)
    assert str(tmp_path / "params.json") in str(e.value) and "sliding_window" in str(e.value)
    assert "divide n_layers=4" in str(e.value)


def test_ministral_layer_types(tmp_path):
    """HF "ministral": each layer is sliding_window or full by layer_types; the repeating pattern is kept."""
    types = ["full_attention", "sliding_attention", "sliding_attention", "sliding_attention"]
    args = hf(tmp_path, model_type="ministral", architectures=["MinistralForCausalLM"], sliding_window=32,
              layer_types=types)
    assert args.sliding_window == (None, 32, 32, 32)
    args = hf(tmp_path, model_type="ministral", sliding_window=32, layer_types=["full_attention",
                                                                                "sliding_attention"] * 2)
    assert args.sliding_window == (None, 32)
    # without layer_types every layer slides (MinistralConfig's default)
    assert hf(tmp_path, model_type="ministral", sliding_window=32).sliding_window == 32


def test_layer_types_are_ignored_where_transformers_ignores_them(tmp_path):
    with pytest.warns(UserWarning, match="layer_types is ignored for model_type 'mistral'"):
        args = ModelArgs.from_hf_config(write(tmp_path, "config.json", {
            **BASE_HF, "sliding_window": 32, "layer_types": ["full_attention", "sliding_attention"] * 2}))
    assert args.sliding_window == 32  # MistralModel windows every layer


@pytest.mark.parametrize("changes,message", [
    (dict(layer_types=["full_attention"] * 3), "layer_types must list"),
    (dict(layer_types=["sliding", "full", "full", "full"]), "layer_types must list"),
    (dict(sliding_window=None, layer_types=["sliding_attention"] * 4), "sliding_window is None"),
])
def test_bad_layer_types_name_file_and_key(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message) as e:
        hf(tmp_path, model_type="ministral", **{"sliding_window": 32, **changes})
    assert str(tmp_path / "config.json") in str(e.value)


def test_interleaved_windows_round_trip_both_formats(tmp_path):
    args = get_preset("ministral-8b-2410", n_layers=8, dim=64, hidden_dim=96, n_heads=4, n_kv_heads=2, head_dim=16,
                      vocab_size=100)
    cfg = args.to_hf_config()
    assert (cfg["model_type"], cfg["architectures"], cfg["sliding_window"]) == (
        "ministral", ["MinistralForCausalLM"], 32768)
    assert cfg["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention",
                                  "sliding_attention"] * 2
    write(tmp_path, "config.json", cfg)
    assert ModelArgs.from_hf_config(tmp_path) == args
    write(tmp_path, "params.json", args.to_params_json())
    assert ModelArgs.from_params_json(tmp_path) == args
    assert json.loads((tmp_path / "params.json").read_text())["sliding_window"] == [None, 32768, 32768, 32768]


def test_what_hf_cannot_express(tmp_path):
    with pytest.raises(ConfigError, match="two different windows"):
        replace(PRESETS["ministral-8b-2410"], sliding_window=(4096, 32768)).to_hf_config()
    with pytest.raises(ConfigError, match="per-layer sliding windows together with experts or YaRN"):
        replace(PRESETS["ministral-3-8b-2512"], sliding_window=(None, 4096)).to_hf_config()
    with pytest.raises(ConfigError, match="llama_4_scaling only on top of YaRN"):
        replace(PRESETS["ministral-3-8b-2512"], yarn=None).to_hf_config()
    with pytest.raises(ConfigError, match="same original_max_position_embeddings"):
        replace(PRESETS["ministral-3-8b-2512"], llama_4_scaling=Llama4Scaling(8192, 0.1)).to_hf_config()
    with pytest.raises(ConfigError, match="experts together with YaRN"):
        replace(PRESETS["mixtral-8x7b"], yarn=YarnArgs(4.0, 4096)).to_hf_config()


# ---- YaRN and the query scaling -----------------------------------------------------------------------------------
def test_yarn_and_query_scaling_in_params_json(tmp_path):
    args = params(tmp_path, yarn=YARN, llama_4_scaling={"original_max_position_embeddings": 16384, "beta": 0.1},
                  max_position_embeddings=262144)
    assert args.yarn == YarnArgs(16.0, 16384, 32.0, 1.0, apply_scale=False)
    assert args.llama_4_scaling == Llama4Scaling(16384, 0.1)
    assert args.max_seq_len == 262144  # the file's max_position_embeddings, as metadata
    assert args.yarn.attention_scaling == 1.0
    assert params(tmp_path, yarn={**YARN, "apply_scale": True}).yarn.attention_scaling == pytest.approx(
        0.1 * math.log(16) + 1)
    # beta / alpha / apply_scale may be absent: 32, 1 and true, as vLLM reads them
    assert params(tmp_path, yarn={"factor": 4, "original_max_position_embeddings": 4096}).yarn == YarnArgs(
        4.0, 4096, 32.0, 1.0, apply_scale=True)


@pytest.mark.parametrize("yarn,message", [
    ({"original_max_position_embeddings": 16384}, "required key 'yarn.factor' is missing"),
    ({"factor": 16}, "required key 'yarn.original_max_position_embeddings' is missing"),
    ({**YARN, "beta_fast": 32}, r"key 'yarn' has unknown entries \['beta_fast'\]"),
    ({**YARN, "factor": 0.5}, "yarn.factor must be >= 1"),
    ({**YARN, "factor": "16"}, "yarn.factor must be a positive number"),
    ({**YARN, "original_max_position_embeddings": 0}, "yarn.original_max_position_embeddings must be a positive"),
    ({**YARN, "beta": 1.0, "alpha": 32.0}, r"yarn.beta \(beta_fast\) = 1.0 must be greater than yarn.alpha"),
    ({**YARN, "apply_scale": "yes"}, "yarn.apply_scale must be true or false"),
    ([16, 16384], "key 'yarn' must be an object"),
])
def test_bad_yarn_names_file_and_key(tmp_path, yarn, message):
    with pytest.raises(ConfigError, match=message) as e:
        params(tmp_path, yarn=yarn)
    assert str(tmp_path / "params.json") in str(e.value)


@pytest.mark.parametrize("section,message", [
    ({"beta": 0.1}, "required key 'llama_4_scaling.original_max_position_embeddings' is missing"),
    ({"original_max_position_embeddings": 16384}, "required key 'llama_4_scaling.beta' is missing"),
    ({"original_max_position_embeddings": 16384, "beta": -1}, "llama_4_scaling.beta must be a positive number"),
])
def test_bad_query_scaling_names_file_and_key(tmp_path, section, message):
    with pytest.raises(ConfigError, match=message) as e:
        params(tmp_path, yarn=YARN, llama_4_scaling=section)
    assert str(tmp_path / "params.json") in str(e.value)


def test_ministral3_rope_parameters(tmp_path):
    args = hf(tmp_path, model_type="ministral3", architectures=["Ministral3ForCausalLM"], rope_theta=None,
              rope_parameters=MINISTRAL3_ROPE, max_position_embeddings=262144)
    assert (args.rope_theta, args.yarn, args.llama_4_scaling) == (
        1e6, YarnArgs(16.0, 16384, 32.0, 1.0, apply_scale=False), Llama4Scaling(16384, 0.1))


@pytest.mark.parametrize("rope,scaling,apply_scale,explicit", [
    ({"mscale": 1.0, "mscale_all_dim": 1.0}, 1.0, False, None),  # Ministral 3: mscale / mscale = 1
    ({"mscale": 1.0, "mscale_all_dim": 0.0}, 0.1 * math.log(16) + 1, True, None),  # all_dim 0: the default
    ({}, 0.1 * math.log(16) + 1, True, None),  # neither given: the default
    ({"mscale": 0.707, "mscale_all_dim": 0.707}, 1.0, False, None),  # DeepSeek style: equal -> 1
    ({"mscale": 1.0, "mscale_all_dim": 0.5}, (0.1 * math.log(16) + 1) / (0.05 * math.log(16) + 1), True, "ratio"),
    ({"attention_factor": 1.5}, 1.5, True, 1.5),  # explicit wins
])
def test_hf_yarn_magnitude_rules(tmp_path, rope, scaling, apply_scale, explicit):
    """transformers' rule for the cos/sin factor, and how each result is kept (apply_scale or attention_factor)."""
    args = hf(tmp_path, model_type="ministral3", rope_theta=None, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 16384, **rope})
    assert args.yarn.attention_scaling == pytest.approx(scaling, rel=1e-12)
    assert args.yarn.apply_scale == apply_scale
    assert (args.yarn.attention_factor is not None) == (explicit is not None)
    write(tmp_path, "config.json", args.to_hf_config())
    assert ModelArgs.from_hf_config(tmp_path) == args  # written back the same way
    if explicit is not None:
        with pytest.raises(ConfigError, match="attention_factor=.* cannot be written to params.json"):
            args.to_params_json()


def test_hf_yarn_defaults_and_old_spelling(tmp_path):
    """factor from max_position_embeddings / original; original from max_position_embeddings; transformers 4's
    rope_scaling {"type": "yarn"} with a top-level rope_theta; beta_fast / beta_slow default to 32 / 1."""
    args = hf(tmp_path, model_type="ministral3", max_position_embeddings=65536,
              rope_parameters={"rope_type": "yarn", "original_max_position_embeddings": 4096})
    assert (args.yarn.factor, args.yarn.beta, args.yarn.alpha) == (16.0, 32.0, 1.0)
    args = hf(tmp_path, rope_scaling={"type": "yarn", "factor": 4.0}, max_position_embeddings=8192)
    assert args.yarn.original_max_position_embeddings == 8192 and args.rope_theta == 1e6
    assert args.llama_4_scaling is None


def test_query_scaling_only_where_transformers_applies_it(tmp_path):
    """MistralForCausalLM runs YaRN but not the query scaling: a beta in a "mistral" config warns and is dropped."""
    with pytest.warns(UserWarning, match="llama_4_scaling_beta is ignored for model_type 'mistral'"):
        args = ModelArgs.from_hf_config(write(tmp_path, "config.json", {
            **BASE_HF, "rope_theta": None, "rope_parameters": MINISTRAL3_ROPE}))
    assert args.yarn is not None and args.llama_4_scaling is None
    # beta 0 means none (transformers' converter writes it for YaRN without the scaling)
    assert hf(tmp_path, model_type="ministral3", rope_parameters={**MINISTRAL3_ROPE, "llama_4_scaling_beta": 0}
              ).llama_4_scaling is None


@pytest.mark.parametrize("rope,message", [
    ({"rope_type": "default", "rope_theta": 1e6, "llama_4_scaling_beta": 0.1}, "llama_4_scaling_beta needs"),
    ({**MINISTRAL3_ROPE, "truncate": False}, "truncate=false"),
    ({**MINISTRAL3_ROPE, "beta_fast": 0.5, "beta_slow": 2.0}, "must be greater than yarn.alpha"),
    ({"rope_type": "yarn", "rope_theta": 1e6}, "original_max_position_embeddings is missing"),
    ({"rope_type": "longrope", "rope_theta": 1e6}, "rope_type 'longrope'"),
])
def test_bad_hf_rope_parameters_name_file_and_key(tmp_path, rope, message):
    content = {**BASE_HF, "model_type": "ministral3", "rope_theta": None, "rope_parameters": rope}
    content.pop("max_position_embeddings")
    with pytest.raises(ConfigError, match=message) as e:
        ModelArgs.from_hf_config(write(tmp_path, "config.json", content))
    assert str(tmp_path / "config.json") in str(e.value)


@pytest.mark.parametrize("name", ["ministral-3-3b-2512", "ministral-3-14b-2512", "devstral-small-2-2512",
                                  "ministral-8b-2410", "mistral-small-2503"])
def test_presets_round_trip_both_formats(tmp_path, name):
    args = PRESETS[name]
    write(tmp_path, "params.json", args.to_params_json())
    write(tmp_path, "config.json", args.to_hf_config())
    assert ModelArgs.from_params_json(tmp_path) == args
    assert ModelArgs.from_hf_config(tmp_path) == args
    cfg = args.to_hf_config()
    if args.yarn:
        assert cfg["model_type"] == "ministral3" and cfg["rope_parameters"]["rope_type"] == "yarn"
        assert cfg["rope_parameters"]["llama_4_scaling_beta"] == 0.1
        assert cfg["rope_parameters"]["mscale"] == cfg["rope_parameters"]["mscale_all_dim"] == 1.0
    assert cfg["tie_word_embeddings"] == args.tied_embeddings


# ---- tied embeddings and multimodal configs -----------------------------------------------------------------------
def test_tied_embeddings_both_formats(tmp_path):
    assert params(tmp_path, tied_embeddings=True).tied_embeddings
    assert "tied_embeddings" not in params(tmp_path).to_params_json()  # written only when true
    assert params(tmp_path, tied_embeddings=True).to_params_json()["tied_embeddings"] is True
    assert hf(tmp_path, tie_word_embeddings=True).tied_embeddings
    with pytest.raises(ConfigError, match="tied_embeddings must be true or false") as e:
        params(tmp_path, tied_embeddings=1)
    assert str(tmp_path / "params.json") in str(e.value)


def test_native_vision_encoder_loads_the_language_model_with_a_warning(tmp_path):
    content = {**BASE_PARAMS, "vision_encoder": {"hidden_size": 1024, "num_hidden_layers": 24}}
    with pytest.warns(UserWarning, match="multimodal model .*'vision_encoder'.*image inputs are not supported yet"):
        args = ModelArgs.from_params_json(write(tmp_path, "params.json", content))
    assert args == params(tmp_path)


def test_hf_mistral3_reads_its_text_config(tmp_path):
    text = {k: v for k, v in BASE_HF.items() if k not in ("architectures",)}
    content = {"architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
               "text_config": {**text, "model_type": "ministral3", "rope_theta": None,
                               "rope_parameters": MINISTRAL3_ROPE},
               "vision_config": {"model_type": "pixtral", "hidden_size": 1024}, "image_token_index": 10,
               "tie_word_embeddings": True, "spatial_merge_size": 2}
    with pytest.warns(UserWarning, match="Mistral3ForConditionalGeneration: loading its language model"):
        args = ModelArgs.from_hf_config(write(tmp_path, "config.json", content))
    assert args.tied_embeddings and args.yarn is not None and args.llama_4_scaling is not None
    assert (args.dim, args.n_layers) == (64, 4)
    # errors name the nested key
    content["text_config"]["model_type"] = "llama"
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match="text_config.model_type 'llama'"):
        ModelArgs.from_hf_config(write(tmp_path, "config.json", content))
    with pytest.raises(ConfigError, match="needs a 'text_config' object"):
        ModelArgs.from_hf_config(write(tmp_path, "config.json", {"model_type": "mistral3"}))


# ---- the oracle: transformers' own configs --------------------------------------------------------------------------
@pytest.mark.oracle
def test_configs_written_by_transformers_parse_and_read_back(tmp_path):
    """MinistralConfig (layer_types), Ministral3Config (its defaults) and Mistral3Config (a text_config) as
    transformers writes them; and transformers reads what to_hf_config writes, with the same rope parameters."""
    transformers = pytest.importorskip("transformers")
    small = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16)
    config = transformers.MinistralConfig(**small, sliding_window=8, rms_norm_eps=1e-6,
                                          layer_types=["full_attention"] + ["sliding_attention"] * 3)
    config.save_pretrained(tmp_path / "ministral")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        args = ModelArgs.from_hf_config(tmp_path / "ministral")
    assert args.sliding_window == (None, 8, 8, 8)
    back = transformers.MinistralConfig(**args.to_hf_config())
    assert back.layer_types == config.layer_types and back.sliding_window == 8

    config = transformers.Ministral3Config(**small)  # transformers' defaults: YaRN 16x16384, beta 0.1
    config.save_pretrained(tmp_path / "ministral3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        args = ModelArgs.from_hf_config(tmp_path / "ministral3")
    assert args.yarn == PRESETS["ministral-3-8b-2512"].yarn and args.llama_4_scaling == Llama4Scaling(16384, 0.1)
    assert args.max_seq_len == 262144 and args.norm_eps == 1e-5
    back = transformers.Ministral3Config(**args.to_hf_config())
    rope = back.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"], rope["beta_fast"],
            rope["beta_slow"], rope["llama_4_scaling_beta"]) == ("yarn", 16.0, 16384, 32.0, 1.0, 0.1)

    config = transformers.Mistral3Config(text_config=transformers.Ministral3Config(**small, tie_word_embeddings=True),
                                         vision_config={"model_type": "pixtral", "hidden_size": 64,
                                                        "num_hidden_layers": 1, "num_attention_heads": 4,
                                                        "intermediate_size": 64, "head_dim": 16})
    config.save_pretrained(tmp_path / "mistral3")
    with pytest.warns(UserWarning, match="image inputs are not supported yet"):
        args = ModelArgs.from_hf_config(tmp_path / "mistral3")
    assert args.yarn is not None and args.tied_embeddings == json.loads(
        (tmp_path / "mistral3" / "config.json").read_text()).get("tie_word_embeddings", True)
