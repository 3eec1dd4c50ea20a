"""The generate loop: prefill the prompts into a KV cache, then decode one token per row per step.

    prompts (ragged) -> right-pad, position -1 on padding -> prefill (at once, or in chunks) -> logits (B, V)
      -> Sampler (penalties, processors, temperature, top_p) -> ids (B,) -> decode step -> logits (B, V) ...

Ragged batches need no special code: every row carries its own absolute positions, padding is position -1, and
the attention masks are built from positions (attention.attention_mask), so a short prompt's row decodes at
its own positions while a longer one is still ahead. A row that produced a stop token is *frozen*: from the
next step on it is fed position -1, so it writes nothing to its cache and its outputs are ignored.

Per decode step the work is a fixed set of tensor operations on (B, 1) inputs and (B, V) logits: the history
is never re-encoded, copied or scanned (penalty counts are updated incrementally; generated ids go into a
buffer preallocated for max_tokens). The KV cache is allocated once, for longest prompt + max_tokens
positions.

Log-probabilities are those of the *model*: log_softmax of the raw logits, before penalties, processors,
temperature and top_p — the teacher-forced score of the token, whatever sampling did.

The server runs many requests through one batch that changes between steps (mistral_ref/scheduler.py); it shares
this module's validation (:func:`check_generation`) and text side (:class:`TextEvents`, the push form of
generate_stream's decoding and stop strings).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

from mistral_ref.cache import KVCache, cache_nbytes
from mistral_ref.request_spec import MAX_TOP_LOGPROBS
from mistral_ref.sampling import GenerationParamError, LogitsProcessor, Sampler, SamplingParams

FinishReason = Literal["stop", "length"]


@dataclass
class GenerationResult:
    """What one prompt produced.

    tokens: the generated ids, *without* the stop token that ended generation (if any).
    finish_reason: "stop" (a stop token, or a stop string in streaming) or "length" (max_tokens reached).
    stop_token_id: the stop token that ended generation (not in `tokens`), else None.
    logprobs: when asked, log p(token) for each entry of `tokens` (natural log, raw model distribution).
    top_logprobs: when asked, per entry of `tokens` the `top_logprobs` most likely (id, logprob) pairs, best
    first.
    """

    tokens: list[int]
    finish_reason: FinishReason
    stop_token_id: int | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass(frozen=True)
class StreamEvent:
    """One event of :func:`generate_stream`.

    Every generated token gives one event (token_id set, `text` the newly released text, possibly ""); the
    stream ends with exactly one event whose token_id is None and whose finish_reason is set ("stop" or
    "length"), carrying any text held back until then.  stop_reason: the stop token id or the stop string
    that ended generation (None for "length").
    """

    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


# ---- validation --------------------------------------------------------------------------------------------
def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise GenerationParamError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise GenerationParamError(f"{name} must be {'in ' * (high is not None)}{allowed}, got {value}")
    return value


def check_prompts(prompts: Sequence[Sequence[int]], max_tokens: int, vocab_size: int,
                  max_seq_len: int | None) -> list[list[int]]:
    """Validate a batch of prompts and return them as lists of ints.

    Raises GenerationParamError for an empty batch or prompt, a non-integer or out-of-vocabulary id, or a
    prompt that with max_tokens exceeds the model's context `max_seq_len` (when the model declares one).
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise GenerationParamError("prompts must be a non-empty list of token-id lists")
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
            raise GenerationParamError(
                f"prompts[{i}] must be a list of token ids, got {type(prompt).__name__}")
        if len(prompt) == 0:
            raise GenerationParamError(f"prompts[{i}] is empty: a prompt needs at least one token (e.g. BOS)")
        ids = [int(t) if isinstance(t, numbers.Integral) and not isinstance(t, bool) else t for t in prompt]
        for j, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                raise GenerationParamError(f"prompts[{i}][{j}] = {t!r} is not a token id of this model "
                                           f"(integers 0..{vocab_size - 1})")
        if max_seq_len is not None and len(ids) + max_tokens > max_seq_len:
            raise GenerationParamError(
                f"prompts[{i}] has {len(ids)} tokens; with max_tokens={max_tokens} that is "
                f"{len(ids) + max_tokens} positions, beyond the model's context max_seq_len={max_seq_len}")
        out.append(ids)
    return out


def _stop_id_set(eos_id: int | None, stop_token_ids: Sequence[int] | None, ignore_eos: bool,
                 vocab_size: int) -> list[int]:
    if isinstance(stop_token_ids, numbers.Integral):
        stop_token_ids = [stop_token_ids]
    if stop_token_ids is not None and not isinstance(stop_token_ids, (Sequence, set, frozenset)):
        raise GenerationParamError(f"stop_token_ids must be a list of token ids, got {type(stop_token_ids).__name__}")
    ids = ([] if eos_id is None else [eos_id]) + list(stop_token_ids or [])
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise GenerationParamError(f"eos_id / stop_token_ids: {t!r} is not a token id of this model "
                                       f"(integers 0..{vocab_size - 1})")
    return [] if ignore_eos else sorted(set(ids))


def _check_logprobs(logprobs: bool, top_logprobs: int) -> None:
    _check_int("top_logprobs", top_logprobs, 0, MAX_TOP_LOGPROBS)
    if top_logprobs and not logprobs:
        raise GenerationParamError("top_logprobs > 0 requires logprobs=True")


def available_bytes(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`: free GPU memory, or the host's MemAvailable (None: unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def allocate_cache(args, batch_size: int, max_seq_len: int, dtype: torch.dtype, device,
                   extra_bytes: int = 0) -> KVCache:
    """The request's KV cache, or a GenerationParamError when it cannot fit in memory.

    Models without a declared context (native params.json rarely has max_seq_len) are bounded only by memory: an
    absurd max_tokens must fail here, clearly, not in the allocator (or the kernel's OOM killer).
    """
    need = cache_nbytes(args, batch_size, max_seq_len, dtype) + extra_bytes  # extra: the caller's own buffers
    free = available_bytes(torch.device(device))
    if free is not None and need > free:
        raise GenerationParamError(
            f"max_tokens: the KV cache for {batch_size} x {max_seq_len} positions (and output buffers) needs "
            f"{need / 2**30:.1f} GiB but "
            f"only {free / 2**30:.1f} GiB is available; lower max_tokens or the batch size")
    return KVCache(args, batch_size, max_seq_len, dtype=dtype, device=device)


# ---- prefill and the step loop -----------------------------------------------------------------------------
def prefill(model: torch.nn.Module, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor,
            chunk_size: int | None = None) -> torch.Tensor:
    """Run the prompts through the model, filling `cache`; return each row's next-token logits.

    tokens: (B, T) right-padded prompts; positions: (B, T) absolute positions, -1 on padding;
    chunk_size: prompt tokens per forward pass (None = all at once; smaller bounds activation memory).
    returns: (B, V) fp32 logits at each row's last prompt position.
    """
    B, T = tokens.shape
    last = positions.argmax(dim=1)  # (B,) column of each row's last prompt token
    step = T if chunk_size is None else chunk_size
    out = None
    for start in range(0, T, step):
        t = min(step, T - start)  # tokens in this chunk
        at = (last - start).clamp(0, t - 1)  # (B,) the column whose logits this chunk must give
        picked = model(tokens[:, start:start + t], positions[:, start:start + t], cache, logits_at=at)[:, 0]  # (B, V)
        here = (last >= start) & (last < start + t)  # (B,) rows ending in this chunk
        out = picked if out is None else torch.where(here[:, None], picked, out)
    return out


class _Step(NamedTuple):
    ids: torch.Tensor  # (B,) the token chosen for each row (meaningless where not active)
    active: torch.Tensor  # (B,) bool: the row was still generating, so ids is a real generated token
    stopped: torch.Tensor  # (B,) bool: active and ids is a stop token (the row is frozen from now on)
    logprob: torch.Tensor | None  # (B,) raw log p(ids)
    top_values: torch.Tensor | None  # (B, k) raw logprobs of the k most likely tokens, best first
    top_ids: torch.Tensor | None  # (B, k)


@torch.inference_mode()
def _steps(model: torch.nn.Module, prompts: list[list[int]], max_tokens: int, sampler: Sampler,
           stop_ids: list[int], logprobs: bool, top_logprobs: int, chunk_size: int | None) -> Iterator[_Step]:
    """Prefill, then yield one _Step per generated position until max_tokens or every row has stopped."""
    device = model.device
    B, lens = len(prompts), [len(p) for p in prompts]
    T = max(lens)
    tokens = torch.zeros(B, T, dtype=torch.long)
    positions = torch.full((B, T), -1, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
        positions[i, : len(p)] = torch.arange(len(p))
    tokens, positions = tokens.to(device), positions.to(device)
    compiled = getattr(model, "compiled_decode", None)  # a compiled step: capacity in a few sizes, no recompiles
    size = T + max_tokens if compiled is None else compiled.capacity(T + max_tokens)
    cache = allocate_cache(model.args, B, size, model.dtype, device, extra_bytes=B * max_tokens * 8)
    logits = prefill(model, cache, tokens, positions, chunk_size)  # (B, V)

    next_pos = torch.tensor(lens, device=device)  # (B,) position of the token fed at the next decode step
    stop, stop_set = torch.tensor(stop_ids, dtype=torch.long, device=device), set(stop_ids)
    active = torch.ones(B, dtype=torch.bool, device=device)
    # Every row still generating, known on the host: until a row stops, a step needs no masking.  (A step's small
    # tensor operations run with the caches cold from the forward pass: each costs tens of microseconds.)
    all_active, no_stop = True, torch.zeros(B, dtype=torch.bool, device=device)
    generated = torch.zeros(B, max_tokens, dtype=torch.long, device=device)  # (B, max_tokens)
    for step in range(max_tokens):
        ids = sampler(logits, generated[:, :step], active)  # (B,)
        if not all_active:
            ids = ids.masked_fill(~active, 0)  # frozen rows feed a harmless id at position -1
        generated[:, step] = ids
        sampler.observe(ids, active)
        hit = bool(stop_set) and not stop_set.isdisjoint(ids.tolist())  # a stop token among the ids
        stopped = active & torch.isin(ids, stop) if hit else no_stop
        lp = top_v = top_i = None
        if logprobs:
            logp = torch.log_softmax(logits, dim=-1)  # (B, V) raw model distribution
            lp = logp.gather(1, ids[:, None])[:, 0]
            if top_logprobs:
                top_v, top_i = logp.topk(top_logprobs, dim=-1)
        yield _Step(ids, active, stopped, lp, top_v, top_i)
        if step == max_tokens - 1:
            return
        if hit:
            active, all_active = active & ~stopped, False
            if not bool(active.any()):
                return
        pos = next_pos + step if all_active else torch.where(active, next_pos + step, -1)  # (B,)
        logits = model(ids[:, None], pos[:, None], cache)[:, -1]  # (B, V)


def _pairs(values: torch.Tensor, ids: torch.Tensor) -> list[tuple[int, float]]:
    return list(zip(ids.tolist(), values.tolist()))


# ---- the public entry points -------------------------------------------------------------------------------
def check_generation(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_tokens: int,
                     eos_id: int | None = None, stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False,
                     logprobs: bool = False, top_logprobs: int = 0, chunk_size: int | None = None
                     ) -> tuple[list[list[int]], list[int]]:
    """Validate a generation request before any work: raises GenerationParamError naming the parameter.

    The one validation path of generate, generate_stream and the server's scheduler (the sampling parameters
    are SamplingParams'). Returns the prompts as lists of ints and the sorted stop-token ids ([] with ignore_eos).
    """
    args = model.args
    max_tokens = _check_int("max_tokens", max_tokens, 1)
    prompt_ids = check_prompts(prompts, max_tokens, args.vocab_size, args.max_seq_len)
    stop_ids = _stop_id_set(eos_id, stop_token_ids, ignore_eos, args.vocab_size)
    _check_logprobs(logprobs, top_logprobs)
    if chunk_size is not None:
        _check_int("chunk_size", chunk_size, 1)
    return prompt_ids, stop_ids


def _checked_steps(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_tokens: int,
                   params: SamplingParams, eos_id: int | None, stop_token_ids: Sequence[int] | None,
                   ignore_eos: bool, logprobs: bool, top_logprobs: int, chunk_size: int | None,
                   logits_processors: Sequence[LogitsProcessor]) -> tuple[list[list[int]], Iterator[_Step]]:
    """Validate one request (check_generation) and return its prompts and step loop."""
    args = model.args
    prompt_ids, stop_ids = check_generation(model, prompts, max_tokens, eos_id, stop_token_ids, ignore_eos,
                                            logprobs, top_logprobs, chunk_size)
    sampler = Sampler(params, len(prompt_ids), args.vocab_size, model.device, logits_processors)
    steps = _steps(model, prompt_ids, max_tokens, sampler, stop_ids, logprobs, top_logprobs, chunk_size)
    return prompt_ids, steps


def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_tokens: int,
    *,
    temperature: float = 0.7,
    top_p: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    seed: int | None = None,
    eos_id: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
    ignore_eos: bool = False,
    logprobs: bool = False,
    top_logprobs: int = 0,
    chunk_size: int | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
) -> list[GenerationResult]:
    """Generate up to `max_tokens` tokens for each prompt of a (ragged) batch.

    model: a mistral_ref Transformer; prompts: B lists of token ids (lengths may differ; include the BOS);
    max_tokens: >= 1, tokens to generate per prompt (the KV cache holds longest prompt + max_tokens slots).
    temperature, top_p, presence_penalty, frequency_penalty, seed: see sampling.SamplingParams.
    eos_id, stop_token_ids: a row stops at the first of these tokens (none by default: this layer knows no
    tokenizer); the stop token is reported in `stop_token_id`, not in `tokens`.
    ignore_eos: ignore eos_id and stop_token_ids, so every row yields exactly max_tokens tokens.
    logprobs / top_logprobs (0..20): also return log p of each chosen token / of the top alternatives, from
    the raw model distribution (before penalties, processors, temperature and top_p).
    chunk_size: prefill the prompts this many tokens at a time (None = in one pass); never changes the output.
    logits_processors: constrained-decoding hooks, see sampling.LogitsProcessor.
    returns: one GenerationResult per prompt, in order.
    """
    params = SamplingParams(temperature, top_p, presence_penalty, frequency_penalty, seed)
    prompt_ids, steps = _checked_steps(model, prompts, max_tokens, params, eos_id, stop_token_ids, ignore_eos,
                                       logprobs, top_logprobs, chunk_size, logits_processors)
    B = len(prompt_ids)
    ids, stopped, lps, top_vs, top_is = [], [], [], [], []
    for s in steps:
        ids.append(s.ids)
        stopped.append(s.stopped)
        if logprobs:
            lps.append(s.logprob)
            if top_logprobs:
                top_vs.append(s.top_values)
                top_is.append(s.top_ids)
    # One transfer at the end: (n_steps, B) -> per-row Python lists.
    ids_rows = torch.stack(ids, 1).tolist()  # (B, n_steps)
    stopped_t = torch.stack(stopped, 1)  # (B, n_steps), at most one True per row
    stop_at = torch.where(stopped_t.any(1), stopped_t.float().argmax(1), -1).tolist()  # (B,)
    lp_rows = torch.stack(lps, 1).tolist() if logprobs else None
    if top_logprobs:
        top_v, top_i = torch.stack(top_vs, 1).cpu(), torch.stack(top_is, 1).cpu()  # (B, n_steps, k)

    results = []
    for i in range(B):
        n = stop_at[i] if stop_at[i] >= 0 else len(ids_rows[i])
        res = GenerationResult(ids_rows[i][:n], "stop" if stop_at[i] >= 0 else "length",
                               ids_rows[i][n] if stop_at[i] >= 0 else None)
        if logprobs:
            res.logprobs = lp_rows[i][:n]
            if top_logprobs:
                res.top_logprobs = [_pairs(top_v[i, t], top_i[i, t]) for t in range(n)]
        results.append(res)
    return results


class StopStrings:
    """Stop-string matching on streamed text, across token boundaries.

    push(delta) returns (text safe to release, matched stop string or None).  Text that could still be the
    start of a stop string is held back until it is resolved; on a match the output is cut right before the
    earliest occurrence.  Work per push is bounded by the stop strings' lengths, not by the text so far.
    """

    def __init__(self, stop: Sequence[str] | None):
        if isinstance(stop, str):
            stop = [stop]
        self.stop = list(stop or [])
        for i, s in enumerate(self.stop):
            if not isinstance(s, str) or not s:
                raise GenerationParamError(f"stop[{i}] must be a non-empty string, got {s!r}")
        self.held = ""

    def push(self, delta: str) -> tuple[str, str | None]:
        buf = self.held + delta
        if not self.stop:
            self.held = ""
            return buf, None
        hits = [(i, s) for s in self.stop if (i := buf.find(s)) >= 0]
        if hits:
            cut, matched = min(hits, key=lambda h: h[0])
            self.held = ""
            return buf[:cut], matched
        keep = 0  # the longest suffix of buf that is a proper prefix of some stop string
        for n in range(min(len(buf), max(map(len, self.stop)) - 1), 0, -1):
            if any(s.startswith(buf[-n:]) for s in self.stop):
                keep = n
                break
        self.held = buf[len(buf) - keep:]
        return buf[: len(buf) - keep], None

    def flush(self) -> str:
        """Release whatever is held back (generation ended without completing a stop string)."""
        out, self.held = self.held, ""
        return out


def generate_stream(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    max_tokens: int,
    *,
    stop: Sequence[str] | str | None = None,
    temperature: float = 0.7,
    top_p: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
    ignore_eos: bool = False,
    logprobs: bool = False,
    top_logprobs: int = 0,
    chunk_size: int | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    continue_prompt_text: bool = False,
) -> Iterator[StreamEvent]:
    """Stream the generation of one prompt as text, token by token (see StreamEvent).

    continue_prompt_text: decode the output as the continuation of the prompt's text (raw completion), so
    SentencePiece keeps the space that begins the first generated piece; then the texts concatenate to
    decode(prompt + tokens) minus decode(prompt).  Leave False for chat replies, which are decoded on their own.

    tokenizer: a mistral_ref tokenizer (``stream_decoder()``, ``eos_id``); generation stops at its EOS (unless
    ignore_eos) and at `stop_token_ids`, neither of which is decoded.  stop: strings matched on the decoded
    text across token boundaries; the text is cut right before the earliest match (ignore_eos does not disable
    them).  Text is released as soon as it is complete UTF-8 (the tokenizer's incremental decoder) and cannot
    be the start of a stop string.  The concatenated texts equal tokenizer.decode(tokens), cut at a stop
    string.
    Other arguments as in :func:`generate`.  Arguments are validated here, before the first event.
    """
    params = SamplingParams(temperature, top_p, presence_penalty, frequency_penalty, seed)
    ((prompt,), steps) = _checked_steps(model, [prompt_ids], max_tokens, params, tokenizer.eos_id, stop_token_ids,
                                        ignore_eos, logprobs, top_logprobs, chunk_size, logits_processors)
    return _stream(steps, text_events(tokenizer, stop, prompt if continue_prompt_text else None))


class TextEvents:
    """The text side of :func:`generate_stream` in push form: feed it each generated token, get StreamEvents.

    ``push(token, stopped, logprob, top)`` returns the events of one generated token: its own (unless it is a stop
    token) and, when it ends the text (a stop token, a stop string matched), the closing event; ``done`` is then
    True.  ``end()`` is the closing event of a generation that ended otherwise (max_tokens, the caller stopping
    it): whatever text was held back.  generate_stream is a loop over this; the server's scheduler pushes tokens.
    """

    def __init__(self, decoder: Any, matcher: StopStrings):
        self.decoder, self.matcher = decoder, matcher
        self.done = False
        self._finish: FinishReason = "length"
        self._reason: int | str | None = None

    def push(self, token: int, stopped: bool = False, logprob: float | None = None,
             top_logprobs: list[tuple[int, float]] | None = None) -> list[StreamEvent]:
        if stopped:
            self._finish, self._reason = "stop", token
            return [self.end()]
        text, matched = self.matcher.push(self.decoder.feed(token))
        events = [StreamEvent(token, text, logprob, top_logprobs)]
        if matched is not None:
            self.done = True
            events.append(StreamEvent(None, "", finish_reason="stop", stop_reason=matched))
        return events

    def end(self) -> StreamEvent:
        self.done = True
        text, matched = self.matcher.push(self.decoder.flush())
        if matched is not None:
            self._finish, self._reason = "stop", matched
        else:
            text += self.matcher.flush()
        return StreamEvent(None, text, finish_reason=self._finish, stop_reason=self._reason)


def text_events(tokenizer: Any, stop: Sequence[str] | str | None = None,
                prompt: Sequence[int] | None = None) -> TextEvents:
    """A TextEvents for `tokenizer`'s stream decoder and the stop strings `stop`.  prompt: decode the output as
    its continuation (generate_stream's continue_prompt_text); None for a reply decoded on its own."""
    matcher = StopStrings(stop)
    decoder = tokenizer.stream_decoder()
    if prompt is not None:
        decoder.feed_many(prompt)  # the prompt's text is the user's: only its effect on spacing is kept
    return TextEvents(decoder, matcher)


def _stream(steps: Iterator[_Step], events: TextEvents) -> Iterator[StreamEvent]:
    try:
        for s in steps:
            lp = float(s.logprob[0]) if s.logprob is not None else None
            top = _pairs(s.top_values[0], s.top_ids[0]) if s.top_values is not None else None
            yield from events.push(int(s.ids[0]), bool(s.stopped[0]), lp, top)
            if events.done:
                return
        yield events.end()
    finally:
        steps.close()
