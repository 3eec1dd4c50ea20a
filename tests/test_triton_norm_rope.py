"""triton_kernels rms_norm and apply_rotary_emb against the fp32 PyTorch references."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: no GPU on CI machines

import pytest
import torch

from mistral_ref.norm import RMSNorm
from mistral_ref.norm import rms_norm as reference_norm
from mistral_ref.rope import apply_rotary_emb as reference_rope
from mistral_ref.rope import rope_angles
from triton_kernels import apply_rotary_emb, rms_norm
from triton_kernels._common import interpreting

pytestmark = pytest.mark.triton
DEVICE = "cpu" if interpreting() else "cuda"


def reference_rms_norm(x, weight, eps):
    return reference_norm(x.float(), weight.float(), eps)


@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 5, 100), (4, 128)])
def test_rms_norm_fp32(shape):
    g = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(*shape, generator=g) * 3).to(DEVICE)
    weight = torch.randn(shape[-1], generator=g).to(DEVICE)
    out = rms_norm(x, weight, 1e-5)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, reference_rms_norm(x, weight, 1e-5), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
def test_rms_norm_half_precision(dtype, tol):
    x = torch.randn(6, 96, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    weight = (torch.rand(96, generator=torch.Generator().manual_seed(2)) + 0.5).to(DEVICE, dtype)
    out = rms_norm(x, weight, 1e-6)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), reference_rms_norm(x, weight, 1e-6), atol=tol, rtol=tol)


def test_rms_norm_matches_the_module_including_dtype_promotion():
    """An fp32 weight on fp16 activations: the module's result is fp32 (weight * normed.type_as(x))."""
    norm = RMSNorm(40, 1e-5).to(DEVICE)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 40, device=DEVICE).half()
    with torch.no_grad():  # the module's weight requires grad; the kernels are inference-only
        out = rms_norm(x, norm.weight, norm.eps)
        expected = reference_norm(x, norm.weight, norm.eps)
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("B, T, H, D", [(1, 1, 1, 16), (2, 7, 3, 24), (1, 5, 8, 128), (2, 3, 17, 64)])
def test_rope_fp32(B, T, H, D):
    g = torch.Generator().manual_seed(D)
    x = torch.randn(B, T, H, D, generator=g).to(DEVICE)
    positions = torch.randint(0, 5000, (B, T), generator=g).to(DEVICE)
    cos, sin = rope_angles(positions, D, 1e6)
    out = apply_rotary_emb(x, cos, sin)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference_rope(x, cos, sin), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
def test_rope_half_precision(dtype, tol):
    x = torch.randn(2, 6, 4, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    cos, sin = rope_angles(torch.arange(6, device=DEVICE).expand(2, 6), 32, 1e4)
    out = apply_rotary_emb(x, cos, sin)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), reference_rope(x.float(), cos, sin), atol=tol, rtol=tol)


def test_rope_strided_inputs():
    """Strided views: x sliced out of a fused projection, angles broadcast over the batch."""
    B, T, H, D = 2, 5, 4, 32
    fused = torch.randn(B, T, 2 * H * D, device=DEVICE)
    x = fused[..., H * D:].view(B, T, H, D)  # non-contiguous in T
    cos, sin = rope_angles(torch.arange(T, device=DEVICE)[None], D, 1e4)
    cos, sin = cos.expand(B, T, D // 2), sin.expand(B, T, D // 2)  # stride 0 over the batch
    out = apply_rotary_emb(x, cos, sin)
    torch.testing.assert_close(out, reference_rope(x, cos, sin), atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.ones(7, device=DEVICE), 1e-5)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        rms_norm(x.long(), torch.ones(8, device=DEVICE), 1e-5)
    cos, sin = rope_angles(torch.arange(3, device=DEVICE)[None], 8, 1e4)
    with pytest.raises(ValueError, match="D even"):
        apply_rotary_emb(torch.randn(1, 3, 2, 7, device=DEVICE), cos, sin)
    with pytest.raises(ValueError, match="cos and sin"):
        apply_rotary_emb(torch.randn(1, 3, 2, 16, device=DEVICE), cos, sin)
