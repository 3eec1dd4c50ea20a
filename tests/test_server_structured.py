"""Structured outputs and strict tool calls from `mistral-ref serve`, through the official clients unchanged: the
openai client's json_schema response_format and max_completion_tokens, azure-ai-inference's JsonSchemaFormat and
named tool choice; whenever finish_reason is "stop" the content validates against the schema, and a forced call
names a declared (or the named) function with arguments valid against its parameters — on the embedded model too,
which used to answer a call to ``multiply`` with ``convert_units``."""

from __future__ import annotations

import json

import jsonschema
import pytest
from chat_models import (
    SP_V3,
    needs_tokenizer_files,
    one_torch_thread,  # noqa: F401 — a fixture, used through pytestmark
    punctuation_bias,
    tiny_model,
    tokenizer,
)

from mistral_ref.embedded import TOOLS as EMBEDDED_TOOLS
from mistral_ref.server import ChatServer

openai = pytest.importorskip("openai")
inference = pytest.importorskip("azure.ai.inference")
from azure.ai.inference import models as azure_models  # noqa: E402
from azure.core.credentials import AzureKeyCredential  # noqa: E402

pytestmark = [needs_tokenizer_files, pytest.mark.usefixtures("one_torch_thread")]

MESSAGES = [{"role": "user", "content": "Describe a person."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "role"],
    "additionalProperties": False,
}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER, "strict": True}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"]}}}]


@pytest.fixture(scope="module")
def served():
    tok = tokenizer(SP_V3)
    model = tiny_model(tok, max_seq_len=4096)
    model.steer(bias=punctuation_bias(tok, 6.0))  # JSON closes early: many replies end with "stop"
    server = ChatServer(model, tok, port=0, model_name="tiny").start()
    yield server, model, tok
    server.stop()


def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def azure(server):
    return inference.ChatCompletionsClient(endpoint=server.url, credential=AzureKeyCredential("unused"))


def test_openai_json_schema_replies_validate(served):
    server, _, _ = served
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    stopped = 0
    for seed in range(6):
        r = oai(server).chat.completions.create(model="tiny", messages=MESSAGES, response_format=fmt, n=2,
                                                temperature=1.0, seed=seed, max_completion_tokens=60)
        for choice in r.choices:
            if choice.finish_reason == "stop":
                stopped += 1
                jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert stopped >= 4
    chunks = list(oai(server).chat.completions.create(model="tiny", messages=MESSAGES, response_format=fmt,
                                                        temperature=1.0, seed=0, max_completion_tokens=60,
                                                        stream=True))
    r = oai(server).chat.completions.create(model="tiny", messages=MESSAGES, response_format=fmt, temperature=1.0,
                                            seed=0, max_completion_tokens=60)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    with pytest.raises(openai.UnprocessableEntityError, match="response_format.json_schema.schema"):
        bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "if": {}}}}
        oai(server).chat.completions.create(model="tiny", messages=MESSAGES, response_format=bad)


def test_azure_json_schema_format_validates(served):
    server, _, _ = served
    fmt = azure_models.JsonSchemaFormat(name="person", schema=PERSON, strict=True)
    stopped = 0
    for seed in range(6):
        r = azure(server).complete(messages=[azure_models.UserMessage(content=MESSAGES[0]["content"])],
                                   response_format=fmt, temperature=1.0, max_tokens=60, seed=seed)
        if r.choices[0].finish_reason == "stop":
            stopped += 1
            jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    assert stopped >= 2


def test_strict_and_forced_tool_calls_through_both_clients(served):
    server, _, _ = served
    calls = []
    for seed in range(4):
        r = oai(server).chat.completions.create(
            model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
            temperature=1.0, seed=seed, max_tokens=60)
        if r.choices[0].finish_reason == "tool_calls":
            assert len(r.choices[0].message.tool_calls) == 1
            calls += r.choices[0].message.tool_calls
        r = oai(server).chat.completions.create(
            model="tiny", messages=MESSAGES, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=60,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        if r.choices[0].finish_reason == "tool_calls":
            assert {c.function.name for c in r.choices[0].message.tool_calls} == {"get_weather"}
            calls += r.choices[0].message.tool_calls
    assert len(calls) >= 3
    for call in calls:
        assert call.function.name in ("get_weather", "get_time") and len(call.id) == 9
        if call.function.name == "get_weather":
            jsonschema.validate(json.loads(call.function.arguments), WEATHER)

    named = azure_models.ChatCompletionsNamedToolChoice(
        function=azure_models.ChatCompletionsNamedToolChoiceFunction(name="get_weather"))
    tools = [azure_models.ChatCompletionsToolDefinition(function=azure_models.FunctionDefinition(
        name=t["function"]["name"], parameters=t["function"]["parameters"])) for t in TOOLS]
    got = 0
    for seed in range(4):
        r = azure(server).complete(messages=[azure_models.UserMessage(content=MESSAGES[0]["content"])],
                                   tools=tools, tool_choice=named, temperature=1.0, max_tokens=60, seed=seed,
                                   model_extras={"parallel_tool_calls": False})  # (not in Azure's standard set)
        if r.choices[0].finish_reason == "tool_calls":
            got += 1
            (call,) = r.choices[0].message.tool_calls
            assert call.function.name == "get_weather"
            jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    assert got >= 1


def test_the_embedded_model_calls_the_named_function():
    from mistral_ref import load_embedded

    model, tok = load_embedded()
    server = ChatServer(model, tok, port=0).start()
    try:
        tools = list(EMBEDDED_TOOLS.values())
        schema = EMBEDDED_TOOLS["multiply"]["function"]["parameters"]
        for tool_choice in ({"type": "function", "function": {"name": "multiply"}}, "required"):
            offered = tools if tool_choice != "required" else [EMBEDDED_TOOLS["multiply"]]
            r = oai(server).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "Convert 5 km to miles."}], tools=offered,
                tool_choice=tool_choice, temperature=0, max_tokens=64)
            assert r.choices[0].finish_reason == "tool_calls", r
            (call,) = r.choices[0].message.tool_calls
            assert call.function.name == "multiply"
            jsonschema.validate(json.loads(call.function.arguments), schema)
    finally:
        server.stop()
