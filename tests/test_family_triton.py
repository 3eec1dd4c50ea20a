"""The Triton backend on a Ministral-3-like model: YaRN (its cos/sin table with the blending ramp and the magnitude
factor), the llama-4 query scaling, tied embeddings and interleaved windows, against the reference backend.

Nothing in the kernels knows of these: YaRN lives in the rope table (rope.rope_angles) the RoPE kernel multiplies by,
the query scaling is plain math before the attention kernel, and each layer passes its own window."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: no GPU on CI machines

import pytest
import torch

from mistral_ref.cache import KVCache
from mistral_ref.config import Llama4Scaling, ModelArgs, YarnArgs
from mistral_ref.model import Transformer
from triton_kernels._common import interpreting

pytestmark = pytest.mark.triton
DEVICE = "cpu" if interpreting() else "cuda"

# original context 4: positions 0..14 reach floor(p / 4) = 3 (query scale 1 + 0.2 ln 4); a 6-key window on odd
# layers, full attention on even ones; YaRN blends pairs 1..6 of 8 and scales cos/sin by 0.1 ln 4 + 1
ARGS = ModelArgs(dim=32, n_layers=2, hidden_dim=48, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=61,
                 norm_eps=1e-5, rope_theta=1e4, sliding_window=(None, 6), tied_embeddings=True,
                 yarn=YarnArgs(factor=4.0, original_max_position_embeddings=4, beta=1.0, alpha=0.1),
                 llama_4_scaling=Llama4Scaling(original_max_position_embeddings=4, beta=0.2))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ARGS).to(DEVICE).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 1.0)
    return m


def run(model, backend, fn):
    model.set_backend(backend)
    try:
        with torch.no_grad():
            return fn()
    finally:
        model.set_backend()


def test_forward_matches_the_reference(model):
    """A ragged batch longer than the window, past the original context."""
    tokens = torch.randint(0, ARGS.vocab_size, (2, 15), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    positions = torch.arange(15, device=DEVICE).repeat(2, 1)
    positions[1] = torch.arange(15, device=DEVICE) - 3
    positions[1, :3] = -1
    ref = run(model, "reference", lambda: model(tokens, positions))
    out = run(model, "triton", lambda: model(tokens, positions))
    assert rel_err(out, ref) < 1e-5
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_cached_decode_matches_the_reference(model):
    """Chunked prefill into the cache (a rolling buffer on the window layer), then decode steps one by one."""
    prompt = torch.randint(0, ARGS.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def steps():
        cache = KVCache(ARGS, 2, 14, device=DEVICE)
        out = [model(prompt[:, :5], torch.arange(5, device=DEVICE).expand(2, 5), cache),
               model(prompt[:, 5:], torch.arange(5, 9, device=DEVICE).expand(2, 4), cache)]
        token = out[-1][:, -1:].argmax(-1)
        for p in range(9, 14):
            out.append(model(token, torch.full((2, 1), p, device=DEVICE), cache))
            token = out[-1][:, -1:].argmax(-1)
        return torch.cat(out, dim=1)

    ref = run(model, "reference", steps)
    out = run(model, "triton", steps)
    assert rel_err(out, ref) < 1e-5
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
