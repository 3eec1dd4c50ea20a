"""mistral_ref.api with reasoning models: thinking returned apart from the answer (streamed too), reasoning_effort
in v15's model settings, prompt_mode="reasoning" with the checkpoint's system prompt."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from chat_models import (
    SP_V3,
    needs_tokenizer_files,
    one_torch_thread,  # noqa: F401 — a fixture, used through pytestmark
    tiny_model,
    tokenizer,
)
from chat_oracle import MODERN_SPECIALS, V15_BUILDER, V15_SPECIALS, build_tekken

from mistral_ref.api import RequestError, chat_completion
from mistral_ref.request_spec import FIELDS, json_schema
from mistral_ref.tokenizer import load_tokenizer, system_prompt_message, thinking_chunk

pytestmark = [needs_tokenizer_files, pytest.mark.usefixtures("one_torch_thread")]

USER = [{"role": "user", "content": "What is 2 + 2?"}]
WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def v13(tmp_path_factory: pytest.TempPathFactory):
    tok = load_tokenizer(build_tekken(tmp_path_factory.mktemp("v13"), "v13", MODERN_SPECIALS))
    return tiny_model(tok), tok


@pytest.fixture(scope="module")
def v15(tmp_path_factory: pytest.TempPathFactory):
    tok = load_tokenizer(build_tekken(tmp_path_factory.mktemp("v15"), "v15", V15_SPECIALS, V15_BUILDER))
    return tiny_model(tok), tok


def thought(tok, thinking: str, answer: str, close: bool = True) -> list[int]:
    """[THINK]thinking[/THINK]answer</s> as a model would generate it."""
    ids = [tok.special_id("[THINK]"), *tok.encode(thinking)]
    return ids + ([tok.special_id("[/THINK]"), *tok.encode(answer), tok.eos_id] if close else [])


def steer(model, tok, script, messages=USER, **kw):
    return model.steer(script, len(tok.encode_chat(messages, **kw)))


def from_stream(chunks: list[dict]) -> tuple[list[list], str]:
    """(thinking blocks [text, closed], answer) rebuilt from stream deltas."""
    blocks: list[list] = []
    answer = ""
    for c in chunks[1:]:
        content = c["choices"][0]["delta"].get("content")
        if isinstance(content, list):
            (chunk,) = content
            assert chunk["type"] == "thinking" and set(chunk) == {"type", "thinking", "closed"}
            text = "".join(t["text"] for t in chunk["thinking"])
            if blocks and not blocks[-1][1]:
                blocks[-1][0] += text
                blocks[-1][1] = chunk["closed"]
            else:
                blocks.append([text, chunk["closed"]])
        elif content:
            answer += content
    return blocks, answer


def test_thinking_comes_back_apart_from_the_answer(v13):
    model, tok = v13
    steer(model, tok, thought(tok, "Two and two make four.", "It is 4."))
    try:
        r = chat_completion(model, tok, USER, temperature=0, max_tokens=40, logprobs=True)
        chunks = list(chat_completion(model, tok, USER, temperature=0, max_tokens=40, stream=True))
    finally:
        model.steer()
    (choice,) = r["choices"]
    assert choice["message"]["content"] == [thinking_chunk("Two and two make four.", True),
                                            {"type": "text", "text": "It is 4."}]
    assert choice["finish_reason"] == "stop" and choice["message"]["tool_calls"] is None
    n = len(thought(tok, "Two and two make four.", "It is 4."))
    assert r["usage"]["completion_tokens"] == n  # [THINK], [/THINK] and EOS count
    assert len(choice["logprobs"]["content"]) == len(tok.encode("It is 4."))  # the answer's tokens only
    assert from_stream(chunks) == ([["Two and two make four.", True]], "It is 4.")
    first = chunks[1]["choices"][0]["delta"]["content"]  # [THINK] opens a thought before any of its text
    assert first == [{"type": "thinking", "thinking": [], "closed": False}]
    follow_up = USER + [{"role": "assistant", "content": choice["message"]["content"]},
                        {"role": "user", "content": "And 3 + 3?"}]
    r2 = chat_completion(model, tok, follow_up, temperature=0, max_tokens=1)
    assert r2["usage"]["prompt_tokens"] == len(tok.encode_chat(follow_up))


def test_a_thought_cut_by_max_tokens_is_not_closed(v13):
    model, tok = v13
    steer(model, tok, thought(tok, "Let me count slowly: one, two", "", close=False))
    try:
        r = chat_completion(model, tok, USER, temperature=0, max_tokens=4)
        chunks = list(chat_completion(model, tok, USER, temperature=0, max_tokens=4, stream=True))
    finally:
        model.steer()
    (chunk,) = r["choices"][0]["message"]["content"]
    assert chunk["closed"] is False and r["choices"][0]["finish_reason"] == "length"
    assert chunk["thinking"][0]["text"] == tok.decode(tok.encode("Let me count slowly: one, two")[:3])
    assert from_stream(chunks) == ([[chunk["thinking"][0]["text"], False]], "")


def test_stop_strings_apply_to_the_answer_not_the_thinking(v13):
    model, tok = v13
    steer(model, tok, thought(tok, "I could say STOP here.", "Fine. STOP. More."))
    try:
        r = chat_completion(model, tok, USER, temperature=0, max_tokens=40, stop="STOP")
    finally:
        model.steer()
    assert r["choices"][0]["message"]["content"] == [thinking_chunk("I could say STOP here.", True),
                                                     {"type": "text", "text": "Fine. "}]
    assert r["choices"][0]["finish_reason"] == "stop"


def test_thinking_then_a_tool_call(v13):
    model, tok = v13
    call = [tok.special_id("[TOOL_CALLS]"), *tok.encode("get_weather"), tok.special_id("[ARGS]"),
            *tok.encode('{"city": "Paris"}'), tok.eos_id]
    steer(model, tok, thought(tok, "I need the weather.", "", close=True)[:-1] + call, tools=WEATHER)
    try:
        r = chat_completion(model, tok, USER, tools=WEATHER, temperature=0, max_tokens=40)
        chunks = list(chat_completion(model, tok, USER, tools=WEATHER, temperature=0, max_tokens=40, stream=True))
    finally:
        model.steer()
    message = r["choices"][0]["message"]
    assert message["content"] == [thinking_chunk("I need the weather.", True)]
    assert [c["function"] for c in message["tool_calls"]] == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    assert r["choices"][0]["finish_reason"] == "tool_calls" == chunks[-1]["choices"][0]["finish_reason"]
    assert from_stream(chunks) == ([["I need the weather.", True]], "")


def test_without_thinking_the_content_is_a_string(v13):
    model, tok = v13
    r = chat_completion(model, tok, USER, temperature=0, max_tokens=3)
    assert isinstance(r["choices"][0]["message"]["content"], str)


# ---------------------------------------------------------------------------------------------------
# reasoning_effort, prompt_mode
# ---------------------------------------------------------------------------------------------------
def test_reasoning_effort_goes_into_v15_model_settings(v15):
    model, tok = v15
    r = chat_completion(model, tok, USER, temperature=0, max_tokens=1, reasoning_effort="high")
    prompt = tok.encode_chat(USER, reasoning_effort="high")
    assert r["usage"]["prompt_tokens"] == len(prompt)
    assert '[MODEL_SETTINGS]{"reasoning_effort": "high"}[/MODEL_SETTINGS]' in tok.decode(prompt, "keep")
    r = chat_completion(model, tok, USER, temperature=0, max_tokens=1, response_format={"type": "json_object"})
    assert r["usage"]["prompt_tokens"] == len(tok.encode_chat(USER, response_format={"type": "json_object"}))


@pytest.mark.parametrize(
    ("which", "params", "field", "match"),
    [
        ("v15", {"reasoning_effort": "low"}, "reasoning_effort", r"accepts \['none', 'high'\]"),
        ("v15", {"reasoning_effort": "extreme"}, "reasoning_effort", "must be one of 'none'"),
        ("v15", {"reasoning_effort": 3}, "reasoning_effort", "must be a string"),
        ("v13", {"reasoning_effort": "high"}, "reasoning_effort", "needs a v15 tokenizer"),
        ("sp", {"reasoning_effort": "none"}, "reasoning_effort", "needs a v15 tokenizer"),
        ("v13", {"prompt_mode": "fast"}, "prompt_mode", "must be one of 'reasoning'"),
        ("v13", {"prompt_mode": "reasoning"}, "prompt_mode", "SYSTEM_PROMPT.txt"),
        ("v15", {"messages": [{"role": "system", "content": [{"type": "thinking", "thinking": "x"}]}, *USER]},
         "messages", "only in assistant messages"),
    ],
)
def test_reasoning_requests_refused_name_the_field(v13, v15, which, params, field, match):
    model, tok = {"v13": v13, "v15": v15}.get(which) or (tiny_model(tokenizer(SP_V3)), tokenizer(SP_V3))
    params = dict(params)
    messages = params.pop("messages", USER)
    with pytest.raises(RequestError, match=match) as e:
        chat_completion(model, tok, messages, **params)
    assert e.value.field == field


def test_prompt_mode_reasoning_uses_the_checkpoints_system_prompt(v13, tmp_path: Path):
    model, tok = v13
    prompt = "Think it through.[THINK]Scratch work.[/THINK]Then answer."
    want = tok.encode_chat([system_prompt_message(prompt), *USER])
    assert tok.decode(want, "keep").startswith("<s>[SYSTEM_PROMPT]Think it through.[THINK]Scratch work.[/THINK]")
    r = chat_completion(model, tok, USER, temperature=0, max_tokens=1, prompt_mode="reasoning",
                        reasoning_prompt=prompt)
    assert r["usage"]["prompt_tokens"] == len(want)
    (tmp_path / "SYSTEM_PROMPT.txt").write_text(prompt, encoding="utf-8")
    here = copy.copy(tok)
    here.path = tmp_path / "tekken.json"  # the checkpoint directory holds the prompt file
    r = chat_completion(model, here, USER, temperature=0, max_tokens=1, prompt_mode="reasoning")
    assert r["usage"]["prompt_tokens"] == len(want)
    system = [{"role": "system", "content": "Be brief."}, *USER]  # the request's own system prompt follows
    r = chat_completion(model, here, system, temperature=0, max_tokens=1, prompt_mode="reasoning")
    assert r["usage"]["prompt_tokens"] == len(tok.encode_chat([system_prompt_message(prompt), *system]))


def test_the_request_spec_publishes_the_choices():
    assert json_schema(FIELDS["reasoning_effort"])["enum"] == ["none", "minimal", "low", "medium", "high", "xhigh",
                                                                "max"]
    assert json_schema(FIELDS["prompt_mode"])["enum"] == ["reasoning"]
    assert json.dumps(json_schema(FIELDS["prompt_mode"]))  # plain JSON
