"""Continuous batching through HTTP: concurrent requests (greedy, seeded sampling, JSON mode, logprobs, stop
strings, streaming or not) decode together and each gets exactly the reply the Python API gives it alone; a
server with max_batch=1 serves one at a time and gives the same replies."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from chat_models import (
    SP_V3,
    needs_tokenizer_files,
    one_torch_thread,  # noqa: F401 — a fixture, used through pytestmark
    tiny_model,
    tokenizer,
)
from test_server_safety import request

from mistral_ref.api import chat_completion
from mistral_ref.server import ChatServer

pytestmark = [needs_tokenizer_files, pytest.mark.usefixtures("one_torch_thread")]

QUESTIONS = ["Hi", "What is the weather in Paris?", "Tell me a long story about a cat " * 8, "2+2?",
             "Name three rivers.", "Why is the sky blue? " * 3]
PARAMS = [
    dict(temperature=0, max_tokens=24),
    dict(temperature=0, max_tokens=9, logprobs=True, top_logprobs=2),
    dict(temperature=1.0, top_p=0.9, seed=7, max_tokens=20, ignore_eos=True),
    dict(temperature=0.7, seed=3, max_tokens=16, presence_penalty=1.0, response_format={"type": "json_object"}),
    dict(temperature=0, max_tokens=30, stop=["e", "a"]),
    dict(temperature=0, max_tokens=12, ignore_eos=True),
]


@pytest.fixture(scope="module")
def model_and_tok():
    tok = tokenizer(SP_V3)
    return tiny_model(tok, max_seq_len=4096), tok


def reply_of(server, body: dict) -> dict:
    """content, finish_reason, usage and logprobs of a request, streamed or not."""
    status, _, r = request(server, "POST", "/v1/chat/completions", dict(body, stream=False))
    assert status == 200, r
    choice = r["choices"][0]
    return {"content": choice["message"]["content"], "finish": choice["finish_reason"], "usage": r["usage"],
            "logprobs": choice["logprobs"]}


def streamed_reply_of(server, body: dict) -> dict:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=120)
    conn.request("POST", "/v1/chat/completions", json.dumps(dict(body, stream=True)),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    events = [e[6:] for e in resp.read().decode().split("\n\n") if e.startswith("data: ")]
    conn.close()
    assert resp.status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    lps = [x for c in chunks if c["choices"][0]["logprobs"] for x in c["choices"][0]["logprobs"]["content"]]
    return {"content": "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks),
            "finish": chunks[-1]["choices"][0]["finish_reason"], "usage": chunks[-1]["usage"],
            "logprobs": {"content": lps} if body.get("logprobs") else None}


def alone(model, tok, body: dict) -> dict:
    r = chat_completion(model, tok, **body)
    choice = r["choices"][0]
    return {"content": choice["message"]["content"], "finish": choice["finish_reason"], "usage": r["usage"],
            "logprobs": choice["logprobs"]}


def same(a: dict, b: dict) -> bool:
    lp = [(e["token"], round(e["logprob"], 4)) for e in (a["logprobs"] or {"content": []})["content"]]
    lq = [(e["token"], round(e["logprob"], 4)) for e in (b["logprobs"] or {"content": []})["content"]]
    return (a["content"], a["finish"], a["usage"], lp) == (b["content"], b["finish"], b["usage"], lq)


@pytest.mark.parametrize("max_batch", [32, 1])
def test_concurrent_requests_equal_each_served_alone(model_and_tok, max_batch):
    model, tok = model_and_tok
    bodies = [dict(messages=[{"role": "user", "content": q}], **p) for q, p in zip(QUESTIONS, PARAMS)] * 3
    server = ChatServer(model, tok, port=0, max_batch=max_batch, prefill_tokens=32).start()
    try:
        with ThreadPoolExecutor(len(bodies)) as pool:
            got = list(pool.map(lambda ib: (streamed_reply_of if ib[0] % 2 else reply_of)(server, ib[1]),
                                enumerate(bodies)))
        peak = server.scheduler.peak_rows
    finally:
        server.stop()
    for body, reply in zip(bodies, got):
        assert same(reply, alone(model, tok, body)), body
    assert peak == 1 if max_batch == 1 else peak > 4  # decoded together (or, as asked, one at a time)
