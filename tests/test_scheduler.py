"""mistral_ref.scheduler: jobs decoding together give what each gives alone (greedy, seeded sampling, penalties,
processors, logprobs; fp32), however they arrive; memory stays within its budget (jobs wait, none starves);
cancellation and time budgets stop a job within a step and free its row; the cache is released when idle."""

from __future__ import annotations

import math

import pytest
import torch

from mistral_ref.cache import cache_nbytes
from mistral_ref.config import ModelArgs, MoeArgs
from mistral_ref.generation import generate
from mistral_ref.model import Transformer
from mistral_ref.sampling import GenerationParamError
from mistral_ref.scheduler import Job, Scheduler, SchedulerBusy, Token

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 64
EOS = 3


def tiny(window: int | None = 6, moe: bool = False, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(dim=32, n_layers=2, hidden_dim=64, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=VOCAB,
                     sliding_window=window, moe=MoeArgs(4, 2) if moe else None)
    model = Transformer(args).eval()
    with torch.no_grad():
        model.output.weight.mul_(8)  # decisive logits: greedy choices are not decided by rounding
    return model


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in lengths]


class Collect:
    """A sink that keeps everything: tokens, how it ended, and optionally stops after `stop_after` tokens."""

    def __init__(self, stop_after: int | None = None):
        self.tokens: list[Token] = []
        self.ended: str | None = None
        self.failed: BaseException | None = None
        self.stop_after = stop_after

    def token(self, token: Token) -> bool:
        assert self.ended is None and self.failed is None
        self.tokens.append(token)
        return self.stop_after is None or len(self.tokens) < self.stop_after

    def end(self, reason: str) -> None:
        assert self.ended is None and self.failed is None
        self.ended = reason

    def error(self, exc: BaseException) -> None:
        assert self.ended is None and self.failed is None
        self.failed = exc

    @property
    def ids(self) -> list[int]:  # what generate() reports as tokens: without the stop token
        return [t.id for t in self.tokens if not t.stopped]


def alone(model, prompt, max_tokens, **kw):
    (res,) = generate(model, [prompt], max_tokens, **kw)
    return res


def serve_staggered(sched: Scheduler, jobs: list[Job], every: int = 3) -> None:
    """Submit one job every `every` steps (so jobs join a batch that is already decoding), then run to idle."""
    for job in jobs:
        sched.submit(job)
        for _ in range(every):
            sched.step()
    sched.run_until_idle()


def serve_choices(model, p: list[int], max_tokens: int, kw: list[dict], max_batch: int, **job) -> list[Collect]:
    """The n choices of one request (one Job per keyword set in `kw`, choice i > 0 naming choice 0's prompt as its
    own), served together with submit_all; returns their sinks."""
    sinks = [Collect() for _ in kw]
    jobs = [Job(p, max_tokens, s, **job, **k) for s, k in zip(sinks, kw)]
    for j in jobs[1:]:
        j.prompt_of = jobs[0]
    sched = Scheduler(model, max_batch=max_batch, prefill_tokens=8)
    sched.submit_all(jobs)
    sched.run_until_idle()
    return sinks


LENGTHS = [5, 17, 1, 40, 9, 26, 3, 12]


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("every", [0, 3])
def test_greedy_jobs_batched_equal_each_alone(moe, every):
    model = tiny(window=6, moe=moe)
    ps = prompts(LENGTHS)
    budgets = [7, 20, 3, 15, 30, 1, 12, 9]
    sinks = [Collect() for _ in ps]
    jobs = [Job(p, m, s, temperature=0, eos_id=EOS) for p, m, s in zip(ps, budgets, sinks)]
    sched = Scheduler(model, max_batch=4, prefill_tokens=16)  # 4 rows for 8 jobs; long prompts in chunks
    serve_staggered(sched, jobs, every)
    for p, m, sink in zip(ps, budgets, sinks):
        ref = alone(model, p, m, temperature=0, eos_id=EOS)
        assert sink.ids == ref.tokens
        assert sink.ended == ("stop" if ref.finish_reason == "stop" else "length")
        assert (sink.tokens[-1].id == EOS) == (ref.stop_token_id == EOS)
    assert sched.peak_rows == 4 and sched.cache is None  # the batch was full, and the memory is back
    assert sched.stats["finished"] == len(jobs) and not sched.rows and not sched.waiting


def test_sampling_penalties_processors_and_logprobs_equal_alone():
    model = tiny(window=None)
    ps = prompts([4, 11, 7, 20])

    def never(token):
        def proc(generated, logits):
            logits[:, token] = -math.inf
            return logits
        return proc

    kws = [
        dict(temperature=1.0, top_p=0.9, seed=11),
        dict(temperature=0.8, seed=2**64 - 1, presence_penalty=1.5, frequency_penalty=0.5),
        dict(temperature=0, logprobs=True, top_logprobs=3, frequency_penalty=-1.0),
        dict(temperature=1.3, seed=5, logprobs=True, logits_processors=[never(10)]),
    ]
    sinks = [Collect() for _ in ps]
    jobs = [Job(p, 12, s, ignore_eos=True, **kw) for p, s, kw in zip(ps, sinks, kws)]
    serve_staggered(Scheduler(model, max_batch=8), jobs, every=2)
    for p, sink, kw in zip(ps, sinks, kws):
        if "logits_processors" in kw:
            kw = dict(kw, logits_processors=[never(10)])  # a fresh processor for the reference run
        ref = alone(model, p, 12, ignore_eos=True, **kw)
        assert sink.ids == ref.tokens and sink.ended == "length"
        if kw.get("logprobs"):
            assert [t.logprob for t in sink.tokens] == pytest.approx(ref.logprobs, abs=1e-5)
        if kw.get("top_logprobs"):
            assert [[i for i, _ in t.top_logprobs] for t in sink.tokens] == [[i for i, _ in x] for x in
                                                                                ref.top_logprobs]
    assert 10 not in sinks[3].ids


def test_memory_budget_makes_jobs_wait_in_order_and_none_starves():
    model = tiny(window=None)
    ps = prompts([30, 5, 5, 5, 5, 5])
    budgets = [200, 10, 10, 10, 10, 10]
    two_rows = cache_nbytes(model.args, 2, 256, model.dtype)  # room for two rows of up to 256 positions
    sched = Scheduler(model, max_batch=8, kv_cache_bytes=two_rows)
    sinks = [Collect() for _ in ps]
    order = []
    for p, m, s in zip(ps, budgets, sinks):
        s.end = lambda reason, s=s: (order.append(s), setattr(s, "ended", reason))
        sched.submit(Job(p, m, s, temperature=0, ignore_eos=True))
    sched.run_until_idle()
    assert sched.peak_rows == 2  # never more than the budget holds
    for p, m, s in zip(ps, budgets, sinks):
        assert s.ids == alone(model, p, m, temperature=0).tokens
    assert order[0] is sinks[1] and order[-1] is sinks[0]  # the long job decodes on while the short ones pass
    with pytest.raises(GenerationParamError, match="max_tokens: .* KV cache"):  # can never fit: refused at once
        sched.submit(Job(ps[0], 2000, Collect()))


def test_cancel_and_timeout_stop_within_a_step_and_free_the_row():
    model = tiny()
    ps = prompts([6, 6, 6])
    sinks = [Collect() for _ in ps]
    jobs = [Job(p, 50, s, temperature=0, ignore_eos=True) for p, s in zip(ps, sinks)]
    sched = Scheduler(model, max_batch=4)
    for job in jobs:
        sched.submit(job)
    for _ in range(5):
        sched.step()
    jobs[1].cancel()
    n = len(sinks[1].tokens)
    sched.step()
    assert sinks[1].ended == "cancelled" and len(sinks[1].tokens) == n and len(sched.rows) == 2
    sched.run_until_idle()
    assert sinks[0].ids == alone(model, ps[0], 50, temperature=0).tokens
    assert sinks[2].ids == alone(model, ps[2], 50, temperature=0).tokens

    slow = Collect()
    sched.submit(Job(ps[0], 10_000 - len(ps[0]), slow, temperature=0, ignore_eos=True, timeout=0.2))
    sched.run_until_idle()
    assert slow.ended == "timeout" and 0 < len(slow.tokens) < 10_000

    waiting = Collect()  # a job whose whole time passes in the queue gets SchedulerBusy
    sched = Scheduler(model, max_batch=1)
    sched.submit(Job(ps[0], 30, Collect(), temperature=0, ignore_eos=True))
    sched.submit(Job(ps[1], 5, waiting, timeout=0.0))
    sched.run_until_idle()
    assert isinstance(waiting.failed, SchedulerBusy) and not waiting.tokens


def test_sink_stop_queue_limit_and_one_failing_row():
    model = tiny()
    ps = prompts([5, 5])
    stopper = Collect(stop_after=3)

    def broken(generated, logits):
        return logits.fill_(-math.inf)  # allows no token at all: that job fails, not the batch

    bad, good = Collect(), Collect()
    sched = Scheduler(model, max_batch=4, max_waiting=3)
    sched.submit(Job(ps[0], 20, stopper, temperature=0, ignore_eos=True))
    sched.submit(Job(ps[1], 4, bad, temperature=0, logits_processors=[broken]))
    sched.submit(Job(ps[1], 4, good, temperature=0, ignore_eos=True))
    with pytest.raises(SchedulerBusy, match="busy"):
        sched.submit(Job(ps[1], 4, Collect()))
    sched.run_until_idle()
    assert len(stopper.tokens) == 3 and stopper.ended == "stop"
    assert isinstance(bad.failed, ValueError) and "no allowed token" in str(bad.failed)
    assert good.ids == alone(model, ps[1], 4, temperature=0).tokens and good.ended == "length"
    with pytest.raises(GenerationParamError, match="temperature"):
        sched.submit(Job(ps[0], 4, Collect(), temperature=-1))
    with pytest.raises(GenerationParamError, match=r"prompts\[0\]\[0\]"):
        sched.submit(Job([VOCAB], 4, Collect()))


def test_one_row_at_a_time_is_the_same_as_batched():
    model = tiny()
    ps = prompts([3, 8, 2])
    sinks = [Collect() for _ in ps]
    sched = Scheduler(model, max_batch=1)
    for p, s in zip(ps, sinks):
        sched.submit(Job(p, 6, s, temperature=0, ignore_eos=True))
    sched.run_until_idle()
    assert sched.peak_rows == 1
    assert [s.ids for s in sinks] == [alone(model, p, 6, temperature=0).tokens for p in ps]


def test_the_cache_shrinks_as_rows_leave_and_results_stay_equal():
    model = tiny(window=None)
    short, long_prompt, tail = prompts([3] * 8), prompts([500], seed=1)[0], prompts([5], seed=2)[0]
    sched = Scheduler(model, max_batch=16)
    sinks = [Collect() for _ in range(10)]
    for p, s in zip(short, sinks):
        sched.submit(Job(p, 2, s, temperature=0, ignore_eos=True))
    sched.submit(Job(long_prompt, 1, sinks[8], temperature=0, ignore_eos=True))  # 501 positions: the cache grows
    sched.submit(Job(tail, 60, sinks[9], temperature=0, ignore_eos=True))
    sched.step()  # 10 jobs in 16 rows of 512 positions; the 8 short ones end within the step: 2 rows are left
    assert sched.peak_rows == 10 and all(s.ended == "length" for s in sinks[:8])
    assert (sched.cache.batch_size, sched.cache.max_seq_len) == (4, 512)
    while len(sched.rows) > 1:
        sched.step()
    sched.step()
    assert (sched.cache.batch_size, sched.cache.max_seq_len) == (2, 256)  # one row of 65 positions is left
    sched.run_until_idle()
    assert sinks[9].ids == alone(model, tail, 60, temperature=0).tokens
    assert sinks[8].ids == alone(model, long_prompt, 1, temperature=0).tokens


class CountingModel(torch.nn.Module):
    """A model wrapper that counts the (row, position) pairs it is given that are not padding."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model, self.args, self.device, self.dtype = model, model.args, model.device, model.dtype
        self.positions = 0

    def forward(self, tokens, positions=None, cache=None, logits_at=None):
        self.positions += int((positions >= 0).sum())
        return self.model(tokens, positions, cache, logits_at=logits_at)


@pytest.mark.parametrize("window", [None, 6])
def test_choices_sharing_a_prompt_prefill_it_once(window):
    """submit_all of n jobs naming the first as prompt_of: one prefill of the prompt, its cache row copied; each
    job still gives what it gives alone (seed + i sampling, greedy), and a follower that joins late or loses its
    leader prefills its own copy."""
    model = tiny(window=window)
    counting = CountingModel(model)
    (p,) = prompts([23])
    kw = [dict(temperature=1.0, seed=5 + i) for i in range(3)] + [dict(temperature=0)]
    sinks = serve_choices(counting, p, 8, kw, max_batch=4, eos_id=EOS, ignore_eos=True)  # prompt: several chunks
    for sink, k in zip(sinks, kw):
        assert sink.ids == alone(model, p, 8, eos_id=EOS, ignore_eos=True, **k).tokens
    # the prompt once, then 7 decode steps per job (the first token of each comes from the prefill's logits)
    assert counting.positions == len(p) + 4 * 7

    # a batch of 2 rows: jobs 2 and 3 join after the leader left, and prefill their own copies
    counting.positions = 0
    sinks = serve_choices(counting, p, 8, kw, max_batch=2, eos_id=EOS, ignore_eos=True)
    for sink, k in zip(sinks, kw):
        assert sink.ids == alone(model, p, 8, eos_id=EOS, ignore_eos=True, **k).tokens
    assert counting.positions == 3 * len(p) + 4 * 7

    # the leader cancelled while prefilling: its follower prefills by itself
    sinks = [Collect() for _ in range(2)]
    jobs = [Job(p, 8, s, temperature=0, eos_id=EOS) for s in sinks]
    jobs[1].prompt_of = jobs[0]
    sched = Scheduler(model, max_batch=4, prefill_tokens=8)
    sched.submit_all(jobs)
    sched.step()
    jobs[0].cancel()
    sched.run_until_idle()
    assert sinks[0].ended == "cancelled" and sinks[1].ids == alone(model, p, 8, temperature=0, eos_id=EOS).tokens


def test_latent_attention_fine_expert_model_batched_equals_alone():
    """A Small-4-shaped model (latent KV cache, fine-grained experts + shared expert, YaRN) in the continuous batch:
    staggered greedy jobs and n choices sharing one prefill give what each gives alone."""
    from test_mla import tiny as tiny_mla

    torch.manual_seed(0)
    model = Transformer(tiny_mla(vocab_size=VOCAB)).eval()
    with torch.no_grad():
        model.output.weight.mul_(8)  # decisive logits
    ps = prompts([5, 17, 1, 12])
    budgets = [7, 12, 3, 9]
    sinks = [Collect() for _ in ps]
    jobs = [Job(p, m, s, temperature=0, eos_id=EOS) for p, m, s in zip(ps, budgets, sinks)]
    serve_staggered(Scheduler(model, max_batch=3, prefill_tokens=8), jobs, every=2)
    for p, m, sink in zip(ps, budgets, sinks):
        assert sink.ids == alone(model, p, m, temperature=0, eos_id=EOS).tokens
    (p,) = prompts([13], seed=1)
    kw = [dict(temperature=1.0, seed=3 + i) for i in range(2)] + [dict(temperature=0)]
    sinks = serve_choices(model, p, 6, kw, max_batch=4, ignore_eos=True)
    for sink, k in zip(sinks, kw):
        assert sink.ids == alone(model, p, 6, ignore_eos=True, **k).tokens
