"""Parsing generated assistant tokens back into text and tool calls.

The syntax is the ``tool_call`` field of the version's row in :data:`.templates.TEMPLATES`:

* ``"json"`` (v2), ``"json_id"`` (v3, v7): ``[TOOL_CALLS]`` followed by a JSON list
  ``[{"name": ..., "arguments": {...}, "id": ...}]`` (no ``id`` in v2); v7 may put text before it.
* ``"name_id_args"`` (v11): ``[TOOL_CALLS]name[CALL_ID]id[ARGS]{json}`` once per call (``[CALL_ID]id`` optional).
* ``"name_args"`` (v13): ``[TOOL_CALLS]name[ARGS]{json}`` once per call.

Ids that are missing or not 9 alphanumerics are replaced by fresh random ones. Anything that does not
parse turns the whole output into plain ``content``: model output never raises.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Sequence
from typing import Any

from .templates import NAME_PATTERN, TOOL_CALL_ID_PATTERN, Vocabulary, template_for

_ALPHANUM = string.ascii_letters + string.digits
_SYSTEM_RNG = random.SystemRandom()


class _Malformed(Exception):
    pass


def new_tool_call_id(rng: random.Random | None = None) -> str:
    """A random id of 9 characters from a-z, A-Z, 0-9 (what the v3+ templates accept)."""
    r = rng or _SYSTEM_RNG
    return "".join(r.choice(_ALPHANUM) for _ in range(9))


def _arguments_json(value: Any) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise _Malformed from None
    if not isinstance(value, (dict, list)):
        raise _Malformed
    return json.dumps(value, ensure_ascii=False)


def _call(name: Any, arguments: str, call_id: Any, rng: random.Random | None) -> dict[str, Any]:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise _Malformed
    if not (isinstance(call_id, str) and TOOL_CALL_ID_PATTERN.match(call_id)):
        call_id = new_tool_call_id(rng)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _parse_json_calls(text: str, rng: random.Random | None) -> list[dict[str, Any]]:
    text = text.strip()
    try:
        value, end = json.JSONDecoder().raw_decode(text)
    except (ValueError, RecursionError):
        raise _Malformed from None
    if text[end:].strip():
        raise _Malformed
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _Malformed
    calls = []
    for item in items:
        if not isinstance(item, dict):
            raise _Malformed
        args = item.get("arguments", {})
        calls.append(_call(item.get("name"), _arguments_json(args), item.get("id"), rng))
    return calls


def _parse_token_call(
    tok: Vocabulary, seg: list[int], with_id: bool, rng: random.Random | None
) -> dict[str, Any]:
    args_id = tok.special_id("[ARGS]")
    if args_id not in seg:
        raise _Malformed
    k = seg.index(args_id)
    head, body = seg[:k], seg[k + 1 :]
    call_id: str | None = None
    if with_id and tok.has_special("[CALL_ID]") and tok.special_id("[CALL_ID]") in head:
        j = head.index(tok.special_id("[CALL_ID]"))
        call_id = tok.decode(head[j + 1 :]).strip()
        head = head[:j]
    name = tok.decode(head).strip()
    text = tok.decode(body).strip()
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise _Malformed from None
    return _call(name, _arguments_json(value), call_id, rng)


def parse_assistant(tok: Vocabulary, ids: Sequence[int], rng: random.Random | None = None) -> dict[str, Any]:
    """Split generated ids into ``{"content": str | None, "tool_calls": [...]}``.

    Generation is cut at the first EOS. ``content`` is the text before the first ``[TOOL_CALLS]``
    (``None`` if that is blank and there are tool calls). Each tool call is
    ``{"id", "type": "function", "function": {"name", "arguments": JSON string}}``.
    """
    ids = list(ids)
    eos = tok.eos_id
    if eos in ids:
        ids = ids[: ids.index(eos)]
    syntax = template_for(tok.version).tool_call
    if syntax is None or not tok.has_special("[TOOL_CALLS]"):
        return {"content": tok.decode(ids), "tool_calls": []}
    marker = tok.special_id("[TOOL_CALLS]")
    if marker not in ids:
        return {"content": tok.decode(ids), "tool_calls": []}
    first = ids.index(marker)
    segments: list[list[int]] = []
    for t in ids[first:]:
        if t == marker:
            segments.append([])
        else:
            segments[-1].append(t)
    try:
        if syntax in ("json", "json_id"):
            calls = [c for seg in segments for c in _parse_json_calls(tok.decode(seg), rng)]
        else:
            calls = [_parse_token_call(tok, seg, syntax == "name_id_args", rng) for seg in segments]
    except _Malformed:
        return {"content": tok.decode(ids), "tool_calls": []}
    text = tok.decode(ids[:first])
    return {"content": text if text.strip() else None, "tool_calls": calls}
