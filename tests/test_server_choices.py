"""n choices on the server: the official clients get the Python API's n choices (choice i samples with seed + i),
streamed (each chunk names its choice) and not, the prompt counted once; n is at most max_batch and counts n
against the queue (scheduler.submit_all queues all of a request's jobs or none)."""

from __future__ import annotations

import pytest
import torch
from chat_models import (
    SP_V3,
    needs_tokenizer_files,
    one_torch_thread,  # noqa: F401 — a fixture, used through pytestmark
    tiny_model,
    tokenizer,
)
from test_server_safety import request

from mistral_ref.api import chat_completion
from mistral_ref.sampling import GenerationParamError
from mistral_ref.scheduler import Job, Scheduler, SchedulerBusy
from mistral_ref.server import ChatServer

openai = pytest.importorskip("openai")
inference = pytest.importorskip("azure.ai.inference")
from azure.ai.inference import models as azure_models  # noqa: E402
from azure.core.credentials import AzureKeyCredential  # noqa: E402

pytestmark = [needs_tokenizer_files, pytest.mark.usefixtures("one_torch_thread")]

MESSAGES = [{"role": "user", "content": "Tell me about rivers."}]
SAMPLED = dict(temperature=1.0, top_p=0.95, seed=11, max_tokens=10)


@pytest.fixture(scope="module")
def served():
    tok = tokenizer(SP_V3)
    model = tiny_model(tok, max_seq_len=4096)
    server = ChatServer(model, tok, port=0, model_name="tiny", max_batch=4, max_queue=8).start()
    yield server, model, tok
    server.stop()


def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_n_choices_equal_the_python_api(served):
    server, model, tok = served
    ref = chat_completion(model, tok, MESSAGES, n=3, **SAMPLED)
    contents = [c["message"]["content"] for c in ref["choices"]]
    assert len(set(contents)) == 3  # seed + i: the choices differ

    r = oai(server).chat.completions.create(model="tiny", messages=MESSAGES, n=3, **SAMPLED)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.message.content for c in r.choices] == contents
    assert [c.finish_reason for c in r.choices] == [c["finish_reason"] for c in ref["choices"]]
    assert r.usage.prompt_tokens == len(tok.encode_chat(MESSAGES)) == ref["usage"]["prompt_tokens"]  # once
    assert r.usage.completion_tokens == ref["usage"]["completion_tokens"] >= 3 * 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(oai(server).chat.completions.create(model="tiny", messages=MESSAGES, n=3, stream=True,
                                                        **SAMPLED))
    by_index = {i: [c for c in chunks if c.choices and c.choices[0].index == i] for i in range(3)}
    assert sum(map(len, by_index.values())) == len(chunks)  # every chunk names its choice
    for i, own in by_index.items():
        assert "".join(c.choices[0].delta.content or "" for c in own) == contents[i]
        finishes = [c.choices[0].finish_reason for c in own]
        assert finishes[-1] == ref["choices"][i]["finish_reason"] and all(f is None for f in finishes[:-1])
    with_usage = [c for c in chunks if c.usage is not None]
    assert with_usage == [chunks[-1]]  # only the very last chunk, with the usage of all choices
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
        ref["usage"]["prompt_tokens"], ref["usage"]["completion_tokens"])


def test_greedy_n_choices_are_n_copies(served):
    server, model, tok = served
    r = oai(server).chat.completions.create(model="tiny", messages=MESSAGES, n=2, temperature=0, max_tokens=6)
    one = chat_completion(model, tok, MESSAGES, temperature=0, max_tokens=6)
    assert [c.message.content for c in r.choices] == [one["choices"][0]["message"]["content"]] * 2
    assert r.usage.completion_tokens == 2 * one["usage"]["completion_tokens"]
    assert r.usage.prompt_tokens == one["usage"]["prompt_tokens"]


def test_azure_client_n_through_model_extras(served):
    server, model, tok = served
    client = inference.ChatCompletionsClient(endpoint=server.url, credential=AzureKeyCredential("unused"))
    messages = [azure_models.UserMessage(content=MESSAGES[0]["content"])]
    # n is not in the Azure standard set: model_extras sends it with extra-parameters: pass-through
    r = client.complete(messages=messages, temperature=1.0, top_p=0.95, max_tokens=10,
                        model_extras={"n": 2, "seed": 11})
    ref = chat_completion(model, tok, MESSAGES, n=2, **SAMPLED)
    assert [c.message.content for c in r.choices] == [c["message"]["content"] for c in ref["choices"]]
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.prompt_tokens == ref["usage"]["prompt_tokens"]


def test_n_over_the_batch_limit_is_refused_naming_n(served):
    server, _, _ = served
    with pytest.raises(openai.UnprocessableEntityError, match="n: 5 choices need 5 batch rows") as e:
        oai(server).chat.completions.create(model="tiny", messages=MESSAGES, n=5)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.UnprocessableEntityError, match="n"):  # the API's own range, 1..16
        oai(server).chat.completions.create(model="tiny", messages=MESSAGES, n=17)
    status, _, body = request(server, "GET", "/health")
    assert status == 200 and body["running"] == 0 and body["waiting"] == 0  # nothing was scheduled


def test_submit_all_queues_every_job_or_none():
    tok = tokenizer(SP_V3)
    model = tiny_model(tok)

    class Sink:
        def __init__(self):
            self.ended = None

        def token(self, t):
            return True

        def end(self, reason):
            self.ended = reason

        def error(self, exc):
            self.ended = exc

    sched = Scheduler(model, max_batch=2, max_waiting=3, kv_cache_bytes=64 << 20)
    prompt = tok.encode("hello")

    def jobs(k):
        return [Job(prompt, 3, Sink(), temperature=0) for _ in range(k)]

    with pytest.raises(GenerationParamError, match="^n: 4 choices"):
        sched.submit_all(jobs(4))  # can never be queued
    sched.submit_all(jobs(2))
    with pytest.raises(SchedulerBusy):
        sched.submit_all(jobs(2))  # 2 waiting + 2 > 3: none of them is queued
    assert len(sched.waiting) == 2
    last = jobs(1)
    sched.submit_all(last)
    with torch.no_grad():
        sched.run_until_idle()
    assert last[0].sink.ended == "length" and sched.stats["finished"] == 3 and sched.peak_rows == 2
