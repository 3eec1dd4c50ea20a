"""Every backend computes what backend "reference" computes (the plain math): the whole model, ragged batches,
windows shorter than the sequence, head_dim != dim / n_heads (Nemo), experts, cached decode and gradients; the
registry (names, per-family choices, errors) and the compile-friendly functions of compiled decoding."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from mistral_ref.backends import BackendError, get_backend
from mistral_ref.backends import linear as linear_module
from mistral_ref.cache import KVCache
from mistral_ref.config import FineMoeArgs, Llama4Scaling, MlaArgs, ModelArgs, MoeArgs, YarnArgs
from mistral_ref.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


GQA_WINDOW = ModelArgs(dim=48, n_layers=4, hidden_dim=96, n_heads=6, n_kv_heads=2, head_dim=8, vocab_size=101,
                       norm_eps=1e-5, rope_theta=1e4, sliding_window=(5, None))  # (a pattern divides n_layers)
NEMO = ModelArgs(dim=40, n_layers=2, hidden_dim=64, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=97,
                 norm_eps=1e-5, rope_theta=1e6)  # head_dim 16 != 40 / 4
MOE = ModelArgs(dim=32, n_layers=2, hidden_dim=48, n_heads=4, n_kv_heads=1, head_dim=8, vocab_size=89,
                norm_eps=1e-5, rope_theta=1e6, sliding_window=6, moe=MoeArgs(5, 2))
# Ministral-3-like: YaRN over an original context of 4 (a blending ramp, cos/sin scaled by 0.1 ln 4 + 1), the
# query scaling, tied embeddings, and interleaved windows (full, 6) on top: every new path at once
MINISTRAL3 = ModelArgs(dim=32, n_layers=4, hidden_dim=48, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=101,
                       norm_eps=1e-5, rope_theta=1e4, sliding_window=(None, 6), tied_embeddings=True,
                       yarn=YarnArgs(factor=4.0, original_max_position_embeddings=4, beta=1.0, alpha=0.1),
                       llama_4_scaling=Llama4Scaling(original_max_position_embeddings=4, beta=0.2))
# Mistral-Small-4-like: latent attention (absorbed for chunks under 9 tokens and decode steps, expanded beyond)
# and fine-grained experts (16 of them, top-4, 4 groups of which 2 eligible, sigmoid, a shared expert)
SMALL4 = ModelArgs(dim=32, n_layers=2, hidden_dim=48, n_heads=4, n_kv_heads=4, head_dim=10, vocab_size=83,
                   norm_eps=1e-5, rope_theta=1e4, yarn=YarnArgs(factor=4.0, original_max_position_embeddings=4,
                                                              apply_scale=False),
                   llama_4_scaling=Llama4Scaling(original_max_position_embeddings=4, beta=0.1),
                   mla=MlaArgs(kv_lora_rank=16, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5, q_lora_rank=12,
                               mscale_all_dim=1.0),
                   fine_moe=FineMoeArgs(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=12,
                                        first_k_dense_replace=1, n_group=4, topk_group=2, scoring_func="sigmoid",
                                        routed_scaling_factor=2.5))
MODELS = {"gqa_window": GQA_WINDOW, "nemo": NEMO, "moe": MOE, "ministral3": MINISTRAL3, "small4": SMALL4}


def make_model(args: ModelArgs, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args).eval()
    with torch.no_grad():  # weights larger than the default init: attention and routing far from uniform
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 1.0)
    return model


def ragged_positions(B: int, T: int) -> torch.Tensor:
    """Row b starts 3*b positions later, its first 3*b slots are padding (-1): some rows see no key at all."""
    pos = torch.arange(T).repeat(B, 1) - 3 * torch.arange(B)[:, None]
    return pos.masked_fill(pos < 0, -1)


def test_split_linear_decode_matches_the_reference_model(monkeypatch):
    """A KV-cache decode on 2 threads (split products, fused paths) equals the reference backend on 1 thread."""
    monkeypatch.setitem(linear_module._split_measured, 2, True)  # split, whatever split_pays measures here
    args = ModelArgs(dim=64, n_layers=2, hidden_dim=96, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=200,
                     norm_eps=1e-5, rope_theta=1e4, sliding_window=5, moe=MoeArgs(4, 2))
    torch.manual_seed(0)
    model = Transformer(args).eval()
    tokens = torch.randint(0, 200, (2, 12))
    ref = run(model, "reference", lambda: model(tokens))
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            cache = KVCache(args, 2, 12)
            steps = [model(tokens[:, t:t + 1], torch.full((2, 1), t), cache) for t in range(12)]
    finally:
        torch.set_num_threads(n)
        model.set_backend()
    assert rel_err(torch.cat(steps, dim=1), ref) < 1e-5


def run(model: Transformer, backend: str, fn):
    model.set_backend(backend)
    try:
        with torch.inference_mode():
            return fn()
    finally:
        model.set_backend()


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_equals_reference(name):
    """A ragged batch longer than the window, no cache: fast and reference logits agree to 1e-5 (fp32) and on
    every argmax (bf16 model against its own reference)."""
    args = MODELS[name]
    model = make_model(args)
    tokens = torch.randint(0, args.vocab_size, (3, 14), generator=torch.Generator().manual_seed(2))
    positions = ragged_positions(3, 14)
    ref = run(model, "reference", lambda: model(tokens, positions))
    out = run(model, "torch", lambda: model(tokens, positions))
    assert rel_err(out, ref) < 1e-5
    valid = positions >= 0
    assert torch.equal(out.argmax(-1)[valid], ref.argmax(-1)[valid])
    model.to(torch.bfloat16)
    ref16 = run(model, "reference", lambda: model(tokens, positions))
    out16 = run(model, "torch", lambda: model(tokens, positions))
    # bf16 argmax: wherever the fp32 top-2 margin exceeds the bf16 reference's own error (random models have
    # near-ties elsewhere), the fast path picks the same token as both references.
    top2 = ref.topk(2, dim=-1).values
    clear = valid & (top2[..., 0] - top2[..., 1] > 2 * (ref16 - ref).abs().amax(-1))
    assert clear.sum() >= valid.sum() // 3
    assert torch.equal(out16.argmax(-1)[clear], ref.argmax(-1)[clear])
    assert torch.equal(ref16.argmax(-1)[clear], ref.argmax(-1)[clear])


@pytest.mark.parametrize("name", MODELS)
def test_unpadded_prompt_equals_reference(name):
    """The common prefill: one unpadded prompt, no cache (causal mode on full layers; the masked path on layers
    whose window is shorter than the prompt)."""
    args = MODELS[name]
    model = make_model(args, seed=3)
    tokens = torch.randint(0, args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(6))
    ref = run(model, "reference", lambda: model(tokens))
    assert rel_err(run(model, "torch", lambda: model(tokens)), ref) < 1e-5


@pytest.mark.parametrize("chunks", [1, 2])
@pytest.mark.parametrize("name", ["nemo", "ministral3"])
def test_long_bf16_prompt_takes_prompt_attention_and_equals_reference(name, chunks, monkeypatch):
    """A bf16 prompt of prompt_attention.MIN_TOKENS and more on a CPU, in one pass or in two chunks into a KV
    cache, goes through prompt_attention (two GEMMs a block, the reference's softmax in C; the second chunk also
    sees the first one's keys; Ministral 3's windowed layers apply their window there too, and take SDPA's masked
    path for the second chunk), and its logits are nearer the bf16 reference than SDPA's (it rounds where the
    reference rounds), with the same argmax wherever the fp32 margin is clear of bf16's error."""
    from mistral_ref.backends import cpu_gemv, prompt_attention
    from mistral_ref.cache import KVCache

    if cpu_gemv.library() is None:
        pytest.skip(f"C kernels: {cpu_gemv.status()}")
    args = MODELS[name]
    model = make_model(args, seed=4)
    T = chunks * (prompt_attention.MIN_TOKENS + 8)
    tokens = torch.randint(0, args.vocab_size, (1, T), generator=torch.Generator().manual_seed(8))

    def forward():  # the last chunk's logits
        if chunks == 1:
            return model(tokens)
        cache, step = KVCache(args, 1, T, dtype=model.dtype), T // chunks
        for start in range(0, T, step):
            logits = model(tokens[:, start:start + step], torch.arange(start, start + step)[None], cache)
        return logits

    ref = run(model, "reference", forward)
    model.to(torch.bfloat16)
    ref16 = run(model, "reference", forward)
    calls = []
    real = prompt_attention.prompt_attention
    monkeypatch.setattr(prompt_attention, "prompt_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(prompt_attention, "FLASH_FIRST", False)  # (as on a CPU without AMX)
    out16 = run(model, "torch", forward)
    windowed = sum(args.window_for_layer(i) is not None for i in range(args.n_layers))
    # every layer's first chunk (a windowed layer's: behind its empty rolling buffer); a later chunk, the full
    # layers only (a rolling buffer that has wrapped holds no prompt in order: SDPA)
    assert len(calls) == args.n_layers + (chunks - 1) * (args.n_layers - windowed)
    monkeypatch.setattr(prompt_attention, "applies", lambda *a: False)
    sdpa16 = run(model, "torch", forward)
    assert rel_err(out16, ref16) < rel_err(sdpa16, ref16)  # (one pass: 0, bitwise the reference; SDPA 0.03-0.13)
    top2 = ref.topk(2, dim=-1).values
    clear = top2[..., 0] - top2[..., 1] > 2 * (ref16 - ref).abs().amax(-1)
    assert clear.sum() >= ref.shape[1] // 3
    assert torch.equal(out16.argmax(-1)[clear], ref.argmax(-1)[clear])


def cached_greedy(model: Transformer, prompt: torch.Tensor, chunk: int, steps: int):
    """Chunked prefill into a KV cache (rolling on windowed layers), then greedy cached decode."""
    B, T = prompt.shape
    cache = KVCache(model.args, B, T + steps, dtype=model.dtype)
    for start in range(0, T, chunk):
        pos = torch.arange(start, min(start + chunk, T)).expand(B, -1)
        logits = model(prompt[:, start:start + chunk], pos, cache)[:, -1]
    tokens, all_logits = [], [logits]
    for step in range(steps):
        nxt = all_logits[-1].argmax(-1, keepdim=True)  # (B, 1)
        tokens.append(nxt)
        all_logits.append(model(nxt, torch.full((B, 1), T + step), cache)[:, -1])
    return torch.cat(tokens, 1), torch.stack(all_logits, 1)


@pytest.mark.parametrize("name", MODELS)
def test_cached_greedy_decode_equals_reference(name):
    """Prefill in chunks of 4, then 10 decode steps past the window: the same tokens and fp32 logits to 1e-5;
    in bf16 the same greedy tokens."""
    args = MODELS[name]
    model = make_model(args, seed=1)
    prompt = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    ref_tokens, ref_logits = run(model, "reference", lambda: cached_greedy(model, prompt, 4, 10))
    tokens, logits = run(model, "torch", lambda: cached_greedy(model, prompt, 4, 10))
    assert torch.equal(tokens, ref_tokens)
    assert rel_err(logits, ref_logits) < 1e-5
    model.to(torch.bfloat16)
    ref16, _ = run(model, "reference", lambda: cached_greedy(model, prompt, 4, 4))
    out16, _ = run(model, "torch", lambda: cached_greedy(model, prompt, 4, 4))
    assert torch.equal(out16, ref16)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("name", MODELS)
def test_logits_at_equals_picking_from_all_logits(name, backend):
    """logits_at: the logits of every position, picked (fp32 within 1e-6), though the last layer computes only
    those rows (its feed-forward and attention output see (B, 1, dim); the router logits it returns are the rows
    of logits_at): without a cache, and into a cache (a ragged batch, each row's last real token, then a second
    chunk), whose keys and values are those of the whole forward pass, bitwise."""
    args = MODELS[name]
    model = make_model(args)
    B, T = 3, 11
    tokens = torch.randint(0, args.vocab_size, (B, T + 3), generator=torch.Generator().manual_seed(4))
    positions = ragged_positions(B, T + 3)
    at = torch.tensor([7, 0, 4])
    seen = []
    model.layers[-1].feed_forward.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))

    def prefill(logits_at):
        cache = KVCache(args, B, T + 3)
        first = model(tokens[:, :T], positions[:, :T], cache, logits_at=logits_at)
        second = model(tokens[:, T:], positions[:, T:], cache, logits_at=None if logits_at is None else at % 3)
        return first, second, cache

    with torch.inference_mode():
        model.set_backend(backend)
        full, picked = model(tokens), model(tokens, logits_at=at)
        assert seen == [(B, T + 3, args.dim), (B, 1, args.dim)]
        assert picked.shape == (B, 1, args.vocab_size)
        assert rel_err(picked[:, 0], full[torch.arange(B), at]) < 1e-6
        whole = prefill(None)
        last = torch.tensor([T - 1] * B)
        chunks = prefill(last)
        model.set_backend()
    assert rel_err(chunks[0][:, 0], whole[0][:, -1]) < 1e-6
    assert rel_err(chunks[1][:, 0], whole[1][torch.arange(B), at % 3]) < 1e-6
    for mine, theirs in zip(chunks[2].layers, whole[2].layers):
        assert torch.equal(mine.k, theirs.k) and torch.equal(mine.v, theirs.v) and torch.equal(mine.pos, theirs.pos)
    if args.moe is not None or args.fine_moe is not None:
        with torch.inference_mode():
            _, router = model(tokens, return_router_logits=True, logits_at=at)
        assert router[-1].shape[0] == B and all(r.shape[0] == B * (T + 3) for r in router[:-1])


def test_fast_paths_keep_gradients():
    """Training runs the same default backend: gradients flow through SDPA, complex RoPE and grouped experts and
    equal the reference's."""
    model = make_model(MOE)
    tokens = torch.randint(0, MOE.vocab_size, (2, 10), generator=torch.Generator().manual_seed(5))
    grads = {}
    for backend in ("reference", "torch"):
        model.set_backend(backend)
        model.zero_grad()
        model.compute_loss(tokens[:, :-1], tokens[:, 1:]).loss.backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.set_backend()
    for n, g in grads["reference"].items():
        assert rel_err(grads["torch"][n], g) < 1e-4, n


def test_set_backend_rejects_unknown_names():
    with pytest.raises(BackendError, match="reference"):
        make_model(NEMO).set_backend(attention="fast")
    with pytest.raises(BackendError, match="reference"):
        make_model(NEMO).set_backend("fast")
    with pytest.raises(TypeError):
        make_model(NEMO).set_backend(attention_impl="torch")


# ---- the registry and the compiled variant ------------------------------------------------------------------------
def test_reference_backend_is_the_plain_math_everywhere():
    """'reference' means the plain functions for every family, projections included."""
    from mistral_ref import attention, mla, moe, norm
    from mistral_ref.cache import LayerCache

    ops = make_model(NEMO).set_backend("reference").ops
    assert ops.linear is torch.nn.functional.linear
    assert ops.attention is attention.attention and ops.moe is moe.moe_forward and ops.rms_norm is norm.rms_norm
    assert ops.latent_attention is mla.latent_attention
    assert ops.swiglu is moe.swiglu
    cache = LayerCache(1, 4, False, 1, 2, torch.float32, "cpu")
    k = torch.randn(1, 1, 1, 2)
    keys, _, pos = ops.update_cache(cache, k, k, torch.tensor([[2]]))
    assert torch.equal(keys[0, 2], k[0, 0]) and pos.tolist() == [[-1, -1, 2, -1]]


def test_linears_are_the_backends_linear_one_weight_at_a_time():
    """ops.linears (q, k, v; w1, w3) equals ops.linear per weight in every backend, and follows a replaced linear."""
    from dataclasses import replace

    x = torch.randn(1, 1, 48).bfloat16()
    weights = [torch.randn(out, 48).bfloat16() for out in (48, 16, 16)]
    for name in ("reference", "torch"):
        ops = get_backend(name)
        for got, w in zip(ops.linears(x, weights), weights):
            torch.testing.assert_close(got, ops.linear(x, w), rtol=0, atol=0)
    calls = []
    counting = replace(get_backend("torch"), name="counting-linear", linear=lambda x, w: calls.append(1) or x @ w.T)
    counting.linears(x, weights)
    assert len(calls) == 3  # the replaced linear, not the torch backend's one-pass form


def test_per_family_choice_and_names():
    model = make_model(MOE)
    model.set_backend("torch", attention="reference", moe="reference")
    ref = get_backend("reference")
    assert model.ops.attention is ref.attention and model.ops.moe is ref.moe
    assert model.ops.linear is get_backend("torch").linear
    assert model.ops.name == "torch+attention=reference+moe=reference"
    from mistral_ref import moe

    assert model.set_backend("torch", swiglu="reference").ops.swiglu is moe.swiglu  # the feed-forward's own family
    assert model.ops.name == "torch+swiglu=reference" and model.ops.rms_norm is get_backend("torch").rms_norm
    assert model.set_backend().ops is get_backend("torch")


def test_a_registered_backend_is_found_by_name():
    from dataclasses import replace

    from mistral_ref.backends import available_backends, register_backend

    calls = []

    def counting_attention(*args):
        calls.append(1)
        return get_backend("reference").attention(*args)

    register_backend(replace(get_backend("torch"), name="counting", attention=counting_attention))
    model = make_model(NEMO)
    tokens = torch.randint(0, NEMO.vocab_size, (1, 5))
    with torch.inference_mode():
        ref = model(tokens)
        out = model.set_backend("counting")(tokens)
    assert "counting" in available_backends() and len(calls) == NEMO.n_layers
    assert rel_err(out, ref) < 1e-5


def test_a_backend_whose_package_cannot_import_says_how_to_install(monkeypatch):
    """Triton missing: the entry point exists (installed with mistral-ref) but importing it fails."""
    import mistral_ref.backends as backends

    class BrokenEntryPoint:
        name, value = "triton", "triton_kernels.backend:BACKEND"

        def load(self):
            raise ModuleNotFoundError("No module named 'triton'")

    monkeypatch.setattr(backends, "_REGISTRY", {})
    monkeypatch.setattr(backends, "entry_points", lambda group: [BrokenEntryPoint()])
    with pytest.raises(BackendError, match=r"pip install 'mistral-ref\[kernels\]'"):
        backends.get_backend("triton")
    monkeypatch.setattr(backends, "entry_points", lambda group: [])
    with pytest.raises(BackendError, match=r"unknown backend 'triton'.*mistral-ref\[kernels\]"):
        backends.get_backend("triton")


@pytest.mark.parametrize("name", MODELS)
def test_compiled_decode_functions_equal_the_reference_eagerly(name):
    """The compile-friendly functions (backends/compiled.py), run eagerly: chunked prefill, then decode steps with
    the unchecked cache write and stacked experts gathered by index, equal the reference (compiling itself takes
    minutes: `make bench` checks the compiled steps' tokens)."""
    from mistral_ref.backends.compiled import compiled_backend
    from mistral_ref.backends.moe import stack_all_experts

    args = MODELS[name]
    model = make_model(args, seed=4)
    prompt = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(8))
    ref_tokens, ref_logits = run(model, "reference", lambda: cached_greedy(model, prompt, 4, 8))
    stack_all_experts(model)
    compiled_ops = compiled_backend(threads=2)
    model.forward = lambda tokens, positions, cache: model.forward_with(compiled_ops, tokens, positions, cache)
    with torch.inference_mode():
        tokens, logits = cached_greedy(model, prompt, 4, 8)
    assert torch.equal(tokens, ref_tokens)
    assert rel_err(logits, ref_logits) < 1e-5


def test_compile_decode_needs_the_torch_backend():
    with pytest.raises(ValueError, match="set_backend\\('torch'\\)"):
        make_model(NEMO).set_backend("reference").compile_decode()


def test_torch_update_cache_writes_a_chunk_as_cache_update_does():
    """The "torch" backend's update_cache writes rows that sit at the same consecutive positions as one slice (a
    prompt, a later chunk into a full layer; a decode step, a rolling layer's too); every other write (padding,
    rows at other positions, a chunk into a rolling layer) is cache.update's.  Each leaves the cache and returns what
    cache.update leaves and returns, and a chunk past a full layer's capacity raises the same error."""
    import copy

    from mistral_ref.cache import CacheOverflowError, LatentLayerCache, LayerCache

    ops = get_backend("torch")
    g = torch.Generator().manual_seed(4)

    def both(cache, T, positions):
        k = torch.randn(cache.k.shape[0], T, *cache.k.shape[2:], generator=g)
        v = torch.randn(cache.v.shape[0], T, *cache.v.shape[2:], generator=g)
        twin = copy.deepcopy(cache)
        got, want = ops.update_cache(cache, k, v, positions), twin.update(k, v, positions)
        for a, b in zip((*got, cache.k, cache.v, cache.pos), (*want, twin.k, twin.v, twin.pos)):
            assert torch.equal(a, b)

    full = LayerCache(2, 16, False, 2, 4, torch.float32, "cpu")
    both(full, 5, torch.arange(5).expand(2, 5))  # a prompt
    both(full, 4, torch.arange(5, 9).expand(2, 4))  # a later chunk
    both(full, 3, torch.tensor([[9, 10, 11], [9, 10, -1]]))  # padding: the scatter
    both(full, 2, torch.tensor([[12, 13], [13, 14]]))  # rows at other positions
    both(full, 1, torch.tensor([[14], [14]]))  # a decode step
    with pytest.raises(CacheOverflowError):
        ops.update_cache(full, torch.zeros(2, 3, 2, 4), torch.zeros(2, 3, 2, 4), torch.arange(15, 18).expand(2, 3))
    rolling = LayerCache(1, 4, True, 2, 4, torch.float32, "cpu")
    both(rolling, 6, torch.arange(6)[None])  # a rolling layer: cache.update (old buffer + chunk)
    both(rolling, 1, torch.tensor([[6]]))  # a rolling layer's decode step: slot 6 % 4, one slice
    both(full, 1, torch.tensor([[15], [-1]]))  # a finished row (-1): the scatter
    latent = LatentLayerCache(1, 8, 6, 2, torch.float32, "cpu")
    both(latent, 5, torch.arange(5)[None])


def test_bf16_prompts_on_amx_tiles_stay_as_close_to_the_fp32_reference_as_the_bf16_reference():
    """A bf16 Mixtral-shaped model (head_dim 32, experts of width 64: shapes the AMX kernels take) with a window
    of 48 on one layer, a 144-token prompt in one pass and in two chunks of 72: the "torch" backend sends every
    prompt's attention (the window, the later chunk of the full layer) and every layer's experts to the AMX kernels
    (cpu_gemv.prompt_attention_amx, experts_rows), and its logits are no farther from the fp32 reference than the
    bf16 reference's, with the same argmax wherever the fp32 reference's top two are clearly apart."""
    from mistral_ref.backends import cpu_gemv

    if cpu_gemv.library() is None or not cpu_gemv.library().cpu_gemv_amx():
        pytest.skip("no AMX tiles here (the AMX kernels run where there are)")
    args = ModelArgs(dim=64, n_layers=2, hidden_dim=64, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=97,
                     norm_eps=1e-5, rope_theta=1e4, sliding_window=(None, 48), moe=MoeArgs(4, 2))
    model = make_model(args, seed=3)
    with torch.no_grad():  # (smaller weights than make_model's: the bf16 roundings stay below the logits' gaps)
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(0.3)
    tokens = torch.randint(0, args.vocab_size, (1, 144), generator=torch.Generator().manual_seed(1))

    def run(backend: str, chunk: int) -> torch.Tensor:
        model.set_backend(backend)
        cache = KVCache(args, 1, 144, dtype=model.dtype)
        with torch.inference_mode():
            return torch.cat([model(tokens[:, s:s + chunk], torch.arange(s, s + chunk)[None], cache)
                              for s in range(0, 144, chunk)], dim=1)

    ref = run("reference", 144)
    model.to(torch.bfloat16)
    calls = {"attention": 0, "experts": 0}
    real_attention, real_experts = cpu_gemv.prompt_attention_amx, cpu_gemv.experts_rows

    def attention_spy(*a, **kw):
        calls["attention"] += 1
        return real_attention(*a, **kw)

    def experts_spy(*a, **kw):
        calls["experts"] += 1
        return real_experts(*a, **kw)

    import unittest.mock as mock

    for chunk in (144, 72):
        ref16 = run("reference", chunk)
        with mock.patch.object(cpu_gemv, "prompt_attention_amx", attention_spy), \
                mock.patch.object(cpu_gemv, "experts_rows", experts_spy):
            calls.update(attention=0, experts=0)
            out16 = run("torch", chunk)
        # (every layer and chunk, except the windowed layer's second chunk: its rolling buffer has wrapped, its
        # keys are no prompt in order, SDPA takes them)
        assert calls == {"attention": 2 if chunk == 144 else 3, "experts": 2 * 144 // chunk}, (chunk, calls)
        assert rel_err(out16, ref) <= 1.25 * rel_err(ref16, ref) + 5e-3, chunk
        top2 = ref.topk(2, dim=-1).values
        clear = top2[..., 0] - top2[..., 1] > 2 * (ref16 - ref).abs().amax(-1)
        assert clear.sum() >= ref.shape[1] // 3
        assert torch.equal(out16.argmax(-1)[clear], ref.argmax(-1)[clear]), chunk
