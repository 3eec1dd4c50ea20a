"""Compiled decode steps on disk and in the background (backends/compiled_steps.py): a step is described by
everything its compiled code assumes, saved after compiling, loaded (not compiled) by the next start, refused when
the file is not this user's own or is damaged, and compiled by a worker thread while decoding runs eagerly with
the same tokens.  Compiled with dynamo's "eager" backend (inductor takes seconds to minutes: bench_compile.py)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from conftest import rel_err
from model_helpers import random_model

from mistral_ref.backends import compiled_steps, cpu_gemv
from mistral_ref.backends.compiled import compile_decode
from mistral_ref.backends.compiled_steps import (
    GuardedOnce,
    StepCache,
    describe,
    described,
    disk_name,
    global_state,
    trusted,
)
from mistral_ref.cache import KVCache
from mistral_ref.config import ModelArgs, MoeArgs
from mistral_ref.generation import generate

pytestmark = pytest.mark.usefixtures("one_thread")

DENSE = ModelArgs(dim=48, n_layers=3, hidden_dim=96, n_heads=6, n_kv_heads=2, head_dim=8, vocab_size=101,
                  norm_eps=1e-5, rope_theta=1e4, sliding_window=6)
MOE = ModelArgs(dim=32, n_layers=2, hidden_dim=48, n_heads=4, n_kv_heads=1, head_dim=8, vocab_size=89,
                norm_eps=1e-5, rope_theta=1e6, moe=MoeArgs(4, 2))
PROMPTS = [[1, 5, 9, 2, 7, 3, 4], [8, 6, 2, 2, 5]]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Compiled steps go to a temporary directory, never the user's."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile-cache"))
    return tmp_path / "compile-cache"


def greedy(model, prompts=PROMPTS, max_tokens=9):
    return [r.tokens for r in generate(model, prompts, max_tokens, temperature=0.0)]


def fresh(args=DENSE, dtype=torch.float32):
    torch._dynamo.reset()
    return random_model(args, 0).to(dtype)


def axpy(a, x, y):  # a small function to compile: (n,) -> (n,)
    return a * x + y


def test_describe_tells_apart_what_compiled_code_assumes():
    x = torch.zeros(4, 6)
    assert describe(x) == describe(torch.ones(4, 6))  # values do not matter
    assert describe(x) != describe(torch.zeros(4, 7))  # shapes,
    assert describe(x) != describe(torch.zeros(6, 4).t().contiguous().t()[:4])  # strides,
    assert describe(x) != describe(x.double())  # dtypes
    assert describe(x[1:]) != describe(torch.zeros(3, 6))  # and storage offsets do
    a, b = random_model(DENSE, 0), random_model(DENSE, 1)
    assert describe(a.layers[0]) == describe(b.layers[0])  # weights are inputs: other values, the same code
    b.layers[0].attention.window = 99
    assert describe(a.layers[0]) != describe(b.layers[0])  # a plain attribute is part of the code
    full = dataclasses.replace(DENSE, sliding_window=None)
    c1, c2 = KVCache(full, 1, 16), KVCache(full, 1, 32)
    assert describe(c1.layers[0]) != describe(c2.layers[0])  # a cache of another capacity
    assert describe(c1.layers[0]) == describe(KVCache(full, 1, 16).layers[1])
    with pytest.raises(TypeError, match="cannot describe"):
        describe(object())


def test_a_cache_is_described_once_until_something_in_it_is_replaced(monkeypatch):
    """described(cache): the digest of describe(cache), remembered on the cache until an attribute of the cache or
    of one of its layers is replaced; what compiled code assumes still tells caches apart."""
    full = dataclasses.replace(DENSE, sliding_window=None)
    cache, calls = KVCache(full, 1, 16), []
    real = compiled_steps.describe
    monkeypatch.setattr(compiled_steps, "describe", lambda obj, depth=0: calls.append(depth) or real(obj, depth))
    first = described(cache)
    assert described(cache) == first and calls.count(0) == 1  # the memo: described once
    assert described(KVCache(full, 1, 16)) == first != described(KVCache(full, 1, 32))
    assert described(KVCache(full, 2, 16)) != first  # batch size
    cache.layers[1].k = cache.layers[1].k.double()  # a tensor replaced by another dtype
    second = described(cache)
    assert second != first and calls.count(0) == 5
    cache.layers[1].k = cache.layers[1].k.float()  # replaced again, by an equal layout: the first digest
    assert described(cache) == first and calls.count(0) == 6
    cache.layers[0].rolling = True  # a plain attribute
    assert described(cache) != first
    cache.layers.append(cache.layers[0])  # a layer more
    assert described(cache) != described(KVCache(full, 1, 16))
    assert compiled_steps.MEMO not in repr(real(cache))  # (the memo is not described)


def test_a_saved_step_is_loaded_by_the_next_cache_not_compiled(cache_dir):
    args = (torch.tensor(2.0), torch.arange(5.0), torch.ones(5))
    key = ("axpy", describe(args))
    first = StepCache(cache_dir, backend="eager")
    step = first.get(key, "axpy", axpy, lambda: args)
    assert torch.equal(step(*args), axpy(*args)) and first.summary() == "compiled and saved"
    saved = cache_dir / "steps" / disk_name("axpy", key, "eager")
    assert saved.is_file() and trusted(saved) and (saved.stat().st_mode & 0o777) == 0o600

    second = StepCache(cache_dir, backend="eager")  # a new process would start here
    step = second.get(key, "axpy", axpy, lambda: args)
    assert second.summary() == "loaded" and torch.equal(step(*args), axpy(*args))
    assert disk_name("axpy", key, "inductor") != saved.name  # another backend's code is another file


def test_a_step_checks_its_guards_at_the_first_call_only(cache_dir):
    """dynamo's guards of a saved step run at its first call (a loaded file that does not fit the arguments
    fails there), then the key stands for them: no per-call checks of every argument."""
    args = (torch.tensor(2.0), torch.arange(5.0), torch.ones(5))
    key = ("axpy", describe(args))
    StepCache(cache_dir, backend="eager").get(key, "axpy", axpy, lambda: args)
    step = StepCache(cache_dir, backend="eager").get(key, "axpy", axpy, lambda: args)  # loaded
    assert isinstance(step, GuardedOnce) and not step.checked
    with pytest.raises(RuntimeError, match="[Gg]uard"):  # a mistaken key: the first call's guards catch it
        step(torch.tensor(2.0), torch.arange(6.0), torch.ones(6))
    assert not step.checked
    assert torch.equal(step(*args), axpy(*args)) and step.checked
    assert step.step._guard_check_enabled is False


def test_global_settings_are_part_of_a_steps_key(one_thread):
    """What dynamo's global-state guard checks (threads, default dtype, deterministic algorithms, autocast) is in
    every key: another setting compiles another step instead of failing a guard."""
    before = global_state()
    torch.set_num_threads(2)
    try:
        assert global_state() != before
    finally:
        torch.set_num_threads(1)
    with torch.autocast("cpu"):
        assert global_state() != before
    torch.set_default_dtype(torch.float64)
    try:
        assert global_state() != before
    finally:
        torch.set_default_dtype(torch.float32)
    assert global_state() == before


def test_a_file_others_can_write_or_a_damaged_one_is_never_loaded(cache_dir, caplog):
    args = (torch.tensor(2.0), torch.arange(5.0), torch.ones(5))
    key = ("axpy", describe(args))
    StepCache(cache_dir, backend="eager").get(key, "axpy", axpy, lambda: args)
    saved = cache_dir / "steps" / disk_name("axpy", key, "eager")
    saved.chmod(0o666)  # writable by anyone: someone else's code could be in it
    assert not trusted(saved)
    again = StepCache(cache_dir, backend="eager")
    again.get(key, "axpy", axpy, lambda: args)
    assert again.summary() == "compiled and saved" and trusted(saved)  # replaced by this user's own file

    saved.write_bytes(b"not a compiled step")
    damaged = StepCache(cache_dir, backend="eager")
    with caplog.at_level(logging.WARNING, logger="mistral_ref.compile"):
        step = damaged.get(key, "axpy", axpy, lambda: args)
    assert "could not load" in caplog.text and str(saved) in caplog.text
    assert damaged.summary() == "compiled and saved" and torch.equal(step(*args), axpy(*args))


def test_a_step_that_fails_to_compile_stays_eager_and_says_why(cache_dir, caplog):
    def bad(x):
        raise ValueError("no such step")

    steps = StepCache(cache_dir, backend="eager")
    with caplog.at_level(logging.WARNING, logger="mistral_ref.compile"):
        assert steps.get(("bad",), "bad", bad, lambda: (torch.ones(2),)) is None
    assert "no such step" in steps.failed[("bad",)] and "runs eagerly" in caplog.text
    assert steps.get(("bad",), "bad", bad, lambda: (torch.ones(2),)) is None  # not tried again


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["regional", "full"])
def test_a_second_start_loads_every_decode_step_it_needs(mode, cache_dir):
    """Compile, then "restart" (dynamo reset, a new CompiledDecode on another model object of the same shape):
    the same request's steps all come from the disk, with the same tokens as eager decoding."""
    model = fresh()
    eager = greedy(model)
    compile_decode(model, mode=mode, backend="eager")
    assert greedy(model) == eager
    assert "compiled and saved" in model.compiled_decode.steps.summary()
    assert any((cache_dir / "steps").iterdir())

    model = fresh()
    compile_decode(model, mode=mode, backend="eager")
    assert greedy(model) == eager
    assert model.compiled_decode.steps.summary() == "loaded"


@pytest.mark.slow
@pytest.mark.parametrize("args", [DENSE, MOE], ids=["dense", "moe"])
def test_background_compilation_decodes_eagerly_meanwhile_with_the_same_tokens(args):
    """background=True: the first decode steps run eagerly while a worker thread compiles (a batch of two rows:
    the MoE model's dispatch of several tokens is a graph break, compiled in memory only); after wait(), the
    compiled steps give the same tokens."""
    model = fresh(args)
    eager = greedy(model)
    compile_decode(model, backend="eager", background=True)
    assert greedy(model) == eager  # steps run eagerly, compiled, or some of each: the same tokens
    steps = model.compiled_decode.steps
    assert steps.wait(timeout=120) and not steps.failed and steps.steps
    assert greedy(model) == eager
    if args.moe:
        assert "compiled (in memory)" in steps.summary()


def test_background_and_freeze_do_not_mix():
    with pytest.raises(ValueError, match="background"):
        compile_decode(fresh(), mode="full", freeze=True, background=True)


def test_arguments_sharing_memory_run_eagerly():
    """Compiled code assumes distinct inputs (dynamo's guard would refuse the call): tokens and positions given as
    one tensor take the eager step, with the eager logits."""
    model = fresh()
    compile_decode(model, mode="full", backend="eager")
    with torch.inference_mode():
        zeros = torch.zeros(1, 1, dtype=torch.long)
        logits = model(zeros, zeros, KVCache(DENSE, 1, 16))
        assert not model.compiled_decode.steps.steps  # nothing compiled for the aliased call
        eager = model.forward_with(model.ops, zeros, zeros.clone(), KVCache(DENSE, 1, 16))
    assert torch.equal(logits, eager)


QUANTIZABLE = ModelArgs(dim=64, n_layers=2, hidden_dim=128, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=96,
                        norm_eps=1e-5, rope_theta=1e4)
QUANTIZABLE_MOE = dataclasses.replace(QUANTIZABLE, moe=MoeArgs(4, 2))


@pytest.mark.slow
@pytest.mark.parametrize("args", [QUANTIZABLE, QUANTIZABLE_MOE], ids=["dense", "moe"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_quantized_model_compiles_with_its_weight_only_kernels(scheme, args):
    """compile_decode on an int8 / int4 bf16 model: the compiled step calls the weight-only kernels, as eager
    decoding does (a one-row bf16 product of a dense weight is multiply-and-sum; a quantized one is not), and its
    logits agree with eager's to bf16's rounding (greedy tokens may part at a near-tie: bf16 rounds differently
    in the compiled attention and RoPE, as for dense bf16 models).  With the C kernels a quantized MoE step is one
    graph too (the chosen quantized experts are an operator's inputs), so it is saved like a dense one."""
    from mistral_ref.quantize import quantize_model

    model = quantize_model(fresh(args, torch.bfloat16), scheme, group_size=32)

    def step():
        with torch.inference_mode():
            cache = KVCache(args, 1, 256, torch.bfloat16)
            model(torch.tensor([PROMPTS[0]]), None, cache)
            return model(torch.tensor([[3]]), torch.tensor([[7]]), cache)

    eager = step()
    compile_decode(model, backend="aot_eager")
    compiled = step()
    whole = args.moe is None or cpu_gemv.library() is not None  # (without the kernels: a graph break per MoE)
    summary = model.compiled_decode.steps.summary()
    assert summary == ("compiled and saved" if whole else "compiled (in memory)")
    assert not model.compiled_decode.steps.failed
    assert rel_err(compiled, eager) < 5e-2  # (tests/test_compile.py allows dense bf16 models the same)
