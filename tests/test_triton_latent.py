"""triton_kernels.latent_decode (latent attention's decode step in latent space, over the latent cache) against
the fp32 reference mistral_ref.mla.latent_attention: random shapes, ragged caches, padding queries, split-K; and
the "triton" backend on a tiny Small-4-shaped model (latent attention + fine-grained experts)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: no GPU on CI machines

import random

import pytest
import torch

from mistral_ref.mla import latent_attention as reference_latent_attention
from triton_kernels._common import interpreting
from triton_kernels.latent_decode import latent_attention, latent_decode_attention

pytestmark = pytest.mark.triton
DEVICE = "cpu" if interpreting() else "cuda"


def make_inputs(B, S, H, n, r, v, c, seed=0, dtype=torch.float32):
    """One query per row over a ragged latent cache: row b holds S - 3b tokens, then empty slots; the last row's
    query is padding (position -1) when B > 2."""
    g = torch.Generator().manual_seed(seed)
    q_nope, q_rope = torch.randn(B, 1, H, n, generator=g), torch.randn(B, 1, H, r, generator=g)
    latents, k_rope = torch.randn(B, S, c, generator=g), torch.randn(B, S, r, generator=g)
    kv_b = torch.randn(H * (n + v), c, generator=g) * c**-0.5
    lengths = [max(1, S - 3 * b) for b in range(B)]
    k_pos = torch.full((B, S), -1)
    q_pos = torch.zeros(B, 1, dtype=torch.long)
    for b, length in enumerate(lengths):
        k_pos[b, :length] = torch.arange(length)
        q_pos[b, 0] = length - 1
    if B > 2:
        q_pos[-1, 0] = -1
    cast = [t.to(DEVICE, dtype) for t in (q_nope, q_rope, latents, k_rope, kv_b)]
    return (*cast, v, q_pos.to(DEVICE), k_pos.to(DEVICE), 0.37)


def check(args, tol=1e-5, **kernel_options):
    q_nope, q_rope, latents, k_rope, kv_b, v, q_pos, k_pos, scale = args
    f32 = [t.float().cpu() for t in (q_nope, q_rope, latents, k_rope, kv_b)]
    ref = reference_latent_attention(*f32, v, q_pos.cpu(), k_pos.cpu(), scale)
    if kernel_options:  # the kernel itself, with its tiles and splits chosen
        H, n = q_nope.shape[2], q_nope.shape[3]
        w = kv_b.view(H, n + v, -1)
        q_latent = torch.einsum("bhn,hnc->bhc", q_nope[:, 0], w[:, :n])
        o = latent_decode_attention(q_latent, q_rope[:, 0], latents, k_rope, q_pos, k_pos, scale, **kernel_options)
        out = torch.einsum("bhc,hvc->bhv", o, w[:, n:])[:, None]
    else:
        out = latent_attention(q_nope, q_rope, latents, k_rope, kv_b, v, q_pos, k_pos, scale)
    assert out.shape == ref.shape and out.dtype == q_nope.dtype
    assert torch.isfinite(out).all(), "kernel left unwritten (NaN-poisoned) or non-finite elements"
    err = ((out.float().cpu() - ref).abs().max() / ref.abs().max()).item()
    assert err <= tol, err
    return out


@pytest.mark.parametrize("B, S, H, n, r, v, c", [
    (1, 1, 1, 4, 4, 4, 8),  # one token, one head
    (3, 37, 5, 6, 4, 5, 24),  # ragged rows, a padding query, odd sizes
    (2, 70, 20, 8, 8, 6, 32),  # more heads than one block of 16
])
def test_latent_decode_equals_the_reference(B, S, H, n, r, v, c):
    check(make_inputs(B, S, H, n, r, v, c))


@pytest.mark.parametrize("num_splits", [2, 5])
def test_split_k_and_tile_skipping(num_splits):
    """Splits of 16 keys: some splits of the short rows see only empty slots (their tiles are skipped and the
    merge weighs them 0)."""
    check(make_inputs(3, 64, 4, 8, 4, 8, 16, seed=1), block_n=16, num_splits=num_splits)


def test_padding_query_gets_the_uniform_average():
    args = make_inputs(3, 20, 2, 4, 4, 4, 16, seed=2)
    out = check(args, block_n=16, num_splits=2)
    latents, kv_b = args[2], args[4]
    uniform = torch.einsum("c,hvc->hv", latents[2].mean(0), kv_b.view(2, 8, 16)[:, 4:])
    torch.testing.assert_close(out[2, 0], uniform, atol=1e-5, rtol=1e-5)


def test_latent_decode_seeded_sweep():
    rng = random.Random(5)
    for case in range(3):
        B, S, H = rng.randint(1, 4), rng.randint(1, 50), rng.randint(1, 18)
        n, r, v, c = rng.randint(1, 9), rng.choice([2, 4, 8]), rng.randint(1, 9), rng.randint(4, 40)
        check(make_inputs(B, S, H, n, r, v, c, seed=case), block_n=16, num_splits=rng.randint(1, 3))


def test_half_precision_is_close():
    check(make_inputs(2, 30, 4, 8, 8, 8, 32, seed=3, dtype=torch.bfloat16), tol=3e-2)


def test_prefill_chunks_take_the_torch_form():
    """T > 1 is not the kernel's: latent_attention gives the expanded form's answer."""
    g = torch.Generator().manual_seed(4)
    B, T, S, H, n, r, v, c = 2, 5, 9, 3, 4, 4, 4, 8
    q_nope, q_rope = torch.randn(B, T, H, n, generator=g), torch.randn(B, T, H, r, generator=g)
    latents, k_rope, kv_b = torch.randn(B, S, c, generator=g), torch.randn(B, S, r, generator=g), torch.randn(
        H * (n + v), c, generator=g)
    q_pos, k_pos = torch.arange(S - T, S).expand(B, T), torch.arange(S).expand(B, S)
    args = (q_nope, q_rope, latents, k_rope, kv_b, v, q_pos, k_pos, 0.5)
    out = latent_attention(*(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args))
    torch.testing.assert_close(out.cpu(), reference_latent_attention(*args), atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(2, 3, 8, device=DEVICE)
    qr, lat, kr = torch.randn(2, 3, 4, device=DEVICE), torch.randn(2, 5, 8, device=DEVICE), torch.randn(
        2, 5, 4, device=DEVICE)
    qp, kp = torch.zeros(2, 1, dtype=torch.long, device=DEVICE), torch.zeros(2, 5, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="shapes do not agree"):
        latent_decode_attention(q, qr, lat[:, :, :6], kr, qp, kp, 1.0)
    with pytest.raises(ValueError, match=r"q_pos must be \(B, 1\)"):
        latent_decode_attention(q, qr, lat, kr, qp[:, 0], kp, 1.0)
    with pytest.raises(TypeError, match="share one dtype"):
        latent_decode_attention(q, qr, lat.half(), kr, qp, kp, 1.0)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        latent_decode_attention(q, qr, lat, kr, qp, kp, 1.0, block_n=24)


def test_triton_backend_on_a_small4_shaped_model():
    """Latent attention (the decode kernel, the torch prefill) and fine-grained experts (the MoE kernels given
    route_fine's choice) in a model: chunked prefill, then decode steps, equal the reference backend."""
    from test_mla import tiny

    from mistral_ref.cache import KVCache
    from mistral_ref.model import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny("sigmoid", None)).to(DEVICE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    prompt = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def steps():
        cache = KVCache(model.args, 2, 11, device=DEVICE)
        out = [model(prompt[:, :4], torch.arange(4, device=DEVICE).expand(2, 4), cache),
               model(prompt[:, 4:], torch.arange(4, 7, device=DEVICE).expand(2, 3), cache)]
        token = out[-1][:, -1:].argmax(-1)
        for p in range(7, 11):
            out.append(model(token, torch.full((2, 1), p, device=DEVICE), cache))
            token = out[-1][:, -1:].argmax(-1)
        return torch.cat(out, dim=1)

    with torch.no_grad():
        model.set_backend("reference")
        ref = steps()
        model.set_backend("triton")
        assert model.ops.latent_attention is latent_attention and model.layers[1].feed_forward.stacked is not None
        out = steps()
    model.set_backend()
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
