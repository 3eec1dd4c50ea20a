"""ModelArgs: parsing params.json / config.json in every spelling seen in the wild (the presets and parameter counts
are tested in test_family.py)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from mistral_ref.config import ConfigError, ModelArgs, MoeArgs
from mistral_ref.family import get_preset

BASE_PARAMS = {"dim": 64, "n_layers": 2, "hidden_dim": 96, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16,
               "vocab_size": 100, "norm_eps": 1e-5, "rope_theta": 1e6}
BASE_HF = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 64,
           "num_hidden_layers": 2, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16, "vocab_size": 100, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None,
           "max_position_embeddings": 32768, "tie_word_embeddings": False, "hidden_act": "silu"}


def write(tmp_path: Path, name: str, content: dict, **changes) -> Path:
    content = {**content, **changes}
    content = {k: v for k, v in content.items() if v is not _DROP}
    path = tmp_path / name
    path.write_text(json.dumps(content))
    return path


_DROP = object()


def params(tmp_path: Path, **changes) -> ModelArgs:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean file parses without warnings
        return ModelArgs.from_params_json(write(tmp_path, "params.json", BASE_PARAMS, **changes))


def hf(tmp_path: Path, **changes) -> ModelArgs:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return ModelArgs.from_hf_config(write(tmp_path, "config.json", BASE_HF, **changes))


# ---- params.json -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,parsed", [
    (_DROP, None), (None, None), (0, None), (4096, 4096), ("4096", 4096), (4096.0, 4096),
    ([4096, None], (4096, None)), ([], None), ([8, 0, "16"], (8, None, 16)),
])
def test_sliding_window_spellings(tmp_path, raw, parsed):
    # 6 layers: a per-layer pattern must divide n_layers (test_family_config.py tests that rule)
    assert params(tmp_path, sliding_window=raw, n_layers=6).sliding_window == parsed
    assert hf(tmp_path, sliding_window=raw, num_hidden_layers=6).sliding_window == parsed


@pytest.mark.parametrize("raw", ["four", -1, True, {"size": 4}])
def test_bad_sliding_window_names_file_and_key(tmp_path, raw):
    with pytest.raises(ConfigError) as e:
        params(tmp_path, sliding_window=raw)
    assert "params.json" in str(e.value) and "sliding_window" in str(e.value)


@pytest.mark.parametrize("key", ["dim", "n_layers", "hidden_dim", "n_heads", "vocab_size"])
def test_missing_required_key_names_file_and_key(tmp_path, key):
    with pytest.raises(ConfigError) as e:
        params(tmp_path, **{key: _DROP})
    assert str(tmp_path / "params.json") in str(e.value) and repr(key) in str(e.value)


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                                 "vocab_size"])
def test_hf_missing_required_key_names_file_and_key(tmp_path, key):
    with pytest.raises(ConfigError) as e:
        hf(tmp_path, **{key: _DROP})
    assert str(tmp_path / "config.json") in str(e.value) and repr(key) in str(e.value)


def test_defaults_and_derived_fields(tmp_path):
    args = params(tmp_path, head_dim=_DROP, n_kv_heads=_DROP)
    assert args.head_dim == 64 // 4 and args.n_kv_heads == 4 and args.moe is None and not args.is_moe


def test_unknown_keys_warn_with_file_and_key(tmp_path):
    with pytest.warns(UserWarning, match=r"params\.json: ignoring unknown keys \['frobnicate'\]"):
        ModelArgs.from_params_json(write(tmp_path, "params.json", BASE_PARAMS, frobnicate=1))
    with pytest.warns(UserWarning, match=r"config\.json: ignoring unknown keys \['frobnicate'\]"):
        ModelArgs.from_hf_config(write(tmp_path, "config.json", BASE_HF, frobnicate=1))
    # keys that real files carry and that do not change the model are accepted silently
    assert params(tmp_path, max_batch_size=1, torch_dtype="bfloat16").dim == 64


def test_missing_rope_theta_is_explicit_per_format(tmp_path):
    with pytest.warns(UserWarning, match="rope_theta is missing; using 1e6"):
        args = ModelArgs.from_params_json(write(tmp_path, "params.json", BASE_PARAMS, rope_theta=_DROP))
    assert args.rope_theta == 1e6  # mistral-inference's default
    with pytest.warns(UserWarning, match="rope_theta is missing; using 1e4"):
        args = ModelArgs.from_hf_config(write(tmp_path, "config.json", BASE_HF, rope_theta=_DROP))
    assert args.rope_theta == 1e4  # transformers' MistralConfig default


def test_moe_params(tmp_path):
    args = params(tmp_path, moe={"num_experts": 8, "num_experts_per_tok": 2})
    assert args.moe == MoeArgs(8, 2) and args.is_moe
    with pytest.raises(ConfigError, match="params.json: key 'moe'"):
        params(tmp_path, moe={"num_experts": 8})
    with pytest.raises(ConfigError, match="num_experts_per_tok=9"):
        params(tmp_path, moe={"num_experts": 8, "num_experts_per_tok": 9})


def test_inconsistent_heads_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="params.json: n_heads=4 must be a multiple of n_kv_heads=3"):
        params(tmp_path, n_kv_heads=3)
    with pytest.raises(ConfigError, match="head_dim is missing and dim=66"):
        params(tmp_path, dim=66, head_dim=_DROP)


def test_params_json_round_trip(tmp_path):
    args = ModelArgs(dim=64, n_layers=4, hidden_dim=96, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=100,
                     rope_theta=1e8, sliding_window=(8, None), moe=MoeArgs(4, 2), max_seq_len=4096)
    path = tmp_path / "params.json"
    path.write_text(json.dumps(args.to_params_json()))
    assert ModelArgs.from_params_json(tmp_path) == args


def test_invalid_json_and_missing_file(tmp_path):
    (tmp_path / "params.json").write_text("{not json")
    with pytest.raises(ConfigError, match="params.json: not valid JSON"):
        ModelArgs.from_params_json(tmp_path)
    with pytest.raises(ConfigError, match="config.json: file not found"):
        ModelArgs.from_hf_config(tmp_path)


# ---- config.json -------------------------------------------------------------------------------------------------
def test_transformers5_rope_parameters_and_dtype(tmp_path):
    args = hf(tmp_path, rope_theta=_DROP, rope_parameters={"rope_theta": 1e8, "rope_type": "default"},
              dtype="bfloat16")
    assert args.rope_theta == 1e8
    assert hf(tmp_path, torch_dtype="float16", transformers_version="4.44.0").rope_theta == 1e6
    # YaRN is supported now (test_family_config.py); other scalings are refused by name
    with pytest.raises(ConfigError, match="rope_type 'dynamic'"):
        hf(tmp_path, rope_theta=_DROP, rope_parameters={"rope_theta": 1e6, "rope_type": "dynamic", "factor": 4})


def test_hf_variants(tmp_path):
    assert hf(tmp_path, head_dim=None).head_dim == 16  # transformers 5 writes "head_dim": null
    assert hf(tmp_path, sliding_window=4096, use_sliding_window=False).sliding_window is None
    moe = hf(tmp_path, num_local_experts=8, num_experts_per_tok=2, model_type="mixtral")
    assert moe.moe == MoeArgs(8, 2)
    assert hf(tmp_path, max_position_embeddings=1024000).max_seq_len == 1024000  # metadata only
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        hf(tmp_path, model_type="llama")
    # tie_word_embeddings=true is supported now (Ministral 3 3B; test_family_checkpoint.py); nonsense is refused
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        hf(tmp_path, tie_word_embeddings="yes")
    with pytest.raises(ConfigError, match="hidden_act 'gelu'"):
        hf(tmp_path, hidden_act="gelu")


@pytest.mark.oracle
@pytest.mark.parametrize("arch", ["mistral", "mixtral"])
def test_configs_written_by_transformers_parse_without_warnings(tmp_path, arch):
    import transformers

    kw = dict(vocab_size=100, hidden_size=80, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
              num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6, rope_theta=5e5, sliding_window=None)
    if arch == "mixtral":
        config = transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **kw)
    else:
        config = transformers.MistralConfig(**kw)
    config.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        args = ModelArgs.from_hf_config(tmp_path)
    assert (args.dim, args.n_layers, args.hidden_dim, args.n_heads, args.n_kv_heads, args.head_dim,
            args.vocab_size, args.norm_eps, args.rope_theta, args.sliding_window) == (
        80, 3, 96, 8, 2, 32, 100, 1e-6, 5e5, None)
    assert args.moe == (MoeArgs(4, 2) if arch == "mixtral" else None)
    # and the other way: transformers reads the config we write
    cls = transformers.MixtralConfig if arch == "mixtral" else transformers.MistralConfig
    back = cls(**args.to_hf_config())
    assert (back.hidden_size, back.head_dim, back.num_key_value_heads, back.rope_parameters["rope_theta"]) == (
        80, 32, 2, 5e5)
    assert ModelArgs.from_hf_config(tmp_path) == args


def test_to_hf_config_round_trip_and_per_layer_windows(tmp_path):
    args = get_preset("mixtral-8x7b", n_layers=2)
    (tmp_path / "config.json").write_text(json.dumps(args.to_hf_config()))
    assert ModelArgs.from_hf_config(tmp_path) == args
    # one window interleaved with full layers is HF's "ministral" layer_types (test_family_config.py); two
    # different windows are not expressible
    with pytest.raises(ConfigError, match="per-layer"):
        get_preset("mistral-7b-v0.1", sliding_window=(4096, 8192)).to_hf_config()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("norm_eps", "x", "norm_eps must be a positive number"),
    ("norm_eps", -1, "norm_eps must be a positive number"),
    ("rope_theta", 0, "rope_theta must be a positive number"),
    ("rope_theta", "big", "rope_theta must be a positive number"),
    ("max_seq_len", -3, "max_seq_len must be a positive integer"),
])
def test_bad_numeric_fields_name_file_and_field(tmp_path, field, value, message):
    raw = {"dim": 64, "n_layers": 2, "hidden_dim": 128, "n_heads": 4, "vocab_size": 100, "rope_theta": 1e6,
           field: value}
    (tmp_path / "params.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=message) as err:
        ModelArgs.from_params_json(tmp_path)
    assert str(tmp_path / "params.json") in str(err.value)
