"""Sampling semantics on hand-made logits: greedy, temperature before top_p, the crossing token, penalties,
seeds, processors and parameter validation."""

from __future__ import annotations

import math

import pytest
import torch

from mistral_ref.request_spec import GREEDY_BELOW
from mistral_ref.sampling import (
    GenerationParamError,
    Sampler,
    SamplingParams,
    apply_penalties,
    argmax,
    is_greedy,
    sample,
    sampling_probs,
    top_p_filter,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: threads only fight over the shared cores
    yield
    torch.set_num_threads(n)


def logits_of(probs: list[float]) -> torch.Tensor:
    """(1, V) logits whose softmax is `probs`."""
    return torch.tensor([probs]).log()


# ---- greedy and temperature --------------------------------------------------------------------------------
def test_temperature_zero_is_argmax_and_ignores_top_p() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [5.0, 0.0, 0.0, 0.0]])
    assert sample(logits, 0.0).tolist() == [1, 0]
    assert sample(logits, 0.0, top_p=0.01).tolist() == [1, 0]


def test_greedy_argmax_is_torch_argmax_exactly() -> None:
    """sampling.argmax (numpy's on a CPU) gives torch.argmax's indices: random rows, ties (the first maximum),
    NaN (the first NaN), rows of -inf, +inf, a strided view, bf16 and fp16 (converted to fp32 first), fp64
    (torch's own), and int64 (B,) on the CPU."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 32000, generator=g)
    x[1, [7, 99, 31000]] = 50.0  # a tie: the first
    x[2, [5, 400]] = float("nan")  # NaN wins, the first one
    x[3] = float("-inf")
    x[4, [3, 9]] = float("inf")
    cases = [x, x[:, ::3], x[1:2], torch.zeros(2, 7), x.bfloat16(), x.bfloat16()[:, ::3], x.half(), x.double()]
    for logits in cases:
        got = argmax(logits)
        assert got.dtype == torch.int64 and torch.equal(got, logits.argmax(dim=-1)), logits.shape
    assert sample(x, 0.0).tolist() == x.argmax(-1).tolist()


def test_temperature_scales_logits() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    for t in (0.25, 1.0, 2.0):
        want = torch.softmax(logits / t, -1)
        torch.testing.assert_close(sampling_probs(logits, t, 1.0), want)


def test_a_temperature_too_small_to_divide_by_is_greedy() -> None:
    """Below 2**-126 (GREEDY_BELOW) a temperature is greedy like 0; above it, logits are shifted by their maximum
    before the division, so nothing overflows however small the temperature (1e-40 used to give NaN probabilities
    and a RuntimeError from torch.multinomial: an HTTP 500)."""
    logits = torch.tensor([[1000.0, 999.0, -3e5, 998.0], [0.0, 1.0, 0.5, -1.0]])
    g = torch.Generator().manual_seed(0)
    for t in (1e-40, 5e-324, GREEDY_BELOW / 2):
        assert is_greedy(t) and SamplingParams(temperature=t).greedy
        assert sample(logits, t, generator=g).tolist() == [0, 1]
        assert sampling_probs(logits, t, 0.5).tolist() == [[1, 0, 0, 0], [0, 1, 0, 0]]
    for t in (GREEDY_BELOW, 1e-37, 1e-30):  # sampled, and as one-hot as greedy: 1000 / 1e-37 would overflow fp32
        assert not is_greedy(t)
        probs = sampling_probs(logits, t, 1.0)
        assert torch.isfinite(probs).all() and probs.tolist() == [[1, 0, 0, 0], [0, 1, 0, 0]]
        assert sample(logits, t, generator=g).tolist() == [0, 1]
    s = Sampler(SamplingParams(temperature=1e-40, seed=0), 2, 4, logits_processors=[lambda g, x: x])
    assert s(logits, torch.zeros(2, 0, dtype=torch.long)).tolist() == [0, 1]


# ---- top_p -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("top_p", "kept"), [
    (0.1, {2}),  # the most likely token is always kept
    (0.5, {2}),  # 0.5 alone reaches 0.5 exactly: the smallest set is {0.5}
    (0.6, {2, 0}),  # 0.5 < 0.6: the 0.25 token crosses 0.6 and is kept
    (0.75, {2, 0}),  # 0.5 + 0.25 reaches 0.75 exactly
    (0.8, {2, 0, 3}),  # 0.75 < 0.8: one of the 0.125 tokens crosses and is kept
    (1.0, {0, 1, 2, 3}),
])
def test_top_p_keeps_the_smallest_set_reaching_p_with_the_crossing_token(top_p: float, kept: set) -> None:
    probs = torch.tensor([[0.25, 0.125, 0.5, 0.125]])  # dyadic: every prefix sum is exact in fp32
    out = top_p_filter(probs, top_p)
    got = set(out[0].nonzero()[:, 0].tolist())
    if top_p == 0.8:  # the two 0.125 tokens tie: exactly one of them crosses
        assert len(got) == 3 and {0, 2} <= got
    else:
        assert got == kept
    assert torch.equal(out[0, list(got)], probs[0, list(got)])  # kept tokens keep their probability


def test_top_p_is_applied_after_temperature() -> None:
    """logits (2, 1, 0), top_p 0.85.  At temperature 1 the probabilities are (.665, .245, .090): two tokens
    reach 0.85.  At temperature 2 they are (.506, .307, .186): all three are needed.  Applying top_p before
    the temperature would keep two tokens in both cases."""
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    assert (sampling_probs(logits, 1.0, 0.85) > 0).sum() == 2
    assert (sampling_probs(logits, 2.0, 0.85) > 0).sum() == 3
    assert (sampling_probs(logits, 0.1, 0.85) > 0).sum() == 1


def test_sampling_probs_renormalise_the_nucleus() -> None:
    probs = sampling_probs(logits_of([0.5, 0.3, 0.2]), 1.0, 0.7)
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0.0]]))


def test_draws_follow_the_filtered_distribution() -> None:
    logits = logits_of([0.4, 0.3, 0.2, 0.1]).expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    ids = sample(logits, 1.0, top_p=0.65, generator=g)  # keeps 0.4 and the crossing 0.3
    freq = torch.bincount(ids, minlength=4).float() / len(ids)
    assert freq[2] == 0 and freq[3] == 0
    assert abs(freq[0] - 4 / 7) < 0.015 and abs(freq[1] - 3 / 7) < 0.015  # 4 sigma is about 0.014


# ---- penalties ---------------------------------------------------------------------------------------------
def test_penalties_follow_the_openai_formula() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    counts = torch.tensor([[0, 1, 3, 0]])
    out = apply_penalties(logits, counts, presence_penalty=0.5, frequency_penalty=0.25)
    assert out.tolist() == [[1.0, 1.0 - 0.25 - 0.5, 1.0 - 0.75 - 0.5, 1.0]]
    neg = apply_penalties(logits, counts, presence_penalty=-1.0, frequency_penalty=-2.0)  # < 0 encourages
    assert neg.tolist() == [[1.0, 4.0, 8.0, 1.0]]


def test_sampler_counts_only_tokens_of_active_rows() -> None:
    s = Sampler(SamplingParams(temperature=0.0, frequency_penalty=1.0), batch_size=2, vocab_size=4)
    s.observe(torch.tensor([1, 2]), torch.tensor([True, False]))
    s.observe(torch.tensor([1, 3]), torch.tensor([True, True]))
    assert s.counts.tolist() == [[0, 2, 0, 0], [0, 0, 0, 1]]
    logits = torch.tensor([[0.0, 1.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5]])
    # row 0: token 1 drops to -0.5; row 1: token 3 drops to -0.5; the argmax moves to token 0 in both
    assert s(logits, torch.zeros(2, 0, dtype=torch.long)).tolist() == [0, 0]
    assert Sampler(SamplingParams(temperature=0.0), 2, 4).counts is None  # no penalty: no bookkeeping


# ---- seeds -------------------------------------------------------------------------------------------------
def test_seed_makes_sampling_reproducible() -> None:
    logits = torch.randn(3, 1000)
    empty = torch.zeros(3, 0, dtype=torch.long)

    def draws(seed):
        s = Sampler(SamplingParams(temperature=1.0, top_p=0.9, seed=seed), 3, 1000)
        return torch.stack([s(logits, empty) for _ in range(20)]).tolist()

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


# ---- processors --------------------------------------------------------------------------------------------
def test_logits_processor_constrains_the_choice() -> None:
    def only_even(generated: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        logits[:, 1::2] = -math.inf
        return logits

    logits = torch.tensor([[0.0, 9.0, 1.0, 9.0]])
    s = Sampler(SamplingParams(temperature=0.0), 1, 4, logits_processors=[only_even])
    assert s(logits, torch.zeros(1, 0, dtype=torch.long)).tolist() == [2]
    assert logits[0, 1] == 9.0  # the caller's logits are untouched
    hot = Sampler(SamplingParams(temperature=2.0, seed=0), 1, 4, logits_processors=[only_even])
    assert all(hot(logits, torch.zeros(1, 0, dtype=torch.long)).item() in (0, 2) for _ in range(50))


def test_processor_that_forbids_everything_is_an_error() -> None:
    def nothing(generated: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return torch.full_like(logits, -math.inf)

    s = Sampler(SamplingParams(temperature=1.0), 2, 4, logits_processors=[nothing])
    with pytest.raises(ValueError, match="row 0 with no allowed token"):
        s(torch.zeros(2, 4), torch.zeros(2, 0, dtype=torch.long))
    # a finished row may be left with nothing allowed: only active rows must keep a choice
    with pytest.raises(ValueError, match="row 1"):
        s(torch.zeros(2, 4), torch.zeros(2, 0, dtype=torch.long), torch.tensor([False, True]))
    with pytest.raises(GenerationParamError, match=r"logits_processors\[0\] must be callable"):
        Sampler(SamplingParams(), 1, 4, logits_processors=["json"])


# ---- validation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("field", "value", "message"), [
    ("temperature", -0.1, r"temperature must be in \[0, 2\], got -0.1"),
    ("temperature", 2.5, r"temperature must be in \[0, 2\]"),
    ("temperature", float("nan"), "temperature must be a finite number"),
    ("temperature", "hot", "temperature must be a finite number"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\], got 0.0"),
    ("top_p", 1.01, r"top_p must be in \(0, 1\]"),
    ("presence_penalty", 2.5, r"presence_penalty must be in \[-2, 2\]"),
    ("frequency_penalty", -3, r"frequency_penalty must be in \[-2, 2\]"),
    ("seed", 1.5, "seed must be an integer"),
    ("seed", True, "seed must be an integer"),
])
def test_bad_parameters_name_the_parameter_and_its_range(field: str, value, message: str) -> None:
    with pytest.raises(GenerationParamError, match=message):
        SamplingParams(**{field: value})


def test_boundaries_are_accepted() -> None:
    p = SamplingParams(temperature=2, top_p=1, presence_penalty=-2, frequency_penalty=2, seed=0)
    assert p.temperature == 2.0 and isinstance(p.temperature, float)
    assert SamplingParams(temperature=0).greedy
    assert issubclass(GenerationParamError, ValueError)
