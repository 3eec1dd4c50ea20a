"""mistral_ref.api: chat completions equal generate() on the encoded chat; the response schema; tool calls;
stop strings, max_tokens and finish reasons; validation errors that name the field."""

from __future__ import annotations

import json
import re

import pytest
import torch
from chat_models import (
    SP_V3,
    SP_V7,
    TEKKEN_V3,
    needs_tokenizer_files,
    one_torch_thread,  # noqa: F401 — a fixture, used through pytestmark
    tiny_model,
    tokenizer,
)

from mistral_ref.api import ContextLengthError, RequestError, chat_completion
from mistral_ref.generation import generate

pytestmark = [needs_tokenizer_files, pytest.mark.usefixtures("one_torch_thread")]

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
ID = re.compile(r"^[a-zA-Z0-9]{9}$")


@pytest.fixture(scope="module")
def sp():
    tok = tokenizer(SP_V3)
    return tiny_model(tok), tok


def tool_call_script(tok, name="get_weather", arguments='{"city": "Paris"}') -> list[int]:
    body = tok.encode(f'[{{"name": "{name}", "arguments": {arguments}}}]')
    return [tok.special_id("[TOOL_CALLS]")] + body + [tok.eos_id]


def test_response_shape_and_greedy_equals_generate(sp):
    model, tok = sp
    r = chat_completion(model, tok, MESSAGES, temperature=0, max_tokens=12, logprobs=True, model_name="tiny")
    assert set(r) == {"id", "object", "created", "model", "choices", "usage"}
    assert r["object"] == "chat.completion" and r["model"] == "tiny" and isinstance(r["created"], int)
    (choice,) = r["choices"]
    assert set(choice) == {"index", "message", "finish_reason", "logprobs"} and choice["index"] == 0
    assert choice["message"]["role"] == "assistant" and choice["message"]["tool_calls"] is None

    prompt = tok.encode_chat(MESSAGES)
    (ref,) = generate(model, [prompt], 12, temperature=0, eos_id=tok.eos_id, logprobs=True)
    assert choice["message"]["content"] == tok.decode(ref.tokens)
    assert choice["finish_reason"] == ref.finish_reason == "length"
    assert [e["logprob"] for e in choice["logprobs"]["content"]] == pytest.approx(ref.logprobs, abs=1e-6)
    assert [bytes(e["bytes"]) for e in choice["logprobs"]["content"]] == [
        tok.id_to_bytes(t) for t in ref.tokens
    ]
    assert r["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": 12,
        "total_tokens": len(prompt) + 12,
    }


def test_greedy_with_penalties_equals_generate_and_eos_is_counted(sp):
    model, tok = sp
    prompt = tok.encode_chat(MESSAGES)
    script = tok.encode("Paris is the capital.") + [tok.eos_id]
    model.steer(script, len(prompt))
    try:
        r = chat_completion(
            model, tok, MESSAGES, temperature=0, max_tokens=40, frequency_penalty=0.5, presence_penalty=0.3
        )
        (ref,) = generate(
            model, [prompt], 40, temperature=0, eos_id=tok.eos_id, frequency_penalty=0.5, presence_penalty=0.3
        )
    finally:
        model.steer()
    assert ref.stop_token_id == tok.eos_id and ref.tokens == script[:-1]
    assert r["choices"][0]["message"]["content"] == "Paris is the capital." == tok.decode(ref.tokens)
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] == len(script)  # the EOS was generated too


def test_stream_matches_non_stream(sp):
    model, tok = sp
    full = chat_completion(model, tok, MESSAGES, temperature=0, max_tokens=10)
    chunks = list(chat_completion(model, tok, MESSAGES, temperature=0, max_tokens=10, stream=True))
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == full["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"] == full["usage"]


def test_stop_strings_cut_the_text_and_finish_with_stop(sp):
    model, tok = sp
    text = chat_completion(model, tok, MESSAGES, temperature=0, max_tokens=16)["choices"][0]["message"][
        "content"
    ]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text.find(stop)
    r = chat_completion(model, tok, MESSAGES, temperature=0, max_tokens=16, stop=[stop, "never-there"])
    assert r["choices"][0]["message"]["content"] == text[:cut]
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] < 16
    chunks = list(chat_completion(model, tok, MESSAGES, temperature=0, max_tokens=16, stop=stop, stream=True))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text[:cut]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_ignore_eos_generates_exactly_max_tokens(sp):
    model, tok = sp
    prompt = tok.encode_chat(MESSAGES)
    model.steer([tok.eos_id] * 8, len(prompt))
    try:
        stopped = chat_completion(model, tok, MESSAGES, temperature=0, max_tokens=8)
        forced = chat_completion(model, tok, MESSAGES, temperature=0, max_tokens=8, ignore_eos=True)
    finally:
        model.steer()
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] == 1
    assert stopped["choices"][0]["message"]["content"] == ""
    assert forced["choices"][0]["finish_reason"] == "length" and forced["usage"]["completion_tokens"] == 8


def test_seed_reproduces_and_random_seed_is_its_alias(sp):
    model, tok = sp
    a = chat_completion(model, tok, MESSAGES, temperature=1.0, max_tokens=8, seed=7)
    b = chat_completion(model, tok, MESSAGES, temperature=1.0, max_tokens=8, random_seed=7)
    c = chat_completion(model, tok, MESSAGES, temperature=1.0, max_tokens=8, seed=8)
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["choices"][0]["message"] != c["choices"][0]["message"]


def test_a_temperature_too_small_to_divide_by_is_greedy(sp):
    model, tok = sp
    greedy = chat_completion(model, tok, MESSAGES, temperature=0, max_tokens=8)
    for t in (1e-40, 5e-324):  # below 2**-126: greedy (1e-40 used to overflow logits / t into NaN)
        tiny = chat_completion(model, tok, MESSAGES, temperature=t, max_tokens=8, seed=1)
        assert tiny["choices"][0]["message"] == greedy["choices"][0]["message"]


def test_safe_prompt_prepends_the_system_prompt(sp):
    model, tok = sp
    r = chat_completion(model, tok, MESSAGES, temperature=0, max_tokens=1, safe_prompt=True)
    assert r["usage"]["prompt_tokens"] == len(tok.encode_chat(MESSAGES, safe_prompt=True))
    assert r["usage"]["prompt_tokens"] > len(tok.encode_chat(MESSAGES))


def test_top_logprobs(sp):
    model, tok = sp
    r = chat_completion(model, tok, MESSAGES, temperature=0, max_tokens=4, logprobs=True, top_logprobs=3)
    for entry in r["choices"][0]["logprobs"]["content"]:
        assert len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])  # greedy = the best
        assert entry["top_logprobs"][0]["token"] == entry["token"]


@pytest.mark.parametrize("tok_name", [SP_V3, SP_V7])
@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_are_parsed_and_the_follow_up_turn_encodes(tok_name, stream):
    tok = tokenizer(tok_name)
    model = tiny_model(tok)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    prompt = tok.encode_chat(messages, tools=TOOLS)
    model.steer(tool_call_script(tok), len(prompt))
    out = chat_completion(model, tok, messages, tools=TOOLS, temperature=0, max_tokens=40, stream=stream)
    if stream:
        chunks = list(out)
        (delta,) = [c["choices"][0]["delta"] for c in chunks if "tool_calls" in c["choices"][0]["delta"]]
        calls = delta["tool_calls"]
        assert [c["index"] for c in calls] == [0]
        calls = [{k: v for k, v in c.items() if k != "index"} for c in calls]
        assert not "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        finish = chunks[-1]["choices"][0]["finish_reason"]
    else:
        msg = out["choices"][0]["message"]
        assert msg["content"] is None
        calls, finish = msg["tool_calls"], out["choices"][0]["finish_reason"]
        assert out["usage"]["completion_tokens"] == len(tool_call_script(tok))
    assert finish == "tool_calls"
    (call,) = calls
    assert ID.match(call["id"]) and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}

    follow_up = messages + [
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": call["id"], "name": "get_weather", "content": "22 C"},
    ]
    model.steer()
    r = chat_completion(model, tok, follow_up, tools=TOOLS, temperature=0, max_tokens=3)
    assert r["usage"]["prompt_tokens"] == len(tok.encode_chat(follow_up, tools=TOOLS))


def test_tool_choice_any_forces_none_forbids(sp):
    model, tok = sp
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    marker = tok.special_id("[TOOL_CALLS]")
    script = tool_call_script(tok)
    bias = torch.zeros(tok.vocab_size)
    bias[marker] = -1000.0  # the model would never start a tool call by itself...
    model.steer(script, len(tok.encode_chat(messages, tools=TOOLS)), bias)
    try:
        forced = chat_completion(
            model, tok, messages, tools=TOOLS, tool_choice="any", temperature=0, max_tokens=40
        )
        required = chat_completion(
            model, tok, messages, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=40
        )
        named = chat_completion(
            model,
            tok,
            messages,
            tools=TOOLS,
            temperature=0,
            max_tokens=40,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
        auto = chat_completion(
            model, tok, messages, tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=5
        )
        model.steer(script, len(tok.encode_chat(messages)))  # ...and this one always would
        none = chat_completion(
            model, tok, messages, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=5
        )
        no_tools = chat_completion(model, tok, messages, temperature=0, max_tokens=5)  # nothing to call
    finally:
        model.steer()
    for r in (forced, required, named):  # ...but "any" makes [TOOL_CALLS] the first token
        assert r["choices"][0]["finish_reason"] == "tool_calls"
        assert r["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert (
        auto["choices"][0]["finish_reason"] == "length"
        and auto["choices"][0]["message"]["tool_calls"] is None
    )
    # "none": tools are not in the prompt and [TOOL_CALLS] cannot be generated
    assert none["usage"]["prompt_tokens"] == len(tok.encode_chat(messages))
    for r in (none, no_tools):
        assert r["choices"][0]["message"]["tool_calls"] is None and r["choices"][0]["finish_reason"] == "length"


def test_malformed_tool_call_becomes_content(sp):
    model, tok = sp
    messages = [{"role": "user", "content": "Weather?"}]
    script = [tok.special_id("[TOOL_CALLS]")] + tok.encode("not json") + [tok.eos_id]
    model.steer(script, len(tok.encode_chat(messages, tools=TOOLS)))
    try:
        r = chat_completion(model, tok, messages, tools=TOOLS, temperature=0, max_tokens=20)
        chunks = list(
            chat_completion(model, tok, messages, tools=TOOLS, temperature=0, max_tokens=20, stream=True)
        )
    finally:
        model.steer()
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["message"]["tool_calls"] is None
    assert r["choices"][0]["message"]["content"].strip() == "not json"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks).strip() == "not json"


def test_tekken_chat_completion_runs_and_counts():
    tok = tokenizer(TEKKEN_V3)
    model = tiny_model(tok)
    r = chat_completion(model, tok, MESSAGES, temperature=0, max_tokens=5)
    prompt = tok.encode_chat(MESSAGES)
    (ref,) = generate(model, [prompt], 5, temperature=0, eos_id=tok.eos_id)
    assert r["choices"][0]["message"]["content"] == tok.decode(ref.tokens)
    assert r["usage"]["prompt_tokens"] == len(prompt)


@pytest.mark.parametrize(
    "params, field",
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"stop": 5}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": "json"}, "response_format"),
        ({"tools": "get_weather"}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice"),
        ({"tool_choice": "any"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS}, "tool_choice"),
        (
            {"response_format": {"type": "json_object"}, "tool_choice": "any", "tools": TOOLS},
            "response_format",
        ),
        ({"seed": 1, "random_seed": 2}, "random_seed"),
        ({"seed": "1"}, "seed"),
        ({"safe_prompt": "yes"}, "safe_prompt"),
        ({"logprobs": 1}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
        ({"frobnicate": True}, "frobnicate"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ],
)
def test_bad_parameters_raise_request_error_naming_the_field(sp, params, field):
    model, tok = sp
    with pytest.raises(RequestError) as e:
        chat_completion(model, tok, MESSAGES, **params)
    assert e.value.field == field and str(e.value).startswith(field)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hello",
        [{"role": "bot", "content": "hi"}],
        [{"role": "user"}],
        [{"role": "user", "content": 3}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    ],
)
def test_bad_messages_name_the_messages_field(sp, messages):
    model, tok = sp
    with pytest.raises(RequestError) as e:
        chat_completion(model, tok, messages)
    assert e.value.field == "messages"


def test_streaming_request_is_validated_before_the_first_chunk(sp):
    model, tok = sp
    with pytest.raises(RequestError):
        chat_completion(model, tok, MESSAGES, stream=True, temperature=-1)


def test_context_length_errors(sp):
    model, tok = sp
    n = len(tok.encode_chat(MESSAGES))
    with pytest.raises(ContextLengthError) as e:
        chat_completion(model, tok, MESSAGES, max_context=n)
    assert e.value.field == "messages"
    with pytest.raises(ContextLengthError) as e:
        chat_completion(model, tok, MESSAGES, max_context=n + 4, max_tokens=5)
    assert e.value.field == "max_tokens"
    r = chat_completion(model, tok, MESSAGES, max_context=n + 4, temperature=0, ignore_eos=True)
    assert r["usage"]["completion_tokens"] == 4  # max_tokens defaults to what the context leaves


@pytest.mark.slow
@pytest.mark.parametrize("version", ["v11", "v13"])
def test_token_syntax_tool_calls_of_v11_and_v13(tmp_path, version):
    """[TOOL_CALLS]name[CALL_ID]id[ARGS]{json} (v11) and [TOOL_CALLS]name[ARGS]{json} (v13), on Tekken files."""
    from chat_models import DATA

    from mistral_ref.tokenizer import LEGACY_SPECIAL_TOKENS, load_tokenizer, write_tekken_file

    specials = [*LEGACY_SPECIAL_TOKENS, *[f"<SPECIAL_{i}>" for i in range(20, 32)], "[ARGS]", "[CALL_ID]"]
    tok = load_tokenizer(write_tekken_file(DATA / TEKKEN_V3, tmp_path / "tekken.json", version, specials))
    model = tiny_model(tok)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    call_id = [tok.special_id("[CALL_ID]"), *tok.encode("aB3dE5fG7")] if version == "v11" else []
    script = [tok.special_id("[TOOL_CALLS]"), *tok.encode("get_weather"), *call_id, tok.special_id("[ARGS]"),
              *tok.encode('{"city": "Paris"}'), tok.eos_id]
    model.steer(script, len(tok.encode_chat(messages, tools=TOOLS)))
    r = chat_completion(model, tok, messages, tools=TOOLS, temperature=0, max_tokens=30)
    chunks = list(chat_completion(model, tok, messages, tools=TOOLS, temperature=0, max_tokens=30, stream=True))
    (call,) = r["choices"][0]["message"]["tool_calls"]
    assert r["choices"][0]["finish_reason"] == "tool_calls" == chunks[-1]["choices"][0]["finish_reason"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert ID.match(call["id"]) and (version != "v11" or call["id"] == "aB3dE5fG7")
    follow_up = messages + [{"role": "assistant", "tool_calls": [call]},
                            {"role": "tool", "tool_call_id": call["id"], "name": "get_weather", "content": "22 C"}]
    model.steer()
    r = chat_completion(model, tok, follow_up, tools=TOOLS, temperature=0, max_tokens=2)
    assert r["usage"]["prompt_tokens"] == len(tok.encode_chat(follow_up, tools=TOOLS))
