"""Logit parity with transformers for every family shape, through every checkpoint path.

Small random MistralForCausalLM / MixtralForCausalLM models shaped like the family members are saved with
save_pretrained, loaded with load_model, converted to the native format and back (sharded too), and
compared in fp32 (max|a-b| / max|b| <= 1e-5) on sequences longer than the sliding window; in bf16 the top-1
tokens agree wherever transformers' own fp32 top-2 margin is not a near tie.
"""

from __future__ import annotations

import pytest
import torch

from mistral_ref import checkpoint
from mistral_ref.checkpoint import convert_checkpoint, find_checkpoint, load_model, save_checkpoint

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.oracle

SEQ_LEN = 24  # > every window below
# name: (architecture, config).  GQA ratios 2 / 4 / 1 / 4; Nemo's head_dim (16) != hidden / heads (6).
FAMILIES = {
    "v0.1": ("mistral", dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6,
                             rope_theta=1e4)),
    "v0.3": ("mistral", dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=None,
                             rope_theta=1e6)),
    "mixtral": ("mixtral", dict(vocab_size=128, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                sliding_window=None, rope_theta=1e6, num_local_experts=8,
                                num_experts_per_tok=2)),
    "nemo": ("mistral", dict(vocab_size=192, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                             num_attention_heads=8, num_key_value_heads=2, head_dim=16, sliding_window=None,
                             rope_theta=1e6)),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|"""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def build_hf(name: str):
    arch, kw = FAMILIES[name]
    if arch == "mixtral":
        config_cls, model_cls = transformers.MixtralConfig, transformers.MixtralForCausalLM
    else:
        config_cls, model_cls = transformers.MistralConfig, transformers.MistralForCausalLM
    # MistralConfig() defaults to sliding_window=4096, eps 1e-6, theta 1e4: everything is set explicitly.
    # initializer_range 0.2 and random norm weights give logits far from uniform (a test with teeth).
    config = config_cls(**kw, rms_norm_eps=1e-6, max_position_embeddings=256, initializer_range=0.2,
                        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    assert model.config.sliding_window == kw["sliding_window"]
    assert model.config.rope_parameters["rope_theta"] == kw["rope_theta"]
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, HF checkpoint dir, tokens, HF fp32 logits)"""
    name = request.param
    hf = build_hf(name)
    directory = tmp_path_factory.mktemp(f"hf-{name}")
    hf.save_pretrained(directory)
    tokens = torch.randint(0, FAMILIES[name][1]["vocab_size"], (2, SEQ_LEN),
                           generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = hf(tokens).logits.float()
    assert logits.std() > 0.5  # not near-uniform
    return name, directory, tokens, logits


def forward(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).float()


def test_hf_checkpoint_loads_with_fp32_parity(family):
    name, directory, tokens, ref = family
    model = load_model(directory)
    assert model.checkpoint_files.format == "hf" and model.dtype == torch.float32
    args = model.args
    assert args.sliding_window is None or args.sliding_window < SEQ_LEN
    assert rel_err(forward(model, tokens), ref) <= 1e-5


def test_native_round_trip_and_hf_files_we_write_have_parity(family, tmp_path):
    name, directory, tokens, ref = family
    model = load_model(directory)
    # native, sharded
    shard = sum(p.numel() * 4 for p in model.parameters()) // 3  # about 3-4 shards
    native = save_checkpoint(model, tmp_path / "native", format="native", max_shard_bytes=shard)
    assert len(native.shards) > 2
    from_native = load_model(tmp_path / "native")
    assert from_native.checkpoint_files.format == "native"
    assert torch.equal(forward(from_native, tokens), forward(model, tokens))
    assert rel_err(forward(from_native, tokens), ref) <= 1e-5
    # back to HF, sharded: transformers itself reads our files
    assert len(save_checkpoint(from_native, tmp_path / "hf", format="hf", max_shard_bytes=shard).shards) > 2
    hf_cls = transformers.MixtralForCausalLM if from_native.args.moe else transformers.MistralForCausalLM
    reloaded = hf_cls.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert rel_err(reloaded(tokens).logits, ref) <= 1e-5
    # the streaming converter: native -> HF reproduces save_pretrained's tensors bit for bit
    files = convert_checkpoint(tmp_path / "native", tmp_path / "converted", format="hf")
    from safetensors.torch import load_file

    ours, theirs = load_file(files.shards[0]), load_file(find_checkpoint(directory).shards[0])
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("which", ["v0.1", "nemo"])
def test_parity_breaks_without_the_qk_permutation(which, tmp_path, monkeypatch):
    """The parity tests have teeth: load the HF files with q/k rows left in HF order."""
    hf = build_hf(which)
    hf.save_pretrained(tmp_path)
    tokens = torch.randint(0, 128, (1, SEQ_LEN), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(tokens).logits
    assert rel_err(forward(load_model(tmp_path), tokens), ref) <= 1e-5
    def keep_hf_order(w, head_dim, to, out=None):
        return w if out is None else out.copy_(w)

    monkeypatch.setattr(checkpoint.safetensors_io, "permute_qk", keep_hf_order)  # what load_model calls
    assert rel_err(forward(load_model(tmp_path), tokens), ref) > 1e-2


def test_parity_depends_on_the_window(tmp_path):
    """The v0.1 sequences really run past the window: ignoring it changes the logits."""
    hf = build_hf("v0.1")
    hf.save_pretrained(tmp_path)
    tokens = torch.randint(0, 128, (1, SEQ_LEN), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(tokens).logits
    model = load_model(tmp_path)
    assert rel_err(forward(model, tokens), ref) <= 1e-5
    for layer in model.layers:
        layer.attention.window = None
    assert rel_err(forward(model, tokens), ref) > 1e-3


def test_bf16_top1_tokens_agree(family):
    name, directory, tokens, ref = family
    moe = FAMILIES[name][0] == "mixtral"
    hf_cls = transformers.MixtralForCausalLM if moe else transformers.MistralForCausalLM
    hf = hf_cls.from_pretrained(directory, dtype=torch.bfloat16).eval()
    model = load_model(directory, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    ours = forward(model, tokens)
    with torch.no_grad():
        theirs = hf(tokens).logits.float()
    # Both are as close to the fp32 truth as bf16 allows (mean error: in bf16 a near-tie router score can pick
    # another expert for one token, in transformers as in ours, which moves that token's logits a lot).
    def mean_err(x: torch.Tensor) -> float:
        return ((x - ref).abs().mean() / ref.abs().mean()).item()

    assert mean_err(ours) < 0.05 and mean_err(ours) < 1.5 * mean_err(theirs)
    # Compare the top-1 token wherever the fp32 top-2 margin is well above bf16 noise.
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.02 * ref.abs().max()
    assert clear.float().mean() > 0.5
    assert torch.equal(ours.argmax(-1)[clear], theirs.argmax(-1)[clear])
    assert torch.equal(ours.argmax(-1)[clear], ref.argmax(-1)[clear])


def test_config_json_from_transformers_parses_to_the_same_args(family):
    name, directory, _, _ = family
    args = load_model(directory).args
    kw = FAMILIES[name][1]
    assert (args.dim, args.n_heads, args.n_kv_heads, args.head_dim) == (
        kw["hidden_size"], kw["num_attention_heads"], kw["num_key_value_heads"], kw["head_dim"])
    assert args.rope_theta == kw["rope_theta"] and args.sliding_window == kw["sliding_window"]
    assert args.norm_eps == 1e-6
    assert (args.moe.num_experts if args.moe else None) == kw.get("num_local_experts")


@pytest.mark.parametrize("name", ["v0.1", "nemo"])
def test_decode_token_by_token_over_a_long_context_equals_transformers(name, tmp_path, monkeypatch):
    """A decode step at a time through the KV cache over 200 positions (v0.1: a rolling buffer 33 times past its
    window of 6; nemo: 8 query heads on 2 key / value heads, the C kernel's groups of 4): every position's fp32
    logits within 1e-5 of transformers' one pass over the sequence.  On a CPU with the C kernels each step's
    attention is cpu_gemv.attention (its grouped loops where head_dim fits the vector width)."""
    from mistral_ref.backends import cpu_gemv
    from mistral_ref.cache import KVCache

    hf = build_hf(name)
    hf.save_pretrained(tmp_path)
    T = 200
    tokens = torch.randint(0, FAMILIES[name][1]["vocab_size"], (2, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(tokens).logits.float()
    model = load_model(tmp_path)
    calls = []
    attention = cpu_gemv.attention
    monkeypatch.setattr(cpu_gemv, "attention", lambda *a, **k: calls.append(1) or attention(*a, **k))
    cache = KVCache(model.args, batch_size=2, max_seq_len=T)
    steps = []
    with torch.no_grad():
        for s in range(T):
            steps.append(model(tokens[:, s:s + 1], torch.full((2, 1), s), cache=cache).float())
    assert rel_err(torch.cat(steps, dim=1), ref) <= 1e-5
    assert len(calls) == (T * model.args.n_layers if cpu_gemv.library() is not None else 0)
