"""Compiled decoding (backends/compiled.py): the regional step (one compiled block for every layer) and the full
step give eager decoding's greedy tokens; regional compiles one block, not one per layer; cache capacities are
bucketed so a new request (a chat's next turn) reuses the compiled step; the on-disk compile cache's place.

Compiling with inductor takes seconds to minutes, so these compile with torch.compile's cheap backends ("eager",
"aot_eager": dynamo's graphs, without inductor's code generation) and count graphs with dynamo's counters;
benchmarks/bench_compile.py runs inductor (and README reports what it measured by hand)."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from model_helpers import random_model

from mistral_ref.backends.compile_cache import compile_cache_dir
from mistral_ref.backends.compiled import MIN_CAPACITY, bucket_capacity, compile_decode
from mistral_ref.cache import KVCache
from mistral_ref.config import ModelArgs, MoeArgs
from mistral_ref.generation import generate

pytestmark = pytest.mark.usefixtures("one_thread")

# window 6 < prompt + new tokens, so the rolling buffers wrap; 4 layers of one shape: one block graph
DENSE = ModelArgs(dim=48, n_layers=4, hidden_dim=96, n_heads=6, n_kv_heads=2, head_dim=8, vocab_size=101,
                  norm_eps=1e-5, rope_theta=1e4, sliding_window=6)
MOE = ModelArgs(dim=32, n_layers=3, hidden_dim=48, n_heads=4, n_kv_heads=1, head_dim=8, vocab_size=89,
                norm_eps=1e-5, rope_theta=1e6, sliding_window=6, moe=MoeArgs(5, 2))
# interleaved windows (6, full): two kinds of layer, so two block graphs
INTERLEAVED = ModelArgs(dim=48, n_layers=4, hidden_dim=96, n_heads=6, n_kv_heads=2, head_dim=8, vocab_size=101,
                        norm_eps=1e-5, rope_theta=1e4, sliding_window=(6, None))
PROMPTS = [[1, 5, 9, 2, 7, 3, 4], [8, 6, 2, 2, 5]]  # ragged: 7 and 5 tokens


def graphs() -> int:
    """Graphs dynamo has compiled so far in this process."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def greedy(model, prompts=PROMPTS, max_tokens=9):
    return [r.tokens for r in generate(model, prompts, max_tokens, temperature=0.0)]


def fresh(args, dtype=torch.float32, seed=0):
    torch._dynamo.reset()  # no compiled code from an earlier test: counts start from zero
    return random_model(args, seed).to(dtype)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Compiled-decode caches go to a temporary directory, never the user's."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile-cache"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("args", [DENSE, MOE], ids=["dense", "moe"])
@pytest.mark.parametrize("mode", ["regional", "full"])
def test_compiled_decode_gives_eager_greedy_tokens(args, dtype, mode):
    """Ragged batch, windows shorter than the sequence, dense and MoE, fp32 and bf16: the compiled step (dynamo's
    graphs through aot_eager) picks eager decoding's tokens, and its logits agree."""
    model = fresh(args, dtype)
    eager = greedy(model)
    tokens = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        cache = KVCache(args, 1, 16, dtype)
        model(tokens, None, cache)
        eager_logits = model(torch.tensor([[3]]), torch.tensor([[7]]), cache)
    compile_decode(model, mode=mode, backend="aot_eager")
    assert greedy(model) == eager
    with torch.inference_mode():
        cache = KVCache(args, 1, 16, dtype)
        model(tokens, None, cache)
        logits = model(torch.tensor([[3]]), torch.tensor([[7]]), cache)
    assert rel_err(logits, eager_logits) < (1e-5 if dtype == torch.float32 else 5e-2)  # bf16: other roundings


@pytest.mark.parametrize("mode", ["regional", "full"])
def test_converting_or_quantizing_a_compiled_model_compiles_for_the_new_weights(mode):
    """Compiled steps check dynamo's guards at their first call only, so a model converted (.to) or quantized
    after compile_decode must not reach the steps compiled for its old weights: its modules are described again,
    the keys change, new steps are compiled, and decoding gives eager decoding's tokens (no guard failure)."""
    model = fresh(MOE)
    compile_decode(model, mode=mode, backend="aot_eager")
    greedy(model)
    before = len(model.compiled_decode.steps.steps)
    model.to(torch.bfloat16)
    with torch.inference_mode():
        compiled_tokens = greedy(model)
    assert len(model.compiled_decode.steps.steps) > before
    eager = fresh(MOE).to(torch.bfloat16)
    assert compiled_tokens == greedy(eager)
    from mistral_ref.quantize import quantize_model

    dense = fresh(DENSE)
    compile_decode(dense, mode=mode, backend="aot_eager")
    greedy(dense)
    before = len(dense.compiled_decode.steps.steps)
    quantize_model(dense, "int8")
    got = greedy(dense)
    assert len(dense.compiled_decode.steps.steps) > before
    dense.compile_decode(False)
    assert got == greedy(dense)


@pytest.mark.slow
@pytest.mark.parametrize("args, blocks", [(DENSE, 1), (MOE, 1), (INTERLEAVED, 2)], ids=["dense", "moe", "interleaved"])
def test_regional_compiles_one_block_for_all_layers(args, blocks):
    """Layers of one kind share one compiled block: n_layers layers cost `blocks` graphs (an fp32 model's head runs
    eagerly: one product)."""
    model = fresh(args)
    compile_decode(model, backend="eager")
    before = graphs()
    model.compiled_decode.warm_up(batch_size=1, positions=20)  # (batch 1: a batch's MoE dispatch is eager)
    assert graphs() - before == blocks
    greedy(model, PROMPTS[:1], max_tokens=20 - 7)  # same batch, same capacity bucket: nothing new to compile
    assert graphs() - before == blocks


@pytest.mark.slow
def test_a_second_request_in_the_same_capacity_bucket_does_not_recompile():
    """A chat's second turn (longer prompt, other max_tokens) allocates the same bucketed capacity: no new graph;
    a request beyond the bucket compiles once more (its full-attention layers' caches are larger)."""
    model = fresh(INTERLEAVED)
    compile_decode(model, backend="eager")
    greedy(model, [[1, 2, 3]], max_tokens=5)
    first = graphs()
    greedy(model, [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]], max_tokens=40)
    assert graphs() == first
    greedy(model, [[1, 2, 3]], max_tokens=MIN_CAPACITY)  # 259 positions: the next bucket
    assert graphs() > first


def test_bucket_capacity_rounds_up_to_powers_of_two_within_the_context():
    assert [bucket_capacity(n) for n in (1, 200, 256, 257, 1000, 1025)] == [256, 256, 256, 512, 1024, 2048]
    assert bucket_capacity(300, limit=400) == 400  # never beyond the model's context ...
    assert bucket_capacity(500, limit=400) == 500  # ... nor below what the request needs


class EagerStep:
    """What generation asks of model.compiled_decode: capacity(), then the decode steps (here eager ones)."""

    def __init__(self, model):
        self.model = model

    def capacity(self, positions):
        return 2 * positions

    def __call__(self, tokens, positions, cache, logits_at=None):
        return self.model.forward_with(self.model.ops, tokens, positions, cache, logits_at=logits_at)


def test_decode_capacity_is_bucketed_only_when_compiled(monkeypatch):
    """generate allocates prompt + max_tokens positions eagerly, a bucketed capacity with a compiled step."""
    import mistral_ref.generation as generation

    sizes = []
    real = generation.allocate_cache
    monkeypatch.setattr(generation, "allocate_cache", lambda args, B, size, *a, **k: sizes.append(size) or
                        real(args, B, size, *a, **k))
    model = random_model(DENSE)
    greedy(model, [[1, 2, 3]], max_tokens=4)
    model.compiled_decode = EagerStep(model)
    greedy(model, [[1, 2, 3]], max_tokens=4)
    assert sizes == [7, 14]


def test_compile_decode_checks_its_mode_and_freeze():
    model = random_model(DENSE)
    with pytest.raises(ValueError, match="mode must be one of"):
        compile_decode(model, mode="fast")
    with pytest.raises(ValueError, match="freeze=True .* needs mode='full'"):
        compile_decode(model, freeze=True)


def test_compile_cache_dir_is_under_the_user_cache_unless_inductor_s_is_set(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache_dir() == tmp_path / "mistral-ref" / "compile" / f"torch-{torch.__version__}"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert compile_cache_dir() == tmp_path / "elsewhere"
