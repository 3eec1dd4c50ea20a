"""backends/huge_pages.py: weights moved onto one mapping advised for huge pages keep their values, objects,
sharing and trainability; decoding with them gives the same logits bitwise."""

from __future__ import annotations

import copy
import dataclasses
import mmap

import pytest
import torch
from model_helpers import random_model

from mistral_ref.backends import huge_pages
from mistral_ref.backends.moe import stack_all_experts
from mistral_ref.cache import KVCache
from mistral_ref.checkpoint import load_model, save_checkpoint
from mistral_ref.config import ModelArgs, MoeArgs
from mistral_ref.quantize import quantize_model

DENSE = ModelArgs(dim=96, n_layers=2, hidden_dim=160, n_heads=6, n_kv_heads=2, head_dim=32, vocab_size=320,
                  norm_eps=1e-5, rope_theta=1e4, sliding_window=12)
MOE = dataclasses.replace(DENSE, moe=MoeArgs(num_experts=4, num_experts_per_tok=2))


@pytest.fixture(autouse=True)
def movable(monkeypatch):
    """The moving is tested wherever madvise exists (the kernel's THP setting only decides the page size)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        pytest.skip("no madvise(MADV_HUGEPAGE) on this platform")
    monkeypatch.setattr(huge_pages, "available", lambda: None)


def in_arena(model, t: torch.Tensor) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return any(start <= ptr < end for start, end in model.__dict__[huge_pages.ARENAS])


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_weights_move_with_their_values_and_objects():
    model = random_model(DENSE).to(torch.bfloat16)
    before, params = snapshot(model), dict(model.named_parameters())
    moved = huge_pages.place(model, min_bytes=0)
    assert moved >= sum(p.numel() * p.element_size() for p in model.parameters())
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    for name, value in model.state_dict().items():
        assert value.dtype == before[name].dtype and torch.equal(value, before[name]), name
    assert all(in_arena(model, p) for p in model.parameters())
    arena = model.__dict__[huge_pages.ARENAS][0]
    assert model.layers[0].attention.wq.weight.data_ptr() % 64 == 0 and arena[0] <= arena[1]
    assert huge_pages.place(model, min_bytes=0) == 0  # nothing left to move


def test_small_models_shared_memory_and_the_switch_move_nothing(monkeypatch):
    model = random_model(DENSE)
    assert huge_pages.place(model) == 0  # under 2 MB of weights: not worth a mapping
    shared = random_model(DENSE).share_memory()  # other processes may read it: left where it is
    assert huge_pages.place(shared, min_bytes=0) == 0 and all(p.is_shared() for p in shared.parameters())
    monkeypatch.undo()
    monkeypatch.setenv(huge_pages.SWITCH, "0")
    assert huge_pages.available() == f"{huge_pages.SWITCH}=0"
    assert huge_pages.place(model, min_bytes=0) == 0


@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
def test_shared_storage_stays_shared(scheme):
    """Stacked experts: every expert's weight views its stack; after the move they view the new one."""
    model = random_model(MOE)
    if scheme:
        quantize_model(model, scheme)
    stack_all_experts(model)
    before = snapshot(model)
    huge_pages.place(model, min_bytes=0)
    for layer in model.layers:
        ff = layer.feed_forward
        stacks = [s if isinstance(s, torch.Tensor) else s.qweight for s in ff.stacked]
        for stack in stacks:
            assert in_arena(model, stack)
        codes = [e.w1.weight if scheme is None else e.w1.weight.qweight for e in ff.experts]
        for e, code in enumerate(codes):
            assert code.untyped_storage().data_ptr() == stacks[0].untyped_storage().data_ptr()
            assert torch.equal(code, stacks[0][e])
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_decoding_is_bitwise_the_same():
    twin = random_model(MOE).to(torch.bfloat16)
    model = copy.deepcopy(twin)
    assert huge_pages.place(model, min_bytes=0) > 0

    def decode(m):
        cache = KVCache(MOE, 1, 48, m.dtype, "cpu")
        out, logits = m(torch.arange(5)[None] + 7, torch.arange(5)[None], cache), []
        with torch.inference_mode():
            for i in range(20):  # past the window of 12
                out = m(out[:, -1].argmax(-1, keepdim=True), torch.tensor([[5 + i]]), cache)
                logits.append(out)
        return torch.cat(logits)

    with torch.inference_mode():
        assert torch.equal(decode(model), decode(twin))


def test_moved_weights_train_and_save(tmp_path):
    model = random_model(DENSE)
    huge_pages.place(model, min_bytes=0)
    loss = model(torch.arange(6)[None]).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.layers[0].parameters())
    save_checkpoint(model, tmp_path / "m", format="hf")  # safetensors: no shared tensors to refuse
    again = load_model(tmp_path / "m")
    for name, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name


@pytest.mark.skipif(huge_pages.available() is not None, reason=f"huge pages: {huge_pages.available()}")
def test_the_mapping_is_advised_for_huge_pages():
    """The kernel marks the mapping eligible (its smaps entry), whatever pages it could find at the time."""
    model = random_model(dataclasses.replace(DENSE, dim=512, hidden_dim=2048, n_layers=1, head_dim=64))  # 20 MB
    assert huge_pages.place(model) > 4 * huge_pages.HUGE_PAGE
    start, end = model.__dict__[huge_pages.ARENAS][0]
    entry, lines = None, open("/proc/self/smaps").read().splitlines()
    for i, line in enumerate(lines):
        lo, hi = (int(a, 16) for a in line.split()[0].split("-")) if "-" in line.split()[0] else (0, 0)
        if lo <= start < hi and not line.split()[0].endswith(":"):
            entry = lines[i:i + 30]
            break
    assert entry is not None
    assert any(line.startswith("THPeligible:") and line.split()[1] == "1" for line in entry)
