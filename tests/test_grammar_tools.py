"""Constrained tool calls (mistral_ref.grammar.tool_call_grammar through api.chat_completion): a forced call names
a declared (or the named) function with arguments valid against its parameters schema, in every call syntax
(v3 / v7 JSON lists, v11 name[CALL_ID]id[ARGS]{...}, v13 name[ARGS]{...}); parallel_tool_calls=false allows one
call; "auto" with strict tools constrains the arguments once a call starts."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from chat_models import (
    DATA,
    SP_V3,
    TEKKEN_V3,
    needs_tokenizer_files,
    one_torch_thread,  # noqa: F401 — a fixture, used through pytestmark
    punctuation_bias,
    tiny_model,
    tokenizer,
)

from mistral_ref.api import RequestError, chat_completion
from mistral_ref.grammar import AfterToken, GrammarLogitsProcessor, tool_call_grammar
from mistral_ref.tokenizer import LEGACY_SPECIAL_TOKENS, TekkenTokenizer

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), needs_tokenizer_files]

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "array", "items": {"type": "integer"},
                                                                       "maxItems": 3}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER, "strict": True}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
_MODERN = [*LEGACY_SPECIAL_TOKENS, *[f"<SPECIAL_{i}>" for i in range(20, 32)], "[ARGS]", "[CALL_ID]"]
_TOKS: dict[str, object] = {}


def tok_for(name: str):
    """SentencePiece v3 / v7, Tekken v3, or Tekken v11 / v13 (the Nemo vocabulary with the modern specials)."""
    if name not in _TOKS:
        if name in (SP_V3, TEKKEN_V3) or name.endswith(".v7"):
            _TOKS[name] = tokenizer(name)
        else:
            nemo = json.loads((DATA / TEKKEN_V3).read_text(encoding="utf-8"))
            data = {**nemo, "config": {**nemo["config"], "version": name},
                    "special_tokens": [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(_MODERN)]}
            _TOKS[name] = TekkenTokenizer(data)
    return _TOKS[name]


def check_calls(calls, names):
    for call in calls:
        fn = call["function"]
        assert fn["name"] in names, fn
        jsonschema.validate(json.loads(fn["arguments"]), SCHEMAS[fn["name"]])


@pytest.mark.parametrize("name", [SP_V3, "mistral_instruct_tokenizer_241114.model.v7", "v11", "v13"])
def test_forced_calls_name_declared_functions_with_valid_arguments(name):
    tok = tok_for(name)
    model = tiny_model(tok).steer(bias=punctuation_bias(tok, 6.0))
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    finishes = []
    for seed in range(4):
        for choice, names in (("any", {"get_weather", "add"}),
                              ({"type": "function", "function": {"name": "add"}}, {"add"})):
            out = chat_completion(model, tok, msgs, tools=TOOLS, tool_choice=choice, temperature=1.0, seed=seed,
                                  max_tokens=60)
            c = out["choices"][0]
            finishes.append(c["finish_reason"])
            assert c["finish_reason"] in ("tool_calls", "length"), c  # never "stop": EOS comes only after a call
            if c["finish_reason"] == "tool_calls":
                check_calls(c["message"]["tool_calls"], names)
    assert finishes.count("tool_calls") >= 3


def _script(tok, calls):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": calls}]
    ids = tok.encode_chat(msgs, continue_final_message=True)
    start = len(ids) - ids[::-1].index(tok.special_id("[/INST]"))
    return ids[start:]


@pytest.mark.parametrize("name", [SP_V3, "v11", "v13"])
def test_parallel_tool_calls_false_allows_one_call(name):
    tok = tok_for(name)
    calls = [{"id": "abcDEF123", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": []}'}},
             {"id": "Zz9Yy8Xx7", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": [3]}'}}]
    script = _script(tok, calls)  # [TOOL_CALLS] ... two calls
    one = len(_script(tok, calls[:1]))
    for parallel in (True, False):
        grammar = tool_call_grammar(tok, TOOLS, parallel=parallel)
        proc = AfterToken(tok.special_id("[TOOL_CALLS]"), lambda g=grammar: GrammarLogitsProcessor(tok, g))
        generated = torch.zeros(1, 0, dtype=torch.long)
        refused_at = None
        for i, t in enumerate(script):
            logits = proc(generated, torch.zeros(1, tok.vocab_size))
            if torch.isneginf(logits[0, t]):
                refused_at = i
                break
            generated = torch.cat([generated, torch.tensor([[t]])], 1)
        if parallel:
            assert refused_at is None  # both calls fit the grammar
        else:  # the first call is whole; what starts a second one is refused (EOS is what may come)
            assert refused_at is not None and refused_at >= one - 2, (refused_at, one)
            assert logits[0, tok.eos_id] == 0.0 or refused_at < one


def test_auto_with_a_strict_tool_constrains_the_arguments_once_a_call_starts():
    tok = tok_for("v13")
    model = tiny_model(tok)
    msgs = [{"role": "user", "content": "Weather?"}]
    prompt = len(tok.encode_chat(msgs, tools=TOOLS))
    # the model says some text, then starts a call to get_weather; the grammar writes valid arguments
    script = tok.encode("ok") + [tok.special_id("[TOOL_CALLS]")] + tok.encode("get_weather") + [
        tok.special_id("[ARGS]")]
    for seed in range(3):
        model.steer(script, prompt, bias=punctuation_bias(tok, 6.0))
        out = chat_completion(model, tok, msgs, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=40)
        c = out["choices"][0]
        assert c["finish_reason"] in ("tool_calls", "length"), c
        if c["finish_reason"] == "tool_calls":
            check_calls(c["message"]["tool_calls"], {"get_weather"})


def test_unsupported_parameters_schema_is_a_request_error_naming_the_function():
    tok = tok_for(SP_V3)
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "if": {}}}}]
    with pytest.raises(RequestError, match="'f'.*if") as e:
        chat_completion(tiny_model(tok), tok, [{"role": "user", "content": "x"}], tools=bad, tool_choice="any")
    assert e.value.field == "tools"
