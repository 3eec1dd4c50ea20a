"""Requests that could take a thread down: containers nested ~1000 (or 100,000) deep in messages, tool schemas,
tool-call arguments or any field, integers too long to print, and prompts of a million spaces.  Each gives a
RequestError naming the field (or a normal result), never a RecursionError, ValueError or panic."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from chat_models import TEKKEN_V3, needs_tokenizer_files, tiny_model, tokenizer

from mistral_ref.api import ContextLengthError, RequestError, chat_completion, parse_request, prepare
from mistral_ref.request_spec import MAX_NESTING

pytestmark = needs_tokenizer_files

USER = {"role": "user", "content": "hi"}


def nested(depth: int, kind: str = "list") -> Any:
    """1 inside `depth` lists (or {"a": ...} objects); built without recursion."""
    value: Any = 1
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


def tool(parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "f", "description": "d", "parameters": parameters}}


def call_turns(arguments: Any) -> list[dict[str, Any]]:
    return [USER, {"role": "assistant", "tool_calls": [{"id": "abcdefghi", "type": "function",
                                                        "function": {"name": "f", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "abcdefghi", "content": "1"}]


PLACES = {  # field at fault: a request with `deep` put somewhere inside it
    "messages": lambda deep: {"messages": [{"role": "user", "content": deep}]},
    "messages ": lambda deep: {"messages": call_turns(deep)},  # tool-call arguments (a dict)
    "tools": lambda deep: {"messages": [USER], "tools": [tool({"type": "object", "properties": {"x": deep}})]},
    "stop": lambda deep: {"messages": [USER], "stop": deep},
    "response_format": lambda deep: {"messages": [USER], "response_format": deep},
    "tool_choice": lambda deep: {"messages": [USER], "tool_choice": deep},
    "temperature": lambda deep: {"messages": [USER], "temperature": deep},
}


@pytest.mark.parametrize("depth", [MAX_NESTING + 1, 1000, 100_000])
@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("kind", ["list", "dict"])
def test_deep_nesting_is_a_request_error_naming_the_field(place: str, depth: int, kind: str) -> None:
    body = PLACES[place](nested(depth, kind))
    with pytest.raises(RequestError) as e:
        parse_request(body)
    assert e.value.field == place.strip()
    assert f"nested more than {MAX_NESTING} levels deep" in str(e.value)


def test_the_path_to_the_deep_part_is_named() -> None:
    body = PLACES["tools"](nested(1000, "dict"))
    with pytest.raises(RequestError, match=r"tools\[0\]\.function\.parameters\.properties\.x\.a\.a\.\.\.: nested"):
        parse_request(body)


@pytest.mark.parametrize("place", ["tools", "messages "])
def test_nesting_within_the_limit_is_encoded(place: str) -> None:
    tok = tokenizer(TEKKEN_V3)
    body = PLACES[place](nested(MAX_NESTING - 10, "dict"))
    prompt = prepare(tok, parse_request(body)).prompt_ids
    assert tok.decode(prompt).count('{"a": ') == MAX_NESTING - 10


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a": ' + "1" * 5000 + "}"])
def test_deep_or_huge_json_inside_strings_is_text(text: str) -> None:
    # a tool call's arguments string and a tool result are JSON text; unparsable ones are kept as text
    tok = tokenizer(TEKKEN_V3)
    for body in ({"messages": call_turns(text)},
                 {"messages": [*call_turns("{}")[:2], {"role": "tool", "tool_call_id": "abcdefghi",
                                                        "content": text}]}):
        assert prepare(tok, parse_request(body)).prompt_ids


needs_int_limit = pytest.mark.skipif(not getattr(sys, "get_int_max_str_digits", lambda: 0)(),
                                     reason="this Python prints integers of any length")


@needs_int_limit
@pytest.mark.parametrize("place", PLACES)
def test_integers_too_long_to_print_are_a_request_error(place: str) -> None:
    huge = 10 ** (sys.get_int_max_str_digits() + 10)
    with pytest.raises(RequestError) as e:
        parse_request(PLACES[place]([huge]))
    assert e.value.field == place.strip() and f"more than {sys.get_int_max_str_digits()} digits" in str(e.value)


@needs_int_limit
@pytest.mark.parametrize("field", ["max_tokens", "seed", "top_logprobs", "n"])
def test_long_integer_parameters_are_a_request_error(field: str) -> None:
    with pytest.raises(RequestError) as e:
        parse_request({"messages": [USER], field: 10 ** (sys.get_int_max_str_digits() + 10)})
    assert e.value.field == field


@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty", "frequency_penalty"])
def test_numbers_beyond_the_float_range_are_a_request_error(field: str) -> None:
    # 10**400 is a valid JSON number that json.loads returns as an int; as a float it would overflow
    with pytest.raises(RequestError, match=f"{field}: must be a finite number"):
        parse_request({"messages": [USER], field: 10**400})


def test_a_prompt_of_a_million_spaces_is_encoded_or_refused_cleanly() -> None:
    tok = tokenizer(TEKKEN_V3)
    body = {"messages": [{"role": "user", "content": "a" + " " * 1_000_000 + "b"}]}
    prompt = prepare(tok, parse_request(body)).prompt_ids
    assert " " * 1_000_000 in tok.decode(prompt)
    with pytest.raises(ContextLengthError) as e:
        chat_completion(tiny_model(tok), tok, body["messages"], max_context=4096)
    assert e.value.field == "messages"


def test_encode_chat_called_directly_refuses_tools_nested_past_the_recursion_limit():
    """Without the API's nesting check in front, the template itself refuses (no RecursionError escapes)."""
    from mistral_ref.embedded import EMBEDDED_MODEL_DIR
    from mistral_ref.tokenizer import ChatTemplateError, load_tokenizer

    tok = load_tokenizer(EMBEDDED_MODEL_DIR)
    deep: dict = {}
    node = deep
    for _ in range(5000):
        node["a"] = {}
        node = node["a"]
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": deep}}]
    with pytest.raises(ChatTemplateError, match="JSON"):
        tok.encode_chat([{"role": "user", "content": "hi"}], tools=tools)
    generated = tok.encode("[" * 5000, bos=False)
    assert isinstance(tok.parse_assistant(generated)["content"], str)  # malformed output stays content
