"""Parsing generated assistant tokens back into text, thinking and tool calls.

Thinking (vocabularies with ``[THINK]`` and ``[/THINK]``): each ``[THINK]…[/THINK]`` span before the tool calls
becomes a thinking chunk (not closed when generation stopped inside it); the reply's content is then a list of
Mistral-API chunks, ``{"type": "thinking", "thinking": [{"type": "text", "text": …}], "closed": bool}`` and
``{"type": "text", "text": …}``, in the order generated. Without thinking the content stays a plain string.

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
        except (ValueError, RecursionError):  # generated text: malformed or nested past the recursion limit
            raise _Malformed from None
    if not isinstance(value, (dict, list)):
        raise _Malformed
    try:
        return json.dumps(value, ensure_ascii=False)
    except (ValueError, RecursionError):
        raise _Malformed from None


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


def thinking_chunk(text: str, closed: bool) -> dict[str, Any]:
    """A thinking chunk in the Mistral API's form (its ``thinking`` is a list of text chunks)."""
    return {"type": "thinking", "thinking": [{"type": "text", "text": text}], "closed": closed}


def _think_ids(tok: Vocabulary) -> tuple[int, int] | tuple[None, None]:
    """Ids of ``[THINK]`` and ``[/THINK]``, or ``(None, None)`` when the vocabulary lacks them."""
    if tok.has_special("[THINK]") and tok.has_special("[/THINK]"):
        return tok.special_id("[THINK]"), tok.special_id("[/THINK]")
    return None, None


def _split_thinking(tok: Vocabulary, ids: list[int]) -> list[tuple[str, list[int], bool]]:
    """``ids`` as ("text" | "thinking", ids, closed) pieces, in order."""
    open_id, close_id = _think_ids(tok)
    pieces: list[tuple[str, list[int], bool]] = []
    for t in ids:
        thinking = bool(pieces) and pieces[-1][0] == "thinking" and not pieces[-1][2]
        if t == open_id and not thinking:
            pieces.append(("thinking", [], False))
        elif thinking and t == close_id:
            pieces[-1] = ("thinking", pieces[-1][1], True)
        elif thinking or (pieces and pieces[-1][0] == "text"):
            pieces[-1][1].append(t)
        else:
            pieces.append(("text", [t], False))
    return pieces


def _calls_start(tok: Vocabulary, ids: list[int], marker: int) -> int | None:
    """Index of the first ``[TOOL_CALLS]`` that is not inside thinking (``None`` if there is none)."""
    open_id, close_id = _think_ids(tok)
    inside = False
    for i, t in enumerate(ids):
        if t == open_id and not inside:
            inside = True
        elif t == close_id and inside:
            inside = False
        elif t == marker and not inside:
            return i
    return None


def _content(tok: Vocabulary, pieces: list[tuple[str, list[int], bool]], calls: bool) -> str | list | None:
    """The reply's content: plain text (``None`` if blank and there are calls), or chunks when it thought."""
    if not any(kind == "thinking" for kind, _, _ in pieces):
        text = tok.decode([t for _, ids, _ in pieces for t in ids])
        return None if calls and not text.strip() else text
    chunks: list[dict[str, Any]] = []
    for kind, ids, closed in pieces:
        text = tok.decode(ids)
        if kind == "thinking":
            chunks.append(thinking_chunk(text, closed))
        elif text and not (calls and not text.strip()):
            chunks.append({"type": "text", "text": text})
    return chunks


def parse_assistant(tok: Vocabulary, ids: Sequence[int], rng: random.Random | None = None) -> dict[str, Any]:
    """Split generated ids into ``{"content": str | list | None, "tool_calls": [...]}``.

    Generation is cut at the first EOS. ``content`` is what comes before the first ``[TOOL_CALLS]`` (outside
    thinking): its text (``None`` if that is blank and there are tool calls), or a list of chunks when it holds
    thinking (module docstring). Each tool call is ``{"id", "type": "function", "function": {"name",
    "arguments": JSON string}}``.
    """
    ids = list(ids)
    eos = tok.eos_id
    if eos in ids:
        ids = ids[: ids.index(eos)]
    syntax = template_for(tok.version).tool_call
    plain = {"content": _content(tok, _split_thinking(tok, ids), False), "tool_calls": []}
    if syntax is None or not tok.has_special("[TOOL_CALLS]"):
        return plain
    marker = tok.special_id("[TOOL_CALLS]")
    first = _calls_start(tok, ids, marker)
    if first is None:
        return plain
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
        return plain
    return {"content": _content(tok, _split_thinking(tok, ids[:first]), True), "tool_calls": calls}
