"""mistral_ref.server: the official `openai` and `azure-ai-inference` clients work unchanged against a server
on 127.0.0.1; bad requests get 4xx JSON errors naming the field; 50 concurrent requests complete; a client that
disconnects mid-stream leaves the server serving."""

from __future__ import annotations

import http.client
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from chat_models import (
    SP_V3,
    needs_tokenizer_files,
    one_torch_thread,  # noqa: F401 — a fixture, used through pytestmark
    punctuation_bias,
    tiny_model,
    tokenizer,
)

from mistral_ref.api import REQUEST_FIELDS, chat_completion
from mistral_ref.server import ChatServer

openai = pytest.importorskip("openai")
inference = pytest.importorskip("azure.ai.inference")
from azure.ai.inference import models as azure_models  # noqa: E402
from azure.core.credentials import AzureKeyCredential  # noqa: E402
from azure.core.exceptions import HttpResponseError  # noqa: E402

pytestmark = [needs_tokenizer_files, pytest.mark.usefixtures("one_torch_thread")]

CONTEXT = 4096
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


@pytest.fixture(scope="module")
def served():
    tok = tokenizer(SP_V3)
    model = tiny_model(tok, max_seq_len=CONTEXT)
    server = ChatServer(
        model, tok, host="127.0.0.1", port=0, model_name="tiny-mistral", max_body_bytes=64 * 1024
    ).start()
    yield server, model, tok
    server.stop()


@pytest.fixture
def script(served):
    """Steer the served model for one test: script(tokens, messages, tools) -> None; reset afterwards."""
    _, model, tok = served

    def steer(tokens, messages=MESSAGES, tools=None, bias=None):
        model.steer(tokens, len(tok.encode_chat(messages, tools=tools)), bias)

    yield steer
    model.steer()


def tool_call_script(tok):
    body = tok.encode('[{"name": "get_weather", "arguments": {"city": "Paris"}}]')
    return [tok.special_id("[TOOL_CALLS]")] + body + [tok.eos_id]


def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def azure(server):
    return inference.ChatCompletionsClient(endpoint=server.url, credential=AzureKeyCredential("unused"))


def raw(server, method, path, body=None, headers=None):
    """One plain HTTP request: (status, parsed JSON body)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, json.loads(payload) if payload else None


# ---- the openai client
# ------------------------------------------------------------------------------------------
def test_openai_chat_equals_the_python_api(served):
    server, model, tok = served
    r = oai(server).chat.completions.create(model="tiny-mistral", messages=MESSAGES, temperature=0, max_tokens=8)
    ref = chat_completion(model, tok, MESSAGES, temperature=0, max_tokens=8)
    assert r.choices[0].message.content == ref["choices"][0]["message"]["content"]
    assert r.choices[0].finish_reason == "length" and r.model == "tiny-mistral" and r.object == "chat.completion"
    assert r.usage.prompt_tokens == len(tok.encode_chat(MESSAGES)) and r.usage.completion_tokens == 8

    chunks = list(
        oai(server).chat.completions.create(
            model="tiny-mistral", messages=MESSAGES, temperature=0, max_tokens=8, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == 8


def test_openai_tool_calls_stream_and_not(served, script):
    server, _, tok = served
    script(tool_call_script(tok), tools=TOOLS)
    client = oai(server)
    r = client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS, temperature=0, max_tokens=40)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and len(call.id) == 9 and call.id.isalnum()
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    chunks = list(
        client.chat.completions.create(
            model="m", messages=MESSAGES, tools=TOOLS, temperature=0, max_tokens=40, stream=True
        )
    )
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas] == ["get_weather"] and deltas[0].index == 0
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    follow_up = MESSAGES + [
        r.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "name": "get_weather", "content": "22 C"},
    ]
    r2 = client.chat.completions.create(model="m", messages=follow_up, tools=TOOLS, temperature=0, max_tokens=2)
    assert r2.usage.prompt_tokens == len(tok.encode_chat(follow_up, tools=TOOLS))


def test_openai_json_mode_and_extras(served, script):
    server, _, tok = served
    script(None, bias=punctuation_bias(tok, 8.0))
    client = oai(server)
    finishes = []
    for seed in range(3):
        r = client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            response_format={"type": "json_object"},
            temperature=1.0,
            seed=seed,
            max_tokens=16,
        )
        finishes.append(r.choices[0].finish_reason)
        if finishes[-1] == "stop":
            assert isinstance(json.loads(r.choices[0].message.content), dict)
    assert "stop" in finishes
    r = client.chat.completions.create(
        model="m",
        messages=MESSAGES,
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
        extra_body={"random_seed": 3, "safe_prompt": True, "ignore_eos": True},
    )
    assert len(r.choices[0].logprobs.content) == 3 and len(r.choices[0].logprobs.content[0].top_logprobs) == 2
    assert r.usage.prompt_tokens == len(tok.encode_chat(MESSAGES, safe_prompt=True))


def test_openai_errors_name_the_field(served):
    client = oai(served[0])
    with pytest.raises(openai.UnprocessableEntityError, match="messages"):
        client.chat.completions.create(model="m", messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.UnprocessableEntityError, match="frobnicate"):
        client.chat.completions.create(model="m", messages=MESSAGES, extra_body={"frobnicate": 1})
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        client.chat.completions.create(model="m", messages=MESSAGES, temperature=9)
    with pytest.raises(openai.UnprocessableEntityError, match="n: "):  # n > 1 works (test_server_choices.py)
        client.chat.completions.create(model="m", messages=MESSAGES, n=17)


# ---- the azure-ai-inference client
# ------------------------------------------------------------------------------
def test_azure_model_info_and_complete(served):
    server, model, tok = served
    client = azure(server)
    info = client.get_model_info()
    assert (info.model_name, info.model_type, info.model_provider_name) == (
        "tiny-mistral",
        "chat-completions",
        "MistralAI",
    )
    messages = [azure_models.UserMessage(content=MESSAGES[0]["content"])]
    r = client.complete(messages=messages, temperature=0, max_tokens=6)
    ref = chat_completion(model, tok, MESSAGES, temperature=0, max_tokens=6)
    assert r.choices[0].message.content == ref["choices"][0]["message"]["content"]
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    updates = list(client.complete(messages=messages, temperature=0, max_tokens=6, stream=True))
    assert "".join(u.choices[0].delta.content or "" for u in updates if u.choices) == r.choices[0].message.content
    assert [u.choices[0].finish_reason for u in updates if u.choices][-1] == "length"


def test_azure_model_extras_pass_through(served):
    server, _, tok = served
    client = azure(server)
    messages = [azure_models.UserMessage(content=MESSAGES[0]["content"])]
    safe = client.complete(messages=messages, max_tokens=2, model_extras={"safe_mode": True})
    assert safe.usage.prompt_tokens == len(tok.encode_chat(MESSAGES, safe_prompt=True))
    lp = client.complete(messages=messages, max_tokens=3, temperature=0, model_extras={"logprobs": True})
    entries = lp.as_dict()["choices"][0]["logprobs"]["content"]
    assert len(entries) == 3 and all(e["logprob"] <= 0 for e in entries)


def test_azure_tools_and_json_mode(served, script):
    server, _, tok = served
    client = azure(server)
    tools = [
        azure_models.ChatCompletionsToolDefinition(
            function=azure_models.FunctionDefinition(
                name="get_weather",
                description="Current weather of a city",
                parameters=TOOLS[0]["function"]["parameters"],
            )
        )
    ]
    messages = [azure_models.UserMessage(content=MESSAGES[0]["content"])]
    script(tool_call_script(tok), tools=TOOLS)
    r = client.complete(messages=messages, tools=tools, temperature=0, max_tokens=40)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"} and len(call.id) == 9
    streamed = list(client.complete(messages=messages, tools=tools, temperature=0, max_tokens=40, stream=True))
    assert [u.choices[0].finish_reason for u in streamed if u.choices][-1] == "tool_calls"
    script(None, bias=punctuation_bias(tok, 8.0))
    finishes = []
    for seed in range(3):
        r = client.complete(messages=messages, response_format="json_object", temperature=1.0, seed=seed, max_tokens=16)
        finishes.append(r.choices[0].finish_reason)
        if finishes[-1] == "stop":
            assert isinstance(json.loads(r.choices[0].message.content), dict)
    assert "stop" in finishes


def test_azure_extra_parameters_header(served):
    server = served[0]
    body = {"messages": MESSAGES, "max_tokens": 1, "safe_mode": True}
    status, err = raw(server, "POST", "/chat/completions", body)
    assert status == 400 and err["error"]["param"] == "safe_mode" and "pass-through" in err["message"]
    status, r = raw(server, "POST", "/chat/completions", body, {"extra-parameters": "drop"})
    assert status == 200 and r["usage"]["prompt_tokens"] == len(served[2].encode_chat(MESSAGES))
    with pytest.raises(HttpResponseError, match="temperature"):
        azure(server).complete(messages=[azure_models.UserMessage(content="hi")], temperature=9)
    modalities = {"messages": MESSAGES, "max_tokens": 1, "modalities": ["text"], "safe_mode": True}
    for mode in ("drop", "pass-through"):  # a standard Azure parameter we accept and ignore, in both modes
        status, r = raw(server, "POST", "/chat/completions", modalities, {"extra-parameters": mode})
        safe = mode == "pass-through"  # safe_mode is passed through as safe_prompt, or dropped
        assert status == 200 and r["usage"]["prompt_tokens"] == len(served[2].encode_chat(MESSAGES, safe_prompt=safe))


# ---- errors, documents, concurrency, disconnects
# ----------------------------------------------------------------
@pytest.mark.parametrize(
    "body, status, field",
    [
        (b'{"messages": [', 400, "body"),
        (b"\xff\xfe", 400, "body"),
        (b"[1, 2]", 422, "body"),
        ({"messages": MESSAGES, "temperature": "warm"}, 422, "temperature"),
        ({"messages": MESSAGES, "max_tokens": -1}, 422, "max_tokens"),
        ({"messages": MESSAGES, "stream": "yes"}, 422, "stream"),
        ({"messages": MESSAGES, "bogus": 1}, 422, "bogus"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 422, "messages"),
        ({"messages": "hello"}, 422, "messages"),
        ({}, 422, "messages"),
        ({"messages": [{"role": "user", "content": "hello " * 5000}]}, 400, "messages"),
        ({"messages": MESSAGES, "max_tokens": CONTEXT}, 400, "max_tokens"),
    ],
)
def test_bad_requests_get_4xx_json_naming_the_field(served, body, status, field):
    got, err = raw(served[0], "POST", "/v1/chat/completions", body)
    assert got == status
    assert err["object"] == "error" and err["error"]["param"] == field and field in err["message"]


def test_a_temperature_too_small_to_divide_by_is_greedy_not_a_500(served):
    server, model, tok = served
    expected = chat_completion(model, tok, MESSAGES, temperature=0, max_tokens=4)["choices"][0]["message"]
    status, r = raw(server, "POST", "/v1/chat/completions", {"messages": MESSAGES, "temperature": 1e-40,
                                                             "max_tokens": 4})
    assert status == 200 and r["choices"][0]["message"] == expected


def test_deeply_nested_json_gets_a_400_not_a_dropped_connection(served):
    server = served[0]
    body = b"[" * 5000 + b"]" * 5000  # 10 kB, valid JSON, nested deeper than the interpreter's recursion limit
    status, err = raw(server, "POST", "/v1/chat/completions", body)
    assert status == 400 and err["error"]["param"] == "body"
    assert raw(server, "POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1})[0] == 200


def test_oversized_body_unknown_route_and_method(served):
    server = served[0]
    status, err = raw(server, "POST", "/v1/chat/completions", b"x" * (65 * 1024))
    assert status == 413 and "65536" in err["message"]
    assert raw(server, "GET", "/v2/nothing")[0] == 404
    assert raw(server, "GET", "/v1/chat/completions")[0] == 405
    status, r = raw(server, "POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1})
    assert status == 200  # and the server goes on serving


def test_openapi_and_models(served):
    server = served[0]
    status, doc = raw(server, "GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert {"/v1/chat/completions", "/chat/completions", "/info", "/v1/models"} <= set(doc["paths"])
    props = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert set(props) == set(REQUEST_FIELDS)
    status, models = raw(server, "GET", "/v1/models")
    assert status == 200 and models["data"][0]["id"] == "tiny-mistral"
    assert models["data"][0]["max_context_length"] == CONTEXT
    assert [m.id for m in oai(server).models.list()] == ["tiny-mistral"]


def test_fifty_concurrent_requests_all_complete(served):
    server, model, tok = served
    expected = chat_completion(model, tok, MESSAGES, temperature=0, max_tokens=3)["choices"][0]["message"]["content"]

    def one(i):
        body = {"messages": MESSAGES, "temperature": 0, "max_tokens": 3, "stream": i % 2 == 1}
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=120)
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read().decode()
        conn.close()
        if i % 2 == 0:
            return resp.status, json.loads(data)["choices"][0]["message"]["content"]
        events = [line[6:] for line in data.split("\n\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        return resp.status, "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(one, range(50)))
    assert results == [(200, expected)] * 50


def test_client_disconnecting_mid_stream_does_not_wedge_the_server(served):
    server = served[0]
    before = server.scheduler.stats["cancelled"]
    body = json.dumps({"messages": MESSAGES, "max_tokens": 3000, "ignore_eos": True, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=60)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    received = b""
    while received.count(b"data: ") < 3:
        received += sock.recv(4096)
    assert received.startswith(b"HTTP/1.1 200")
    sock.close()  # gone, 3000 tokens early

    t0 = time.monotonic()
    status, r = raw(server, "POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2})
    assert status == 200 and r["usage"]["completion_tokens"] == 2
    while server.scheduler.stats["cancelled"] == before and time.monotonic() - t0 < 60:
        time.sleep(0.01)
    assert server.scheduler.stats["cancelled"] == before + 1  # the abandoned generation was stopped, not run out
    assert time.monotonic() - t0 < 60


def test_unsupported_methods_get_a_json_405(served):
    server = served[0]
    for method in ("PUT", "DELETE", "PATCH"):
        status, err = raw(server, method, "/v1/chat/completions", {"messages": MESSAGES})
        assert status == 405 and method in err["message"]
