"""YaRN frequencies and magnitude (rope.py) and the llama-4 query scaling (attention.py): the plain formulas, checked
by hand and against transformers 5.23's own functions."""

from __future__ import annotations

import math

import pytest
import torch

from mistral_ref.attention import llama4_query_scale
from mistral_ref.config import Llama4Scaling, YarnArgs
from mistral_ref.rope import rope_angles, rope_frequencies, yarn_correction_range, yarn_frequencies


def test_yarn_keeps_fast_pairs_and_slows_down_slow_pairs():
    """Below the correction range a pair keeps its trained frequency, above it the frequency / factor, between a
    linear blend; head_dim 128, theta 1e6, 16x over 16k (Ministral 3)."""
    yarn = YarnArgs(factor=16.0, original_max_position_embeddings=16384, beta=32.0, alpha=1.0)
    low, high = yarn_correction_range(128, 1e6, yarn)
    # pair i turns 16384 / (2 pi theta^(2i/128)) times: 32 times at i = 128 ln(16384 / (64 pi)) / (2 ln 1e6)
    assert low == math.floor(128 * math.log(16384 / (32 * 2 * math.pi)) / (2 * math.log(1e6))) == 20
    assert high == math.ceil(128 * math.log(16384 / (2 * math.pi)) / (2 * math.log(1e6))) == 37
    plain, scaled = rope_frequencies(128, 1e6), yarn_frequencies(128, 1e6, yarn)
    assert torch.equal(scaled[:low + 1], plain[:low + 1])
    assert torch.allclose(scaled[high:], plain[high:] / 16, rtol=1e-6)
    between = scaled[low + 1:high] / plain[low + 1:high]  # falls from 1 to 1/16 with the ramp
    assert (between < 1).all() and (between > 1 / 16).all() and (between.diff() < 0).all()


def test_yarn_magnitude_and_the_table():
    pos = torch.tensor([[-1, 0, 5, 70000]])  # padding is position 0
    yarn = YarnArgs(factor=16.0, original_max_position_embeddings=16384)  # apply_scale: 0.1 ln 16 + 1
    cos, sin = rope_angles(pos, 64, 1e6, yarn)
    assert torch.allclose(cos**2 + sin**2, torch.full_like(cos, (0.1 * math.log(16) + 1) ** 2))
    assert torch.equal(cos[:, 0], cos[:, 1])
    unscaled = rope_angles(pos, 64, 1e6, YarnArgs(16.0, 16384, apply_scale=False))
    assert torch.allclose(unscaled[0] ** 2 + unscaled[1] ** 2, torch.ones_like(cos))
    assert YarnArgs(16.0, 16384, attention_factor=0.5).attention_scaling == 0.5


def test_llama4_query_scale():
    scaling = Llama4Scaling(original_max_position_embeddings=16, beta=0.1)
    pos = torch.tensor([[-1, 0, 15, 16, 31, 32, 47, 160, 16 * 1000]])
    expected = [1, 1, 1, 1 + 0.1 * math.log(2), 1 + 0.1 * math.log(2), 1 + 0.1 * math.log(3),
                1 + 0.1 * math.log(3), 1 + 0.1 * math.log(11), 1 + 0.1 * math.log(1001)]
    out = llama4_query_scale(pos, scaling)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor([expected]), rtol=1e-6)


@pytest.mark.oracle
@pytest.mark.parametrize("head_dim,theta,rope", [
    (128, 1e6, dict(factor=16.0, original_max_position_embeddings=16384, beta_fast=32.0, beta_slow=1.0,
                    mscale=1.0, mscale_all_dim=1.0)),  # Ministral 3
    (32, 1e4, dict(factor=8.0, original_max_position_embeddings=16, beta_fast=1.0, beta_slow=0.1,
                   mscale=1.0, mscale_all_dim=0.0)),  # the parity tests' ramp
    (64, 1e8, dict(factor=48.0, original_max_position_embeddings=8192)),  # defaults: 0.1 ln 48 + 1
    (128, 1e4, dict(factor=4.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                    mscale=0.707, mscale_all_dim=0.5)),  # a ratio of mscales
    (16, 1e4, dict(factor=2.0, original_max_position_embeddings=64, attention_factor=1.3)),
])
def test_yarn_equals_transformers(tmp_path, head_dim, theta, rope):
    """inv_freq and the cos/sin factor equal transformers' _compute_yarn_parameters (through our config parser),
    and the query scale equals Ministral3's get_llama_4_attn_scale."""
    import json

    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.ministral3.modeling_ministral3 import get_llama_4_attn_scale

    from mistral_ref.config import ModelArgs

    rope_parameters = {"rope_type": "yarn", "rope_theta": theta, "llama_4_scaling_beta": 0.1, **rope}
    context = int(rope["factor"] * rope["original_max_position_embeddings"])
    config = transformers.Ministral3Config(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=head_dim,
                                           max_position_embeddings=context, rope_parameters=rope_parameters)
    inv_freq, scaling = ROPE_INIT_FUNCTIONS["yarn"](config)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    args = ModelArgs.from_hf_config(tmp_path)
    assert torch.allclose(yarn_frequencies(head_dim, theta, args.yarn), inv_freq, rtol=1e-6, atol=0)
    assert args.yarn.attention_scaling == pytest.approx(scaling, rel=1e-12)
    pos = torch.arange(0, 40 * rope["original_max_position_embeddings"], 7)[None]
    theirs = get_llama_4_attn_scale(pos, 0.1, rope["original_max_position_embeddings"])[:, 0, :, 0]
    assert torch.allclose(llama4_query_scale(pos, args.llama_4_scaling), theirs, rtol=1e-6)
