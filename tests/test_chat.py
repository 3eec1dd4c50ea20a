"""Chat templates (mistral_ref.tokenizer.chat, .templates): token parity with mistral-common, validation, properties."""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import string
from pathlib import Path

import pytest
from chat_oracle import (
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
    REASONING_EFFORTS,
    SAFE_PROMPT,
    TEMPLATES,
    VERSIONS,
    ChatTemplateError,
    Tokenizer,
    load_tokenizer,
    mistral_common_data_dir,
)

DATA = mistral_common_data_dir()
pytestmark = pytest.mark.skipif(DATA is None, reason="the mistral-common wheel ships the tokenizer files")

# name -> file in mistral_common/data, or the key of a file built from the Nemo file (BUILT)
CONFIGS = {
    "v1": "tokenizer.model.v1",
    "v2": "mistral_instruct_tokenizer_240216.model.v2",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
    "v7": "mistral_instruct_tokenizer_241114.model.v7",
    "tekken-v3": "tekken_240718.json",
    "tekken-v7": "v7",
    "tekken-v11": "v11",
    "tekken-v13": "v13",
    "tekken-v15": "v15",
    "tekken-v15-effort": "v15-effort",
}
# built file -> (version, special tokens, model_settings_builder)
BUILT = {
    "v7": ("v7", list(LEGACY_SPECIAL_TOKENS), None),
    "v11": ("v11", MODERN_SPECIALS, None),
    "v13": ("v13", MODERN_SPECIALS, None),
    "v15": ("v15", V15_SPECIALS, V15_BUILDER),
    # every reasoning effort, default medium, no schema setting
    "v15-effort": (
        "v15",
        V15_SPECIALS,
        {"reasoning_effort": {**EFFORT_NONE_HIGH, "default": "medium", "values": list(REASONING_EFFORTS)}},
    ),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    assert DATA is not None
    tmp = tmp_path_factory.mktemp("tekken")
    out = {}
    for name, f in CONFIGS.items():
        out[name] = build_tekken(tmp, *BUILT[f], name=f) if f in BUILT else DATA / f
    return out


@pytest.fixture(scope="module")
def toks(files: dict[str, Path]) -> dict[str, Tokenizer]:
    return {name: load_tokenizer(p) for name, p in files.items()}


# ---------------------------------------------------------------------------------------------------
# random requests
# ---------------------------------------------------------------------------------------------------
TEXTS = [
    "Hello",
    "What's the weather like in Paris today?",
    "Bonjour, comment ça va ?",
    "Schreib mir ein Gedicht über Bäume.",
    "¿Dónde está la biblioteca?",
    "नमस्ते, आप कैसे हैं?",
    "مرحبا كيف حالك",
    "你好，世界！",
    "ഹലോ ലോകം",
    "I like 🍕 and 🐍 👩‍💻",
    "def f(x):\n    return x ** 2\n",
    "12345 67.89 -0.5e10",
    "   spaces   around   ",
    "trailing spaces   ",
    "text with [INST] and </s> and <s> inside",
    "line1\r\nline2\n\n\tindented",
    "",
    " ",
    '{"looks": "like json"}',
]
FUNCS = ["get_weather", "search", "calc-sum", "lookup_2", "send_email"]


def _rid(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(9))


def _text(rng: random.Random) -> str:
    t = rng.choice(TEXTS)
    if rng.random() < 0.3:
        t = t + " " + rng.choice(TEXTS)
    return t


def _content(rng: random.Random, allow_empty: bool = True) -> object:
    t = _text(rng)
    while not allow_empty and not t:
        t = _text(rng)
    if rng.random() < 0.15:
        return [{"type": "text", "text": t}, {"type": "text", "text": _text(rng) or "x"}]
    return t


def _tools(rng: random.Random) -> list[dict]:
    out = []
    for name in rng.sample(FUNCS, rng.randint(1, 3)):
        fn: dict = {"name": name}
        if rng.random() < 0.8:
            fn["description"] = rng.choice(["Get the weather", "Cherche sur le web", "Somme 🧮", ""])
        if rng.random() < 0.9:
            fn["parameters"] = {
                "type": "object",
                "properties": {"q": {"type": "string", "description": "query é"}, "n": {"type": "integer"}},
                "required": ["q"],
            }
        out.append({"type": "function", "function": fn})
    return out


def _args(rng: random.Random) -> object:
    a = {"q": _text(rng), "n": rng.randint(-5, 500)}
    r = rng.random()
    if r < 0.4:
        return a
    if r < 0.8:
        return json.dumps(a, ensure_ascii=rng.random() < 0.5)
    return rng.choice(["", "{}", "not json", '{"nested": {"a": [1, 2, {"b": null}]}}'])


def _result(rng: random.Random) -> str:
    return rng.choice(
        ['{"temperature": 21, "unit": "°C"}', "It is sunny.", "", "[1, 2, 3]", "42", '"str"', _text(rng)]
    )


THOUGHTS = ["Let me think.", "", "  The user wants the weather; call get_weather.\n", "Hmm… 2 + 2 = 4 ", "思考"]


def _thinking(rng: random.Random, closed: bool = True) -> dict:
    """A thinking chunk, in mistral-common's form or the Mistral API's (thinking as a list of text chunks)."""
    text = rng.choice(THOUGHTS)
    chunk: dict = {"type": "thinking", "thinking": text}
    if rng.random() < 0.3:
        chunk["thinking"] = [{"type": "text", "text": text}]
    if not closed or rng.random() < 0.5:
        chunk["closed"] = closed
    return chunk


def _with_thinking(rng: random.Random, content: object, closed: bool = True) -> object:
    """Content with thinking chunks (v13+): before the text mostly, sometimes between text chunks."""
    text = [content] if isinstance(content, str) else list(content)  # type: ignore[call-overload]
    chunks = [{"type": "text", "text": t} if isinstance(t, str) else t for t in text]
    r = rng.random()
    if r < 0.6:
        return [_thinking(rng), *chunks]
    if r < 0.8:
        return [*chunks[:1], _thinking(rng), *chunks[1:], _thinking(rng, closed)]
    return [_thinking(rng, closed)] if not chunks[0]["text"] else [*chunks, _thinking(rng, closed)]


def make_request(rng: random.Random, v: int) -> tuple[list[dict], list[dict] | None, bool, bool]:
    """A random, mostly valid chat request for version ``v``; some are deliberately invalid.

    From v13 on, assistant messages (and v13 system messages) think, some through ``reasoning_content``; a few
    v15 system messages do too, which v15 refuses. Older versions draw exactly the random numbers they always did.
    """
    tools_ok = v >= 2
    msgs: list[dict] = []
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        msgs.append({"role": rng.choice(["system", "system", "developer"]), "content": _content(rng)})
        if v >= 13 and rng.random() < (0.3 if v == 13 else 0.03):
            msgs[-1]["content"] = _with_thinking(rng, msgs[-1]["content"])
    pending_ids: list[str] = []
    for _turn in range(rng.randint(1, 4)):
        for _ in range(rng.choice([1, 1, 1, 2])):
            msgs.append({"role": "user", "content": _content(rng)})
        if rng.random() < 0.1:
            msgs.append({"role": "system", "content": _content(rng)})
        if tools_ok and rng.random() < 0.4:
            n = 1 if v == 2 else rng.randint(1, 2)
            calls = []
            for _ in range(n):
                call = {"id": _rid(rng), "type": "function", "function": {"name": rng.choice(FUNCS)}}
                call["function"]["arguments"] = _args(rng)
                calls.append(call)
            a: dict = {"role": "assistant", "tool_calls": calls}
            if v >= 7 and rng.random() < 0.3:
                a["content"] = _text(rng)
            if v >= 13 and rng.random() < 0.4:
                a["content"] = [_thinking(rng)] + ([{"type": "text", "text": a["content"]}] if "content" in a else [])
            msgs.append(a)
            results = [
                {
                    "role": "tool",
                    "tool_call_id": c["id"],
                    "name": c["function"]["name"],
                    "content": _result(rng),
                }
                for c in calls
            ]
            if rng.random() < 0.3:
                rng.shuffle(results)
            msgs.extend(results)
            pending_ids = [c["id"] for c in calls]
        if rng.random() < 0.8:
            msgs.append({"role": "assistant", "content": _content(rng, allow_empty=False)})
            if v >= 13:
                r = rng.random()
                if r < 0.4:
                    msgs[-1]["content"] = _with_thinking(rng, msgs[-1]["content"])
                elif r < 0.5:
                    msgs[-1]["reasoning_content"] = rng.choice(THOUGHTS)
            if rng.random() < 0.1:
                msgs.append({"role": "assistant", "content": _text(rng) or "more"})
    del pending_ids
    cfm = False
    if msgs[-1]["role"] == "assistant":
        if rng.random() < 0.7:
            cfm = True
        else:
            msgs.append({"role": "user", "content": _content(rng)})
    elif rng.random() < 0.15:
        msgs.append({"role": "assistant", "content": _text(rng) or "Sure"})
        cfm = True
        if v >= 13 and rng.random() < 0.5:  # continue a thought that is still going on
            msgs[-1]["content"] = [_thinking(rng, closed=rng.random() < 0.3)]
    tools = _tools(rng) if tools_ok and rng.random() < 0.6 else None
    if rng.random() < 0.05:  # deliberate mistakes
        kind = rng.randrange(4)
        if kind == 0:
            msgs.append({"role": "assistant", "content": "no prefix flag"})
            cfm = False
        elif kind == 1:
            msgs.insert(0, {"role": "tool", "content": "x", "tool_call_id": _rid(rng)})
            msgs.insert(1, {"role": "user", "content": "y"})
        elif kind == 2:
            for m in msgs:
                for c in m.get("tool_calls") or []:
                    c["id"] = "bad-id"
                if m["role"] == "tool":
                    m["tool_call_id"] = "bad-id"
        else:
            msgs.insert(len(msgs) - 1, {"role": "assistant", "content": None})
    return msgs, tools, rng.random() < 0.2, cfm


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "description": "ville é"}, "days": {"type": "integer"}},
    "required": ["city"],
}


def make_settings(rng: random.Random, v: int) -> dict:
    """Random model settings for a request of version ``v`` (v13+; older versions get none and draw nothing):
    ``reasoning_effort`` (now and then one that the model refuses) and ``response_format``."""
    out: dict = {}
    if v < 13:
        return out
    r = rng.random()
    if v == 13 and r < 0.03:
        out["reasoning_effort"] = rng.choice(REASONING_EFFORTS)  # refused: v13 has no model settings
    elif v == 15 and r < 0.6:
        out["reasoning_effort"] = rng.choice(["none", "high"] * 40 + list(REASONING_EFFORTS))
    r = rng.random()
    if r < 0.15:
        out["response_format"] = {"type": "json_object"}
    elif r < 0.3:
        schema = {"name": "weather", "schema": SCHEMA, "strict": rng.random() < 0.5}
        out["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif r < 0.35:
        out["response_format"] = {"type": "text"}
    return out


# ---------------------------------------------------------------------------------------------------
# the oracle
# ---------------------------------------------------------------------------------------------------
N_REQUESTS = 330


@pytest.mark.oracle
@pytest.mark.parametrize("name", list(CONFIGS))
def test_chat_matches_mistral_common(name: str, files: dict[str, Path], toks: dict[str, Tokenizer]) -> None:
    tok = toks[name]
    mt = oracle_tokenizer(files[name])
    v = int(tok.version[1:])
    rng = random.Random(1234 + v)
    ok = errors = 0
    for k in range(N_REQUESTS):
        msgs, tools, safe, cfm = make_request(rng, v)
        extra = make_settings(rng, v)
        try:
            want = oracle_encode(mt, msgs, tools, safe, cfm, **extra)
        except Exception as e:  # noqa: BLE001 - any refusal by the oracle
            with pytest.raises(ChatTemplateError):
                tok.encode_chat(msgs, tools=tools, safe_prompt=safe, continue_final_message=cfm, **extra)
            errors += 1
            del e
            continue
        got = tok.encode_chat(msgs, tools=tools, safe_prompt=safe, continue_final_message=cfm, **extra)
        assert got == want, f"request {k}: {json.dumps([msgs, tools, safe, cfm, extra], ensure_ascii=False)}"
        ok += 1
    assert ok >= 300, (ok, errors)


# ---------------------------------------------------------------------------------------------------
# layouts (decode with special="keep" shows the template)
# ---------------------------------------------------------------------------------------------------
WEATHER = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "tool_calls": [
            {
                "id": "abcDEF123",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "abcDEF123", "name": "get_weather", "content": '{"t": 21}'},
    {"role": "assistant", "content": "21 °C. "},
    {"role": "user", "content": "Thanks"},
]
WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            "strict": True,
        },
    }
]
TOOLS_JSON = (
    '[{"type": "function", "function": {"name": "get_weather", "description": "Weather", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]'
)
LAYOUTS = {
    "v1": "<s>[INST] Be brief.\n\nWeather in Paris? [/INST] Sunny.</s> [INST] Thanks [/INST]",
    "v2": f"<s>[INST]Weather in Paris?[/INST] 21 °C.</s>[AVAILABLE_TOOLS] {TOOLS_JSON}[/AVAILABLE_TOOLS]"
    "[INST] Be brief.\n\nThanks[/INST]",
    "v7": '<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST] Weather in Paris?[/INST][TOOL_CALLS] [{"name": '
    '"get_weather", "arguments": {"city": "Paris"}, "id": "abcDEF123"}]</s>[TOOL_RESULTS] abcDEF123'
    f'[TOOL_CONTENT] {{"t": 21}}[/TOOL_RESULTS] 21 °C.</s>[AVAILABLE_TOOLS] {TOOLS_JSON}[/AVAILABLE_TOOLS]'
    "[INST] Thanks[/INST]",
    "tekken-v3": '<s>[INST]Weather in Paris?[/INST][TOOL_CALLS][{"name": "get_weather", '
    '"arguments": {"city": "Paris"}, "id": "abcDEF123"}]</s>'
    '[TOOL_RESULTS]{"content": {"t": 21}, "call_id": "abcDEF123"}'
    f"[/TOOL_RESULTS]21 °C.</s>[AVAILABLE_TOOLS]{TOOLS_JSON}[/AVAILABLE_TOOLS]"
    "[INST]Be brief.\n\nThanks[/INST]",
    "tekken-v11": "<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]Weather in Paris?[/INST]"
    "[TOOL_CALLS]get_weather"
    '[CALL_ID]abcDEF123[ARGS]{"city": "Paris"}</s>[TOOL_RESULTS]abcDEF123[TOOL_CONTENT]{"t": 21}'
    f"[/TOOL_RESULTS]21 °C.</s>[AVAILABLE_TOOLS]{TOOLS_JSON}[/AVAILABLE_TOOLS][INST]Thanks[/INST]",
    "tekken-v13": "<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT]"
    f"[AVAILABLE_TOOLS]{TOOLS_JSON}[/AVAILABLE_TOOLS]"
    '[INST]Weather in Paris?[/INST][TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}</s>[TOOL_RESULTS]{"t": 21}'
    "[/TOOL_RESULTS]21 °C.</s>[INST]Thanks[/INST]",
    "tekken-v15": "<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT]"
    f'[AVAILABLE_TOOLS]{TOOLS_JSON}[/AVAILABLE_TOOLS][MODEL_SETTINGS]{{"reasoning_effort": "none"}}[/MODEL_SETTINGS]'
    '[INST]Weather in Paris?[/INST][TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}</s>[TOOL_RESULTS]{"t": 21}'
    "[/TOOL_RESULTS]21 °C.</s>[INST]Thanks[/INST]",
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_template_layout(name: str, toks: dict[str, Tokenizer]) -> None:
    tok = toks[name]
    msgs = WEATHER
    if name == "v1":
        msgs = [WEATHER[0], WEATHER[1], {"role": "assistant", "content": "Sunny. "}, WEATHER[5]]
    ids = tok.encode_chat(msgs, tools=None if name == "v1" else WEATHER_TOOLS)
    assert tok.decode(ids, "keep") == LAYOUTS[name].replace("Sunny.</s>", "Sunny. </s>")


@pytest.mark.parametrize("name", ["v3", "tekken-v7", "tekken-v13"])
def test_safe_prompt_and_continuation(name: str, toks: dict[str, Tokenizer]) -> None:
    tok = toks[name]
    msgs = [
        {"role": "user", "content": "Write a haiku"},
        {"role": "assistant", "content": "Autumn moonlight -"},
    ]
    ids = tok.encode_chat(msgs, safe_prompt=True, continue_final_message=True)
    text = tok.decode(ids, "keep")
    assert SAFE_PROMPT in text and ids.count(tok.bos_id) == 1
    assert ids[-1] != tok.eos_id and text.endswith("Autumn moonlight -")
    if name == "v3":
        assert f"<s>[INST]{SAFE_PROMPT}\n\nWrite a haiku[/INST]" in text
    else:
        assert text.startswith(f"<s>[SYSTEM_PROMPT]{SAFE_PROMPT}[/SYSTEM_PROMPT][INST]")
    closed = tok.encode_chat(msgs[:1] + [msgs[1], {"role": "user", "content": "more"}])
    assert tok.eos_id in closed


# ---------------------------------------------------------------------------------------------------
# validation: errors users meet, each saying what to change
# ---------------------------------------------------------------------------------------------------
def _call(call_id: str = "abcDEF123", name: str = "get_weather") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": "{}"}}


@pytest.mark.parametrize(
    ("name", "messages", "kwargs", "match"),
    [
        ("v3", [], {}, "at least one user message"),
        ("v3", [{"role": "assistant", "content": "hi"}], {}, "must start with a user or system"),
        (
            "v3",
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            {},
            "continue_final",
        ),
        (
            "v3",
            [{"role": "user", "content": "a"}],
            {"continue_final_message": True},
            "last message to be the",
        ),
        (
            "v3",
            [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],
            {},
            "cannot follow a user",
        ),
        ("v3", [{"role": "bot", "content": "a"}], {}, "role 'bot' is unknown"),
        ("v3", [{"role": "user"}], {}, "needs 'content'"),
        ("v3", ["hello"], {}, "must be a dict"),
        ("v3", {"role": "user", "content": "x"}, {}, "must be a list"),
        (
            "v3",
            [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
            {},
            "only text chunks",
        ),
        (
            "v3",
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": None},
                {"role": "user", "content": "b"},
            ],
            {},
            "neither content nor tool_calls",
        ),
        (
            "v3",
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "x", "tool_calls": [_call()]},
            ],
            {"continue_final_message": True},
            "both content and tool_calls",
        ),
        (
            "v3",
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "tool_calls": [_call("call_1")]},
                {"role": "tool", "tool_call_id": "call_1", "content": "r"},
            ],
            {},
            "9 characters",
        ),
        (
            "v3",
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "tool_calls": [_call(name="get weather!")]},
                {"role": "tool", "tool_call_id": "abcDEF123", "content": "r"},
            ],
            {},
            "function name 'get weather!' is invalid",
        ),
        (
            "v3",
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "tool_calls": [_call(), _call("zzzZZZ999")]},
                {"role": "tool", "tool_call_id": "abcDEF123", "content": "r"},
                {"role": "assistant", "content": "done"},
                {"role": "user", "content": "b"},
            ],
            {},
            "fewer tool results than calls",
        ),
        (
            "tekken-v11",
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "tool_calls": [_call()]},
                {"role": "tool", "tool_call_id": "zzzZZZ999", "content": "r"},
            ],
            {},
            "matches no call",
        ),
        (
            "v2",
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "tool_calls": [_call(), _call("zzzZZZ999")]},
                {"role": "tool", "tool_call_id": "abcDEF123", "content": "r"},
                {"role": "tool", "tool_call_id": "zzzZZZ999", "content": "s"},
            ],
            {},
            "several tool results",
        ),
        (
            "v1",
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "tool_calls": [_call()]},
                {"role": "tool", "tool_call_id": "abcDEF123", "content": "r"},
            ],
            {},
            "v2 or newer",
        ),
        (
            "tekken-v13",
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
                {"role": "tool", "content": "r", "tool_call_id": "null"},
            ],
            {},
            "needs an id",
        ),
        (
            "tekken-v7",
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "x", "prefix": True},
                {"role": "user", "content": "b"},
            ],
            {},
            "only the last message can be an assistant prefix",
        ),
    ],
)
def test_invalid_requests_say_what_to_change(
    name: str, messages: object, kwargs: dict, match: str, toks: dict[str, Tokenizer]
) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        toks[name].encode_chat(messages, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("tools", "match"),
    [
        ([{"type": "function", "function": {"name": "bad name"}}], "function name 'bad name' is invalid"),
        ([{"type": "retrieval"}], "not supported"),
        ([{"type": "function", "function": {"name": "f", "parameters": []}}], "JSON schema object"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "dict"}}}], "schema type"),
        ("get_weather", "tools must be a list"),
    ],
)
def test_invalid_tools(tools: object, match: str, toks: dict[str, Tokenizer]) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        toks["tekken-v7"].encode_chat([{"role": "user", "content": "hi"}], tools=tools)  # type: ignore[arg-type]


def test_missing_template_token_is_reported(toks: dict[str, Tokenizer]) -> None:
    tok = copy.copy(toks["tekken-v7"])  # legacy special tokens only: no [ARGS] / [CALL_ID]
    tok.version = "v11"
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "tool_calls": [_call()]},
        {"role": "tool", "tool_call_id": "abcDEF123", "content": "r"},
    ]
    with pytest.raises(ChatTemplateError, match=r"no \[(ARGS|CALL_ID)\] token"):
        tok.encode_chat(msgs)


def test_template_table_rows_are_checked() -> None:
    assert VERSIONS == tuple(TEMPLATES) and all(TEMPLATES[v].version == v for v in VERSIONS)
    with pytest.raises(ValueError, match="v13: tools='frist'"):
        dataclasses.replace(TEMPLATES["v13"], tools="frist")  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        TEMPLATES["v3"].tools = "first"  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------------
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_role = st.sampled_from(["system", "user", "assistant", "tool", "developer", "bot", None])
_call_st = st.fixed_dictionaries(
    {"id": st.sampled_from(["abcDEF123", "zzzZZZ999", "bad", "null"]), "type": st.just("function")},
    optional={
        "function": st.fixed_dictionaries(
            {"name": st.sampled_from(["f", "get_weather", "bad name"])},
            optional={"arguments": st.one_of(_json, st.sampled_from(["{}", '{"a": 1}', "oops"]))},
        )
    },
)
_message = st.fixed_dictionaries(
    {"role": _role},
    optional={
        "content": st.one_of(
            st.none(),
            st.text(max_size=20),
            st.lists(
                st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=8)}), max_size=2
            ),
            _json,
        ),
        "tool_calls": st.one_of(st.none(), st.lists(_call_st, max_size=2), _json),
        "tool_call_id": st.sampled_from(["abcDEF123", "zzzZZZ999", "x", None]),
        "name": st.sampled_from(["f", "get_weather", "bad name", None]),
    },
)
_messages = st.lists(st.one_of(_message, _json), max_size=6)
_tools_st = st.one_of(st.none(), st.just(WEATHER_TOOLS), _json)


@pytest.mark.parametrize("name", ["v1", "v3", "tekken-v7", "tekken-v13"])
def test_any_request_gives_one_bos_or_our_error(name: str, toks: dict[str, Tokenizer]) -> None:
    tok = toks[name]

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_messages, _tools_st, st.booleans(), st.booleans())
    def check(messages: list, tools: object, safe: bool, cfm: bool) -> None:
        try:
            ids = tok.encode_chat(messages, tools=tools, safe_prompt=safe, continue_final_message=cfm)  # type: ignore[arg-type]
        except ChatTemplateError:
            return
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1

    check()


@pytest.mark.parametrize("name", ["v3", "tekken-v13"])
def test_valid_conversations_have_one_bos(name: str, toks: dict[str, Tokenizer]) -> None:
    tok = toks[name]
    v = int(tok.version[1:])

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.integers(0, 2**32 - 1))
    def check(seed: int) -> None:
        msgs, tools, safe, cfm = make_request(random.Random(seed), v)
        try:
            ids = tok.encode_chat(msgs, tools=tools, safe_prompt=safe, continue_final_message=cfm)
        except ChatTemplateError:
            return
        assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
        assert sum(tok.is_special(t) for t in ids) >= 2 if v > 1 else True

    check()


def _mutate(rng: random.Random, msgs: list[dict], v: int) -> list[dict]:
    """Break a request in small ways (roles, empty content, ids, stray system/tool/assistant messages)."""
    msgs = copy.deepcopy(msgs)
    for _ in range(rng.randint(1, 3)):
        if not msgs:
            break
        k, i = rng.randrange(10), rng.randrange(len(msgs))
        m = msgs[i]
        if k == 0 and not m.get("tool_calls"):
            m["role"] = rng.choice(["system", "user", "assistant", "tool"])
            if m["role"] == "tool":
                m["tool_call_id"] = "abcDEF123"
        elif k == 1:
            m["content"] = rng.choice(["", None, [], [{"type": "text", "text": ""}], "x "])
        elif k == 2:
            msgs.insert(i, {"role": "system", "content": "mid"})
        elif k == 3:
            del msgs[i]
        elif k == 4 and m.get("tool_calls"):
            m["tool_calls"][0]["id"] = rng.choice(["null", "abc", "ABCDEFGHI", "x" * 9])
        elif k == 5 and m["role"] == "tool":
            m["tool_call_id"] = rng.choice(["null", "abcdefghi"] + ([None] if v >= 3 else []))
        elif k == 6:
            call = {"id": "abcDEF123", "function": {"name": "f", "arguments": ""}}
            msgs.insert(i, {"role": "assistant", "content": "a", "tool_calls": [call]})
        elif k == 7:
            tool = {
                "role": "tool",
                "content": "r",
                "tool_call_id": "abcDEF123",
                "name": rng.choice(["f", "b c"]),
            }
            msgs.insert(i, tool)
        elif k == 8:
            msgs.insert(i, {"role": "assistant", "tool_calls": []})
        elif k == 9:
            msgs.append({"role": "assistant", "content": "tail  "})
    return msgs


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["v1", "v2", "v3", "tekken-v7", "tekken-v11", "tekken-v13", "tekken-v15"])
def test_broken_requests_refused_like_mistral_common(
    name: str, files: dict[str, Path], toks: dict[str, Tokenizer]
) -> None:
    tok = toks[name]
    mt = oracle_tokenizer(files[name])
    v = int(tok.version[1:])
    rng = random.Random(99 + v)
    refused = 0
    for k in range(120):
        msgs, tools, safe, cfm = make_request(rng, v)
        msgs = _mutate(rng, msgs, v)
        extra = make_settings(rng, v)
        try:
            want = oracle_encode(mt, msgs, tools, safe, cfm, **extra)
        except Exception:  # noqa: BLE001 - any refusal by the oracle
            refused += 1
            with pytest.raises(ChatTemplateError):
                tok.encode_chat(msgs, tools=tools, safe_prompt=safe, continue_final_message=cfm, **extra)
            continue
        got = tok.encode_chat(msgs, tools=tools, safe_prompt=safe, continue_final_message=cfm, **extra)
        assert got == want, f"request {k}: {json.dumps([msgs, tools, safe, cfm, extra], ensure_ascii=False)}"
    assert refused >= 40
