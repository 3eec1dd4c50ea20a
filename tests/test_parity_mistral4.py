"""Logit and greedy parity with transformers 5.23 for latent attention + fine-grained experts.

* "small4": Mistral-Small-4-shaped (Mistral4ForCausalLM): compressed queries (q_lora_rank), softmax routing over
  one group, a shared expert, YaRN 8x over an original context of 16 with mscale_all_dim 1 (softmax-scale
  correction) and the llama-4 query scaling, one dense layer first.
* "large3": Mistral-Large-3 / DeepSeek-V3-shaped (DeepseekV3ForCausalLM): sigmoid routing with a (random)
  e_score_correction_bias, 4 expert groups of which 2 are eligible, routed_scaling_factor 2.5, no q compression,
  YaRN with mscale_all_dim 0.707 (cos/sin scaled too).
Full forward, the latent cache token by token and in chunks, positions far beyond YaRN's original context, a
ragged batch and 64 greedy tokens.  fp32 logits within 1e-5 relative; greedy tokens identical.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import FP32_RTOL, rel_err

from mistral_ref.cache import KVCache, LatentLayerCache
from mistral_ref.checkpoint.names import hf_to_native_name, native_to_hf_name
from mistral_ref.config import ModelArgs
from mistral_ref.generation import generate
from mistral_ref.model import Transformer

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.oracle, pytest.mark.usefixtures("one_thread")]

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, first_k_dense_replace=1,
              kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10, rms_norm_eps=1e-6,
              max_position_embeddings=512, initializer_range=0.2, bos_token_id=1, eos_token_id=None,
              pad_token_id=None, rope_interleave=True)
MODELS = {
    "small4": ("Mistral4", dict(q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                                norm_topk_prob=True, routed_scaling_factor=1.0,
                                rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0,
                                                 "original_max_position_embeddings": 16, "beta_fast": 32.0,
                                                 "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                                                 "llama_4_scaling_beta": 0.1})),
    "large3": ("DeepseekV3", dict(q_lora_rank=None, n_routed_experts=16, num_experts_per_tok=3, n_group=4,
                                  topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                                  rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0,
                                                   "original_max_position_embeddings": 16, "beta_fast": 32.0,
                                                   "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.707})),
}
T = 200  # positions up to 12 x the original context of 16


def build_hf(name: str):
    prefix, kw = MODELS[name]
    config = getattr(transformers, f"{prefix}Config")(**COMMON, **kw)
    torch.manual_seed(0)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
        for pname, b in model.named_buffers():
            if pname.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    return model


def hf_config_args(hf, tmp_path) -> ModelArgs:
    """Our ModelArgs, read from the config.json transformers writes."""
    hf.config.save_pretrained(tmp_path)
    return ModelArgs.from_hf_config(tmp_path)


def ours_from_hf(hf, args: ModelArgs) -> Transformer:
    """Our model with transformers' weights: hub names through checkpoint.names; transformers 5 keeps the routed
    experts fused in memory (experts.gate_up_proj (E, 2 * hidden, dim), experts.down_proj (E, dim, hidden)),
    so those are split into the per-expert tensors of the hub files first."""
    state = {}
    for name, t in list(hf.state_dict().items()):
        if name.endswith("mlp.experts.gate_up_proj"):
            base = name.removesuffix("gate_up_proj")
            for e, w in enumerate(t):
                gate, up = w.chunk(2, dim=0)
                state[f"{base}{e}.gate_proj.weight"], state[f"{base}{e}.up_proj.weight"] = gate, up
        elif name.endswith("mlp.experts.down_proj"):
            base = name.removesuffix("down_proj")
            for e, w in enumerate(t):
                state[f"{base}{e}.down_proj.weight"] = w
        else:
            state[name] = t
    model = Transformer(args).eval()
    ours = {hf_to_native_name(k, args): v for k, v in state.items()}
    model.load_state_dict(ours, strict=True)  # every tensor named, none left over
    assert {native_to_hf_name(k, args) for k in model.state_dict()} == set(state)  # both directions
    return model.set_backend("reference")


@pytest.fixture(scope="module", params=list(MODELS))
def oracle(request, tmp_path_factory):
    """(name, HF model, our model, tokens (2, T), HF fp32 logits)"""
    name = request.param
    hf = build_hf(name)
    args = hf_config_args(hf, tmp_path_factory.mktemp(f"hf-{name}"))
    model = ours_from_hf(hf, args)
    tokens = torch.randint(3, COMMON["vocab_size"], (2, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = hf(tokens).logits.float()
    assert logits.std() > 0.5  # not near-uniform
    return name, hf, model, tokens, logits


def forward(model, tokens, positions=None):
    with torch.no_grad():
        return model(tokens, positions).float()


def test_config_is_read(oracle):
    name, hf, model, _, _ = oracle
    a = model.args
    assert a.mla is not None and a.fine_moe is not None
    assert a.mla.q_lora_rank == (24 if name == "small4" else None)
    assert a.fine_moe.scoring_func == ("softmax" if name == "small4" else "sigmoid")
    assert (a.llama_4_scaling is not None) == (name == "small4")
    assert a.yarn.attention_scaling == pytest.approx(hf.model.rotary_emb.attention_scaling, rel=1e-12)
    assert model.layers[1].attention.scale == pytest.approx(hf.model.layers[1].self_attn.scaling, rel=1e-12)


def test_full_forward_fp32_parity(oracle):
    name, hf, model, tokens, ref = oracle
    for backend in ("reference", "torch"):
        assert rel_err(forward(model.set_backend(backend), tokens), ref) <= FP32_RTOL, backend
    start = 120  # one chunk far beyond the original context
    tail = forward(model, tokens[:, start:], torch.arange(start, T).expand(2, -1))
    with torch.no_grad():
        hf_tail = hf(tokens[:, start:], position_ids=torch.arange(start, T)[None]).logits
    assert rel_err(tail, hf_tail) <= FP32_RTOL


def test_parity_has_teeth(oracle):
    """Without the softmax-scale correction, the query scaling or the group limit the logits are far off."""
    from dataclasses import replace

    name, _, model, tokens, ref = oracle
    a = model.args
    variants = [replace(a, mla=replace(a.mla, mscale_all_dim=0.0))]
    if name == "small4":
        variants.append(replace(a, llama_4_scaling=None))
    else:
        variants.append(replace(a, fine_moe=replace(a.fine_moe, n_group=1, topk_group=1)))
        variants.append(replace(a, fine_moe=replace(a.fine_moe, routed_scaling_factor=1.0)))
    for args in variants:
        other = Transformer(args).eval()
        other.load_state_dict(model.state_dict())
        assert rel_err(forward(other, tokens), ref) > 1e-3, args
    if name == "large3":  # the correction bias steers the choice
        other = Transformer(a).eval()
        other.load_state_dict({k: torch.zeros_like(v) if k.endswith("e_score_correction_bias") else v
                               for k, v in model.state_dict().items()})
        assert rel_err(forward(other, tokens), ref) > 1e-3


def test_latent_cache_token_by_token_and_chunked_prefill(oracle):
    """The latent cache (latent + rotary key per token) decodes one token at a time and in chunks of 7 to the
    one-pass logits, with both backends."""
    _, _, model, tokens, ref = oracle
    n = 80
    for backend, chunk in (("reference", 1), ("torch", 1), ("reference", 7)):
        model.set_backend(backend)
        cache = KVCache(model.args, batch_size=2, max_seq_len=n)
        assert all(isinstance(c, LatentLayerCache) for c in cache.layers)
        m = model.args.mla
        assert cache.layers[0].latent.shape == (2, n, 1, m.kv_lora_rank)
        assert cache.layers[0].k_rope.shape == (2, n, 1, m.qk_rope_head_dim)
        pieces = []
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            with torch.no_grad():
                pieces.append(model(tokens[:, s:e], torch.arange(s, e).expand(2, -1), cache=cache).float())
        assert rel_err(torch.cat(pieces, dim=1), ref[:, :n]) <= FP32_RTOL, (backend, chunk)
    model.set_backend("reference")


def test_greedy_64_tokens_ragged_batch(oracle):
    """A ragged batch (prompts of 9, 23 and 4 tokens) generates transformers' 64 greedy tokens for each prompt
    alone, past the original context; chunked prefill does not change them."""
    _, hf, model, tokens, _ = oracle
    prompts = [tokens[0, :9].tolist(), tokens[1, :23].tolist(), tokens[1, 30:34].tolist()]
    n_new = 64
    expected = []
    for p in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=n_new, do_sample=False, pad_token_id=0)
        expected.append(out[0, len(p):].tolist())
    for chunk_size in (None, 5):
        results = generate(model, prompts, n_new, temperature=0.0, ignore_eos=True, chunk_size=chunk_size)
        assert [r.tokens for r in results] == expected, chunk_size


def test_hf_files_we_write_round_trip(oracle, tmp_path):
    """save_checkpoint(format="hf") then load_model gives the same logits, for both models, and transformers'
    own from_pretrained reads our files to its logits: DeepseekV3ForCausalLM per-expert tensors (the hub layout),
    Mistral4ForCausalLM its fused experts.gate_up_proj / experts.down_proj.  Our files hold exactly the tensor
    names, shapes and dtypes that transformers' save_pretrained writes for the same model."""
    from safetensors import safe_open

    from mistral_ref.checkpoint import find_checkpoint, load_model, save_checkpoint

    name, hf, model, tokens, ref = oracle
    save_checkpoint(model, tmp_path / "ours", format="hf")
    back = load_model(tmp_path / "ours").set_backend("reference")
    assert back.args == model.args
    assert rel_err(forward(back, tokens[:, :60]), ref[:, :60]) <= FP32_RTOL
    cls = transformers.DeepseekV3ForCausalLM if name == "large3" else transformers.Mistral4ForCausalLM
    theirs = cls.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert rel_err(theirs(tokens).logits, ref) <= FP32_RTOL
    hf.save_pretrained(tmp_path / "theirs")

    def layout(path):
        out = {}
        for shard in find_checkpoint(path).shards:
            with safe_open(shard, "pt") as f:
                out.update({k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()})
        return out

    ours_layout, theirs_layout = layout(tmp_path / "ours"), layout(tmp_path / "theirs")
    assert ours_layout == theirs_layout
    assert any(k.endswith("experts.gate_up_proj") for k in ours_layout) == (name == "small4")


def test_fused_hf_files_shard_and_convert_both_ways(oracle, tmp_path):
    """HF files across several shards (Mistral4: fused experts; DeepseekV3: per expert), then HF -> native -> HF
    (DeepseekV3: HF -> HF in one shard -> HF) with the streaming converter: same logits, and the second HF copy's
    tensors are bit-identical to the first's (the fused layout is rebuilt exactly)."""
    from safetensors.torch import load_file

    from mistral_ref.checkpoint import convert_checkpoint, find_checkpoint, load_model, save_checkpoint

    name, _, model, tokens, ref = oracle
    half = sum(p.nbytes for p in model.parameters()) // 3
    save_checkpoint(model, tmp_path / "hf", format="hf", max_shard_bytes=half)
    assert len(find_checkpoint(tmp_path / "hf").shards) > 1
    # (large3's YaRN cos/sin factor has no params.json spelling: it goes HF -> HF in one shard instead)
    middle = "native" if name == "small4" else "hf1"
    convert_checkpoint(tmp_path / "hf", tmp_path / middle, format="native" if name == "small4" else "hf")
    convert_checkpoint(tmp_path / middle, tmp_path / "hf2", format="hf")
    for path in (middle, "hf2"):
        got = forward(load_model(tmp_path / path).set_backend("reference"), tokens[:, :60])
        assert rel_err(got, ref[:, :60]) <= FP32_RTOL, path

    def tensors(path):
        out = {}
        for shard in find_checkpoint(path).shards:
            out.update(load_file(shard))
        return out

    first, second = tensors(tmp_path / "hf"), tensors(tmp_path / "hf2")
    assert any(k.endswith("experts.gate_up_proj") for k in first) == (name == "small4")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_transformers_save_pretrained_files_load(oracle, tmp_path):
    """What transformers 5.23 writes loads with load_model: Mistral4 saves its routed experts fused (one
    experts.gate_up_proj and one experts.down_proj per layer), which the loader reads as per-expert slices of
    the same file; the streaming converter writes them out as per-expert tensors."""
    from safetensors import safe_open

    from mistral_ref.checkpoint import convert_checkpoint, find_checkpoint, load_model

    name, hf, _, tokens, ref = oracle
    hf.save_pretrained(tmp_path / "hf")
    with safe_open(find_checkpoint(tmp_path / "hf").shards[0], "pt") as f:
        fused = any(k.endswith("experts.gate_up_proj") for k in f.keys())
    if name == "small4":
        assert fused
    model = load_model(tmp_path / "hf").set_backend("reference")
    assert rel_err(forward(model, tokens[:, :60]), ref[:, :60]) <= FP32_RTOL
    # (large3's YaRN cos/sin factor mscale(1) / mscale(0.707) has no params.json spelling: it converts to HF)
    fmt = "native" if name == "small4" else "hf"
    convert_checkpoint(tmp_path / "hf", tmp_path / "converted", format=fmt)
    converted = load_model(tmp_path / "converted").set_backend("reference")
    assert torch.equal(forward(converted, tokens[:, :60]), forward(model, tokens[:, :60]))


def test_small4_preset_as_transformers_builds_it():
    """transformers' Mistral4ForCausalLM built on the meta device from the config.json we write for the Mistral
    Small 4 preset has our parameter count (118.97B) and reads back to the preset."""
    import tempfile

    from mistral_ref.family import PRESETS, parameter_counts

    args = PRESETS["mistral-small-4-2603"]
    cfg = args.to_hf_config()
    config = transformers.Mistral4Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = transformers.Mistral4ForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == parameter_counts(args)["total"]
    assert model.model.layers[0].self_attn.scaling == pytest.approx(
        mla_scale(args), rel=1e-12)
    with tempfile.TemporaryDirectory() as d:
        config.save_pretrained(d)
        assert replace(ModelArgs.from_hf_config(d), tokenizer=args.tokenizer) == args


def mla_scale(args: ModelArgs) -> float:
    from mistral_ref.mla import mla_softmax_scale

    return mla_softmax_scale(args.mla, args.yarn)
