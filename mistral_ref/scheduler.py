"""Continuous batching: many generations decode together in one KV cache, joining and leaving between steps.

    submit(job) -> waiting (FIFO) --its cache fits--> prefilling rows --prompt done--> decoding rows --> retired

(``submit_all(jobs)`` queues the n choices of one request together, or none of them: n jobs, n rows.  A job whose
``prompt_of`` names another job with the same prompt — choice i > 0 of a request names choice 0 — does not prefill
the prompt itself when it joins while that job is still prefilling: it waits, and when the other's prompt is done its
cache row is copied into this one's, and both sample their first token from the same logits, each with its own
sampler.  Joining later, it prefills its own copy.)

The cache is one ``KVCache`` of R rows x S positions.  Each running job owns one row: rows ``[0, n_decoding)``
decode, rows ``[n_decoding, n_rows)`` are still prefilling, the rest are free.  Rows carry their own absolute
positions, and attention masks are built from positions (attention.attention_mask), so a row at position 900
decodes next to a row at position 12 with no special code, exactly as in a ragged ``generate`` batch; a row's
unused slots hold position -1 and are never attended to.

One :meth:`Scheduler.step`, run by one worker thread:

1. retire the rows whose job was cancelled (the client left) or ran out of time;
2. admit waiting jobs, oldest first, while their row fits: at most ``max_batch`` rows, and the cache grown to
   hold them within ``kv_cache_bytes`` (else the job waits: a later job never overtakes it, so none starves);
3. prefill one chunk (at most ``prefill_tokens`` prompt tokens in all) of the prefilling rows: a long prompt
   takes several steps, and the decoding rows get a token every step meanwhile; a row whose prompt is done
   samples its first token and starts decoding;
4. decode one token for every decoding row (one forward pass of shape (n_decoding, 1)).

A job leaves when it produces a stop token, reaches max_tokens, its sink says stop (a stop string matched), it is
cancelled, or its time is up; its row is reused (the last row moves into the hole, so the used rows stay a
prefix), the cache shrinks when the rows left use a small part of it, and when no row is left it is released.
Each job samples with its own ``sampling.Sampler`` (its own seeded generator, penalty counts and logits
processors) on its own row of the logits, so a seeded or greedy job gives the tokens it would give alone with
``generation.generate`` (tested, greedy and seeded, fp32).

Memory: the cache is allocated for the rows and the longest row's prompt + max_tokens (rounded up to
``ROUND_POSITIONS``), within ``kv_cache_bytes``; it is re-allocated (rows copied) when a job needs more, and
freed when the last job leaves.  While it grows, the old and the new cache exist together for a moment.

A compiled decode step (``model.compiled_decode``, backends/compiled.py) is compiled again for every new batch size
and cache capacity it sees, which would happen every few steps as jobs join and leave.  So with one, the shapes
come from a small set: the decode pass runs on the next power of two rows (up to ``max_batch``'s), the extra rows
fed token 0 at position -1 — a free or still-prefilling row, whose cache such a row leaves untouched (write_one
skips position -1, and no query attends position -1) — and only the first n rows of logits are used; the cache's
rows are a power of two (admission counts the padded rows against ``kv_cache_bytes``, so the padded pass always
fits), and its positions per row are the compiled step's capacity bucket (``compiled_decode.capacity``: powers of
two) instead of a multiple of ``ROUND_POSITIONS``.  A prefill chunk of one column gets a padding column, so that
it runs eagerly rather than through the compiled step in yet another shape.  Eager models are not padded.
"""

from __future__ import annotations

import collections
import copy
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch

from mistral_ref.cache import KVCache, cache_nbytes
from mistral_ref.generation import available_bytes, check_generation
from mistral_ref.sampling import GenerationParamError, LogitsProcessor, Sampler, SamplingParams, argmax

log = logging.getLogger("mistral_ref.scheduler")

#: The cache's positions per row are the longest job's need rounded up to this, so that jobs of similar lengths
#: share one allocation instead of re-allocating the cache for every few extra tokens.
ROUND_POSITIONS = 256


class SchedulerBusy(RuntimeError):
    """The job cannot be queued now (the waiting queue is full) or waited longer than its timeout: retry later."""


class Token(NamedTuple):
    """One generated token, as a job's sink receives it.

    stopped: it is one of the job's stop tokens (EOS): generation ends with it, and it is not part of the text.
    logprob, top_logprobs: when the job asked, the raw model's log p(id) and the most likely (id, logprob) pairs.
    """

    id: int
    stopped: bool
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class Sink(Protocol):
    """Where a job's output goes; called on the scheduler's thread, so each call must be quick."""

    def token(self, token: Token) -> bool:
        """One generated token (stop tokens included); return False to stop generating (a stop string matched)."""

    def end(self, reason: str) -> None:
        """Generation ended: "stop" (a stop token, or token() returned False), "length" (max_tokens), "timeout"
        (the job's time ran out), or "cancelled" (job.cancel()).  Called once, last."""

    def error(self, exc: BaseException) -> None:
        """Generation failed (or the job waited past its timeout: a SchedulerBusy); called instead of end()."""


@dataclass(eq=False)
class Job:
    """One generation request: a prompt, its budget and sampling (the keywords of generation.generate_stream).

    timeout: seconds from submit() until the job ends ("timeout"; while still waiting: a SchedulerBusy error).
    """

    prompt: Sequence[int]
    max_tokens: int
    sink: Sink
    temperature: float = 0.7
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    eos_id: int | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    logits_processors: Sequence[LogitsProcessor] = ()
    timeout: float | None = None
    prompt_of: Job | None = None  # a job with the same prompt whose prefilled cache row this one may copy
    cancelled: bool = field(default=False, init=False)

    def cancel(self) -> None:
        """Stop this job at the scheduler's next step (safe from any thread)."""
        self.cancelled = True


@dataclass(eq=False)  # rows are found by identity
class _Row:
    """A job holding a row of the cache: its validated prompt, sampler and progress."""

    job: Job
    prompt: list[int]
    stop_ids: frozenset[int]
    sampler: Sampler
    plain: bool  # greedy with no penalties or processors: its token is the row's argmax, taken for all at once
    generated: torch.Tensor | None  # (1, max_tokens) what the processors see; None without processors
    deadline: float | None
    filled: int = 0  # prompt tokens prefilled so far
    leader: _Row | None = None  # a prefilling row of job.prompt_of: this row copies its cache instead of prefilling
    n: int = 0  # tokens generated so far
    last: int = 0  # the last generated token: the input of the next decode step

    @property
    def need(self) -> int:
        """Positions this row may occupy: prompt + max_tokens."""
        return len(self.prompt) + self.job.max_tokens


class Scheduler:
    """Continuous batching over one model (see the module docstring).  Thread-safe submit(); step() on one thread.

    max_batch: rows decoding together (1 = one request at a time, the baseline of benchmarks/bench_server.py);
    kv_cache_bytes: the cache's size limit (default: half of the memory available on the model's device now);
    prefill_tokens: prompt tokens per prefill chunk, all prefilling rows together; max_waiting: queued jobs
    beyond which submit() raises SchedulerBusy.
    """

    def __init__(self, model: torch.nn.Module, max_batch: int = 32, kv_cache_bytes: int | None = None,
                 prefill_tokens: int = 512, max_waiting: int = 256):
        for name, value in (("max_batch", max_batch), ("prefill_tokens", prefill_tokens),
                            ("max_waiting", max_waiting)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.model = model
        self.max_batch, self.prefill_tokens, self.max_waiting = max_batch, prefill_tokens, max_waiting
        if kv_cache_bytes is None:
            free = available_bytes(model.device)
            kv_cache_bytes = free // 2 if free is not None else 4 << 30
        self.kv_cache_bytes = kv_cache_bytes
        self.waiting: collections.deque[tuple[Job, float]] = collections.deque()  # (job, submit time)
        self.rows: list[_Row] = []  # rows[i] owns cache row i; [0, n_decoding) decode, the rest prefill
        self.n_decoding = 0
        self.cache: KVCache | None = None
        self._lock = threading.Condition()
        self.stats = collections.Counter()  # submitted, finished, cancelled, timeout, failed, steps, resizes
        self.peak_rows = 0
        self._one = torch.ones(1, dtype=torch.bool, device=model.device)  # `active` of a one-row Sampler call

    # ---- submitting (any thread) -------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue `job`.  Raises GenerationParamError (a ValueError naming the parameter) for a job that can
        never run here (bad parameters, or a cache beyond kv_cache_bytes even alone) and SchedulerBusy when the
        waiting queue is full."""
        self.submit_all([job])

    def submit_all(self, jobs: Sequence[Job]) -> None:
        """Queue `jobs` together (the n choices of one request), one row each, or none of them: each counts as one
        waiting job against ``max_waiting`` and, once admitted, one row against ``max_batch``.  Errors as
        :meth:`submit`; more jobs than ``max_waiting`` can never be queued: a GenerationParamError naming n."""
        if len(jobs) > self.max_waiting:
            raise GenerationParamError(f"n: {len(jobs)} choices are {len(jobs)} jobs; this server queues at most "
                                       f"{self.max_waiting}")
        for job in jobs:
            row = self._new_row(job, deadline=None)  # validates, before anything is queued
            need = cache_nbytes(self.model.args, 1, row.need, self.model.dtype)
            if need > self.kv_cache_bytes:
                raise GenerationParamError(
                    f"max_tokens: the prompt ({len(row.prompt)} tokens) + max_tokens ({job.max_tokens}) need "
                    f"{need / 2**20:.1f} MiB of KV cache; this server's cache holds at most "
                    f"{self.kv_cache_bytes / 2**20:.1f} MiB: lower max_tokens or shorten the prompt")
        with self._lock:
            if len(self.waiting) + len(jobs) > self.max_waiting:
                raise SchedulerBusy(f"the server is busy ({len(self.waiting)} requests waiting); retry later")
            now = time.monotonic()
            self.waiting.extend((job, now) for job in jobs)
            self.stats["submitted"] += len(jobs)
            self._lock.notify()

    def _new_row(self, job: Job, deadline: float | None) -> _Row:
        params = SamplingParams(job.temperature, job.top_p, job.presence_penalty, job.frequency_penalty, job.seed)
        (prompt,), stop_ids = check_generation(self.model, [job.prompt], job.max_tokens, job.eos_id,
                                               job.stop_token_ids, job.ignore_eos, job.logprobs, job.top_logprobs)
        sampler = Sampler(params, 1, self.model.args.vocab_size, self.model.device, job.logits_processors)
        plain = params.greedy and not params.has_penalties and not sampler.processors
        generated = (torch.zeros(1, job.max_tokens, dtype=torch.long, device=self.model.device)
                     if sampler.processors else None)
        return _Row(job, prompt, frozenset(stop_ids), sampler, plain, generated, deadline)

    @property
    def busy(self) -> bool:
        """Whether any job is waiting or running."""
        return bool(self.rows or self.waiting)

    def wait_for_work(self, timeout: float) -> None:
        """Block until a job is submitted (or `timeout` seconds pass); for the worker thread when idle."""
        with self._lock:
            if not self.waiting:
                self._lock.wait(timeout)

    # ---- one step (the worker thread) --------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> bool:
        """Retire, admit, prefill a chunk, decode a token (see the module docstring).  Returns whether there was
        anything to do."""
        if not self.busy:
            return False
        self.stats["steps"] += 1
        now = time.monotonic()
        for i in reversed(range(len(self.rows))):
            row = self.rows[i]
            if row.job.cancelled or (row.deadline is not None and now > row.deadline):
                self._retire(i, "cancelled" if row.job.cancelled else "timeout")
        self._admit(now)
        if len(self.rows) > self.n_decoding:
            self._guarded(self._prefill, range(self.n_decoding, len(self.rows)))
        if self.n_decoding:
            self._guarded(self._decode, range(self.n_decoding))
        if not self.rows:
            self.cache = None  # idle: give the memory back
        else:
            self._shrink()
        return True

    def run_until_idle(self) -> None:
        """Step until every submitted job has ended (tests, benchmarks, single-threaded use)."""
        while self.step():
            pass

    def _guarded(self, work, rows: range) -> None:
        """Run a forward pass; if it fails (out of memory, a processor error), fail its rows, not the server."""
        try:
            work()
        except Exception as e:  # noqa: BLE001 — reported to each job's sink; the other rows go on
            log.exception("generation step failed")
            for i in reversed(rows):
                if i < len(self.rows):
                    self._retire(i, None, e)

    # ---- admission -----------------------------------------------------------------------------------------
    def _admit(self, now: float) -> None:
        while True:
            with self._lock:  # only this thread removes jobs, so the head stays the head outside the lock
                if not self.waiting:
                    return
                job, submitted = self.waiting[0]
            expired = job.timeout is not None and now > submitted + job.timeout
            if not (job.cancelled or expired) and (len(self.rows) >= self.max_batch or not self._room_for(job)):
                return  # it waits; nothing behind it overtakes it
            with self._lock:
                self.waiting.popleft()
            if job.cancelled:
                self.stats["cancelled"] += 1
                self._notify(job.sink.end, "cancelled")
            elif expired:
                self.stats["timeout"] += 1
                self._notify(job.sink.error, SchedulerBusy(
                    f"the request waited {now - submitted:.0f} s for a free slot, its whole time budget; "
                    "retry later"))
            else:
                try:
                    row = self._new_row(job, None if job.timeout is None else submitted + job.timeout)
                except Exception as e:  # noqa: BLE001 — validated at submit(); reported, never raised here
                    self.stats["failed"] += 1
                    self._notify(job.sink.error, e)
                    continue
                i = len(self.rows)
                for layer in self.cache.layers:
                    layer.pos[i] = -1  # an empty row: the previous owner's keys are never seen
                if job.prompt_of is not None:  # its prompt's prefill is running: copy it when done
                    row.leader = next((r for r in self.rows[self.n_decoding:] if r.job is job.prompt_of), None)
                self.rows.append(row)
                self.peak_rows = max(self.peak_rows, len(self.rows))

    def _room_for(self, job: Job) -> bool:
        """Make the cache hold one more row for `job` (growing it within kv_cache_bytes); False if it can't."""
        need = len(job.prompt) + job.max_tokens
        n = len(self.rows) + 1
        cache = self.cache
        if cache is not None and cache.batch_size >= self._padded(n) and cache.max_seq_len >= need:
            return True
        positions = max([need] + [r.need for r in self.rows])
        rounded = self._positions(positions)
        least = self._padded(n)  # the rows a decode pass of n rows needs: n, a power of two when compiled
        rows = max(least, min(self.max_batch, 1 << (n - 1).bit_length()))  # rows grow by doubling
        for r, s in ((rows, rounded), (least, rounded), (least, positions)):  # the roomiest shape within budget
            if cache_nbytes(self.model.args, r, s, self.model.dtype) <= self.kv_cache_bytes:
                self._resize(r, s)
                return True
        return False

    def _shrink(self) -> None:
        """Give memory back when the rows left use a quarter of the cache's rows or half of its positions (the
        gap from the doubling in _room_for keeps a steady load from resizing back and forth)."""
        n = len(self.rows)
        positions = self._positions(max(r.need for r in self.rows))
        rows = 1 << (n - 1).bit_length()
        if self.cache.batch_size >= 4 * rows or self.cache.max_seq_len >= 2 * positions:
            self._resize(min(self.cache.batch_size, 2 * rows), min(self.cache.max_seq_len, positions))

    def _positions(self, need: int) -> int:
        """Positions per row for a longest row of `need`: the compiled step's capacity bucket (a power of two, so a
        few capacities serve every request), else `need` rounded up to ROUND_POSITIONS."""
        compiled = getattr(self.model, "compiled_decode", None)
        if compiled is not None:
            return compiled.capacity(need)
        return -(-need // ROUND_POSITIONS) * ROUND_POSITIONS

    def _padded(self, n: int) -> int:
        """Rows a decode pass of n rows runs on: n eagerly; the next power of two with a compiled step (n <=
        max_batch, so at most max_batch's power of two), so that the step is compiled for a few batch sizes."""
        if getattr(self.model, "compiled_decode", None) is None:
            return n
        return 1 << (n - 1).bit_length()

    def _resize(self, rows: int, positions: int) -> None:
        """A new cache of rows x positions holding the used rows of the old one.

        Slot layouts agree: a full layer keeps position p in slot p, a rolling one in slot p % W, and every
        row's positions are below its own need <= both sizes, so the first min(capacity) slots are all there is.
        """
        old, new = self.cache, KVCache(self.model.args, rows, positions, self.model.dtype, self.model.device)
        if old is not None:
            n = len(self.rows)
            for a, b in zip(old.layers, new.layers):
                c = min(a.capacity, b.capacity)
                b.k[:n, :c], b.v[:n, :c], b.pos[:n, :c] = a.k[:n, :c], a.v[:n, :c], a.pos[:n, :c]
        self.cache = new
        self.stats["resizes"] += 1

    # ---- leaving -------------------------------------------------------------------------------------------
    def _retire(self, i: int, reason: str | None, error: BaseException | None = None) -> None:
        """End row i's job (reason for sink.end, or error for sink.error) and free the row, keeping the used
        rows a prefix with the decoding rows first: the last decoding row moves into the hole, the last
        prefilling row into the hole that leaves."""
        row = self.rows[i]
        for r in self.rows:
            if r.leader is row:
                r.leader = None  # it prefills its own copy after all
        if i < self.n_decoding:
            self._move(self.n_decoding - 1, i)
            i = self.n_decoding - 1
            self.n_decoding -= 1
        self._move(len(self.rows) - 1, i)
        self.rows.pop()
        if error is not None:
            self.stats["failed"] += 1
            self._notify(row.job.sink.error, error)
        else:
            self.stats["finished" if reason in ("stop", "length") else reason] += 1
            self._notify(row.job.sink.end, reason)

    def _move(self, src: int, dst: int) -> None:
        """Row src's cache and state into row dst (row src is then free)."""
        if src == dst:
            return
        for layer in self.cache.layers:
            layer.k[dst], layer.v[dst], layer.pos[dst] = layer.k[src], layer.v[src], layer.pos[src]
        self.rows[dst] = self.rows[src]

    def _swap(self, a: int, b: int) -> None:
        if a == b:
            return
        for layer in self.cache.layers:
            for t in (layer.k, layer.v, layer.pos):
                t[[a, b]] = t[[b, a]]
        self.rows[a], self.rows[b] = self.rows[b], self.rows[a]

    def _notify(self, callback, arg) -> bool:
        """Call a sink; a sink that raises has its job stopped (logged), never the scheduler."""
        try:
            return callback(arg)
        except Exception:  # noqa: BLE001
            log.exception("a job's sink failed; its job is stopped")
            return False

    # ---- the forward passes --------------------------------------------------------------------------------
    def _view(self, start: int, stop: int) -> KVCache:
        """Rows [start, stop) of the cache as a KVCache of their own (views: writes land in the cache)."""
        view = copy.copy(self.cache)
        view.layers = []
        for layer in self.cache.layers:
            part = copy.copy(layer)
            part.k, part.v, part.pos = layer.k[start:stop], layer.v[start:stop], layer.pos[start:stop]
            view.layers.append(part)
        view.batch_size = stop - start
        return view

    def _prefill(self) -> None:
        """One chunk of every prefilling row's prompt; rows that finish their prompt sample a first token."""
        start, stop = self.n_decoding, len(self.rows)
        rows = self.rows[start:stop]
        left = [0 if r.leader is not None else len(r.prompt) - r.filled for r in rows]  # followers wait
        T = min(max(left), max(1, self.prefill_tokens // len(rows)))  # prompt tokens per row in this chunk
        # one column would be a decode-shaped call: with a compiled step, a padding column keeps it eager
        width = 2 if T == 1 and getattr(self.model, "compiled_decode", None) is not None else T
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        positions = torch.full((len(rows), width), -1, dtype=torch.long)
        for j, r in enumerate(rows):
            t = min(T, left[j])
            tokens[j, :t] = torch.tensor(r.prompt[r.filled:r.filled + t])
            positions[j, :t] = torch.arange(r.filled, r.filled + t)
        device = self.model.device
        at = positions.argmax(dim=1).to(device)  # (k,) each row's last column in this chunk
        logits = self.model(tokens.to(device), positions.to(device), self._view(start, stop), logits_at=at)[:, 0]
        done, source = [], []  # rows whose prompt is done; the row of logits each samples from
        for j, r in enumerate(rows):
            r.filled += min(T, left[j])
            if r.filled == len(r.prompt) and r.leader is None:
                done.append(j)
                source.append(j)
        for j in list(done):  # followers of a row that finished: its cache row becomes theirs
            for k, f in enumerate(rows):
                if f.leader is rows[j]:
                    for layer in self.cache.layers:
                        for t in (layer.k, layer.v, layer.pos):
                            t[start + k] = t[start + j]
                    f.leader, f.filled = None, len(f.prompt)
                    done.append(k)
                    source.append(j)
        if not done:
            return
        tokens_out = self._choose([rows[j] for j in done], logits[source])  # (k, V) -> one Token per done row
        for j, tok in zip(done, tokens_out):
            i = self.rows.index(rows[j])  # rows move as others leave; a done row joins the decoding rows
            self._swap(i, self.n_decoding)
            self.n_decoding += 1
            self._emit(self.n_decoding - 1, tok)

    def _decode(self) -> None:
        """One token for every decoding row: one pass over rows [0, P), P = _padded(n); rows [n, P) (free or
        prefilling) are padding, token 0 at position -1, which leaves their cache as it is."""
        rows = self.rows[:self.n_decoding]
        n = len(rows)
        P = min(self._padded(n), self.cache.batch_size)  # (smaller only if the model was compiled mid-run)
        tokens = torch.zeros(P, 1, dtype=torch.long)  # (P, 1)
        positions = torch.full((P, 1), -1, dtype=torch.long)  # (P, 1)
        tokens[:n, 0] = torch.tensor([r.last for r in rows])
        positions[:n, 0] = torch.tensor([len(r.prompt) + r.n - 1 for r in rows])
        device = self.model.device
        logits = self.model(tokens.to(device), positions.to(device), self._view(0, P))[:n, -1]  # (n, V)
        for r, tok in zip(list(rows), self._choose(rows, logits)):
            self._emit(self.rows.index(r), tok)

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> list[Token | Exception]:
        """Each row's next token from its row of logits (n, V), with its own sampler (greedy rows at once); an
        Exception for a row whose sampler failed (a logits processor that allows no token)."""
        ids = argmax(logits).tolist()  # the plain greedy rows' tokens (numpy's vectorized argmax on a CPU)
        failed: dict[int, Exception] = {}
        for j, r in enumerate(rows):
            if not r.plain:
                generated = r.generated[:, :r.n] if r.generated is not None else None
                try:
                    t = r.sampler(logits[j:j + 1], generated, self._one)  # (1,)
                except Exception as e:  # noqa: BLE001 — this row's failure, reported to its job
                    failed[j] = e
                    continue
                r.sampler.observe(t, self._one)
                ids[j] = int(t)
        want = [j for j, r in enumerate(rows) if r.job.logprobs]
        lps: dict[int, tuple[float, list | None]] = {}
        if want:
            logp = torch.log_softmax(logits[want], dim=-1)  # (w, V) the raw model distribution
            chosen = logp.gather(1, torch.tensor([[ids[j]] for j in want], device=logp.device))[:, 0].tolist()
            for k, j in enumerate(want):
                top = None
                if rows[j].job.top_logprobs:
                    values, top_ids = logp[k].topk(rows[j].job.top_logprobs)
                    top = list(zip(top_ids.tolist(), values.tolist()))
                lps[j] = (chosen[k], top)
        out: list[Token | Exception] = []
        for j, r in enumerate(rows):
            lp, top = lps.get(j, (None, None))
            out.append(failed[j] if j in failed else Token(ids[j], ids[j] in r.stop_ids, lp, top))
        return out

    def _emit(self, i: int, tok: Token | Exception) -> None:
        """Give row i's job its token; retire the row if that ends it."""
        if isinstance(tok, Exception):
            self._retire(i, None, tok)
            return
        r = self.rows[i]
        if r.generated is not None:
            r.generated[0, r.n] = tok.id
        r.n += 1
        r.last = tok.id
        keep = self._notify(r.job.sink.token, tok)
        if tok.stopped or not keep:
            self._retire(i, "stop")
        elif r.n >= r.job.max_tokens:
            self._retire(i, "length")
