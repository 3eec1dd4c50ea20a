"""mistral_ref.scheduler with a compiled decode step: as jobs join and leave, the decode pass runs on a power of two
rows (padding rows at position -1) and the cache's capacity is a power-of-two bucket, so the compiled step sees a few
shapes instead of one per (batch, capacity) pair; padding leaves a still-prefilling row's cache bit for bit as it
was; every job still gives the greedy tokens it gives alone (fp32); the padded rows fit within kv_cache_bytes; eager
models are not padded.

The steps are compiled with a backend that runs dynamo's graphs as they are (no inductor code generation: the
tests take seconds) and records the cache shape of each graph it is given."""

from __future__ import annotations

import pytest
import torch

from mistral_ref.backends.compiled import MIN_CAPACITY, compile_decode
from mistral_ref.cache import cache_nbytes
from mistral_ref.config import ModelArgs
from mistral_ref.generation import generate
from mistral_ref.model import Transformer
from mistral_ref.scheduler import ROUND_POSITIONS, Job, Scheduler, Token

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB, EOS, WINDOW = 64, 3, 6
# a rolling layer (window 6: its cache is 6 slots whatever the capacity) and a full one: two kinds of block graph
ARGS = ModelArgs(dim=32, n_layers=2, hidden_dim=64, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=VOCAB,
                 sliding_window=(WINDOW, None))
# prompts: three one-token prompts submitted together (a prefill chunk of shape (3, 1), which must not go to the
# compiled step), then one job every two steps; long prompts take several prefill chunks
LENGTHS = [1, 1, 1, 5, 17, 1, 40, 9, 26, 3, 12]
BUDGETS = [4, 9, 6, 7, 20, 3, 15, 30, 9, 12, 230]  # the last needs 12 + 230 > 240 positions: still the 256 bucket


def tiny() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ARGS).eval()
    with torch.no_grad():
        model.output.weight.mul_(8)  # decisive logits: greedy choices are not decided by rounding
    return model


def prompts(lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in lengths]


class Collect:
    """A sink that keeps the tokens and how the job ended."""

    def __init__(self):
        self.tokens: list[Token] = []
        self.ended: str | None = None

    def token(self, token: Token) -> bool:
        self.tokens.append(token)
        return True

    def end(self, reason: str) -> None:
        self.ended = reason

    def error(self, exc: BaseException) -> None:
        self.ended = f"error: {exc!r}"

    @property
    def ids(self) -> list[int]:  # what generate() reports as tokens: without the stop token
        return [t.id for t in self.tokens if not t.stopped]


class CacheShapes:
    """A torch.compile backend: runs each graph dynamo gives it as it is (as backend "eager" does) and records the
    (batch, slots) of the layer cache the graph was built for (its 4-d inputs: keys, values (B, S, heads, dim))."""

    def __init__(self):
        self.graphs: list[set[tuple[int, int]]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs.append({tuple(t.shape[:2]) for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() == 4})
        return gm.forward


def watch_decode(sched: Scheduler) -> list[dict]:
    """Wrap sched._decode: record, for every decode pass, the rows decoding, the cache's shape, and whether every
    row that is not decoding (prefilling or free) kept its keys, values and positions bit for bit."""
    passes: list[dict] = []
    decode = sched._decode

    def watched():
        n, cache = sched.n_decoding, sched.cache
        others = [(t[n:].clone(), t) for layer in cache.layers for t in (layer.k, layer.v, layer.pos)]
        decode()
        passes.append(dict(n=n, prefilling=len(sched.rows) - n, shape=(cache.batch_size, cache.max_seq_len),
                           untouched=all(torch.equal(before, t[n:]) for before, t in others)))

    sched._decode = watched
    return passes


def serve_staggered(sched: Scheduler, groups: list[list[Job]], every: int) -> None:
    """Submit one group of jobs every `every` steps (jobs join a batch that is decoding), then run to idle."""
    for jobs in groups:
        sched.submit_all(jobs)
        for _ in range(every):
            sched.step()
    sched.run_until_idle()


@pytest.fixture(scope="module")
def served():
    """Eleven greedy jobs (at most 5 together) through a scheduler over a compiled step, and each job alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = tiny()
    ps = prompts(LENGTHS)
    alone = [generate(model, [p], m, temperature=0, eos_id=EOS)[0] for p, m in zip(ps, BUDGETS)]  # eager
    torch._dynamo.reset()  # no compiled code from an earlier test
    shapes = CacheShapes()
    compile_decode(model, backend=shapes)
    sinks = [Collect() for _ in ps]
    sched = Scheduler(model, max_batch=5, prefill_tokens=16)  # 5 rows for 11 jobs; long prompts in chunks
    passes = watch_decode(sched)
    jobs = [Job(p, m, s, temperature=0, eos_id=EOS) for p, m, s in zip(ps, BUDGETS, sinks)]
    serve_staggered(sched, [jobs[:3]] + [[job] for job in jobs[3:]], every=2)
    torch.set_num_threads(threads)
    return dict(alone=alone, sinks=sinks, sched=sched, passes=passes, shapes=shapes)


@pytest.mark.slow
def test_compiled_step_sees_power_of_two_batches_and_capacities(served):
    """Batches of 1 to 5 rows decode; the compiled graphs are built for batch 1, 2, 4, 8 and one capacity only."""
    decoding = {p["n"] for p in served["passes"]}
    assert {1, 2, 3, 4, 5} <= decoding  # every batch size occurred, the odd ones padded
    graphs = served["shapes"].graphs
    cache_shapes = set().union(*graphs)
    assert {b for b, _ in cache_shapes} == {1, 2, 4, 8}
    assert {s for _, s in cache_shapes} == {WINDOW, MIN_CAPACITY}  # the rolling layer's 6 slots; the full layer's
    assert len(graphs) == 2 * 4  # two kinds of layer x four batch sizes: nothing compiled twice
    cache = {p["shape"] for p in served["passes"]}  # the cache grows 1, 2, 4, 8 rows, always in the 256 bucket
    assert all(rows & (rows - 1) == 0 and positions == MIN_CAPACITY for rows, positions in cache)


@pytest.mark.slow
def test_padding_rows_leave_prefilling_rows_untouched(served):
    """A padding row (position -1) that is a still-prefilling row keeps its cache bit for bit through a decode
    pass (and so does a free row)."""
    passes = served["passes"]
    assert any(p["prefilling"] and p["n"] & (p["n"] - 1) for p in passes)  # a prefilling row inside the padding
    assert all(p["untouched"] for p in passes)


@pytest.mark.slow
def test_compiled_jobs_equal_each_alone(served):
    for ref, sink in zip(served["alone"], served["sinks"]):
        assert sink.ids == ref.tokens
        assert sink.ended == ("stop" if ref.finish_reason == "stop" else "length")
    sched = served["sched"]
    assert sched.peak_rows == 5 and sched.cache is None
    assert sched.stats["finished"] == len(LENGTHS) and sched.stats["failed"] == 0


@pytest.mark.slow
def test_padded_rows_count_against_the_cache_budget():
    """kv_cache_bytes for 3 rows: eagerly 3 jobs decode together; compiled, 2 (3 padded to 4 would not fit), and
    each still gives its tokens alone."""
    ps, budget = prompts([6, 9, 4, 11]), 200  # 4 rows of 211 positions exceed 3 of 256: the 4th job waits
    kv_bytes = cache_nbytes(ARGS, 3, MIN_CAPACITY, torch.float32)
    model = tiny()
    alone = [generate(model, [p], budget, temperature=0, eos_id=EOS)[0].tokens for p in ps]
    peaks = []
    for compiled in (False, True):
        torch._dynamo.reset()
        compile_decode(model, enabled=compiled, backend="eager")
        sinks = [Collect() for _ in ps]
        sched = Scheduler(model, max_batch=4, kv_cache_bytes=kv_bytes)
        for p, s in zip(ps, sinks):
            sched.submit(Job(p, budget, s, temperature=0, eos_id=EOS))
        sched.run_until_idle()
        assert [s.ids for s in sinks] == alone
        peaks.append(sched.peak_rows)
    assert peaks == [3, 2]


def test_eager_decode_is_not_padded():
    """Without a compiled step each decode pass has exactly the decoding rows, and capacities are multiples of
    ROUND_POSITIONS (as before padding existed)."""
    model = tiny()
    sched = Scheduler(model, max_batch=5, prefill_tokens=16)
    passes = watch_decode(sched)
    rows_seen = []
    forward = model.forward

    def recording(tokens, positions=None, cache=None, **kw):
        if tokens.shape[1] == 1:
            rows_seen.append((tokens.shape[0], int((positions >= 0).sum())))
        return forward(tokens, positions, cache, **kw)

    model.forward = recording
    ps = prompts(LENGTHS[3:8])
    serve_staggered(sched, [[Job(p, m, Collect(), temperature=0, eos_id=EOS)] for p, m in zip(ps, BUDGETS)], 2)
    assert rows_seen and all(b == valid for b, valid in rows_seen)  # no padding row
    assert {p["n"] for p in passes} >= {3}
    assert all(s % ROUND_POSITIONS == 0 for _, s in (p["shape"] for p in passes))
