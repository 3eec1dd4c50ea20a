"""Logit and greedy parity with transformers 5.23 for the 2024-2026 dense models, through every checkpoint path.

* Ministral (MinistralForCausalLM): interleaved attention, one full layer then three with a 5-key window, on
  sequences much longer than the window — one forward pass, through the KV cache token by token, in prefill
  chunks, and as a ragged batch.
* Ministral 3 (Ministral3ForCausalLM): YaRN over an original context of 16 positions, with the llama-4 query
  scaling, at positions up to 300 (floor(p / 16) up to 18); once with transformers' Ministral 3 defaults (beta_fast
  32, beta_slow 1, mscale = mscale_all_dim = 1: cos/sin unscaled) and once with a real blending ramp (beta_fast 1,
  beta_slow 0.1) and YaRN's magnitude factor 0.1 * ln(factor) + 1 (mscale_all_dim 0).
* Tied embeddings (Ministral 3 3B): no output weight in either format, through load, save and convert.
Each model is saved by save_pretrained, loaded with load_model, saved and converted to native and back, and the
files we write are read by transformers itself.  fp32 logits within 1e-5 relative; greedy tokens identical.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import FP32_RTOL, rel_err

from mistral_ref.cache import KVCache
from mistral_ref.checkpoint import convert_checkpoint, find_checkpoint, load_model, save_checkpoint
from mistral_ref.generation import generate
from mistral_ref.model import Transformer

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.oracle, pytest.mark.usefixtures("one_thread")]

WINDOW = 5
COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              rms_norm_eps=1e-6, max_position_embeddings=512, initializer_range=0.2, bos_token_id=1, eos_token_id=None,
              pad_token_id=None)  # no EOS: every row generates exactly n_new tokens
YARN_DEFAULTS = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 16.0, "original_max_position_embeddings": 16,
                 "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                 "llama_4_scaling_beta": 0.1}
YARN_RAMP = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0, "original_max_position_embeddings": 16,
             "beta_fast": 1.0, "beta_slow": 0.1, "mscale": 1.0, "mscale_all_dim": 0.0, "llama_4_scaling_beta": 0.2}
# name: (transformers classes, config arguments, sequence length of the parity check)
MODELS = {
    "ministral": ("Ministral", dict(num_hidden_layers=4, head_dim=16, sliding_window=WINDOW,
                                    layer_types=["full_attention"] + ["sliding_attention"] * 3,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                                    tie_word_embeddings=False), 40),
    "ministral3": ("Ministral3", dict(num_hidden_layers=2, head_dim=32, sliding_window=None,
                                      rope_parameters=YARN_RAMP, tie_word_embeddings=False), 300),
    "ministral3-tied": ("Ministral3", dict(num_hidden_layers=2, head_dim=16, sliding_window=None,
                                           rope_parameters=YARN_DEFAULTS, tie_word_embeddings=True), 300),
}


def build_hf(name: str):
    prefix, kw, _ = MODELS[name]
    config = getattr(transformers, f"{prefix}Config")(**COMMON, **kw)
    torch.manual_seed(0)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=list(MODELS))
def oracle(request, tmp_path_factory):
    """(name, HF model, its save_pretrained dir, tokens (2, T), HF fp32 logits)"""
    name = request.param
    hf = build_hf(name)
    directory = tmp_path_factory.mktemp(f"hf-{name}")
    hf.save_pretrained(directory)
    tokens = torch.randint(3, COMMON["vocab_size"], (2, MODELS[name][2]), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = hf(tokens).logits.float()
    assert logits.std() > 0.5  # not near-uniform
    return name, hf, directory, tokens, logits


def forward(model, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, positions).float()


def test_config_features_are_read(oracle):
    name, hf, directory, _, _ = oracle
    args = load_model(directory).args
    if name == "ministral":
        assert args.sliding_window == (None, WINDOW, WINDOW, WINDOW)  # the repeating pattern of layer_types
    else:
        assert args.yarn is not None and args.llama_4_scaling is not None
        assert args.yarn.attention_scaling == pytest.approx(hf.model.rotary_emb.attention_scaling, rel=1e-12)
    assert args.tied_embeddings == (name == "ministral3-tied")


def test_hf_checkpoint_loads_with_fp32_parity(oracle):
    name, _, directory, tokens, ref = oracle
    model = load_model(directory)
    assert rel_err(forward(model, tokens), ref) <= FP32_RTOL
    # positions far past the original context as one chunk starting at 150: the same as transformers there
    start = tokens.shape[1] // 2
    tail = forward(model, tokens[:, start:], torch.arange(start, tokens.shape[1]).expand(2, -1))
    with torch.no_grad():
        hf_tail = oracle[1](tokens[:, start:], position_ids=torch.arange(start, tokens.shape[1])[None]).logits
    assert rel_err(tail, hf_tail) <= FP32_RTOL


def test_parity_has_teeth(oracle):
    """Each feature matters at these shapes: without it (or with the other YaRN magnitude) the logits are far from
    transformers'."""
    name, _, directory, tokens, ref = oracle
    model = load_model(directory)
    a = model.args
    if name == "ministral":  # every layer windowed, as a plain Mistral config with the same sliding_window says
        variants = [replace(a, sliding_window=WINDOW)]
    else:
        variants = [replace(a, llama_4_scaling=None), replace(a, yarn=None),
                    replace(a, yarn=replace(a.yarn, apply_scale=not a.yarn.apply_scale))]
    for args in variants:
        other = Transformer(args).eval()
        other.load_state_dict(model.state_dict())
        assert rel_err(forward(other, tokens), ref) > 1e-2, args


def test_kv_cache_token_by_token_and_chunked_prefill(oracle):
    """Decode one token at a time (rolling window buffers on the window layers), and prefill in chunks of 7:
    the logits of every position equal transformers' one-pass logits."""
    name, _, directory, tokens, ref = oracle
    model = load_model(directory)
    T = min(tokens.shape[1], 60)
    for chunk in (1, 7):
        cache = KVCache(model.args, batch_size=2, max_seq_len=T)
        if name == "ministral":  # full layers keep T slots, window layers W
            assert [c.capacity for c in cache.layers] == [T, WINDOW, WINDOW, WINDOW]
        pieces = []
        for s in range(0, T, chunk):
            e = min(s + chunk, T)
            with torch.no_grad():
                pieces.append(model(tokens[:, s:e], torch.arange(s, e).expand(2, -1), cache=cache).float())
        assert rel_err(torch.cat(pieces, dim=1), ref[:, :T]) <= FP32_RTOL, chunk


def test_greedy_ragged_batch_equals_transformers_per_prompt(oracle):
    """A ragged batch (prompts of 9, 23 and 4 tokens) generates transformers' greedy tokens for each prompt alone,
    past the window and past the original context; chunked prefill does not change them."""
    name, hf, directory, tokens, _ = oracle
    model = load_model(directory)
    prompts = [tokens[0, :9].tolist(), tokens[1, :23].tolist(), tokens[1, 30:34].tolist()]
    n_new = 24
    expected = []
    for p in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=n_new, do_sample=False,
                              pad_token_id=0)
        expected.append(out[0, len(p):].tolist())
    for chunk_size in (None, 5):
        results = generate(model, prompts, n_new, temperature=0.0, ignore_eos=True, chunk_size=chunk_size)
        assert [r.tokens for r in results] == expected, chunk_size


def test_native_and_hf_files_we_write_round_trip(oracle, tmp_path):
    """HF -> native (sharded) -> HF, and the streaming converter both ways: the same logits, and transformers
    reads the HF files we write (Ministral / Ministral3 config, tied embeddings without lm_head)."""
    name, hf, directory, tokens, ref = oracle
    model = load_model(directory)
    tied = model.args.tied_embeddings
    shard = sum(p.numel() * 4 for p in model.parameters()) // 3
    native = save_checkpoint(model, tmp_path / "native", format="native", max_shard_bytes=shard)
    params = json.loads((tmp_path / "native" / "params.json").read_text())
    assert params.get("tied_embeddings", False) == tied
    assert ("yarn" in params) == (name != "ministral") and ("llama_4_scaling" in params) == (name != "ministral")
    if name == "ministral":
        assert params["sliding_window"] == [None, WINDOW, WINDOW, WINDOW]
    from_native = load_model(tmp_path / "native")
    assert len(native.shards) > 1 and from_native.args == model.args
    assert torch.equal(forward(from_native, tokens), forward(model, tokens))
    # our HF files: transformers reads them (and its own class for them)
    save_checkpoint(from_native, tmp_path / "hf", format="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == ("ministral" if name == "ministral" else "ministral3")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(reloaded) is type(hf)
    with torch.no_grad():
        assert rel_err(reloaded(tokens).logits, ref) <= FP32_RTOL
    # the converter: native -> HF gives save_pretrained's tensors bit for bit; HF -> native gives ours
    from safetensors.torch import load_file

    files = convert_checkpoint(tmp_path / "native", tmp_path / "converted", format="hf")
    ours, theirs = load_file(files.shards[0]), load_file(find_checkpoint(directory).shards[0])
    assert ours.keys() == theirs.keys()
    assert ("lm_head.weight" in ours) == (not tied)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    back = convert_checkpoint(directory, tmp_path / "back", format="native")
    native_tensors = load_file(back.shards[0])
    assert ("output.weight" in native_tensors) == (not tied)
    assert rel_err(forward(load_model(tmp_path / "back"), tokens), ref) <= FP32_RTOL
