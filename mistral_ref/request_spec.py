"""The chat-completions and FIM requests, declared once: every field's JSON type, range, default, aliases and doc.

One table per endpoint — :data:`REQUEST` (POST /v1/chat/completions) and :data:`FIM_REQUEST` (POST
/v1/fim/completions) — drives the three places that need it:

- ``api.parse_request`` / ``api.parse_fim_request`` validate a request body with :func:`check` (type, range,
  allowed values, unknown names) and raise ``RequestError`` naming the field; before that,
  :func:`check_nesting_and_integers` refuses bodies nested too deep or holding integers too long to print;
- ``sampling.SamplingParams`` checks temperature, top_p, the penalties and seed with the same :func:`check`
  (raising ``GenerationParamError``), so the Python API and HTTP share one set of ranges;
- ``server.openapi_document`` publishes :func:`request_schema` as the ``ChatCompletionRequest`` schema of
  ``GET /openapi.json`` (and :func:`fim_request_schema` as ``FIMCompletionRequest``).

The table is plain data (no torch, no web framework).  A :class:`Field` maps onto a JSON Schema property
(:func:`json_schema`) and just as directly onto a pydantic field::

    (field.annotation | None, pydantic.Field(field.default, ge=..., gt=..., le=..., description=field.doc))

Scalar fields (number, integer, boolean, string and its allowed values) are validated here completely.
Structured fields (messages, stop, response_format, tools, tool_choice, stream_options) carry their JSON Schema in
``Field.schema``; their shape is checked by their parser in api.py, whose messages say what is expected.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from mistral_ref.tokenizer.settings import REASONING_EFFORTS

#: A temperature below this (the smallest normal float32, 2**-126 ~ 1.2e-38) is greedy, like 0.  The logits
#: are divided by the temperature in fp32: below it the divisor has no precision left (and rounds to 0 below
#: ~1.4e-45), while softmax(logits / t) is one-hot up to exact ties long before.
GREEDY_BELOW = 2.0**-126
MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 16  # n: completions per request


class FieldError(ValueError):
    """A value that its :class:`Field` refuses; ``field`` names it, ``problem`` says what is wrong."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{field}: {problem}")


@dataclass(frozen=True)
class Field:
    """One parameter of the chat-completions request.

    type: the JSON type: "number" (a finite int or float, stored as float), "integer", "boolean", "string", or,
    for a structured field, "array" / "object" / "any" with its JSON Schema in ``schema``.
    default: the value when the field is absent or null; None when there is none (or it is computed per
    request: max_tokens defaults to what the context leaves).
    minimum, maximum: the closed range of a number / integer; exclusive_minimum makes it (minimum, maximum].
    range_doc: how an error states the range, where "must be in [a, b]" says it badly (n, seed).
    alias_of: this field is another name of that one (``random_seed`` is ``seed``); both may be given if equal.
    azure: one of the Azure AI model inference API's standard parameters (the others are its "extra
    parameters", refused on the Azure route unless the ``extra-parameters`` header lets them through).
    required: a request must carry it (messages).
    schema: the JSON Schema of a structured field (its ``$ref``s point into :data:`COMPONENTS`).
    choices: the values a string field may take (JSON Schema ``enum``).
    """

    name: str
    type: str
    doc: str
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    range_doc: str | None = None
    alias_of: str | None = None
    azure: bool = False
    required: bool = False
    schema: Mapping[str, Any] | None = None
    choices: tuple[str, ...] | None = None

    @property
    def annotation(self) -> Any:
        """The Python type of a value (what a pydantic model would declare)."""
        if self.choices is not None:
            return Literal[self.choices]  # Literal["a", "b"]: a tuple subscript spreads
        return {"number": float, "integer": int, "boolean": bool, "string": str, "array": list,
                "object": dict}.get(self.type, Any)

    @property
    def interval(self) -> str:
        """The range in words: "in [0, 2]", "in (0, 1]", ">= 1" ("" when unbounded)."""
        lo, hi = self.minimum, self.maximum
        if lo is not None and hi is not None:
            return f"in {'(' if self.exclusive_minimum else '['}{_num(lo)}, {_num(hi)}]"
        if lo is not None:
            return f"{'>' if self.exclusive_minimum else '>='} {_num(lo)}"
        return f"<= {_num(hi)}" if hi is not None else ""

    def in_range(self, value: float) -> bool:
        lo, hi = self.minimum, self.maximum
        if lo is not None and (value < lo or (self.exclusive_minimum and value == lo)):
            return False
        return hi is None or value <= hi


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


_TEXT_CHUNK = {"type": "object", "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
_THINKING_CHUNK = {  # assistant messages (and v13 system messages); "thinking": mistral-common's or the API's
    "type": "object",
    "properties": {
        "type": {"const": "thinking"},
        "thinking": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_CHUNK}]},
        "closed": {"type": "boolean"},
    },
}
_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "user", "assistant", "tool", "developer"]},
        "content": {
            "anyOf": [
                {"type": "string"},
                {"type": "null"},
                {"type": "array", "items": {"anyOf": [_TEXT_CHUNK, _THINKING_CHUNK]}},
            ]
        },
        "tool_calls": {"type": "array", "items": {"$ref": "#/components/schemas/ToolCall"}},
        "tool_call_id": {"type": "string"},
        "name": {"type": "string"},
        "prefix": {"type": "boolean"},
        "reasoning_content": {"type": "string", "description": "an assistant's thinking (SGLang's field)"},
        "reasoning": {"type": "string", "description": "an assistant's thinking (vLLM's field)"},
    },
}
_TOOL_CALL = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"},
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}},
        },
    },
}
_TOOL = {
    "type": "object",
    "properties": {
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "description": {"type": "string"},
                "parameters": {"type": "object"},
                "strict": {"type": "boolean", "description": "constrain the arguments to parameters (grammar)"},
            },
        },
    },
}
#: The JSON Schemas that request fields refer to ("#/components/schemas/NAME" in the OpenAPI document).
COMPONENTS: dict[str, Any] = {"Message": _MESSAGE, "ToolCall": _TOOL_CALL}

_SEED = Field(
    "seed", "integer", "makes sampling reproducible on the same device (its own torch.Generator)",
    minimum=-(2**63), maximum=2**64 - 1, range_doc="must fit in 64 bits", azure=True)
_PENALTY = dict(type="number", default=0.0, minimum=-2, maximum=2, azure=True)

# ---- the table -----------------------------------------------------------------------------------------------
#: Every parameter a chat-completions request may carry: the Mistral API's, the names the OpenAI client sends,
#: and mistral-ref's extras (ignore_eos).  Validation reports the first bad field in this order.
REQUEST: tuple[Field, ...] = (
    Field("messages", "array", "the conversation: system / user / assistant / tool messages", required=True,
          azure=True,
          schema={"type": "array", "items": {"$ref": "#/components/schemas/Message"}, "minItems": 1}),
    Field("model", "string", "echoed in the response", azure=True),
    Field("temperature", "number",
          f"0 = greedy (argmax), and so is any temperature below 2**-126 ~ {GREEDY_BELOW:.2g}; otherwise "
          "sample from softmax(logits / temperature)", default=0.7, minimum=0, maximum=2, azure=True),
    Field("top_p", "number", "nucleus sampling: keep the smallest set of most likely tokens reaching this mass",
          default=1.0, minimum=0, maximum=1, exclusive_minimum=True, azure=True),
    Field("max_tokens", "integer", "default: what the context leaves after the prompt", minimum=1,
          azure=True),
    Field("stop", "any", "a stop string or a list of them, matched on the content text", azure=True,
          schema={"anyOf": [{"type": "string", "minLength": 1},
                            {"type": "array", "items": {"type": "string", "minLength": 1}}]}),
    Field("presence_penalty", doc="subtracted from the logit of every token generated so far", **_PENALTY),
    Field("frequency_penalty", doc="times its count, subtracted from the logit of every generated token",
          **_PENALTY),
    _SEED,
    replace(_SEED, name="random_seed", doc="the Mistral API's name for seed", alias_of="seed", azure=False),
    Field("response_format", "object", "{'type': 'json_object'} constrains the reply to a JSON object, "
          "{'type': 'json_schema', 'json_schema': {'name', 'schema', 'strict'}} to a document of the schema",
          default={"type": "text"}, azure=True,
          schema={"type": "object", "properties": {
              "type": {"enum": ["text", "json_object", "json_schema"]},
              "json_schema": {"type": "object", "properties": {
                  "name": {"type": "string"}, "description": {"type": "string"}, "schema": {"type": "object"},
                  "strict": {"type": "boolean"}}, "required": ["name"]}}}),
    Field("tools", "array", "functions the model may call", azure=True,
          schema={"type": "array", "items": _TOOL}),
    Field("tool_choice", "any", "'auto', 'none', 'any' (or 'required': a tool call is forced) or a named "
          "function", default="auto", azure=True,
          schema={"anyOf": [{"enum": ["auto", "none", "any", "required"]}, {"type": "object"}]}),
    Field("parallel_tool_calls", "boolean", "false: at most one tool call (enforced by the grammar)", default=True),
    Field("safe_prompt", "boolean", "prepend Mistral's safety system prompt (Azure model_extras: safe_mode)",
          default=False),
    Field("stream", "boolean", "reply with server-sent chat.completion.chunk events", default=False, azure=True),
    Field("stream_options", "object", "accepted for the OpenAI client; usage is always in the last chunk",
          schema={"type": "object", "properties": {"include_usage": {"type": "boolean"}},
                  "additionalProperties": False}),
    Field("n", "integer", "completions per request (choices 0..n-1; the prompt is counted once in usage)",
          default=1, minimum=1, maximum=MAX_CHOICES),
    Field("user", "string", "accepted for the OpenAI client; ignored"),
    Field("max_completion_tokens", "integer", "OpenAI's name for max_tokens", minimum=1, alias_of="max_tokens"),
    Field("metadata", "object", "accepted for the OpenAI client (string tags of the request); ignored",
          schema={"type": "object", "additionalProperties": {"type": "string"}}),
    Field("prediction", "object", "accepted for the OpenAI client (predicted output, a speed hint); ignored: "
          "the completion is the same without it",
          schema={"type": "object", "properties": {"type": {"const": "content"}, "content": {}}}),
    Field("reasoning_effort", "string", "how much the model thinks before answering; v15 tokenizers write it in "
          "the prompt's model settings (the model's tokenizer file lists the values it takes)",
          choices=REASONING_EFFORTS),
    Field("prompt_mode", "string", "'reasoning': begin with the model's reasoning system prompt (its "
          "SYSTEM_PROMPT.txt)", choices=("reasoning",)),
    Field("ignore_eos", "boolean", "extra: generate exactly max_tokens", default=False),
    Field("logprobs", "boolean", "extra: the log-probabilities of the content tokens", default=False),
    Field("top_logprobs", "integer", "extra: this many most likely alternatives per token (needs logprobs)",
          default=0, minimum=0, maximum=MAX_TOP_LOGPROBS),
)
FIELDS: dict[str, Field] = {f.name: f for f in REQUEST}

#: Every parameter of a fill-in-the-middle request (the Mistral API's POST /v1/fim/completions): the model
#: writes what goes between ``prompt`` and ``suffix``.  The sampling fields are the chat request's.
FIM_REQUEST: tuple[Field, ...] = (
    Field("prompt", "string", "the text before the gap (the code to complete)", required=True),
    Field("suffix", "string", "the text after the gap; without it the model continues the prompt"),
    FIELDS["model"],
    FIELDS["temperature"],
    FIELDS["top_p"],
    Field("max_tokens", "integer", "default: what the context leaves after the prompt", minimum=1),
    Field("min_tokens", "integer", "the end-of-sequence token is not generated before this many tokens",
          minimum=0),
    FIELDS["stop"],
    FIELDS["seed"],
    FIELDS["random_seed"],
    FIELDS["stream"],
)
FIM_FIELDS: dict[str, Field] = {f.name: f for f in FIM_REQUEST}
#: The fields that sampling.SamplingParams holds (seed also as random_seed in a request).
SAMPLING_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed")

#: The Azure route: names its clients send for our fields (``model_extras={"safe_mode": True}``), and standard
#: parameters it accepts and ignores (text is the only modality).
AZURE_ALIASES = {"safe_mode": "safe_prompt"}
AZURE_IGNORED = ("modalities",)
AZURE_FIELDS = tuple(f.name for f in REQUEST if f.azure) + AZURE_IGNORED


# ---- validation ----------------------------------------------------------------------------------------------
_TYPE_WORDS = {"number": "a finite number", "integer": "an integer", "boolean": "true or false",
               "string": "a string"}


def type_name(value: Any) -> str:
    """The JSON-ish name of a value's type, for error messages ("null" for None)."""
    return "null" if value is None else type(value).__name__


def _has_type(kind: str, value: Any) -> bool:
    if kind == "number":
        try:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        except OverflowError:  # an int beyond the float range (JSON allows 1000...0 of 400 digits)
            return False
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, {"boolean": bool, "string": str}[kind])


def check(name: str, value: Any, fields: Mapping[str, Field] | None = None) -> Any:
    """``value`` checked against the field `name` of `fields` (default: the chat request's): its type, range and
    allowed values (a number comes back as a float).

    Raises FieldError (a ValueError naming the field) for a wrong type, a value out of range or not among the
    choices.  A structured field (one with a ``schema``) is returned as is: its parser in api.py checks it.
    """
    f = (FIELDS if fields is None else fields)[name]
    if f.schema is not None:
        return value
    if not _has_type(f.type, value):
        raise FieldError(name, f"must be {_TYPE_WORDS[f.type]}, got {type_name(value)} {value!r}")
    if not f.in_range(value):
        raise FieldError(name, f"{f.range_doc or 'must be ' + f.interval}, got {value!r}")
    if f.choices is not None and value not in f.choices:
        raise FieldError(name, f"must be one of {', '.join(map(repr, f.choices))}, got {value!r}")
    return float(value) if f.type == "number" else value


#: Containers nested deeper than this in a request are refused: serialising tool schemas and arguments, and
#: printing values in error messages, recurse once per level, and Python allows about 1000 levels per thread.
MAX_NESTING = 100


def _step(key: Any) -> str:
    """One step of a path: ``.name`` for a key, ``[i]`` for an index (the type when a key cannot be shown)."""
    if isinstance(key, str):
        return f".{key}"
    if type(key) is int and key.bit_length() < 64:
        return f"[{key}]"
    return f"[{type(key).__name__}]"


def check_nesting_and_integers(body: Mapping[str, Any]) -> None:
    """Refuse what later steps could not even print: containers nested more than :data:`MAX_NESTING` levels
    (a RecursionError there), and integers with more digits than Python converts to text
    (``sys.get_int_max_str_digits()``, 4300 by default: a ValueError there).

    Walks the body with an explicit stack, so any depth is safe here.  Raises FieldError naming the top-level
    field; its message gives the path (``tools[0].function.parameters.properties.x...``).
    """
    fields = [(name if isinstance(name, str) else _step(name), value) for name, value in body.items()]
    stack = [(name, name, value, 1) for name, value in fields]
    while stack:
        name, path, value, depth = stack.pop()  # the field, where in it, what is there, how deep
        if isinstance(value, (Mapping, list, tuple)):
            if depth > MAX_NESTING:
                raise FieldError(name, f"{path}...: nested more than {MAX_NESTING} levels deep")
            items = value.items() if isinstance(value, Mapping) else enumerate(value)
            for key, item in items:
                where = path + _step(key) if depth < 8 else path  # deeper levels are not spelled out
                stack += [(name, where, key, depth + 1), (name, where, item, depth + 1)]
        elif isinstance(value, int) and value.bit_length() > 2000:  # the lowest limit Python allows: 640 digits
            try:
                str(value)
            except ValueError:
                raise FieldError(name, f"{path}: an integer of more than {sys.get_int_max_str_digits()} "
                                 "digits") from None


# ---- JSON Schema / OpenAPI -----------------------------------------------------------------------------------
def json_schema(f: Field) -> dict[str, Any]:
    """The JSON Schema (OpenAPI 3.1) property of one field: type, range, default and description."""
    out = dict(f.schema) if f.schema is not None else {"type": f.type}
    if f.choices is not None:
        out["enum"] = list(f.choices)
    if f.minimum is not None:
        out["exclusiveMinimum" if f.exclusive_minimum else "minimum"] = f.minimum
    if f.maximum is not None:
        out["maximum"] = f.maximum
    if f.default is not None:
        out["default"] = f.default
    out["description"] = f.doc
    return out


def request_schema(table: tuple[Field, ...] = REQUEST) -> dict[str, Any]:
    """The ``ChatCompletionRequest`` JSON Schema: every field of :data:`REQUEST` (or of `table`), nothing else."""
    return {
        "type": "object",
        "required": [f.name for f in table if f.required],
        "additionalProperties": False,
        "properties": {f.name: json_schema(f) for f in table},
    }


def fim_request_schema() -> dict[str, Any]:
    """The ``FIMCompletionRequest`` JSON Schema: every field of :data:`FIM_REQUEST`, nothing else."""
    return request_schema(FIM_REQUEST)
