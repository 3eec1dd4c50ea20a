"""Mistral's own native checkpoints of latent attention + fine-grained experts (Mistral Small 4, Mistral Large 3).

Mistral's consolidated.safetensors name these tensors layers.N.attention.wq_a / q_a_norm / wq_b / wkv_a_with_mqa /
kv_a_norm / wkv_b / wo, layers.N.gate, layers.N.experts.E.w1/w2/w3, layers.N.shared_experts.w1/w2/w3, and their
params.json spells the widths at the top level and the experts in a `moe` section.  The table below is written
here from vLLM's MistralLarge3ForCausalLM mapping and transformers' convert_mistral4_weight_to_hf.py, independently
of checkpoint/names.py; the oracle is transformers' Mistral4ForCausalLM:

* a native directory built by hand from the HF model's tensors (no row permuted) loads to transformers' logits;
* HF -> native -> HF converts to exactly these names and back, both loading to transformers' logits;
* permuting the rotary rows (as Mistral-7B's q/k need between the formats) would break parity: no permutation;
* save_checkpoint(format="native") writes Mistral's names and spelling; files our earlier releases wrote (HF-style
  names, own `mla` / `fine_moe` sections) still load; unknown and FP8 tensors are errors naming tensor and file.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import FP32_RTOL, rel_err
from model_helpers import random_model
from safetensors.torch import load_file, save_file

from mistral_ref.checkpoint import CheckpointError, convert_checkpoint, load_model, save_checkpoint
from mistral_ref.config import FineMoeArgs, Llama4Scaling, MlaArgs, ModelArgs, YarnArgs

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.oracle, pytest.mark.usefixtures("one_thread")]

# Mistral-Small-4-shaped, tiny: compressed queries, one dense layer first, softmax routing with a shared expert,
# YaRN 8x over an original context of 16 and the llama-4 query scaling.
HF_CONFIG = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, first_k_dense_replace=1,
                 q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10,
                 n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, norm_topk_prob=True,
                 routed_scaling_factor=1.0, rms_norm_eps=1e-6, max_position_embeddings=512, initializer_range=0.2,
                 bos_token_id=1, eos_token_id=None, pad_token_id=None, rope_interleave=True,
                 rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0,
                                  "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
                                  "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1})
# The same model as Mistral's params.json spells it (Mistral Large 3's published file, these numbers).
PARAMS_JSON = {
    "dim": 64, "n_layers": 3, "head_dim": 20, "hidden_dim": 96, "n_heads": 4, "n_kv_heads": 4, "norm_eps": 1e-6,
    "vocab_size": 97, "rope_theta": 1e4, "tied_embeddings": False, "max_position_embeddings": 512,
    "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 12, "qk_rope_head_dim": 8, "v_head_dim": 10,
    "moe": {"num_experts": 8, "num_experts_per_tok": 2, "expert_hidden_dim": 24, "num_shared_experts": 1,
            "first_k_dense_replace": 1, "routed_scale": 1.0, "num_expert_groups": 1, "num_expert_groups_per_tok": 1,
            "route_every_n": 1},
    "llama_4_scaling": {"beta": 0.1, "original_max_position_embeddings": 16},
    "yarn": {"alpha": 1, "apply_scale": False, "beta": 32, "factor": 8, "original_max_position_embeddings": 16},
}
# transformers' name -> Mistral's (vLLM's mapping read backwards); the fused routed experts are split below.
HF_TO_MISTRAL = [
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attention_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_a_proj\.weight", r"layers.\1.attention.wq_a.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_a_layernorm\.weight", r"layers.\1.attention.q_a_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_b_proj\.weight", r"layers.\1.attention.wq_b.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.kv_a_proj_with_mqa\.weight", r"layers.\1.attention.wkv_a_with_mqa.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.kv_a_layernorm\.weight", r"layers.\1.attention.kv_a_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.kv_b_proj\.weight", r"layers.\1.attention.wkv_b.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"layers.\1.attention.wo.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"layers.\1.feed_forward.w1.weight"),  # the dense layer
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"layers.\1.feed_forward.w3.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"layers.\1.feed_forward.w2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate\.weight", r"layers.\1.gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.gate_proj\.weight", r"layers.\1.shared_experts.w1.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.up_proj\.weight", r"layers.\1.shared_experts.w3.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.down_proj\.weight", r"layers.\1.shared_experts.w2.weight"),
]
TOKENS = torch.randint(3, 97, (2, 48), generator=torch.Generator().manual_seed(2))  # 3x the original context


def mistral_tensors(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' state dict under Mistral's names, every tensor as it is (no row reordered)."""
    out = {}
    for name, t in hf_state.items():
        fused = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", name)
        if fused:  # (E, 2 * hidden, dim): gate rows then up rows; (E, dim, hidden)
            for e, w in enumerate(t):
                base = f"layers.{fused[1]}.experts.{e}."
                if fused[2] == "down_proj":
                    out[base + "w2.weight"] = w.clone()
                else:
                    out[base + "w1.weight"], out[base + "w3.weight"] = (x.clone() for x in w.chunk(2))
            continue
        for pattern, repl in HF_TO_MISTRAL:
            if re.fullmatch(pattern, name):
                out[re.sub(pattern, repl, name)] = t.clone()
                break
        else:
            raise AssertionError(f"no Mistral name for {name}")
    return out


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """(HF model, its fp32 logits on TOKENS, an HF directory, a native directory written by hand)"""
    torch.manual_seed(0)
    hf = transformers.Mistral4ForCausalLM(transformers.Mistral4Config(**HF_CONFIG)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
        ref = hf(TOKENS).logits.float()
    assert ref.std() > 0.5  # not near-uniform
    hf_dir = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(hf_dir)
    native = tmp_path_factory.mktemp("native")
    save_file(mistral_tensors(hf.state_dict()), native / "consolidated.safetensors")
    (native / "params.json").write_text(json.dumps(PARAMS_JSON))
    return hf, ref, hf_dir, native


def logits(model, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).float()


def test_a_native_checkpoint_in_mistrals_spelling_loads_to_transformers_logits(oracle):
    hf, ref, hf_dir, native = oracle
    model = load_model(native)
    assert model.args == load_model(hf_dir).args  # params.json and config.json say the same model
    assert rel_err(logits(model), ref) <= FP32_RTOL


def test_hf_to_native_to_hf_round_trip(oracle, tmp_path):
    hf, ref, hf_dir, native = oracle
    files = convert_checkpoint(hf_dir, tmp_path / "native", format="native")
    written = load_file(files.shards[0])
    expected = load_file(native / "consolidated.safetensors")
    assert written.keys() == expected.keys()  # exactly Mistral's names
    assert all(torch.equal(written[k], expected[k]) for k in expected)  # and no row moved
    params = json.loads(files.config.read_text())
    assert "mla" not in params and "fine_moe" not in params  # Mistral's spelling, not ours
    for key in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "moe", "yarn",
                "llama_4_scaling", "head_dim"):
        assert params[key] == PARAMS_JSON[key], key
    assert rel_err(logits(load_model(tmp_path / "native")), ref) <= FP32_RTOL

    back = convert_checkpoint(tmp_path / "native", tmp_path / "hf", format="hf")
    assert load_file(back.shards[0]).keys() == load_file(hf_dir / "model.safetensors").keys()
    reloaded = transformers.Mistral4ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in hf.state_dict().items())
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits.float(), ref)


def test_the_rotary_rows_are_not_permuted_between_formats(oracle):
    """The q/k permutation question for latent attention: Mistral's files, HF's files and our model all hold the
    rotary rows (the last qk_rope_head_dim rows of each wq_b head, the last ones of wkv_a_with_mqa) as interleaved
    pairs (HF rope_interleave true).  Reordering them into halves, as Mistral-7B's wq / wk are between the
    formats, breaks parity."""
    hf, ref, hf_dir, native = oracle
    model = load_model(native)
    n, r, H = 12, 8, 4
    half = torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2)])  # interleaved pairs -> halves
    q_rows = torch.cat([torch.cat([torch.arange(n), n + half]) + h * (n + r) for h in range(H)])
    kv_rows = torch.cat([torch.arange(16), 16 + half])  # kv_lora_rank 16, then the rotary key
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.q_b_proj.weight.copy_(layer.attention.q_b_proj.weight[q_rows])
            layer.attention.kv_a_proj_with_mqa.weight.copy_(layer.attention.kv_a_proj_with_mqa.weight[kv_rows])
    assert rel_err(logits(model), ref) > 1e-3


def test_save_checkpoint_native_writes_mistrals_names_and_spelling(oracle, tmp_path):
    hf, ref, hf_dir, native = oracle
    model = load_model(hf_dir)
    files = save_checkpoint(model, tmp_path, format="native", max_shard_bytes=200_000)
    assert len(files.shards) > 1
    index = json.loads(files.index.read_text())["weight_map"]
    assert set(index) == set(load_file(native / "consolidated.safetensors"))
    params = json.loads(files.config.read_text())
    assert {k: params[k] for k in PARAMS_JSON if k not in ("tied_embeddings", "max_position_embeddings")} == {
        k: v for k, v in PARAMS_JSON.items() if k not in ("tied_embeddings", "max_position_embeddings")}
    assert torch.equal(logits(load_model(tmp_path)), logits(model))


def test_files_in_our_earlier_spelling_still_load(oracle, tmp_path):
    """Before Mistral's names were known, save_checkpoint wrote our parameter names (HF-style for these layers:
    layers.N.attention.q_a_proj, layers.N.feed_forward.experts.E.w1, ...) and `mla` / `fine_moe` sections."""
    hf, ref, hf_dir, native = oracle
    model = load_model(hf_dir)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "consolidated.safetensors")
    a = model.args
    old = {k: v for k, v in json.loads(json.dumps(a.to_params_json())).items()
           if k not in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "moe")}
    old["mla"] = {f: getattr(a.mla, f) for f in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                                 "v_head_dim", "q_lora_rank", "mscale_all_dim")}
    old["fine_moe"] = {f: getattr(a.fine_moe, f) for f in (
        "num_experts", "num_experts_per_tok", "moe_intermediate_size", "n_shared_experts", "first_k_dense_replace",
        "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor", "scoring_func")}
    (tmp_path / "params.json").write_text(json.dumps(old))
    assert "layers.1.attention.q_a_proj.weight" in load_file(tmp_path / "consolidated.safetensors")
    assert rel_err(logits(load_model(tmp_path)), ref) <= FP32_RTOL


def test_an_unknown_native_tensor_is_an_error_naming_tensor_and_file(oracle, tmp_path):
    hf, ref, hf_dir, native = oracle
    tensors = load_file(native / "consolidated.safetensors")
    tensors["layers.1.attention.wq_c.weight"] = torch.zeros(3, 64)
    save_file(tensors, tmp_path / "consolidated.safetensors")
    (tmp_path / "params.json").write_text((native / "params.json").read_text())
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*'layers\.1\.attention\.wq_c\.weight' \(in "
                                              r"consolidated\.safetensors\).*Mistral's"):
        load_model(tmp_path)
    with pytest.warns(UserWarning, match=r"'layers\.1\.attention\.wq_c\.weight' \(in consolidated"):
        load_model(tmp_path, strict=False)  # non-strict: a warning


def test_a_missing_native_tensor_is_named_as_mistral_names_it(oracle, tmp_path):
    hf, ref, hf_dir, native = oracle
    tensors = load_file(native / "consolidated.safetensors")
    del tensors["layers.2.attention.wkv_b.weight"], tensors["layers.1.experts.4.w3.weight"]
    save_file(tensors, tmp_path / "consolidated.safetensors")
    (tmp_path / "params.json").write_text((native / "params.json").read_text())
    expected = "missing 2 tensor(s) that params.json expects: layers.1.experts.4.w3.weight, layers.2.attention.wkv_b"
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        load_model(tmp_path)


@pytest.mark.parametrize("kind", ["float8 weight", "qscale_weight", "qscale_act", "weight_scale_inv"])
def test_fp8_checkpoints_are_refused_by_tensor_name(oracle, tmp_path, kind):
    """Mistral's FP8 releases: float8_e4m3fn weights with a per-tensor qscale_weight (and qscale_act); loading the
    float8 bytes as numbers without their scales would be garbage."""
    hf, ref, hf_dir, native = oracle
    tensors = load_file(native / "consolidated.safetensors")
    name = "layers.2.experts.3.w1.weight"
    if kind == "float8 weight":
        tensors[name] = tensors[name].to(torch.float8_e4m3fn)
        bad = name
    else:
        bad = name.removesuffix("weight") + kind
        tensors[bad] = torch.tensor(0.01)
    save_file(tensors, tmp_path / "consolidated.safetensors")
    params = {**PARAMS_JSON, "quantization": {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"}}
    (tmp_path / "params.json").write_text(json.dumps(params))
    for strict in (True, False):
        with pytest.raises(CheckpointError, match=rf"consolidated\.safetensors: tensor '{re.escape(bad)}' .*FP8"):
            load_model(tmp_path, strict=strict)
    with pytest.raises(CheckpointError, match=re.escape(bad)):
        convert_checkpoint(tmp_path, tmp_path / "hf", format="hf")
    if kind == "float8 weight":  # without the quantization the config declares: a plain float8 file, loaded
        (tmp_path / "params.json").write_text(json.dumps(PARAMS_JSON))
        assert load_model(tmp_path, dtype="float32").args.fine_moe is not None


def test_sigmoid_routing_without_query_compression_round_trips(tmp_path):
    """DeepSeek-V3-style routing (sigmoid + correction bias) and no q compression: Mistral's spelling has no words
    for the routing, so params.json keeps our `mla` / `fine_moe` sections; the tensors still carry Mistral's names
    (attention.wq for q_proj, router_biases for the bias, as sglang's copy of vLLM's mapping names them)."""
    args = ModelArgs(
        dim=32, n_layers=2, hidden_dim=40, n_heads=4, n_kv_heads=4, head_dim=10, vocab_size=50, rope_theta=1e4,
        yarn=YarnArgs(factor=4.0, original_max_position_embeddings=8, apply_scale=False),
        mla=MlaArgs(kv_lora_rank=8, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5, mscale_all_dim=1.0),
        fine_moe=FineMoeArgs(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
                             n_group=4, topk_group=2, routed_scaling_factor=2.5, scoring_func="sigmoid"))
    model = random_model(args)
    with torch.no_grad():
        model.layers[1].feed_forward.gate.e_score_correction_bias.copy_(torch.randn(8))
    files = save_checkpoint(model, tmp_path / "native", format="native")
    keys = set(load_file(files.shards[0]))
    assert {"layers.1.attention.wq.weight", "layers.1.router_biases", "layers.1.gate.weight",
            "layers.1.experts.7.w2.weight", "layers.0.feed_forward.w2.weight"} <= keys
    assert not any("q_proj" in k or "feed_forward.experts" in k for k in keys)
    params = json.loads(files.config.read_text())
    assert params["fine_moe"]["scoring_func"] == "sigmoid" and params["mla"]["qk_nope_head_dim"] == 6
    tokens = TOKENS % 50
    loaded = load_model(tmp_path / "native")
    assert loaded.args == args and torch.equal(logits(loaded, tokens), logits(model, tokens))
    convert_checkpoint(tmp_path / "native", tmp_path / "hf", format="hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "native2", format="native")
    assert load_file(tmp_path / "native2" / "consolidated.safetensors").keys() == keys
    assert torch.equal(logits(load_model(tmp_path / "native2"), tokens), logits(model, tokens))


def test_query_scaling_and_yarn_are_written_as_mistral_spells_them():
    """Mistral Small 4's and Large 3's presets write the params.json keys the published Large 3 file has."""
    from mistral_ref.family import PRESETS

    for name in ("mistral-small-4-2603", "mistral-large-3-2512"):
        p = PRESETS[name].to_params_json()
        assert "mla" not in p and "fine_moe" not in p
        assert set(p["moe"]) == set(PARAMS_JSON["moe"]) and p["yarn"]["apply_scale"] is False
        assert p["llama_4_scaling"] == {"original_max_position_embeddings": 8192, "beta": 0.1}
    assert Llama4Scaling(16, 0.1) == load_args(PARAMS_JSON).llama_4_scaling


def load_args(params: dict) -> ModelArgs:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "params.json").write_text(json.dumps(params))
        return ModelArgs.from_params_json(d)


@pytest.mark.parametrize("preset", ["mistral-small-4-2603", "mistral-large-3-2512"])
def test_the_presets_name_every_tensor_as_mistral_does(preset):
    """Every parameter of the two presets (4 layers, 2 of them dense for Large 3) has one of Mistral's names, and
    the names map back one to one."""
    from dataclasses import replace

    from mistral_ref.checkpoint.names import from_mistral_name, to_mistral_name
    from mistral_ref.family import PRESETS
    from mistral_ref.model import meta_model

    args = replace(PRESETS[preset], n_layers=4)
    names = list(meta_model(args).state_dict())
    mistral = [to_mistral_name(n, args) for n in names]
    assert [from_mistral_name(n, args) for n in mistral] == names
    mistral_layer = {r"attention\.(wq_a|q_a_norm|wq_b|wkv_a_with_mqa|kv_a_norm|wkv_b|wo)\.weight",
                     r"(attention_norm|ffn_norm)\.weight", r"feed_forward\.w[123]\.weight", r"gate\.weight",
                     r"experts\.\d+\.w[123]\.weight", r"shared_experts\.w[123]\.weight"}
    for n in mistral:
        assert n in ("tok_embeddings.weight", "norm.weight", "output.weight") or any(
            re.fullmatch(rf"layers\.\d\.{p}", n) for p in mistral_layer), n
    dense = args.fine_moe.first_k_dense_replace
    assert f"layers.{dense}.experts.127.w2.weight" in mistral and f"layers.{dense}.gate.weight" in mistral
    assert ("layers.0.feed_forward.w1.weight" in mistral) == (dense > 0)
