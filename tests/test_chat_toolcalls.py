"""Parsing generated assistant tokens (mistral_ref.tokenizer.toolcalls) for every tool-call syntax."""

from __future__ import annotations

import json
import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistral_ref.tokenizer import (
    LEGACY_SPECIAL_TOKENS,
    TekkenTokenizer,
    Tokenizer,
    load_tokenizer,
    mistral_common_data_dir,
)
from mistral_ref.tokenizer.toolcalls import new_tool_call_id

DATA = mistral_common_data_dir()
pytestmark = pytest.mark.skipif(DATA is None, reason="the mistral-common wheel ships the tokenizer files")
ID = re.compile(r"^[a-zA-Z0-9]{9}$")
MODERN_SPECIALS = [*LEGACY_SPECIAL_TOKENS, *[f"<SPECIAL_{i}>" for i in range(20, 32)], "[ARGS]", "[CALL_ID]"]


@pytest.fixture(scope="module")
def toks() -> dict[str, Tokenizer]:
    assert DATA is not None
    out: dict[str, Tokenizer] = {
        "v1": load_tokenizer(DATA / "tokenizer.model.v1"),
        "v2": load_tokenizer(DATA / "mistral_instruct_tokenizer_240216.model.v2"),
        "v3": load_tokenizer(DATA / "mistral_instruct_tokenizer_240323.model.v3"),
        "v7": load_tokenizer(DATA / "mistral_instruct_tokenizer_241114.model.v7"),
    }
    nemo = json.loads((DATA / "tekken_240718.json").read_text(encoding="utf-8"))
    for version in ("v3", "v7", "v11", "v13"):
        data = {**nemo, "config": {**nemo["config"], "version": version}}
        if version in ("v11", "v13"):
            data["special_tokens"] = [
                {"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(MODERN_SPECIALS)
            ]
        out[f"tekken-{version}"] = TekkenTokenizer(data)
    return out


CALLS = [
    {
        "id": "abcDEF123",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Zürich"}},
    },
    {
        "id": "Zz9Yy8Xx7",
        "type": "function",
        "function": {"name": "add-numbers", "arguments": '{"a": 1, "b": [2]}'},
    },
]


def _generated(tok: Tokenizer, calls: list[dict], content: str | None = None) -> list[int]:
    """The assistant tokens the template writes for this turn, as a model would generate them."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content, "tool_calls": calls}]
    ids = tok.encode_chat(msgs, continue_final_message=True)
    end_inst = tok.special_id("[/INST]")
    start = len(ids) - ids[::-1].index(end_inst)
    return [*ids[start:], tok.eos_id]


@pytest.mark.parametrize("name", ["v2", "v3", "v7", "tekken-v3", "tekken-v7", "tekken-v11", "tekken-v13"])
def test_tool_calls_round_trip(name: str, toks: dict[str, Tokenizer]) -> None:
    tok = toks[name]
    calls = CALLS[:1] if name == "v2" else CALLS
    out = tok.parse_assistant(_generated(tok, calls), rng=random.Random(0))
    assert out["content"] is None
    assert [c["function"]["name"] for c in out["tool_calls"]] == [c["function"]["name"] for c in calls]
    assert [json.loads(c["function"]["arguments"]) for c in out["tool_calls"]] == [
        {"city": "Zürich"},
        {"a": 1, "b": [2]},
    ][: len(calls)]
    assert all(c["type"] == "function" and ID.match(c["id"]) for c in out["tool_calls"])
    ids_kept = name not in ("v2", "tekken-v13")  # v2 and v13 write no ids: fresh ones are made up
    assert ([c["id"] for c in out["tool_calls"]] == [c["id"] for c in calls]) == ids_kept
    # the parsed calls can be sent back as history and give the same tokens (ids are not printed by v2 / v13)
    original = [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": calls}]
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", **out}]
    assert tok.encode_chat(history, continue_final_message=True) == tok.encode_chat(
        original, continue_final_message=True
    )


@pytest.mark.parametrize("name", ["v7", "tekken-v7", "tekken-v11", "tekken-v13"])
def test_content_before_tool_calls(name: str, toks: dict[str, Tokenizer]) -> None:
    tok = toks[name]
    out = tok.parse_assistant(_generated(tok, CALLS[:1], content="Let me check."))
    assert out["content"] == "Let me check."
    assert out["tool_calls"][0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize("name", ["v1", "v3", "tekken-v13"])
def test_plain_text_and_eos_cut(name: str, toks: dict[str, Tokenizer]) -> None:
    tok = toks[name]
    ids = [*tok.encode("Bonjour 👋"), tok.eos_id, *tok.encode("after eos")]
    assert tok.parse_assistant(ids) == {"content": "Bonjour 👋", "tool_calls": []}


@pytest.mark.parametrize("name", ["v3", "tekken-v7", "tekken-v11", "tekken-v13"])
def test_malformed_tool_calls_become_content(name: str, toks: dict[str, Tokenizer]) -> None:
    tok = toks[name]
    tc = tok.special_id("[TOOL_CALLS]")
    bad = [
        [tc, *tok.encode('[{"name": "f", "arguments": {"a": 1}')],  # truncated JSON
        [tc, *tok.encode('[{"name": "no spaces allowed", "arguments": {}}]')],
        [tc, *tok.encode("get_weather")],  # no [ARGS] / not JSON
        [*tok.encode("text"), tc],
        [tc, *tok.encode('[{"name": "f", "arguments": "not json"}]')],
    ]
    if tok.has_special("[ARGS]"):
        bad.append([tc, *tok.encode("f"), tok.special_id("[ARGS]"), *tok.encode("{broken")])
    for ids in bad:
        out = tok.parse_assistant(ids)
        assert out == {"content": tok.decode(ids), "tool_calls": []}


def test_v3_json_variants(toks: dict[str, Tokenizer]) -> None:
    tok = toks["tekken-v3"]
    tc = tok.special_id("[TOOL_CALLS]")
    one = tok.parse_assistant([tc, *tok.encode(' {"name": "f", "arguments": {"x": "é"}, "id": "bad"} ')])
    call = one["tool_calls"][0]
    assert call["function"] == {"name": "f", "arguments": '{"x": "é"}'} and ID.match(call["id"])
    two = tok.parse_assistant([tc, *tok.encode('[{"name": "f"}]'), tc, *tok.encode('[{"name": "g"}]')])
    assert [c["function"]["name"] for c in two["tool_calls"]] == ["f", "g"]
    assert two["tool_calls"][0]["function"]["arguments"] == "{}"


def test_v11_call_id_optional(toks: dict[str, Tokenizer]) -> None:
    tok = toks["tekken-v11"]
    tc, args = tok.special_id("[TOOL_CALLS]"), tok.special_id("[ARGS]")
    out = tok.parse_assistant([tc, *tok.encode("f"), args, *tok.encode('{"k": null}')], rng=random.Random(1))
    assert out["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"k": null}'}
    assert ID.match(out["tool_calls"][0]["id"])


def test_generated_ids() -> None:
    assert new_tool_call_id(random.Random(3)) == new_tool_call_id(random.Random(3))
    assert all(ID.match(new_tool_call_id()) for _ in range(50))


@pytest.mark.parametrize("name", ["v2", "v7", "tekken-v11", "tekken-v13"])
def test_parse_never_raises(name: str, toks: dict[str, Tokenizer]) -> None:
    tok = toks[name]
    specials = [
        tok.special_id(s) for s in ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "</s>") if tok.has_special(s)
    ]
    pieces = [
        t for s in ['[{"name": "f", "arguments": {', "}]", "f", '"', "{}", " ", "é"] for t in tok.encode(s)
    ]

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.sampled_from(specials + pieces) | st.integers(0, tok.vocab_size - 1), max_size=25))
    def check(ids: list[int]) -> None:
        out = tok.parse_assistant(ids)
        assert set(out) == {"content", "tool_calls"}
        for c in out["tool_calls"]:
            assert ID.match(c["id"]) and isinstance(json.loads(c["function"]["arguments"]), (dict, list))

    check()
