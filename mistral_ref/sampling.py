"""Choosing the next token: the one sampling path used by generation.py, the API and the server.

One step turns the model's raw next-token logits into a token id, in this order:

1. penalties (OpenAI's formula, over the tokens *generated so far*, never the prompt):
   ``logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty``;
2. logits processors (constrained decoding, e.g. the API's JSON mode):
   ``proc(generated_ids, logits) -> logits``, typically setting disallowed tokens to -inf;
3. temperature 0: argmax (greedy; top_p is then irrelevant); so is a temperature below 2**-126, too small to
   divide by in fp32 (request_spec.GREEDY_BELOW);
4. otherwise softmax(logits / temperature) (on the logits minus their maximum, so it cannot overflow), then
   top_p (nucleus) filtering: keep the smallest set of most likely tokens whose probability mass reaches
   top_p, *including* the token that crosses it;
5. draw one token from what is left (``torch.multinomial``; with a seed, from a ``torch.Generator`` seeded for
   this request, so a seed reproduces the same tokens on the same device).

Every tensor here is (B, V): one row per sequence of the batch, V = vocabulary size, logits in fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mistral_ref.request_spec import FIELDS, GREEDY_BELOW, SAMPLING_FIELDS, FieldError, check

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``proc(generated_ids, logits) -> logits``.

generated_ids: (B, n) int64, the tokens each row generated so far (a view: do not modify); logits: (B, V)
fp32, after penalties.  Return the (possibly in-place modified) logits; -inf removes a token.  A stateful
processor (a JSON grammar) can advance its state on ``generated_ids[:, -1]`` at each call.
"""


class GenerationParamError(ValueError):
    """A generation / sampling parameter outside its allowed range; the message names the parameter."""


def _checked(name: str, value: object) -> object:
    """``value`` checked against the request spec's field `name` (type and range), as a GenerationParamError."""
    try:
        return check(name, value)
    except FieldError as e:
        raise GenerationParamError(f"{name} {e.problem}") from None


def is_greedy(temperature: float) -> bool:
    """Temperature 0 is argmax, and so is one too small to divide by in fp32 (request_spec.GREEDY_BELOW)."""
    return temperature < GREEDY_BELOW


@dataclass(frozen=True)
class SamplingParams:
    """The chat-completions sampling parameters, validated on construction against the request spec
    (request_spec.FIELDS: the same types, ranges and defaults as the HTTP API).

    temperature: in [0, 2]; 0 means greedy (argmax), and so does any temperature below GREEDY_BELOW (2**-126).
    The default 0.7 is the Mistral API's usual default.
    top_p: in (0, 1]; nucleus sampling mass (1 = no filtering).
    presence_penalty, frequency_penalty: in [-2, 2] (OpenAI's ranges; positive values discourage repetition).
    seed: an int (64 bits) makes sampling reproducible (a fresh torch.Generator per request); None = torch's
    global RNG.
    """

    temperature: float = FIELDS["temperature"].default
    top_p: float = FIELDS["top_p"].default
    presence_penalty: float = FIELDS["presence_penalty"].default
    frequency_penalty: float = FIELDS["frequency_penalty"].default
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in SAMPLING_FIELDS:
            value = getattr(self, name)
            if name == "seed" and value is None:  # no seed: torch's global RNG
                continue
            object.__setattr__(self, name, _checked(name, value))  # frozen dataclass: normalise in place once

    @property
    def greedy(self) -> bool:
        return is_greedy(self.temperature)

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


# ---- the steps, as pure functions --------------------------------------------------------------------------
def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence_penalty: float,
                    frequency_penalty: float) -> torch.Tensor:
    """OpenAI's repetition penalties.  logits: (B, V) fp32; counts: (B, V) how often each token was generated.

    returns logits - counts * frequency_penalty - (counts > 0) * presence_penalty  (a new tensor).
    """
    counts = counts.to(logits.dtype)
    return logits - counts * frequency_penalty - (counts > 0).to(logits.dtype) * presence_penalty


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the nucleus.  probs: (B, V), rows summing to 1 -> (B, V), NOT renormalised.

    The nucleus is the smallest set of most likely tokens whose mass reaches top_p: a token is kept while
    the mass of the tokens ranked before it is still below top_p, so the token that crosses top_p is kept, and
    so is the most likely token.  top_p = 1 keeps everything (no rounding can cut the tail).
    """
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # exclusive prefix sums (B, V)
    keep_sorted = mass_before < top_p
    keep_sorted[:, 0] = True
    keep = torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)  # back to vocabulary order
    return probs.masked_fill(~keep, 0.0)


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution a token is drawn from: softmax(logits / temperature), then top_p, renormalised.

    logits: (B, V) (after penalties / processors).  returns (B, V) fp32, rows summing to 1.  A greedy
    temperature (is_greedy) gives the one-hot argmax.  The logits are shifted by their row maximum before the
    division, so that however small the temperature, nothing overflows: the best token gets 0, the others
    tend to -inf.
    """
    logits = logits.float()
    if is_greedy(temperature):
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    shifted = logits - logits.amax(dim=-1, keepdim=True)  # (B, V) <= 0
    probs = torch.softmax(shifted / temperature, dim=-1)
    probs = top_p_filter(probs, top_p)
    return probs / probs.sum(dim=-1, keepdim=True)


_NUMPY_ARGMAX = (torch.float32, torch.bfloat16, torch.float16)  # the logits argmax sends through numpy on a CPU


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1): (B, V) -> (B,) int64, the first index of each row's maximum (of its first NaN, if
    any).  Rows on a CPU go through numpy's argmax, the same answer (tests/test_sampling.py): PyTorch's CPU argmax
    reduces one element at a time, numpy's is vectorized (README, "Speed on a CPU"); bf16 and fp16 rows are
    converted to fp32 first (exactly: every bf16 or fp16 value, NaN and infinities included, is an fp32 value)."""
    if logits.device.type == "cpu" and logits.dtype in _NUMPY_ARGMAX and logits.dim() == 2 and not logits.requires_grad:
        values = logits if logits.dtype == torch.float32 else logits.float()
        return torch.from_numpy(values.numpy().argmax(-1).astype(np.int64, copy=False))
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row.  logits: (B, V) -> (B,) int64.  A greedy temperature (0, or below GREEDY_BELOW) is
    argmax (top_p ignored)."""
    if is_greedy(temperature):
        return argmax(logits)
    probs = sampling_probs(logits, temperature, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


# ---- per-request state -------------------------------------------------------------------------------------
class Sampler:
    """The sampling state of one request of B rows: its RNG, token counts for the penalties, its processors.

    Per step: ``ids = sampler(logits, generated, active)`` then ``sampler.observe(ids, active)``.  A step is a
    fixed number of (B, V) operations; nothing grows with the number of tokens generated.
    """

    def __init__(self, params: SamplingParams, batch_size: int, vocab_size: int,
                 device: torch.device | str = "cpu", logits_processors: Sequence[LogitsProcessor] = ()):
        self.params = params
        self.processors = list(logits_processors)
        for i, proc in enumerate(self.processors):
            if not callable(proc):
                raise GenerationParamError(
                    f"logits_processors[{i}] must be callable, got {type(proc).__name__}")
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed % 2**64)
        self.counts = (torch.zeros(batch_size, vocab_size, dtype=torch.int32, device=device)
                       if params.has_penalties else None)  # (B, V) generated-token counts

    def process(self, logits: torch.Tensor, generated: torch.Tensor,
                active: torch.Tensor | None = None) -> torch.Tensor:
        """Penalties, then processors.  -> (B, V) fp32.

        logits: (B, V) fp32 raw; generated: (B, n); active: (B,) bool, the rows still generating (a processor
        that leaves an *active* row without any allowed token is an error).
        """
        p = self.params
        if self.counts is not None:
            logits = apply_penalties(logits, self.counts, p.presence_penalty, p.frequency_penalty)
        if self.processors:
            logits = logits.clone()  # processors may write in place; never touch the caller's tensor
            for proc in self.processors:
                logits = proc(generated, logits)
            dead = torch.isneginf(logits).all(dim=-1) | torch.isnan(logits).any(dim=-1)  # (B,)
            if active is not None:
                dead &= active
            if bool(dead.any()):
                row = int(dead.nonzero()[0, 0])
                raise ValueError(f"logits processors left row {row} with no allowed token (all -inf or NaN)")
        return logits

    def __call__(self, logits: torch.Tensor, generated: torch.Tensor,
                 active: torch.Tensor | None = None) -> torch.Tensor:
        """Choose the next token of every row.  -> (B,) int64 (arbitrary but valid where not active).

        logits: (B, V) raw next-token logits; generated: (B, n) tokens generated so far; active: (B,) bool.
        """
        logits = self.process(logits, generated, active)
        if active is not None and self.processors and not self.params.greedy:
            # a finished row may be all -inf: make it drawable (its token is ignored anyway)
            logits = logits.masked_fill(~active[:, None], 0.0)
        return sample(logits, self.params.temperature, self.params.top_p, self.generator)

    def observe(self, ids: torch.Tensor, active: torch.Tensor) -> None:
        """Count the tokens just chosen (ids: (B,)) for the rows still generating (active: (B,) bool)."""
        if self.counts is not None:
            self.counts.scatter_add_(1, ids[:, None], active[:, None].to(self.counts.dtype))
