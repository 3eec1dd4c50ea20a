"""Model settings (tokenizer v15): the ``[MODEL_SETTINGS]{json}[/MODEL_SETTINGS]`` block and what may go in it.

A v15 ``tekken.json`` declares which settings its model understands in a ``model_settings_builder`` object (the
name mistral-common gives it)::

    "model_settings_builder": {
        "reasoning_effort": {"type": "enum", "accepts_none": true, "default": "none", "values": ["none", "high"]},
        "json_schema": {"type": "json_schema", "accepts_none": false, "default": null}
    }

Either entry may be absent or null: the model then has no such setting. :meth:`ModelSettingsSpec.build` turns a
request's ``reasoning_effort`` and ``response_format`` into the settings the template writes, exactly as
mistral-common 1.13.1 does:

* ``reasoning_effort``: the request's value, or the file's default when the request sends none (so a model with
  this setting always gets it written); it must be one of the file's ``values``. A request value for a model
  *without* the setting is dropped, as mistral-common drops it.
* ``json_schema``: the schema of ``response_format`` — ``json_schema``'s own schema, ``{"anyOf": [{"type":
  "object"}, {"type": "array"}]}`` for ``json_object``, nothing for ``text``.

The block holds the built settings with their names sorted (``json_schema`` before ``reasoning_effort``); a schema
keeps its own key order. No settings at all: no block.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ChatTemplateError, TokenizerError

#: The reasoning efforts a request may name (mistral-common's ReasoningEffort), least to most.
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")

#: The schema model settings carry for ``response_format={"type": "json_object"}``.
JSON_OBJECT_SCHEMA = {"anyOf": [{"type": "object"}, {"type": "array"}]}

_SCHEMA_TYPES = ("array", "boolean", "integer", "null", "number", "object", "string")


def _err(where: str, what: str) -> ChatTemplateError:
    return ChatTemplateError(f"{where}: {what}")


def check_schema(where: str, schema: Any) -> None:
    """A light structural check of a JSON schema (mistral-common runs a full Draft 7 meta-validation)."""
    if not isinstance(schema, Mapping):
        raise _err(where, f"must be a JSON schema object (a dict), got {type(schema).__name__}")
    t = schema.get("type")
    if t is not None:
        for x in t if isinstance(t, list) else [t]:
            if x not in _SCHEMA_TYPES:
                raise _err(where, f"schema type {x!r} is not one of {_SCHEMA_TYPES}")
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, Mapping):
            raise _err(where, "schema 'properties' must be an object")
        for key, sub in props.items():
            check_schema(f"{where}.properties.{key}", sub)
    req = schema.get("required")
    if req is not None and not (isinstance(req, list) and all(isinstance(r, str) for r in req)):
        raise _err(where, "schema 'required' must be a list of property names")


def response_schema(response_format: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema a ``response_format`` asks for (``None`` for text), after checking its shape.

    ``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {"name": str,
    "schema": {...}, "strict": bool, "description": str}}`` (the Mistral / OpenAI form).
    """
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise _err("response_format", f"must be a dict like {{'type': 'text'}}, got {type(response_format).__name__}")
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return dict(JSON_OBJECT_SCHEMA)
    if kind != "json_schema":
        raise _err("response_format", f"type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise _err("response_format", "type 'json_schema' needs 'json_schema': {'name': ..., 'schema': {...}}")
    if not isinstance(spec.get("name"), str):
        raise _err("response_format", "json_schema needs a string 'name'")
    for key, kinds, what in (("description", (str,), "a string"), ("strict", (bool,), "true or false")):
        if spec.get(key) is not None and not isinstance(spec[key], kinds):
            raise _err("response_format", f"json_schema.{key} must be {what}")
    schema = spec.get("schema")
    check_schema("response_format.json_schema.schema", schema)
    return dict(schema)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ModelSettingsSpec:
    """The settings a v15 model understands (its tekken.json's ``model_settings_builder``).

    reasoning_efforts: the accepted values of ``reasoning_effort`` (``None``: the model has no such setting).
    default_reasoning_effort: written when a request sends no reasoning_effort.
    json_schema: the model gets ``response_format``'s schema as a setting.
    """

    reasoning_efforts: tuple[str, ...] | None = None
    default_reasoning_effort: str | None = None
    json_schema: bool = False

    @classmethod
    def from_json(cls, data: Any, where: str) -> ModelSettingsSpec:
        """Read a ``model_settings_builder`` object; :class:`TokenizerError` naming ``where`` if malformed."""
        if not isinstance(data, Mapping):
            raise TokenizerError(f"{where}: model_settings_builder must be an object, got {type(data).__name__}")
        unknown = set(data) - {"reasoning_effort", "json_schema"}
        if unknown:
            raise TokenizerError(f"{where}: model_settings_builder has unknown settings {sorted(unknown)}")
        efforts = default = None
        effort = data.get("reasoning_effort")
        if effort is not None:
            w = f"{where}: model_settings_builder.reasoning_effort"
            if not isinstance(effort, Mapping) or set(effort) - {"type", "accepts_none", "default", "values"}:
                raise TokenizerError(f"{w} must be {{'type': 'enum', 'accepts_none': true, 'default', 'values'}}")
            values = effort.get("values")
            if effort.get("type", "enum") != "enum" or effort.get("accepts_none", True) is not True:
                raise TokenizerError(f"{w}: type must be 'enum' and accepts_none true")
            if not isinstance(values, list) or any(v not in REASONING_EFFORTS for v in values):
                raise TokenizerError(f"{w}.values must be a list of {REASONING_EFFORTS}, got {values!r}")
            if len(set(values)) != len(values):
                raise TokenizerError(f"{w}.values has duplicates: {values}")
            default = effort.get("default")
            if default not in values:
                raise TokenizerError(f"{w}.default must be one of its values {values}, got {default!r}")
            efforts = tuple(values)
        schema = data.get("json_schema")
        if schema is not None:
            expected = {"type": "json_schema", "accepts_none": False, "default": None}
            if not isinstance(schema, Mapping) or {**expected, **schema} != expected:
                raise TokenizerError(
                    f"{where}: model_settings_builder.json_schema must be {expected} (or null), got {schema!r}"
                )
        return cls(efforts, default, schema is not None)

    def build(self, reasoning_effort: str | None, response_format: Mapping[str, Any] | None) -> dict[str, Any]:
        """The settings of one request, names sorted (empty: write no block). :class:`ChatTemplateError` if a
        value is not accepted by this model."""
        out: dict[str, Any] = {}
        schema = response_schema(response_format)
        if self.json_schema and schema is not None:
            out["json_schema"] = schema
        if self.reasoning_efforts is not None:
            value = self.default_reasoning_effort if reasoning_effort is None else reasoning_effort
            if value not in self.reasoning_efforts:
                raise _err("reasoning_effort", f"this model accepts {list(self.reasoning_efforts)}, got {value!r}")
            out["reasoning_effort"] = value
        return out
