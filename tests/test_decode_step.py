"""The engine's whole decode step (backends/decode_step.py: one operator call a block) against the "torch"
backend's eager layers and the "reference" backend: beyond the sliding window, GQA, head_dim != dim / n_heads,
Mixtral's experts, Ministral 3's query scaling, Mistral Small 4's latent attention and fine-grained experts (past
YaRN's original context and the query scaling's steps), bf16, int8 and int4; when it is taken and when not; its
kept plan after the model changes."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from conftest import FP32_RTOL, rel_err
from torch import nn

from mistral_ref.attention import Attention
from mistral_ref.backends import cpu_gemv, decode_step
from mistral_ref.backends.moe import stack_all_experts
from mistral_ref.cache import CacheOverflowError, KVCache
from mistral_ref.config import FineMoeArgs, Llama4Scaling, MlaArgs, ModelArgs, MoeArgs, YarnArgs
from mistral_ref.generation import generate
from mistral_ref.quantize import quantize_model

pytestmark = pytest.mark.skipif(cpu_gemv.library() is None or cpu_gemv.operators(wait=True) != "C++",
                                reason=f"the C kernels' C++ operators are not available: {cpu_gemv.operators()}")

# 6 query heads on 2 kv heads of 32 (dim 96: head_dim != dim / n_heads), a window of 12 the steps run past
DENSE = ModelArgs(dim=96, n_layers=3, hidden_dim=160, n_heads=6, n_kv_heads=2, head_dim=32, vocab_size=320,
                  norm_eps=1e-5, rope_theta=1e4, sliding_window=12)
MOE = dataclasses.replace(DENSE, moe=MoeArgs(num_experts=4, num_experts_per_tok=2))
# Ministral 3: queries scaled by position, in steps of 8 positions (the steps run to 35)
SCALED = dataclasses.replace(DENSE, llama_4_scaling=Llama4Scaling(original_max_position_embeddings=8, beta=0.1))
# Mistral Small 4 in small: latent attention with a low-rank query, YaRN over an original context of 8 with the
# softmax-scale correction, query scaling; a dense first layer, then 16 fine-grained experts (top 4, softmax) and a
# shared expert
LATENT = ModelArgs(dim=64, n_layers=3, hidden_dim=96, n_heads=4, n_kv_heads=4, head_dim=20, vocab_size=320,
                   norm_eps=1e-6, rope_theta=1e4,
                   yarn=YarnArgs(factor=4.0, original_max_position_embeddings=8, apply_scale=False),
                   llama_4_scaling=Llama4Scaling(original_max_position_embeddings=8, beta=0.1),
                   mla=MlaArgs(kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
                               q_lora_rank=24, mscale_all_dim=1.0),
                   fine_moe=FineMoeArgs(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=16,
                                        n_shared_experts=1, first_k_dense_replace=1))
# ... without the low-rank query, with DeepSeek-V3's router: sigmoid scores with a score-correction bias, 2 of 4
# groups, the weights renormalised and scaled by 2.5
SIGMOID = dataclasses.replace(
    LATENT, mla=dataclasses.replace(LATENT.mla, q_lora_rank=None),
    fine_moe=dataclasses.replace(LATENT.fine_moe, scoring_func="sigmoid", n_group=4, topk_group=2,
                                 norm_topk_prob=True, routed_scaling_factor=2.5))
# ... with shapes int4's groups of 32 fit (every input width a multiple of 32, every output one of 16)
LATENT_INT4 = dataclasses.replace(
    LATENT, mla=dataclasses.replace(LATENT.mla, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16, v_head_dim=8),
    fine_moe=dataclasses.replace(LATENT.fine_moe, moe_intermediate_size=32))
STEPS, PROMPT = 30, 5


def biased(model):
    """A random score-correction bias for the fine-grained routers (their choice moves with it)."""
    generator = torch.Generator().manual_seed(3)
    for layer in model.layers:
        gate = getattr(layer.feed_forward, "gate", None)
        if hasattr(gate, "e_score_correction_bias"):
            bias = gate.e_score_correction_bias
            bias.copy_(0.1 * torch.randn(bias.shape, generator=generator))
    return model


def layers_only(model):
    """The model with the "torch" backend's functions but without its whole decode step: the layers run."""
    model.ops = dataclasses.replace(model.ops, decode_step=None)
    return model


def decode(model, steps: int = STEPS, start: int = 0, capacity: int = 64) -> tuple[torch.Tensor, list[int]]:
    """Greedy decoding after a PROMPT-token prompt at positions start..: the logits of every step (steps, vocab)
    and the tokens."""
    args = model.args
    cache = KVCache(args, 1, capacity, model.dtype, "cpu")
    prompt = torch.randint(0, args.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    logits, tokens = [], []
    with torch.inference_mode():
        out = model(prompt, torch.arange(start, start + PROMPT)[None], cache)
        for i in range(steps):
            token = out[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
            out = model(token, torch.tensor([[start + PROMPT + i]]), cache)
            logits.append(out[0, -1])
    return torch.stack(logits), tokens


def steps_taken(model, **kw) -> int:
    """How many decode_model calls decoding makes (the profiler's count of the operator)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        decode(model, **kw)
    return sum(e.name == "mistral_ref::decode_model" for e in prof.events())


def stacked(model):
    """The model with its experts stacked (backends/moe.py), as the CLI and compile_decode lay them out."""
    stack_all_experts(model)
    return model


FP32_CASES = [(DENSE, None), (MOE, None), (MOE, stacked), (SCALED, None), (LATENT, None), (LATENT, stacked),
              (SIGMOID, None), (SIGMOID, stacked)]
FP32_IDS = ["dense", "moe", "moe-stacked", "query-scaling", "latent", "latent-stacked", "sigmoid", "sigmoid-stacked"]


@pytest.mark.parametrize("args,layout", FP32_CASES, ids=FP32_IDS)
def test_fp32_equals_the_layers_and_the_reference(args, layout, make_model):
    def build(a):  # (fine-grained routers with a random score-correction bias)
        return biased(make_model(a))

    model = build(args)
    if layout:
        layout(model)
    parameters = list(model.parameters())
    assert steps_taken(model) == STEPS  # one call every step
    assert all(a is b for a, b in zip(parameters, model.parameters(), strict=True))  # none replaced
    fused, fused_tokens = decode(model)
    layers, layer_tokens = decode(layers_only(build(args)))
    reference, reference_tokens = decode(build(args).set_backend("reference"))
    exact, exact_tokens = decode(build(args).set_backend("reference").double())
    if layout:  # stacked experts decode as their own tensors do
        assert fused_tokens == decode(build(args))[1]
    # against the float64 reference: three fp32 paths that sum in different orders each land within 1e-5 of it,
    # but not always within 1e-5 of one another (30 steps through experts: 1.1e-5 apart on a Xeon with AMX)
    assert rel_err(fused, exact) < FP32_RTOL and rel_err(layers, exact) < FP32_RTOL
    assert rel_err(fused, exact) < rel_err(reference, exact) + FP32_RTOL / 2  # no farther than the reference's
    assert fused_tokens == layer_tokens == reference_tokens == exact_tokens


# (LATENT's experts are 16 wide: no int4 group fits them; LATENT_INT4 has int4's shapes)
BF16_CASES = [pytest.param(args, layout, scheme, id=f"{name}-{scheme or 'bf16'}")
              for args, layout, name in [(DENSE, None, "dense"), (MOE, None, "moe"), (MOE, stacked, "moe-stacked"),
                                         (SCALED, None, "query-scaling"), (LATENT, None, "latent"),
                                         (LATENT, stacked, "latent-stacked"), (SIGMOID, None, "sigmoid"),
                                         (SIGMOID, stacked, "sigmoid-stacked")]
              for scheme in ([None, "int8"] if args.mla else [None, "int8", "int4"])]
BF16_CASES += [pytest.param(LATENT_INT4, layout, "int4", id=f"latent-{name}int4")
               for layout, name in [(None, ""), (stacked, "stacked-")]]


@pytest.mark.parametrize("args,layout,scheme", BF16_CASES)
def test_bf16_and_quantized_equal_the_layers(args, layout, scheme, make_model):
    """The same kernels and roundings as the eager layers: equal but where SiLU's exp polynomial and torch's exp
    differ in fp32's last bits and that moves a bf16 rounding (in practice: bitwise).  Latent attention rounds
    where backends/mla.py's einsums round: in bf16 on a CPU with bf16 instructions, else in fp32 throughout."""
    models = []
    for _ in range(2):
        model = biased(make_model(args)).to(torch.bfloat16)
        if scheme:
            quantize_model(model, scheme, group_size=32)
        if layout:
            layout(model)
        models.append(model)
    assert steps_taken(models[0], steps=3) == 3
    fused, fused_tokens = decode(models[0])
    layers, layer_tokens = decode(layers_only(models[1]))
    assert rel_err(fused, layers) < 1e-2
    assert fused_tokens == layer_tokens


@pytest.mark.parametrize("scheme", [None, "int8"])
def test_several_rows_at_their_own_positions(scheme, make_model):
    """A bf16 batch of 3 rows at different positions, one of them padding (-1) at every step, past the window:
    equal to the layers' step (whose cache write is then the masked scatter); int4 and experts: not taken."""
    def run(model):
        model = model.to(torch.bfloat16)
        if scheme:
            quantize_model(model, scheme)
        cache = KVCache(DENSE, 3, 32, torch.bfloat16, "cpu")
        tokens = torch.randint(0, DENSE.vocab_size, (3, 1), generator=torch.Generator().manual_seed(2))
        out = []
        with torch.inference_mode(), torch.profiler.profile() as prof:
            for i in range(20):
                positions = torch.tensor([[i], [2 * i + 1], [-1 if i % 3 == 0 else i + 5]])
                if i == 19:  # (positions a caller made by expanding one column: not contiguous)
                    positions = torch.tensor([[i]]).expand(3, 1)
                logits = model(tokens, positions, cache)
                out.append(logits[:, 0])
                tokens = logits[:, -1].argmax(-1, keepdim=True)
        calls = sum(e.name == "mistral_ref::decode_model" for e in prof.events())
        return torch.stack(out), calls, cache
    fused, calls, cache = run(make_model(DENSE))
    layers, _, layer_cache = run(layers_only(make_model(DENSE)))
    assert calls == 20
    assert rel_err(fused, layers) < 1e-2 and fused.argmax(-1).equal(layers.argmax(-1))
    for a, b in zip(cache.layers, layer_cache.layers, strict=True):
        assert torch.equal(a.pos, b.pos) and rel_err(a.k, b.k) < 1e-2
    tokens, positions = torch.zeros(2, 1, dtype=torch.long), torch.tensor([[0], [3]])
    for args, q in ((DENSE, "int4"), (MOE, None)):
        model = make_model(args).to(torch.bfloat16)
        if q:
            quantize_model(model, q)
        with torch.inference_mode():
            assert decode_step.decode_step(model, tokens, positions, KVCache(args, 2, 8, torch.bfloat16, "cpu")) is None


def test_positions_past_the_rotation_table_and_the_caches_end(make_model):
    """Positions from 300 (the table of rotations grows past 256), a full cache that overflows as the layers'."""
    args = dataclasses.replace(DENSE, sliding_window=None)
    fused, _ = decode(make_model(args), steps=8, start=300, capacity=400)
    layers, _ = decode(layers_only(make_model(args)), steps=8, start=300, capacity=400)
    assert rel_err(fused, layers) < FP32_RTOL
    for model in (make_model(args), layers_only(make_model(args))):
        with pytest.raises(CacheOverflowError, match="position 8 does not fit a KV cache allocated for 8"):
            decode(model, steps=8, capacity=8)


def test_not_taken_where_it_does_not_apply(make_model):
    model = make_model(DENSE)
    cache = KVCache(DENSE, 2, 16, torch.float32, "cpu")
    tokens, positions = torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long)
    with torch.inference_mode():
        assert decode_step.decode_step(model, tokens, positions, cache) is None  # two rows of an fp32 model
        assert decode_step.decode_step(model, tokens[:1], positions[:1], None) is None  # no cache
    one = KVCache(DENSE, 1, 16, torch.float32, "cpu")
    assert torch.is_grad_enabled() and decode_step.decode_step(model, tokens[:1], positions[:1], one) is None
    # another family's function: the whole step would not call it
    assert make_model(DENSE).set_backend("torch", attention="reference").ops.decode_step is None
    assert steps_taken(make_model(DENSE).set_backend("torch", attention="reference"), steps=2) == 0
    # a forward hook inside a block (tensor parallelism's all-reduce after wo), or one on every module: the
    # step would skip it
    hooked, seen = make_model(DENSE), []
    decode(hooked, steps=2)  # (a plan kept from before the hook)
    handle = hooked.layers[1].attention.register_forward_hook(lambda *_: seen.append(1))
    assert steps_taken(hooked, steps=2) == 0 and len(seen) == 3  # the prompt's pass and two steps
    handle.remove()
    assert steps_taken(hooked, steps=2) == 2
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *_: None)
    try:
        assert steps_taken(make_model(DENSE), steps=2) == 0
    finally:
        handle.remove()
    # a forward replaced on a class (an intervention patched in by a test's conftest) or on one module
    patched, real = make_model(DENSE), Attention.forward
    decode(patched, steps=2)
    try:
        Attention.forward = lambda self, *a, **k: real(self, *a, **k) * 1.001
        assert steps_taken(patched, steps=2) == 0
        Attention.forward = functools.wraps(real)(lambda self, *a, **k: real(self, *a, **k))
        assert steps_taken(patched, steps=2) == 0
    finally:
        Attention.forward = real
    assert steps_taken(patched, steps=2) == 2
    patched.layers[2].feed_forward.forward = lambda x, ops: torch.zeros_like(x)
    assert steps_taken(patched, steps=2) == 0
    # a latent-attention model of two rows: the layers' step
    latent = make_model(LATENT)
    with torch.inference_mode():
        cache = KVCache(LATENT, 2, 16, torch.float32, "cpu")
        assert decode_step.decode_step(latent, tokens, positions, cache) is None


@pytest.mark.parametrize("args,layout", [(DENSE, None), (MOE, None), (MOE, stacked), (DENSE, "int8"), (MOE, "int4"),
                                         (LATENT, None), (SIGMOID, stacked)],
                         ids=["dense", "moe", "moe-stacked", "dense-int8", "moe-int4", "latent", "sigmoid-stacked"])
def test_declined_exactly_where_the_layers_would_run_a_hook(args, layout, make_model):
    """A forward hook, or a forward replaced on the module itself, on each module of a block in turn (the block,
    its norms, attention and latent attention's norms, the weights' modules, the router, each expert, the shared
    expert): where the layers' step runs it, the
    whole step is declined; where the layers' step never calls that module, the step is taken (decode_step only
    checks the modules it would skip: called_modules)."""
    model = make_model(args)
    if layout in ("int8", "int4"):
        model = quantize_model(model.to(torch.bfloat16), layout)
    elif layout:
        layout(model)
    block = model.layers[1]
    called = {id(m) for m in decode_step.called_modules(block)}
    for name, module in block.named_modules():
        fired = []
        handle = module.register_forward_hook(lambda *_, fired=fired: fired.append(1))
        try:
            ops = model.ops
            model.ops = dataclasses.replace(ops, decode_step=None)  # the layers' step
            try:
                decode(model, steps=2)
            finally:
                model.ops = ops
            runs_hook = len(fired) == 3  # the prompt's pass and two steps
            assert len(fired) in (0, 3), name
            assert runs_hook == (id(module) in called), name
            taken = steps_taken(model, steps=2)
            assert taken == (0 if runs_hook else 2), name
        finally:
            handle.remove()
        if id(module) in called:  # a forward patched on the module itself
            module.forward = functools.partial(type(module).forward, module)
            try:
                assert steps_taken(model, steps=2) == 0, name
            finally:
                del module.forward
    assert steps_taken(model, steps=2) == 2


def test_the_embedding_and_the_final_norm_are_skipped_too(make_model):
    """The step also computes the embedding and the final norm without calling their modules: a hook or a patched
    forward on either declines it, as on a block's modules."""
    model = make_model(DENSE)
    for module in (model.tok_embeddings, model.norm):
        fired = []
        handle = module.register_forward_hook(lambda *_, fired=fired: fired.append(1))
        try:
            assert steps_taken(model, steps=2) == 0 and len(fired) == 3  # the prompt's pass and two steps
        finally:
            handle.remove()
        module.forward = functools.partial(type(module).forward, module)
        try:
            assert steps_taken(model, steps=2) == 0
        finally:
            del module.forward
    assert steps_taken(model, steps=2) == 2


def test_an_output_product_the_kernels_do_not_take_for_these_rows_runs_after_the_operator(make_model):
    """A bf16 batch of 3 rows whose output weight is int4 (the C kernels take int4 products of one row only): the
    operator returns the hidden states and the final norm and the output product run in Python, as in the layers'
    step; one row folds them into the operator.  Both equal the layers."""
    from mistral_ref.quantize import quantize_weight

    def build():
        model = make_model(DENSE).to(torch.bfloat16)
        weight = quantize_weight(model.output.weight, "int4", 32)
        del model.output.weight
        model.output.weight = weight
        return model
    model, twin = build(), layers_only(build())
    assert decode_step.plan(model).output_rows == cpu_gemv.MAX_ROWS["int4"] == 2
    cache, twin_cache = (KVCache(DENSE, 3, 32, torch.bfloat16, "cpu") for _ in range(2))
    tokens = torch.randint(0, DENSE.vocab_size, (3, 1), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode(), torch.profiler.profile() as prof:
        for i in range(4):
            positions = torch.tensor([[i], [i + 2], [i + 7]])
            ours, theirs = model(tokens, positions, cache), twin(tokens, positions, twin_cache)
            assert ours.dtype == torch.float32 and torch.equal(ours, theirs)
            tokens = ours[:, -1].argmax(-1, keepdim=True)
    assert sum(e.name == "mistral_ref::decode_model" for e in prof.events()) == 4
    assert torch.equal(decode(build())[0], decode(layers_only(build()))[0])  # one row: in the operator


def test_a_kept_plan_lets_replaced_weights_go(make_model):
    """A plan holds the weights it read; replacing them (quantize_model after decoding) drops it at once, so the
    old weights are freed without waiting for another step."""
    import gc
    import weakref

    model = make_model(DENSE).to(torch.bfloat16)
    decode(model, steps=2)
    assert decode_step.PLAN in vars(model)
    old = weakref.ref(model.layers[0].attention.wq.weight)
    quantize_model(model, "int8")
    gc.collect()
    assert old() is None and decode_step.PLAN not in vars(model)
    assert steps_taken(model, steps=2) == 2  # planned again at the next step


@pytest.mark.parametrize("args", [DENSE, MOE], ids=["dense", "moe"])
def test_the_kept_plan_follows_the_model(args, make_model):
    """Converting (the experts' stacks are dropped then), quantizing or replacing a weight by hand after steps
    have run: the next step uses the new weights, equal to the layers on the same model."""
    model = make_model(args)
    decode(model, steps=2)
    model.to(torch.bfloat16)
    twin = make_model(args).to(torch.bfloat16)
    assert steps_taken(model, steps=2) == 2
    assert rel_err(decode(model)[0], decode(layers_only(twin))[0]) < 1e-2
    quantize_model(model, "int8")
    quantize_model(twin, "int8")
    assert rel_err(decode(model)[0], decode(twin)[0]) < 1e-2
    model.float()  # quantized codes stay, their scales convert: the plan reads the new scales
    twin.float()
    assert rel_err(decode(model)[0], decode(layers_only(twin))[0]) < FP32_RTOL
    fresh = make_model(args)
    decode(fresh, steps=2)
    new = torch.randn_like(fresh.layers[1].attention.wq.weight)
    fresh.layers[1].attention.wq.weight = nn.Parameter(new)
    other = layers_only(make_model(args))
    other.layers[1].attention.wq.weight = nn.Parameter(new.clone())
    assert rel_err(decode(fresh)[0], decode(other)[0]) < FP32_RTOL


def test_generate_takes_it(make_model):
    """generate (inference mode) decodes through it, the tokens those of the layers."""
    model = make_model(MOE)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ours = generate(model, [[1, 2, 3]], 10, temperature=0.0)
    assert any(e.name == "mistral_ref::decode_model" for e in prof.events())
    assert ours == generate(layers_only(make_model(MOE)), [[1, 2, 3]], 10, temperature=0.0)


def test_what_it_keeps_works_outside_inference_mode(make_model):
    """It replaces no parameter, and the table of rotations it keeps from a generate (in inference mode) is a
    normal tensor: the model then trains, and converts and decodes again."""
    model = make_model(MOE)
    generate(model, [[1, 2, 3]], 4, temperature=0.0)
    assert not model.__dict__[decode_step.ROTATIONS][1].is_inference()
    assert all(not p.is_inference() for p in model.parameters())
    model.compute_loss(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]])).loss.backward()
    model.to(torch.bfloat16)
    assert generate(model, [[1, 2, 3]], 4, temperature=0.0) == generate(
        layers_only(make_model(MOE).to(torch.bfloat16)), [[1, 2, 3]], 4, temperature=0.0)


def test_arguments_that_do_not_fit_are_a_clear_error(make_model):
    """decode_model checks every tensor it reads against the shapes it computes: a clear error naming the layer
    and the tensor, never a wrong read."""
    model = make_model(DENSE)
    steps = decode_step.plan(model)
    weights, rot = steps.weights(torch.float32), decode_step.rotations(model, 0)
    tokens, position = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long)

    def call(weights=weights, position=position, caches=None, layout=steps.layout, tokens=tokens):
        caches = caches or [t for c in KVCache(DENSE, 1, 16, torch.float32, "cpu").layers for t in (c.k, c.v, c.pos)]
        return torch.ops.mistral_ref.decode_model(tokens, position, rot, weights, layout, steps.scalars, caches, True,
                                                  1)

    assert call().shape == (1, 1, DENSE.vocab_size)
    bf16 = [t for c in KVCache(DENSE, 1, 16, torch.bfloat16, "cpu").layers for t in (c.k, c.v, c.pos)]
    with pytest.raises(ValueError, match="decode_model: layer 0: the cache must be"):  # bf16 for an fp32 model
        call(caches=bf16)
    with pytest.raises(ValueError, match="decode_model: layer 0: .*rotations"):  # past the table of rotations
        call(position=torch.full((1, 1), rot.shape[0], dtype=torch.long))
    swapped = list(weights)
    swapped[2:6] = weights[3:6] + weights[2:3]  # layer 0: wk, wv, wo, wq
    with pytest.raises(ValueError, match=r"decode_model: layer 0: wv \[96, 192\] Float does not fit \(64, 96\)"):
        call(weights=swapped)
    assert len(weights) == 3 * (2 + 4 + 3) + 3  # (norms, attention, feed-forward) a layer; embedding, norm, output
    with pytest.raises(ValueError, match="decode_model: 31 weights for a layout of 30"):
        call(weights=weights + weights[:1])
    with pytest.raises(ValueError, match="decode_model: 29 weights for this layout"):
        call(weights=weights[:-1])
    L = decode_step.LAYOUT
    with pytest.raises(ValueError, match=f"decode_model: tokens must be .* got 9 cache tensors, {3 * L + 2} ints"):
        call(layout=steps.layout[:-1])
    with pytest.raises(ValueError, match="decode_model: layer 1: a layout of 4 attention weights .*, 3 attention "
                                         "scales"):
        call(layout=steps.layout[:L + 1] + [3] + steps.layout[L + 2:])
    wrong = list(weights)
    wrong[-1] = weights[-1].T.contiguous()  # the output weight (dim, vocab)
    with pytest.raises(ValueError, match=r"decode_model: the output weight \[96, 320\] Float does not fit"):
        call(weights=wrong)
    with pytest.raises(IndexError, match="index out of range"):
        call(tokens=torch.full((1, 1), DENSE.vocab_size))


@pytest.mark.parametrize("args,scheme", [(DENSE, None), (MOE, "int8"), (MOE, "int4"), (LATENT, None),
                                         (SIGMOID, "int8"), (LATENT_INT4, "int4")],
                         ids=["dense", "moe-int8", "moe-int4", "latent", "sigmoid-int8", "latent-int4"])
def test_random_corruptions_of_the_arguments_raise_a_clear_error(args, scheme, make_model):
    """The operator reads memory by the shapes it is handed: a wrong layout int, a weight of another shape or
    dtype, two weights swapped or one missing, a cache or table of rotations cut short, a token out of range, in
    120 random trials, either still fit (a weight swapped with one of its shape) or raise ValueError / IndexError,
    never another error or a crash."""
    import random

    model = make_model(args).to(torch.bfloat16)
    if scheme:
        quantize_model(model, scheme, group_size=32)
    steps = decode_step.plan(model)
    weights, rng, raised = steps.weights(torch.bfloat16), random.Random(0), 0
    for _ in range(120):
        w, layout = list(weights), list(steps.layout)
        caches = [t for c in KVCache(args, 1, 16, torch.bfloat16, "cpu").layers for t in (c.k, c.v, c.pos)]
        tokens, rot = torch.tensor([[3]]), decode_step.rotations(model, 20)
        kind, i = rng.randrange(6), rng.randrange(len(w))
        if kind == 0:
            layout[rng.randrange(len(layout))] = rng.choice([-5, -1, 0, 1, 2, 3, 5, 64, 10**6])
        elif kind == 1:
            t = w[i]
            w[i] = rng.choice([t.flatten(), t[..., :-1].contiguous(), t.float() if t.is_floating_point() else
                               t.to(torch.int32), torch.zeros(0), t.t() if t.dim() == 2 else t])
        elif kind == 2:
            j = rng.randrange(len(w))
            w[i], w[j] = w[j], w[i]
        elif kind == 3:
            j = rng.randrange(len(caches))
            caches[j] = rng.choice([caches[j][:, :-1], caches[j].float(), caches[j][..., :1]])
        elif kind == 4:
            tokens = rng.choice([torch.tensor([[10**6]]), torch.tensor([[-1]]), torch.tensor([[1, 2]])])
            rot = rng.choice([rot, rot[:5], rot.double(), rot[:, :-1]])
        else:
            del w[i]
        position = torch.tensor([[rng.randint(-1, 20)]])
        try:
            torch.ops.mistral_ref.decode_model(tokens, position, rot, w, layout, steps.scalars, caches, True, 2)
        except (ValueError, IndexError) as e:
            assert str(e), "an error without a message"
            raised += 1
    assert raised > 60
