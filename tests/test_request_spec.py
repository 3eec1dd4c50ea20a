"""mistral_ref.request_spec: the one declaration of the chat-completions request agrees with everything it drives:
the OpenAPI document, parse_request, the sampling checks, generation's defaults, the Azure route, and a pydantic
model generated from it."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from mistral_ref import generation
from mistral_ref.api import REQUEST_FIELDS, ChatRequest, RequestError, parse_request
from mistral_ref.request_spec import (
    AZURE_ALIASES,
    AZURE_FIELDS,
    AZURE_IGNORED,
    FIELDS,
    REQUEST,
    SAMPLING_FIELDS,
    Field,
    check,
    json_schema,
)
from mistral_ref.sampling import GenerationParamError, SamplingParams
from mistral_ref.server import openapi_document

MESSAGES = [{"role": "user", "content": "Hi"}]
NUMERIC = [f for f in REQUEST if f.type in ("number", "integer") and (f.minimum, f.maximum) != (None, None)]
SCALAR = [f for f in REQUEST if f.schema is None]
RANGE_KEYS = ("minimum", "exclusiveMinimum", "maximum")
WRONG_TYPE = {"number": "1", "integer": 1.5, "boolean": 1, "string": 3}


def outside(f: Field) -> list[float]:
    """Values just outside the field's range (on each bounded side)."""
    out = []
    if f.minimum is not None:
        out.append(f.minimum if f.exclusive_minimum else f.minimum - 1)
    if f.maximum is not None:
        out.append(f.maximum + 1)
    return out


def bounds(f: Field) -> list[float]:
    """The values at the field's closed bounds (all accepted)."""
    return [b for b in (None if f.exclusive_minimum else f.minimum, f.maximum) if b is not None]


def body(name: str, value) -> dict:
    return {"messages": MESSAGES, "logprobs": True, name: value}  # logprobs: top_logprobs needs it


def test_the_table_covers_what_the_tests_below_rely_on() -> None:
    assert {f.name for f in NUMERIC} == {"temperature", "top_p", "presence_penalty", "frequency_penalty",
                                         "max_tokens", "seed", "random_seed", "n", "top_logprobs",
                                         "max_completion_tokens"}
    assert set(SAMPLING_FIELDS) <= set(FIELDS) and REQUEST_FIELDS == tuple(FIELDS)
    assert len(FIELDS) == len(REQUEST)  # no name twice
    for f in REQUEST:
        assert f.doc and (f.schema is not None or f.type in WRONG_TYPE), f.name
        assert f.alias_of is None or FIELDS[f.alias_of].alias_of is None


def test_the_spec_does_not_import_torch() -> None:
    code = "import sys, mistral_ref.request_spec; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the OpenAPI document ------------------------------------------------------------------------------------
def test_openapi_lists_every_field_with_its_range_and_default() -> None:
    doc = openapi_document()
    schemas = doc["components"]["schemas"]
    request = schemas["ChatCompletionRequest"]
    assert request["additionalProperties"] is False and request["required"] == ["messages"]
    assert list(request["properties"]) == list(FIELDS)
    for f in REQUEST:
        prop = request["properties"][f.name]
        assert prop.get("minimum") == (None if f.exclusive_minimum else f.minimum), f.name
        assert prop.get("exclusiveMinimum") == (f.minimum if f.exclusive_minimum else None), f.name
        assert prop.get("maximum") == f.maximum and prop.get("default") == f.default, f.name
        assert prop["description"] == f.doc
        if f.schema is None:
            assert prop["type"] == f.type
    refs = [r.split("/")[-1] for r in _refs(doc)]
    assert refs and set(refs) <= set(schemas)  # every $ref resolves


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from [v] if k == "$ref" else _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


# ---- parse_request -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("f", NUMERIC, ids=lambda f: f.name)
def test_parse_request_refuses_each_numeric_field_out_of_range_and_accepts_its_bounds(f: Field) -> None:
    for value in outside(f):
        with pytest.raises(RequestError) as e:
            parse_request(body(f.name, value))
        assert e.value.field == f.name and str(e.value).startswith(f"{f.name}: ")
        assert (f.range_doc or f"must be {f.interval}") in str(e.value)
    for value in bounds(f):
        req = parse_request(body(f.name, value))
        assert getattr(req, f.alias_of or f.name, None) in (value, None)  # n is checked, not stored


@pytest.mark.parametrize("f", SCALAR, ids=lambda f: f.name)
def test_parse_request_refuses_each_scalar_field_of_the_wrong_type(f: Field) -> None:
    with pytest.raises(RequestError) as e:
        parse_request(body(f.name, WRONG_TYPE[f.type]))
    assert e.value.field == f.name


def test_parse_request_defaults_are_the_specs() -> None:
    req = parse_request({"messages": MESSAGES})
    for f in SCALAR:
        if hasattr(req, f.name):
            assert getattr(req, f.name) == f.default, f.name
    assert req.tool_choice == FIELDS["tool_choice"].default and not req.json_mode
    nulls = parse_request({"messages": MESSAGES, **{f.name: None for f in REQUEST if not f.required}})
    assert nulls == req  # null means "the default" for every optional field


# ---- the sampling checks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SAMPLING_FIELDS)
def test_sampling_params_check_the_same_ranges_with_the_same_words(name: str) -> None:
    f = FIELDS[name]
    for value in outside(f):
        with pytest.raises(GenerationParamError) as e:
            SamplingParams(**{name: value})
        with pytest.raises(RequestError) as r:
            parse_request(body(name, value))
        assert str(e.value).startswith(f"{name} must ")
        assert str(r.value) == f"{name}: {str(e.value).removeprefix(name + ' ')}"  # the same words
    for value in bounds(f):
        assert getattr(SamplingParams(**{name: value}), name) == value
    assert getattr(SamplingParams(), name) == f.default


def test_chat_request_sampling_generation_defaults_agree() -> None:
    chat = ChatRequest(messages=MESSAGES)
    for name in ("generate", "generate_stream"):
        params = inspect.signature(getattr(generation, name)).parameters
        for field_name in SAMPLING_FIELDS:
            assert params[field_name].default == FIELDS[field_name].default == getattr(chat, field_name)
    assert generation.MAX_TOP_LOGPROBS == FIELDS["top_logprobs"].maximum


def test_check_returns_numbers_as_floats_and_leaves_structured_fields_to_api() -> None:
    assert check("temperature", 1) == 1.0 and isinstance(check("temperature", 1), float)
    assert check("max_tokens", 5) == 5
    stop = ["a"]
    assert check("stop", stop) is stop


# ---- the Azure route -----------------------------------------------------------------------------------------
def test_azure_names_are_fields_of_the_spec() -> None:
    assert set(AZURE_FIELDS) - set(AZURE_IGNORED) <= set(FIELDS)
    assert not set(AZURE_IGNORED) & set(FIELDS)
    assert set(AZURE_ALIASES.values()) <= set(FIELDS) and not set(AZURE_ALIASES) & set(FIELDS)
    assert {"messages", "temperature", "seed", "stream"} <= set(AZURE_FIELDS)
    assert "random_seed" not in AZURE_FIELDS and "safe_prompt" not in AZURE_FIELDS


# ---- a pydantic model generated from the spec ----------------------------------------------------------------
def pydantic_model():
    """What a FastAPI server would declare: one pydantic field per spec field, ranges and defaults included."""
    pydantic = pytest.importorskip("pydantic")
    fields = {}
    for f in REQUEST:
        limits = {"le": f.maximum}
        limits["gt" if f.exclusive_minimum else "ge"] = f.minimum
        if f.type == "number":
            limits["allow_inf_nan"] = False
        default = ... if f.required else f.default
        info = pydantic.Field(default, description=f.doc, **{k: v for k, v in limits.items() if v is not None})
        fields[f.name] = (f.annotation if f.required else f.annotation | None, info)
    config = pydantic.ConfigDict(strict=True, extra="forbid")
    return pydantic, pydantic.create_model("ChatCompletionRequest", __config__=config, **fields)


def test_a_pydantic_model_from_the_spec_agrees_with_parse_request() -> None:
    pydantic, model = pydantic_model()
    for f in NUMERIC:
        for value in outside(f):
            with pytest.raises(pydantic.ValidationError, match=f.name):
                model(**body(f.name, value))
        for value in bounds(f):
            model(**body(f.name, value))
    for f in SCALAR:
        with pytest.raises(pydantic.ValidationError, match=f.name):
            model(**body(f.name, WRONG_TYPE[f.type]))
    with pytest.raises(pydantic.ValidationError, match="frobnicate"):
        model(messages=MESSAGES, frobnicate=1)
    assert model(messages=MESSAGES).temperature == FIELDS["temperature"].default
    props = model.model_json_schema()["properties"]  # and pydantic's JSON Schema states the same ranges
    for f in NUMERIC:
        (prop,) = [p for p in props[f.name]["anyOf"] if p["type"] != "null"]
        assert {k: prop.get(k) for k in RANGE_KEYS} == {k: json_schema(f).get(k) for k in RANGE_KEYS}
