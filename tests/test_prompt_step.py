"""The engine's prompt pass (backends/prompt_step.py: each block's residual additions inside its wo and w2 products)
against the "torch" backend's layers and the float64 reference: beyond the sliding window, GQA, head_dim != dim /
n_heads, Mixtral's experts, Ministral 3's query scaling, Mistral Small 4's latent attention and fine-grained
experts, ragged rows, a later chunk after cached keys, fp32 and bf16; the same bits where no product adds; when
it is taken and when not."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from conftest import FP32_RTOL, rel_err
from test_decode_step import DENSE, LATENT, MOE, SCALED
from torch import nn

from mistral_ref.backends import decode_step, linear, prompt_step
from mistral_ref.backends.moe import stack_all_experts
from mistral_ref.cache import KVCache
from mistral_ref.generation import generate

CASES = {"dense": DENSE, "moe": MOE, "query-scaling": SCALED, "latent": LATENT}


def tame(model):
    """The model with its matrices scaled by 0.3 (smaller weights than make_model's: bf16's roundings then stay
    below the logits' gaps, as in tests/test_backends.py's bf16 prompts).  Returns it."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(0.3)
    return model


def counted(model) -> list:
    """The model with its prompt_step wrapped: the returned list gets True for each pass it took, False for each
    it declined."""
    taken: list = []
    step = model.ops.prompt_step

    def spy(*a, **kw):
        out = step(*a, **kw)
        taken.append(out is not None)
        return out

    model.ops = dataclasses.replace(model.ops, prompt_step=spy)
    return taken


def layers_only(model):
    """The model with the "torch" backend's functions but without its prompt pass: the layers run."""
    model.ops = dataclasses.replace(model.ops, prompt_step=None)
    return model


def prefill(model, T: int, chunks: int = 1, logits_at: bool = False, seed: int = 1):
    """Two rows (the second padded at its start by 3 positions, -1) of a T-token prompt in `chunks` passes into
    one cache: the logits of every pass (concatenated along T, or the last token's with logits_at) and the cache's
    keys and values."""
    args = model.args
    tokens = torch.randint(0, args.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))
    positions = torch.arange(T).repeat(2, 1)
    positions[1] -= 3
    positions[1, :3] = -1
    cache = KVCache(args, 2, T + 1, model.dtype, "cpu")
    outs = []
    with torch.inference_mode():
        for part, pos in zip(tokens.chunk(chunks, 1), positions.chunk(chunks, 1)):
            at = torch.full((2,), part.shape[1] - 1) if logits_at else None
            outs.append(model(part, pos, cache, logits_at=at))
    layers = [(layer.k.clone(), layer.v.clone()) for layer in cache.layers]  # (latent: latents and rotated keys)
    return torch.cat(outs, 1), layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_equals_the_layers_beyond_the_window_and_in_chunks(name, dtype, make_model):
    """Two rows of 300 tokens (the window is 12) in one pass and in three chunks, logits of every token and of the
    last: products of 600 rows add into the residual stream (F.linear's rows: torch.addmm_; 200 rows go to the C
    kernels in bf16 on AMX tiles, the layers' bits).  fp32 within 1e-5 of the layers, and no farther from the
    float64 reference than they are (+ 5e-6); bf16 (weights scaled by 0.3) no farther from it than 1.25 times the
    layers' distance (+ 5e-3), the caches' first layer the layers' bits and the others within 0.1 of theirs."""
    args = CASES[name]

    def build():
        return make_model(args) if dtype == torch.float32 else tame(make_model(args))

    model = build().to(dtype)
    taken = counted(model)
    layers = layers_only(build().to(dtype))
    exact = build().set_backend("reference").double()
    for chunks, logits_at in ((1, False), (3, False), (3, True)):
        got, got_cache = prefill(model, 300, chunks, logits_at)
        want, want_cache = prefill(layers, 300, chunks, logits_at)
        truth, _ = prefill(exact, 300, chunks, logits_at)
        assert taken and all(taken), (chunks, logits_at)
        taken.clear()
        if dtype == torch.float32:  # (600 fp32 rows: F.linear's, so addmm_ adds inside the product)
            assert chunks > 1 or linear.plain_product(torch.zeros(2, 300, args.dim), torch.zeros(args.dim, args.dim))
            assert rel_err(got, want) < FP32_RTOL
            assert rel_err(got, truth) < rel_err(want, truth) + FP32_RTOL / 2  # (300 tokens: both ~1e-5 from it)
        else:
            assert rel_err(got, truth) <= 1.25 * rel_err(want, truth) + 5e-3, (chunks, logits_at)
        assert all(torch.equal(a, b) for a, b in zip(got_cache[0], want_cache[0]))
        for mine, theirs in zip(got_cache, want_cache, strict=True):
            for a, b in zip(mine, theirs, strict=True):
                assert rel_err(a, b) < (1e-5 if dtype == torch.float32 else 0.1)


@pytest.mark.parametrize("name", list(CASES))
def test_bitwise_the_layers_where_no_product_adds(name, make_model):
    """Short prompts in fp32 (two rows of 6 and 12 tokens): every product one that backends/linear.py splits or
    sends to C (fewer than SPLIT_MAX_ROWS rows), so the additions are h.add_(product): the layers' own bits."""
    model = make_model(CASES[name])
    taken = counted(model)
    layers = layers_only(make_model(CASES[name]))
    for T in (6, 12):
        assert not linear.plain_product(torch.zeros(2, T, 1), torch.zeros(1, 1))
        got, got_cache = prefill(model, T)
        want, want_cache = prefill(layers, T)
        assert taken and all(taken)
        taken.clear()
        assert torch.equal(got, want)
        assert all(torch.equal(a, b) for m, t in zip(got_cache, want_cache) for a, b in zip(m, t))


def test_stacked_experts_and_greedy_tokens(make_model):
    """Mixtral's experts stacked as the CLI lays them out; greedy decoding after a 64-token prompt (fp32): the
    same tokens as the layers."""
    model, layers = make_model(MOE), layers_only(make_model(MOE))
    stack_all_experts(model)
    stack_all_experts(layers)
    taken = counted(model)
    prompt = torch.randint(0, MOE.vocab_size, (64,), generator=torch.Generator().manual_seed(5)).tolist()
    got = generate(model, [prompt], 12, temperature=0.0, ignore_eos=True)[0].tokens
    want = generate(layers, [prompt], 12, temperature=0.0, ignore_eos=True)[0].tokens
    assert taken and all(taken)
    assert len(got) == 12 and got == want


def test_declined_where_the_layers_would_run_something_it_skips(make_model):
    """A hook or a forward patched on each module the layers call (decode_step.called_modules, the embedding,
    the final norm), a global hook, autograd, no cache, a subclassed embedding, a backend with a replaced family:
    the step declines (the layers run, and with them the hook)."""
    model = make_model(DENSE)
    taken = counted(model)
    tokens = torch.randint(0, DENSE.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(40)[None]

    def run(grad: bool = False, cache: bool = True):
        with torch.set_grad_enabled(grad):
            return model(tokens, positions, KVCache(DENSE, 1, 41, model.dtype, "cpu") if cache else None)

    with torch.inference_mode():
        want = run()
    assert taken == [True]
    modules = [model.tok_embeddings, model.norm] + decode_step.called_modules(model.layers[1])
    for module in modules:
        taken.clear()
        fired: list = []
        handle = module.register_forward_hook(lambda *_, fired=fired: fired.append(1))
        try:
            with torch.inference_mode():
                assert rel_err(run(), want) < FP32_RTOL  # (the layers: within rounding of the step's sums)
        finally:
            handle.remove()
        assert taken == [False] and fired == [1], type(module).__name__
        module.forward = functools.partial(type(module).forward, module)
        try:
            taken.clear()
            with torch.inference_mode():
                run()
            assert taken == [False], type(module).__name__
        finally:
            del module.forward
    handle = nn.modules.module.register_module_forward_hook(lambda *_: None)
    try:
        taken.clear()
        with torch.inference_mode():
            run()
        assert taken == [False]
    finally:
        handle.remove()
    taken.clear()
    run(grad=True)
    assert taken == [False]
    taken.clear()
    with torch.inference_mode():
        run(cache=False)
    assert taken == []  # (no cache: Transformer.forward never asks)

    class Embedding(nn.Embedding):
        pass

    embedding = Embedding(DENSE.vocab_size, DENSE.dim)
    embedding.weight = model.tok_embeddings.weight
    model.tok_embeddings = embedding
    taken.clear()
    with torch.inference_mode():
        assert rel_err(run(), want) < FP32_RTOL
    assert taken == [False]
    assert make_model(DENSE).set_backend("torch", attention="reference").ops.prompt_step is None


@pytest.mark.parametrize("name", list(CASES))
def test_block_against_transformer_block(name, make_model):
    """prompt_step.block against TransformerBlock.forward, each block of each kind, bf16, 600 rows (weights scaled
    by 0.3): x is written into and returned; no farther from the float64 block than 1.25 times the bf16 block's
    distance (+ 1e-3): one rounding of each sum instead of two."""
    args = CASES[name]
    model = tame(make_model(args)).to(torch.bfloat16)
    exact = tame(make_model(args)).set_backend("reference").double()
    x = torch.randn(2, 300, args.dim, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    positions = torch.arange(300).repeat(2, 1)

    def run(m, layer, inputs, fused: bool):
        rope = m.ops.rope_table(positions, args.rope_dim, args.rope_theta, args.yarn)
        cache = KVCache(args, 2, 300, m.dtype, "cpu")[0]
        with torch.inference_mode():
            if fused:
                return prompt_step.block(layer, inputs, positions, rope, m.ops, cache, None)
            return layer(inputs, positions, rope, m.ops, cache)[0]

    for layer, exact_layer in zip(model.layers, exact.layers):
        mine = x.clone()
        got = run(model, layer, mine, True)
        assert got.data_ptr() == mine.data_ptr()
        want, truth = run(model, layer, x, False), run(exact, exact_layer, x.double(), False)
        assert rel_err(got, truth) <= 1.25 * rel_err(want, truth) + 1e-3
