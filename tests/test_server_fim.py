"""POST /v1/fim/completions: the Mistral FIM API served by the batching server gives exactly what
api.fim_completion gives alone (greedy; min_tokens; stop strings; streamed or not), and is in /openapi.json."""

from __future__ import annotations

import json

import pytest
from chat_models import SP_V3, TEKKEN_V3, needs_tokenizer_files, one_torch_thread, tiny_model, tokenizer  # noqa: F401
from test_server_safety import request

from mistral_ref.api import fim_completion
from mistral_ref.server import ChatServer

pytestmark = [needs_tokenizer_files, pytest.mark.usefixtures("one_torch_thread")]

CASES = [
    dict(prompt="def add(a, b):\n    return", suffix="\n\nprint(add(1, 2))", temperature=0, max_tokens=12),
    dict(prompt="The capital of France is", temperature=0, max_tokens=8, min_tokens=6),
    dict(prompt="x = [1, 2,", suffix="]", temperature=0, max_tokens=16, stop=["e", "a"]),
]


@pytest.mark.parametrize("name", [SP_V3, TEKKEN_V3])
def test_fim_route_equals_the_python_api(name):
    tok = tokenizer(name)
    model = tiny_model(tok, max_seq_len=512)
    server = ChatServer(model, tok, port=0).start()
    try:
        for case in CASES:
            ref = fim_completion(model, tok, **case)
            status, _, got = request(server, "POST", "/v1/fim/completions", case)
            assert status == 200, got
            for key in ("content",):
                assert got["choices"][0]["message"][key] == ref["choices"][0]["message"][key], case
            assert got["choices"][0]["finish_reason"] == ref["choices"][0]["finish_reason"]
            assert got["usage"] == ref["usage"]
            if case.get("min_tokens"):
                assert got["usage"]["completion_tokens"] >= case["min_tokens"]
        status, _, bad = request(server, "POST", "/v1/fim/completions", {"prompt": "x", "min_tokens": -1})
        assert status == 422 and "min_tokens" in json.dumps(bad)
        status, _, doc = request(server, "GET", "/openapi.json")
        assert "/v1/fim/completions" in doc["paths"] and "FIMCompletionRequest" in doc["components"]["schemas"]
        status, _, models = request(server, "GET", "/v1/models")
        assert models["data"][0]["capabilities"]["completion_fim"] is True
    finally:
        server.stop()


def test_fim_route_streams_the_same_middle():
    import http.client

    tok = tokenizer(SP_V3)
    model = tiny_model(tok, max_seq_len=512)
    server = ChatServer(model, tok, port=0).start()
    try:
        case = CASES[0]
        ref = fim_completion(model, tok, **case)["choices"][0]["message"]["content"]
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=120)
        conn.request("POST", "/v1/fim/completions", json.dumps(dict(case, stream=True)),
                     {"Content-Type": "application/json"})
        events = [e[6:] for e in conn.getresponse().read().decode().split("\n\n") if e.startswith("data: ")]
        conn.close()
        assert events[-1] == "[DONE]"
        text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
        assert text == ref
    finally:
        server.stop()
