"""Thinking (v13+) and model settings (v15) in the chat templates: layouts, refusals that agree with mistral-common,
parsing generated thinking back, the model-settings spec of tekken.json, and a checkpoint's system prompt."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from chat_oracle import (
    DATA,
    EFFORT_NONE_HIGH,
    MODERN_SPECIALS,
    V15_BUILDER,
    V15_SPECIALS,
    build_tekken,
    oracle_encode,
    oracle_tokenizer,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistral_ref.tokenizer import (
    LEGACY_SPECIAL_TOKENS,
    ChatTemplateError,
    ModelSettingsSpec,
    Tokenizer,
    TokenizerError,
    find_system_prompt,
    load_tokenizer,
    system_prompt_message,
    thinking_chunk,
)

pytestmark = pytest.mark.skipif(DATA is None, reason="the mistral-common wheel ships the tokenizer files")

# name -> (version, special tokens, model_settings_builder) of a file built from the Nemo vocabulary
FILES = {
    "v7": ("v7", MODERN_SPECIALS, None),
    "v11": ("v11", MODERN_SPECIALS, None),
    "v13": ("v13", MODERN_SPECIALS, None),
    "v13-no-think": ("v13", MODERN_SPECIALS[:-2], None),
    "v15": ("v15", V15_SPECIALS, V15_BUILDER),
    "v15-no-settings": ("v15", V15_SPECIALS, None),
    "v15-schema-only": ("v15", V15_SPECIALS, {"json_schema": V15_BUILDER["json_schema"]}),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("tekken")
    out = {name: build_tekken(tmp, *spec, name=name) for name, spec in FILES.items()}
    assert DATA is not None
    out["sp-v3"] = DATA / "mistral_instruct_tokenizer_240323.model.v3"
    out["sp-v7"] = DATA / "mistral_instruct_tokenizer_241114.model.v7"
    return out


@pytest.fixture(scope="module")
def toks(files: dict[str, Path]) -> dict[str, Tokenizer]:
    return {name: load_tokenizer(p) for name, p in files.items()}


def think(text: str, closed: bool | None = None) -> dict:
    chunk: dict = {"type": "thinking", "thinking": text}
    if closed is not None:
        chunk["closed"] = closed
    return chunk


def text(t: str) -> dict:
    return {"type": "text", "text": t}


USER = {"role": "user", "content": "What is 2 + 2?"}
THOUGHT = {"role": "assistant", "content": [think("2 + 2 = 4."), text("4  ")]}


# ---------------------------------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------------------------------
def test_v13_writes_thinking_of_assistant_and_system_messages(toks: dict[str, Tokenizer]) -> None:
    tok = toks["v13"]
    system = {"role": "system", "content": [text("Think first:"), think("scratch paper"), text("Then answer.")]}
    ids = tok.encode_chat([system, USER, THOUGHT, {"role": "user", "content": "And 3 + 3?"}])
    assert tok.decode(ids, "keep") == (
        "<s>[SYSTEM_PROMPT]Think first:[THINK]scratch paper[/THINK]Then answer.[/SYSTEM_PROMPT]"
        "[INST]What is 2 + 2?[/INST][THINK]2 + 2 = 4.[/THINK]4  </s>[INST]And 3 + 3?[/INST]"
    )  # a text chunk next to thinking keeps its trailing spaces (plain assistant text loses them)
    # an unclosed thought is continued: no [/THINK], no EOS
    ids = tok.encode_chat([USER, {"role": "assistant", "content": [think("Let me", closed=False)]}],
                          continue_final_message=True)
    assert tok.decode(ids, "keep").endswith("[/INST][THINK]Let me")


def test_thinking_spellings_agree(toks: dict[str, Tokenizer]) -> None:
    """mistral-common's string, the Mistral API's list of text chunks, and a reasoning_content field."""
    tok = toks["v13"]
    want = tok.encode_chat([USER, {"role": "assistant", "content": [think("ab"), text("4")]}, USER])
    api = {"role": "assistant", "content": [{"type": "thinking", "thinking": [text("a"), text("b")]}, text("4")]}
    assert tok.encode_chat([USER, api, USER]) == want
    for key in ("reasoning_content", "reasoning"):
        assert tok.encode_chat([USER, {"role": "assistant", "content": "4", key: "ab"}, USER]) == want


def test_v15_model_settings_follow_the_tools_at_the_first_user_message(toks: dict[str, Tokenizer]) -> None:
    tok = toks["v15"]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    msgs = [USER, THOUGHT, {"role": "user", "content": [text("And"), text(" 3 + 3?")]}]
    ids = tok.encode_chat(msgs, tools=tools, reasoning_effort="high")
    assert tok.decode(ids, "keep") == (
        '<s>[AVAILABLE_TOOLS][{"type": "function", "function": {"name": "add", "description": "", "parameters": '
        '{}}}][/AVAILABLE_TOOLS][MODEL_SETTINGS]{"reasoning_effort": "high"}[/MODEL_SETTINGS]'
        "[INST]What is 2 + 2?[/INST][THINK]2 + 2 = 4.[/THINK]4  </s>[INST]And 3 + 3?[/INST]"
    )  # v15 joins the text chunks of a message with nothing
    schema = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object", "b": 1, "a": 2}}}
    ids = tok.encode_chat([USER], response_format=schema)
    assert tok.decode(ids, "keep").startswith(
        '<s>[MODEL_SETTINGS]{"json_schema": {"type": "object", "b": 1, "a": 2}, "reasoning_effort": "none"}'
    )  # settings sorted by name, the schema's own key order kept
    only_schema = toks["v15-schema-only"]
    assert "[MODEL_SETTINGS]" not in only_schema.decode(only_schema.encode_chat([USER]), "keep")
    ids = only_schema.encode_chat([USER], response_format={"type": "json_object"})
    assert '[MODEL_SETTINGS]{"json_schema": {"anyOf": [{"type": "object"}, {"type": "array"}]}}' in only_schema.decode(
        ids, "keep"
    )


# ---------------------------------------------------------------------------------------------------
# refusals, each checked against mistral-common
# ---------------------------------------------------------------------------------------------------
SYSTEM_THINKING = {"role": "system", "content": [text("Be brief."), think("plan")]}
CALL = {"id": "abcDEF123", "type": "function", "function": {"name": "f", "arguments": "{}"}}
CASES = [
    # (file, messages, keyword arguments, what our error says)
    ("v7", [USER, THOUGHT, USER], {}, "v13 or newer"),
    ("v11", [USER, THOUGHT, USER], {}, "v13 or newer"),
    ("sp-v3", [USER, THOUGHT, USER], {}, "v13 or newer"),
    ("v7", [SYSTEM_THINKING, USER], {}, "v13 or newer"),
    ("v11", [SYSTEM_THINKING, USER], {}, "v13 or newer"),
    ("v15", [SYSTEM_THINKING, USER], {}, "only in assistant messages"),
    ("v13", [{"role": "user", "content": [think("x"), text("hi")]}], {}, "only assistant"),
    ("v13", [USER, {"role": "assistant", "tool_calls": [CALL]},
             {"role": "tool", "tool_call_id": "abcDEF123", "content": [think("x")]}], {}, "only assistant"),
    ("v13-no-think", [USER, THOUGHT, USER], {}, r"no \[THINK\] token"),
    ("v13", [USER, {"role": "assistant", "content": [think("a")], "reasoning_content": "b"}, USER], {},
     "send the thinking once"),
    ("v13", [USER, {"role": "assistant", "content": "4", "reasoning": "a", "reasoning_content": "b"}, USER], {},
     "differ"),
    ("sp-v7", [USER], {"reasoning_effort": "high"}, "needs a v15 tokenizer"),
    ("v11", [USER], {"reasoning_effort": "none"}, "needs a v15 tokenizer"),
    ("v13", [USER], {"reasoning_effort": "high"}, "needs a v15 tokenizer"),
    ("v15", [USER], {"reasoning_effort": "low"}, r"accepts \['none', 'high'\], got 'low'"),
    ("v15", [USER], {"reasoning_effort": "extreme"}, "must be one of"),
    ("v15-no-settings", [USER], {}, "declares no model settings"),
    ("v13", [USER], {"response_format": {"type": "json_schema"}}, "needs 'json_schema'"),
    ("v15", [USER], {"response_format": {"type": "yaml"}}, "type must be"),
]


@pytest.mark.oracle
@pytest.mark.parametrize(("name", "messages", "kwargs", "match"), CASES)
def test_refusals_agree_with_mistral_common(
    name: str, messages: list, kwargs: dict, match: str, files: dict[str, Path], toks: dict[str, Tokenizer]
) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        toks[name].encode_chat(messages, **kwargs)
    with pytest.raises(Exception):  # noqa: B017 - any refusal by the oracle
        oracle_encode(oracle_tokenizer(files[name]), messages, None, False, False, **kwargs)


ACCEPTED = [
    ("v13", [SYSTEM_THINKING, USER, THOUGHT, USER], {}),
    ("v13", [USER, {"role": "assistant", "content": [think("t", closed=False)]}], {"cfm": True}),
    ("v13", [USER], {"response_format": {"type": "json_object"}}),  # no setting in v13: the format is not written
    ("v15", [USER], {"reasoning_effort": "high", "response_format": {"type": "json_object"}}),
    ("v15", [{"role": "system", "content": "s"}], {}),  # no user message: no place for the settings
    ("v15", [USER, {"role": "assistant", "content": "", "reasoning_content": "r"}], {"cfm": True}),
]


@pytest.mark.oracle
@pytest.mark.parametrize(("name", "messages", "kwargs"), ACCEPTED)
def test_accepted_requests_equal_mistral_common(
    name: str, messages: list, kwargs: dict, files: dict[str, Path], toks: dict[str, Tokenizer]
) -> None:
    kwargs = dict(kwargs)
    cfm = kwargs.pop("cfm", False)
    got = toks[name].encode_chat(messages, continue_final_message=cfm, **kwargs)
    assert got == oracle_encode(oracle_tokenizer(files[name]), messages, None, False, cfm, **kwargs)


# ---------------------------------------------------------------------------------------------------
# the model-settings spec of tekken.json
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("builder", "match"),
    [
        ([], "must be an object"),
        ({"temperature": {}}, "unknown settings"),
        ({"reasoning_effort": {**EFFORT_NONE_HIGH, "values": ["none", "huge"]}}, "values must be a list"),
        ({"reasoning_effort": {**EFFORT_NONE_HIGH, "values": ["high", "high"], "default": "high"}}, "duplicates"),
        ({"reasoning_effort": {**EFFORT_NONE_HIGH, "default": "low"}}, "default must be one of"),
        ({"reasoning_effort": {**EFFORT_NONE_HIGH, "accepts_none": False}}, "accepts_none true"),
        ({"json_schema": {"type": "json_schema", "accepts_none": True, "default": None}}, "json_schema must be"),
    ],
)
def test_malformed_model_settings_builders_are_refused(builder: object, match: str) -> None:
    with pytest.raises(TokenizerError, match=match):
        ModelSettingsSpec.from_json(builder, "tekken.json")


@pytest.mark.oracle
def test_a_model_settings_builder_before_v15_is_refused_on_load(tmp_path: Path) -> None:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    path = build_tekken(tmp_path, "v13", MODERN_SPECIALS, V15_BUILDER)
    with pytest.raises(TokenizerError, match="model_settings_builder is for v15"):
        load_tokenizer(path)
    with pytest.raises(ValueError, match="model_settings_builder"):
        MistralTokenizer.from_file(str(path))


def test_spec_reads_the_builder(toks: dict[str, Tokenizer]) -> None:
    assert toks["v15"].model_settings == ModelSettingsSpec(("none", "high"), "none", True)
    assert toks["v15-no-settings"].model_settings is None and toks["v13"].model_settings is None
    assert toks["sp-v7"].model_settings is None


# ---------------------------------------------------------------------------------------------------
# parsing generated thinking back
# ---------------------------------------------------------------------------------------------------
def reply_ids(tok: Tokenizer, message: dict) -> list[int]:
    """The ids the template writes for an assistant message, as a model would generate them."""
    ids = tok.encode_chat([USER, message], continue_final_message=True)
    end = len(ids) - ids[::-1].index(tok.special_id("[/INST]"))
    return [*ids[end:], tok.eos_id]


@pytest.mark.parametrize("name", ["v13", "v15"])
def test_parsed_thinking_round_trips(name: str, toks: dict[str, Tokenizer]) -> None:
    tok = toks[name]
    for content in (
        [think("Let me see: 2 + 2 = 4."), text("It is 4.")],
        [think("a"), text("b"), think("c", closed=False)],
        [think("only a thought that was cut", closed=False)],
        [text("answer first"), think("then a thought")],
    ):
        ids = reply_ids(tok, {"role": "assistant", "content": content})
        parsed = tok.parse_assistant(ids)
        want = [thinking_chunk(c["thinking"], c.get("closed", True)) if c["type"] == "thinking" else c
                for c in content]
        assert parsed == {"content": want, "tool_calls": []}
        again = {"role": "assistant", "content": parsed["content"]}  # the reply, sent back as the next turn
        assert reply_ids(tok, again) == ids


def test_thinking_then_tool_calls(toks: dict[str, Tokenizer]) -> None:
    tok = toks["v13"]
    call = {"id": "abcDEF123", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}
    ids = reply_ids(tok, {"role": "assistant", "content": [think("use add")], "tool_calls": [call]})
    parsed = tok.parse_assistant(ids)
    assert parsed["content"] == [thinking_chunk("use add", True)]
    assert [c["function"] for c in parsed["tool_calls"]] == [call["function"]]
    # [TOOL_CALLS] inside a thought is part of the thought, not a call
    inside = [tok.special_id("[THINK]"), *tok.encode("x"), tok.special_id("[TOOL_CALLS]"), *tok.encode("y"),
              tok.special_id("[/THINK]"), *tok.encode("z")]
    assert tok.parse_assistant(inside) == {"content": [thinking_chunk("xy", True), text("z")], "tool_calls": []}


def test_without_thinking_content_stays_a_string(toks: dict[str, Tokenizer]) -> None:
    v7 = toks["sp-v7"]  # no [THINK] in this vocabulary
    assert v7.parse_assistant([*v7.encode("Hello"), v7.eos_id]) == {"content": "Hello", "tool_calls": []}
    tok = toks["v13"]
    stray = [tok.special_id("[/THINK]"), *tok.encode("Hi")]  # a closing marker alone is not thinking
    assert tok.parse_assistant(stray) == {"content": "Hi", "tool_calls": []}


@pytest.mark.parametrize("name", ["v13", "v15"])
def test_parsing_thinking_never_raises(name: str, toks: dict[str, Tokenizer]) -> None:
    tok = toks[name]
    alphabet = [tok.special_id(s) for s in ("[THINK]", "[/THINK]", "[TOOL_CALLS]", "[ARGS]")] + [
        *tok.encode('add {"a": 1} thought')
    ]

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.sampled_from(alphabet), max_size=14))
    def check(ids: list[int]) -> None:
        parsed = tok.parse_assistant(ids)
        content = parsed["content"]
        if isinstance(content, list):
            assert all(c["type"] in ("thinking", "text") for c in content)
            assert (tok.special_id("[THINK]") in ids) and all(
                isinstance(c["closed"], bool) for c in content if c["type"] == "thinking"
            )

    check()


# ---------------------------------------------------------------------------------------------------
# a checkpoint's own system prompt (prompt_mode="reasoning")
# ---------------------------------------------------------------------------------------------------
def test_system_prompt_file_with_a_thinking_template(tmp_path: Path, toks: dict[str, Tokenizer]) -> None:
    prompt = "Think first.\n\nYour thinking must follow this template:[THINK]Draft here.[/THINK]Then answer."
    (tmp_path / "SYSTEM_PROMPT.txt").write_text(prompt, encoding="utf-8")
    tok = copy.copy(toks["v13"])
    tok.path = tmp_path / "tekken.json"
    assert find_system_prompt(tok) == prompt == find_system_prompt(tmp_path)
    message = system_prompt_message(prompt)
    assert message == {"role": "system", "content": [
        text("Think first.\n\nYour thinking must follow this template:"),
        {"type": "thinking", "thinking": "Draft here.", "closed": True},
        text("Then answer."),
    ]}
    ids = tok.encode_chat([message, USER])
    assert tok.decode(ids, "keep").startswith(f"<s>[SYSTEM_PROMPT]{prompt}[/SYSTEM_PROMPT][INST]")
    assert system_prompt_message("Plain prompt.") == {"role": "system", "content": "Plain prompt."}
    assert find_system_prompt(tmp_path / "elsewhere") is None and find_system_prompt(toks["v15"]) is None


def test_the_v15_files_parse_like_json(files: dict[str, Path]) -> None:
    data = json.loads(files["v15"].read_text(encoding="utf-8"))
    assert data["model_settings_builder"] == V15_BUILDER and data["config"]["version"] == "v15"
    assert [s["token_str"] for s in data["special_tokens"]][35:39] == [
        "[THINK]", "[/THINK]", "[MODEL_SETTINGS]", "[/MODEL_SETTINGS]"
    ]
    assert LEGACY_SPECIAL_TOKENS == tuple(s["token_str"] for s in data["special_tokens"][:20])
