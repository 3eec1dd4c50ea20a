"""A small Mixtral-shaped model with the Triton backends equals the same model with the torch references."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: no GPU on CI machines

from pathlib import Path

import pytest
import torch

import triton_kernels
from mistral_ref.cache import KVCache
from mistral_ref.config import ModelArgs, MoeArgs
from mistral_ref.model import Transformer
from triton_kernels._common import interpreting

pytestmark = pytest.mark.triton
DEVICE = "cpu" if interpreting() else "cuda"
REPO = Path(__file__).resolve().parents[1]

# GQA (4 query heads over 2 kv heads), head_dim 24 != dim / n_heads and not a power of two, a sliding window
# of 6 keys on even layers and full attention on odd ones, 4 experts with top-2 routing.
ARGS = ModelArgs(dim=64, n_layers=2, hidden_dim=80, n_heads=4, n_kv_heads=2, head_dim=24, vocab_size=97,
                 norm_eps=1e-5, rope_theta=1e4, sliding_window=(6, None), moe=MoeArgs(4, 2))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ARGS).to(DEVICE).eval()
    with torch.no_grad():  # larger weights than the default init: attention and routing far from uniform
        for p in m.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 1.0)
    return m


def test_import_resolves_to_this_repository():
    """triton's repo and a PyPI project also ship an import package called triton_kernels: ours must win."""
    assert Path(triton_kernels.__file__).resolve() == REPO / "triton_kernels" / "__init__.py"
    assert hasattr(triton_kernels, "moe_forward") and hasattr(triton_kernels, "attention")


def test_set_backend_routes_to_the_kernels(model):
    """The kernels registered themselves as the backend "triton"; its MoE kernel reads the model's stacked
    experts (the parameters view the stacks: no second copy of the expert weights)."""
    from triton_kernels import moe as triton_moe

    model.set_backend(attention="triton", moe="triton")
    try:
        assert model.ops.attention is triton_kernels.attention
        assert model.ops.moe is triton_kernels.moe_forward
        for layer in model.layers:
            w1, w2, w3 = layer.feed_forward.stacked
            assert all(e.w1.weight.data_ptr() == w1[i].data_ptr() for i, e in enumerate(layer.feed_forward.experts))
        triton_moe.clear_stack_cache()
        with torch.no_grad():
            model(torch.randint(0, ARGS.vocab_size, (1, 5), device=DEVICE))
        assert not triton_moe._STACKED  # nothing stacked a second time
        model.set_backend("triton")
        assert model.ops.rms_norm is triton_kernels.rms_norm and model.ops.name == "triton"
    finally:
        model.set_backend()


def forward(model, backend, tokens, positions=None):
    model.set_backend(backend)
    try:
        with torch.no_grad():
            return model(tokens, positions)
    finally:
        model.set_backend()


def test_forward_logits_match(model):
    """A prompt longer than the window, plus a ragged row (left padding at position -1)."""
    tokens = torch.randint(0, ARGS.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    positions = torch.arange(13, device=DEVICE).repeat(2, 1)
    positions[1] = torch.arange(13, device=DEVICE) - 4
    positions[1, :4] = -1
    ref = forward(model, "torch", tokens, positions)
    out = forward(model, "triton", tokens, positions)
    assert rel_err(out, ref) < 1e-5
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def greedy(model, backend, prompt, chunks, steps):
    """Chunked prefill into a KV cache (rolling on the windowed layer), then greedy cached decode."""
    model.set_backend(backend)
    B, T = prompt.shape
    cache = KVCache(ARGS, B, T + steps, dtype=torch.float32, device=DEVICE)
    all_logits, tokens = [], []
    try:
        with torch.no_grad():
            start = 0
            for size in chunks:
                pos = torch.arange(start, start + size, device=DEVICE).expand(B, size)
                logits = model(prompt[:, start:start + size], pos, cache)
                start += size
            all_logits.append(logits[:, -1])
            for step in range(steps):
                nxt = all_logits[-1].argmax(-1, keepdim=True)  # (B, 1)
                tokens.append(nxt)
                pos = torch.full((B, 1), T + step, device=DEVICE)
                all_logits.append(model(nxt, pos, cache)[:, -1])
    finally:
        model.set_backend()
    return torch.cat(tokens, 1), torch.stack(all_logits, 1)


@pytest.mark.slow
def test_cached_greedy_decode_matches(model):
    prompt = torch.randint(0, ARGS.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    ref_tokens, ref_logits = greedy(model, "torch", prompt, chunks=(5, 4), steps=6)  # 15 positions > window 6
    tokens, logits = greedy(model, "triton", prompt, chunks=(5, 4), steps=6)
    assert torch.equal(tokens, ref_tokens)
    assert rel_err(logits, ref_logits) < 1e-5


def test_kernels_refuse_to_run_where_gradients_are_needed(model):
    """No backward exists: a training-mode call must fail loudly instead of returning gradient-less outputs."""
    tokens = torch.zeros(1, 3, dtype=torch.long, device=DEVICE)
    model.set_backend(attention="triton", moe="triton")
    try:
        with pytest.raises(RuntimeError, match="inference-only"):
            model(tokens)
    finally:
        model.set_backend()
