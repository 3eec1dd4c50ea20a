"""Latent attention as a backend family: the "torch" forms (backends/mla.py: absorbed decode, expanded + SDPA
prefill) equal the reference (mla.latent_attention) on their own and inside a model — decode, chunked prefill,
ragged batches; fp32 within 1e-5, bf16 with the same greedy tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from test_mla import tiny

from mistral_ref.backends import get_backend
from mistral_ref.backends.mla import absorbed_latent_attention, expanded_sdpa_latent_attention, latent_attention
from mistral_ref.cache import KVCache
from mistral_ref.generation import generate
from mistral_ref.mla import latent_attention as reference_latent_attention
from mistral_ref.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = (absorbed_latent_attention, expanded_sdpa_latent_attention, latent_attention)


def random_inputs(T: int, dtype=torch.float32, S: int = 11):
    """A ragged batch: row 1 has empty cache slots, row 2 a padding query; or (T == S) a plain causal prompt."""
    torch.manual_seed(0)
    B, H, n, r, v, c = 3, 4, 6, 4, 5, 8
    q_nope, q_rope = torch.randn(B, T, H, n), torch.randn(B, T, H, r)
    latents, k_rope, w = torch.randn(B, S, c), torch.randn(B, S, r), torch.randn(H * (n + v), c)
    k_pos = torch.arange(S).expand(B, S).clone()
    q_pos = torch.arange(S - T, S).expand(B, T).clone()
    if T < S:
        k_pos[1, 7:] = -1  # empty slots
        q_pos[1] = torch.arange(7 - T, 7)
        q_pos[2, 0] = -1  # padding
    cast = [t.to(dtype) for t in (q_nope, q_rope, latents, k_rope, w)]
    return (*cast, v, q_pos, k_pos, 0.3)


@pytest.mark.parametrize("T", [1, 5, 11])
@pytest.mark.parametrize("fast", FAST, ids=lambda f: f.__name__)
def test_fast_forms_equal_the_reference(T, fast):
    """Decode (T = 1), a chunk over a ragged cache (T = 5), a plain causal prompt (T = S = 11)."""
    args = random_inputs(T)
    ref = reference_latent_attention(*args)
    out = fast(*args)
    assert out.shape == ref.shape == (3, T, 4, 5)
    assert rel_err(out, ref) <= 1e-5
    # not trivially equal: another kv_b_proj gives another answer
    other = list(args)
    other[4] = args[4].flip(0)
    assert rel_err(fast(*other), ref) > 1e-2


@pytest.mark.parametrize("T", [1, 5])
def test_bf16_close_to_the_reference(T):
    args = random_inputs(T, torch.bfloat16)
    ref = reference_latent_attention(*[a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                       for a in args])
    out = latent_attention(*args)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), ref) <= 3e-2


@pytest.mark.parametrize("flash_first", [False, True], ids=["gemms-first", "flash-first"])
@pytest.mark.parametrize("offset", [0, 40], ids=["prompt", "later-chunk"])
def test_long_bf16_prompts_take_prompt_attention(offset, flash_first, monkeypatch):
    """MIN_TOKENS or more bf16 queries that see their prompt's keys (a prompt into an empty cache, or a later chunk
    after 40 cached keys) go through prompt_attention (the reference's fp32 scaling, value heads of their own size):
    close to the bf16 reference, and no farther from the exact result than the reference is.  With FLASH_FIRST (a
    CPU with AMX) the prompt into an empty cache takes SDPA's causal kernel instead, close to the reference."""
    from mistral_ref.backends import cpu_gemv, prompt_attention

    if cpu_gemv.library() is None:
        pytest.skip(f"C kernels: {cpu_gemv.status()}")
    g = torch.Generator().manual_seed(5)
    B, T, H, n, r, v, c = 1, prompt_attention.MIN_TOKENS + 6, 4, 6, 4, 5, 8
    S = offset + T + 3  # the cache's last 3 slots empty
    q_nope, q_rope = torch.randn(B, T, H, n, generator=g), torch.randn(B, T, H, r, generator=g)
    latents, k_rope = torch.randn(B, S, c, generator=g), torch.randn(B, S, r, generator=g)
    w = torch.randn(H * (n + v), c, generator=g)
    k_pos = torch.cat([torch.arange(offset + T), torch.full((3,), -1)])[None]
    q_pos = torch.arange(offset, offset + T)[None]
    args = [t.bfloat16() for t in (q_nope, q_rope, latents, k_rope, w)] + [v, q_pos, k_pos, 0.3]
    calls = []
    real = prompt_attention.prompt_attention
    monkeypatch.setattr(prompt_attention, "prompt_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    monkeypatch.setattr(prompt_attention, "FLASH_FIRST", flash_first)
    out = latent_attention(*args)
    if flash_first and offset == 0:  # a CPU with AMX: a plain causal prompt takes SDPA's causal kernel
        assert not calls and rel_err(out, reference_latent_attention(*args)) < 3e-2
        return
    assert len(calls) == 1 and calls[0]["scaled_fp32"] and out.shape == (B, T, H, v)
    ref16 = reference_latent_attention(*args)
    exact = reference_latent_attention(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                         for a in args])
    assert rel_err(out, ref16) < 3e-2  # (as test_bf16_close_to_the_reference: the reference rounds its two
    # partial scores and their sum to bf16, the GEMM the whole dot product once)
    assert rel_err(out, exact) <= 1.5 * rel_err(ref16, exact) + 2 ** -9


def test_the_torch_form_absorbs_while_that_is_cheaper(monkeypatch):
    """Absorbed while T (2c - n - v) < (n + v) c: here c = 8, n = 6, v = 5, so up to 17 queries a row."""
    import mistral_ref.backends.mla as fast

    expanded = []
    monkeypatch.setattr(fast, "expanded_sdpa_latent_attention", lambda *a: expanded.append(a[0].shape[1]))
    for T in (1, 17, 18, 30):
        args = random_inputs(T, S=30)
        if T <= 17:
            assert rel_err(latent_attention(*args), reference_latent_attention(*args)) <= 1e-5
        else:
            latent_attention(*args)
    assert expanded == [18, 30]


def random_model(scoring: str, q_lora: int | None, dtype=torch.float32) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(tiny(scoring, q_lora)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.to(dtype)


@pytest.mark.parametrize("scoring, q_lora", [("sigmoid", None), ("softmax", 12)])
def test_model_with_the_torch_backend_equals_the_reference(scoring, q_lora):
    """A Small-4 / Large-3-shaped tiny model: full forward, decode step by step and chunked prefill through the
    latent cache on a ragged batch; logits equal the reference backend's, greedy tokens identical."""
    model = random_model(scoring, q_lora).set_backend("torch")
    assert model.ops.latent_attention is latent_attention
    tokens = torch.randint(0, 50, (2, 30))
    pos = torch.arange(30).expand(2, 30).clone()
    pos[1, :4] = -1  # row 1 is left-padded
    with torch.no_grad():
        ref = model.set_backend("reference")(tokens, pos)
        assert model.ops.latent_attention is reference_latent_attention
        model.set_backend("torch")
        assert rel_err(model(tokens, pos), ref) <= 1e-5
        cache = KVCache(model.args, batch_size=2, max_seq_len=30)
        steps = [model(tokens[:, i:i + 1], pos[:, i:i + 1], cache=cache) for i in range(30)]
        seen = pos >= 0  # a padding query sees no key: its uniform average depends on the cache's other slots
        assert rel_err(torch.cat(steps, dim=1)[seen], ref[seen]) <= 1e-5
        cache = KVCache(model.args, batch_size=2, max_seq_len=30)
        chunks = [model(tokens[:, i:i + 7], pos[:, i:i + 7], cache=cache) for i in range(0, 30, 7)]
        assert rel_err(torch.cat(chunks, dim=1)[seen], ref[seen]) <= 1e-5
    prompts = [tokens[0, :5].tolist(), tokens[1, :13].tolist()]
    fast = [r.tokens for r in generate(model, prompts, 16, temperature=0.0, ignore_eos=True)]
    model.set_backend("reference")
    assert fast == [r.tokens for r in generate(model, prompts, 16, temperature=0.0, ignore_eos=True)]


def test_bf16_model_decodes_the_same_tokens():
    model = random_model("softmax", 12, torch.bfloat16)
    prompts = [[3, 14, 15, 9, 2], [6, 5, 35, 8, 9, 7, 9, 3, 2, 38, 4]]
    ref = [r.tokens for r in generate(model.set_backend("reference"), prompts, 12, temperature=0.0, ignore_eos=True)]
    assert ref == [r.tokens for r in generate(model.set_backend("torch"), prompts, 12, temperature=0.0,
                                              ignore_eos=True)]


def test_latent_attention_is_a_family_of_its_own():
    """with_parts takes latent attention from another backend (what set_backend's keywords build)."""
    ops = get_backend("torch").with_parts({"latent_attention": get_backend("reference")})
    assert ops.latent_attention is reference_latent_attention and ops.attention is get_backend("torch").attention
    assert ops.name == "torch+latent_attention=reference"
    model = Transformer(tiny()).set_backend("torch", latent_attention="reference")  # the keyword builds it too
    assert model.ops.name == "torch+latent_attention=reference"
    assert model.ops.latent_attention is reference_latent_attention
