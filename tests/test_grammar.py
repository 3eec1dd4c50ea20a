"""mistral_ref.grammar (llguidance): whenever a constrained reply stops at EOS it validates against its JSON
schema (many seeds, nested objects, arrays, enums, required fields, SentencePiece and Tekken); whitespace and
digit runs are bounded; unsupported schema features are a RequestError naming them."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from chat_models import (
    SP_V3,
    TEKKEN_V3,
    needs_tokenizer_files,
    one_torch_thread,  # noqa: F401 — a fixture, used through pytestmark
    punctuation_bias,
    tiny_model,
    tokenizer,
)

from mistral_ref.api import RequestError, chat_completion, parse_request
from mistral_ref.generation import generate
from mistral_ref.grammar import (
    MAX_NUMBER_DIGITS,
    MAX_STRING_BYTES,
    MAX_WHITESPACE,
    GrammarError,
    GrammarLogitsProcessor,
    json_schema_grammar,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "zip": {"type": "integer"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "score": {"type": "number"},
        "active": {"type": "boolean"},
    },
    "required": ["name", "role", "address"],
    "additionalProperties": False,
}
NUMBERS = {"type": "array", "items": {"anyOf": [{"type": "number"}, {"type": "null"}]}, "maxItems": 4}


def sample(tok, proc, steps, seed, bias=None):
    """Random logits (plus `bias`), masked by `proc`, sampled for up to `steps` tokens: (tokens, stopped)."""
    g = torch.Generator().manual_seed(seed)
    generated = torch.zeros(1, 0, dtype=torch.long)
    for _ in range(steps):
        logits = torch.randn(1, tok.vocab_size, generator=g) * 3
        if bias is not None:
            logits += bias
        proc(generated, logits)
        t = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)  # (1, 1)
        if t.item() == tok.eos_id:
            return generated[0].tolist(), True
        generated = torch.cat([generated, t], 1)
    return generated[0].tolist(), False


@needs_tokenizer_files
@pytest.mark.parametrize("name", [SP_V3, TEKKEN_V3])
@pytest.mark.parametrize("schema", [PERSON, NUMBERS, {"type": "object"}], ids=["person", "numbers", "object"])
def test_every_stopped_sample_validates_against_the_schema(name, schema):
    tok = tokenizer(name)
    grammar = json_schema_grammar(None if schema == {"type": "object"} else schema)
    bias = punctuation_bias(tok, 6.0)
    stopped = 0
    for seed in range(12):
        tokens, ended = sample(tok, GrammarLogitsProcessor(tok, grammar), 120, seed, bias)
        if ended:
            stopped += 1
            text = tok.decode(tokens)
            jsonschema.validate(json.loads(text), schema)  # raises with the reason if not
            between = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text.lstrip(" "))  # string contents taken out
            assert not re.search(rf"[ \n]{{{MAX_WHITESPACE + 1}}}", between), text
            assert not re.search(rf"\d{{{MAX_NUMBER_DIGITS + 1}}}", text), text
    assert stopped >= 4  # the property was exercised


@needs_tokenizer_files
def test_eos_only_where_the_document_may_end_and_never_specials():
    tok = tokenizer(SP_V3)
    proc = GrammarLogitsProcessor(tok, json_schema_grammar({"type": "object", "properties": {"a": {"type":
                                                             "integer"}}, "required": ["a"]}))
    script = tok.encode('{"a": 12}')
    generated = torch.zeros(1, 0, dtype=torch.long)
    for i, t in enumerate(script + [None]):
        logits = torch.zeros(1, tok.vocab_size)
        out = proc(generated, logits)
        assert (out[0, tok.eos_id] > float("-inf")) == (i == len(script)), i
        assert torch.isneginf(out[0, sorted(tok.special_ids - {tok.eos_id})]).all()
        assert out[0, t].item() == 0.0 if t is not None else True  # the script itself is allowed
        if t is not None:
            generated = torch.cat([generated, torch.tensor([[t]])], 1)
    with pytest.raises(ValueError, match="once per step"):
        proc(torch.zeros(1, len(script) + 3, dtype=torch.long), torch.zeros(1, tok.vocab_size))


@needs_tokenizer_files
def test_digit_runs_are_bounded_unless_the_grammar_needs_more():
    tok = tokenizer(TEKKEN_V3)
    digits = torch.zeros(tok.vocab_size)
    for i in range(tok.vocab_size):
        if not tok.is_special(i) and tok.id_to_bytes(i).isdigit():
            digits[i] = 20.0  # a model that only wants digits
    tokens, _ = sample(tok, GrammarLogitsProcessor(tok, json_schema_grammar({"type": "integer"})), 40, 0, digits)
    assert 1 <= len(tok.decode(tokens).strip()) <= MAX_NUMBER_DIGITS
    # a schema that needs 20 digits still gets them
    big = {"type": "string", "pattern": "^[0-9]{20}$"}
    tokens, ended = sample(tok, GrammarLogitsProcessor(tok, json_schema_grammar(big)), 40, 0, digits)
    assert ended and re.fullmatch(r'"\d{20}"', tok.decode(tokens).strip())


@needs_tokenizer_files
@pytest.mark.parametrize("name", [SP_V3, TEKKEN_V3])
def test_strings_are_bounded_unless_the_grammar_needs_more(name):
    tok = tokenizer(name)
    letters = torch.zeros(tok.vocab_size)
    for i in range(tok.vocab_size):
        data = tok.id_to_bytes(i)
        if not tok.is_special(i) and data.strip() and data.replace(b" ", b"").isalpha():
            letters[i] = 20.0  # a model that only wants to write words
    letters[tok.eos_id] = 10.0
    schema = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"],
              "additionalProperties": False}
    grammar = json_schema_grammar(schema)
    for bound in (40, 100):
        tokens, ended = sample(tok, GrammarLogitsProcessor(tok, grammar, max_string_bytes=bound), 300, 0, letters)
        assert ended, tok.decode(tokens)
        value = json.loads(tok.decode(tokens))["s"]
        assert bound - 24 <= len(value.encode()) <= bound  # it wrote words until the bound closed the string
    # without the bound (the old behaviour) the same model fills all the tokens it is given inside the string
    tokens, ended = sample(tok, GrammarLogitsProcessor(tok, grammar, max_string_bytes=10**9), 120, 0, letters)
    assert not ended and len(tok.decode(tokens)) > 200
    # the default, and a grammar that needs a longer string still gets it
    assert GrammarLogitsProcessor(tok, grammar).max_string_bytes == MAX_STRING_BYTES
    long = {"type": "string", "minLength": 60}
    tokens, ended = sample(tok, GrammarLogitsProcessor(tok, json_schema_grammar(long), max_string_bytes=20), 200, 0,
                           letters)
    assert ended and len(json.loads(tok.decode(tokens))) >= 60


@pytest.mark.parametrize("schema, feature", [
    ({"type": "object", "if": {"required": ["a"]}, "then": {}}, "if"),
    ({"type": "string", "pattern": "(?=a)b"}, "look-around"),
    ({"type": "string", "format": "not-a-format"}, "not-a-format"),
])
def test_unsupported_schema_features_are_request_errors_naming_them(schema, feature):
    with pytest.raises(GrammarError, match=re.escape(feature)):
        json_schema_grammar(schema)
    body = {"messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    with pytest.raises(RequestError, match=re.escape(feature)) as e:
        parse_request(body)
    assert e.value.field == "response_format.json_schema.schema"


def test_malformed_response_formats_name_the_field():
    for bad in ({"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": {}}},
                "json"):
        with pytest.raises(RequestError) as e:
            parse_request({"messages": [{"role": "user", "content": "hi"}], "response_format": bad})
        assert e.value.field == "response_format", bad


@needs_tokenizer_files
@pytest.mark.parametrize("name", [SP_V3, TEKKEN_V3])
def test_json_schema_through_chat_completion(name):
    tok = tokenizer(name)
    model = tiny_model(tok).steer(bias=punctuation_bias(tok, 8.0))
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    finishes = []
    for seed in range(4):
        for stream in (False, True):
            out = chat_completion(model, tok, [{"role": "user", "content": "Who?"}], temperature=1.0, seed=seed,
                                  max_tokens=60, stream=stream, response_format=fmt)
            if stream:
                chunks = list(out)
                content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
                finish = chunks[-1]["choices"][0]["finish_reason"]
            else:
                content, finish = out["choices"][0]["message"]["content"], out["choices"][0]["finish_reason"]
            finishes.append(finish)
            if finish == "stop":
                jsonschema.validate(json.loads(content), PERSON)
    assert "stop" in finishes


def test_embedded_model_follows_a_schema():
    from mistral_ref import load_embedded

    model, tok = load_embedded()
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["answer", "count"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}
    for seed in range(3):
        out = chat_completion(model, tok, [{"role": "user", "content": "How many?"}], temperature=1.0, seed=seed,
                              max_tokens=40, response_format=fmt)
        choice = out["choices"][0]
        assert choice["finish_reason"] == "stop", choice  # the schema is short: it always closes in 40 tokens
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)


@needs_tokenizer_files
def test_unconstrained_generation_breaks_the_schema():
    """The same steered model without the grammar does not produce valid documents (the tests above are not
    vacuous)."""
    tok = tokenizer(SP_V3)
    model = tiny_model(tok).steer(bias=punctuation_bias(tok, 8.0))
    prompt = tok.encode_chat([{"role": "user", "content": "Who?"}])
    invalid = 0
    for res in generate(model, [prompt] * 8, 30, temperature=1.0, seed=0, eos_id=tok.eos_id):
        try:
            jsonschema.validate(json.loads(tok.decode(res.tokens)), PERSON)
        except (ValueError, jsonschema.ValidationError):
            invalid += 1
    assert invalid >= 6
