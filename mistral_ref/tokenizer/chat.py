"""Chat requests: parse the dicts, validate, normalise, then encode with the version's template.

A request goes through four steps, each mirroring mistral-common (its "test" validation mode):

1. **parse** the OpenAI / Mistral-API dicts into :class:`Message` records (text and thinking chunks);
2. **validate** roles, their order, tool-call ids and names, where thinking may appear, and the request's model
   settings (:class:`ChatTemplateError` says what to change);
3. **normalise**: merge same-role runs with a blank line, gather the system prompt (rows with
   ``system_prompt="first"/"last"``), normalise JSON, order tool results, build the model settings;
4. **encode** with :func:`.templates.render`.

Thinking chunks come in two spellings, both accepted: mistral-common's ``{"type": "thinking", "thinking": "…",
"closed": true}`` and the Mistral API's, whose ``thinking`` is a list of text chunks (their texts are joined).
An assistant message may also carry ``reasoning`` (vLLM's field) or ``reasoning_content`` (SGLang's): it becomes a
closed thinking chunk in front of the content, as mistral-common converts it.

Everything that differs between versions is a field of the version's row in :data:`.templates.TEMPLATES`;
this module and the encoder read the row, never the version number.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ChatTemplateError
from .settings import REASONING_EFFORTS, check_schema, response_schema
from .templates import (
    BLANK_LINE,
    NAME_PATTERN,
    NULL_ID,
    TOOL_CALL_ID_PATTERN,
    ChatTemplate,
    Content,
    Think,
    ToolCall,
    Turn,
    Vocabulary,
    render,
    template_for,
)

#: The system prompt the Mistral API prepends when ``safe_prompt=True``.
SAFE_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. Avoid harmful, "
    "unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity."
)

ROLES = ("system", "user", "assistant", "tool")

# Which role may follow which (mistral-common's message-order rule).
_ALLOWED_NEXT = {
    "system": ("user", "assistant", "system"),
    "user": ("assistant", "system", "user"),
    "assistant": ("assistant", "user", "tool"),
    "tool": ("assistant", "tool", "user"),
}


# ---------------------------------------------------------------------------------------------------
# 1. parsing
# ---------------------------------------------------------------------------------------------------
Raw = str | list[str | Think] | None
"""A message's content as sent: a string, chunks (text chunks as strings, empty ones included), or None."""


@dataclass
class Message:
    """One parsed chat message.

    ``content`` is the content as sent (:data:`Raw`); ``truthy`` is whether it was non-empty (a chunk list counts
    even if its texts are empty), which is what the "content or tool_calls" rules look at.
    """

    role: str
    content: Raw
    truthy: bool
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    prefix: bool = False

    @property
    def has_thinking(self) -> bool:
        """The content holds a thinking chunk."""
        return isinstance(self.content, list) and any(isinstance(c, Think) for c in self.content)


def join_content(contents: Sequence[Raw], join_chunks: str = BLANK_LINE) -> Content:
    """Merge the contents of same-role messages (mistral-common's rule, kept exactly).

    Adjacent text is concatenated: across messages with a blank line, between the chunks of one message with
    ``join_chunks``; empty texts are skipped; a thinking chunk ends the current text piece (text after it starts
    anew, with no separator). Only text: a string; else the list of pieces.
    """
    pieces: list[str | Think] = []
    text: list[str] = []  # the text piece being built
    for content in contents:
        new_message = bool(text)
        if not content:
            continue
        if isinstance(content, str):
            text.append((BLANK_LINE if new_message else "") + content)
            continue
        for chunk in content:
            if isinstance(chunk, Think):
                if text:
                    pieces.append("".join(text))
                    text.clear()
                pieces.append(chunk)
            elif chunk:
                sep = "" if not text else BLANK_LINE if new_message else join_chunks
                text.append(sep + chunk)
                new_message = False
    if not pieces:
        return "".join(text)
    if text:
        pieces.append("".join(text))
    return pieces


def _err(where: str, what: str) -> ChatTemplateError:
    return ChatTemplateError(f"{where}: {what}")


def _thinking_text(where: str, value: Any) -> str:
    """The text of a thinking chunk: a string, or (Mistral API) a list of text chunks, joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for k, chunk in enumerate(value):
            if not (isinstance(chunk, Mapping) and chunk.get("type", "text") == "text"
                    and isinstance(chunk.get("text"), str)):
                raise _err(where, f"thinking[{k}] must be a text chunk {{'type': 'text', 'text': '...'}}")
            texts.append(chunk["text"])
        return "".join(texts)
    raise _err(where, f"'thinking' must be a string or a list of text chunks, got {type(value).__name__}")


def _content(where: str, content: Any, role: str) -> tuple[Raw, bool]:
    if content is None:
        return None, False
    if isinstance(content, str):
        return content, bool(content)
    if isinstance(content, list):
        chunks: list[str | Think] = []
        for j, chunk in enumerate(content):
            if not isinstance(chunk, Mapping):
                raise _err(where, f"content[{j}] must be a dict like {{'type': 'text', 'text': '...'}}")
            kind = chunk.get("type")
            if kind == "thinking":
                if role not in ("assistant", "system"):
                    raise _err(where, f"content[{j}] is a thinking chunk; only assistant (and, with some "
                               "tokenizers, system) messages can hold thinking")
                closed = chunk.get("closed", True)
                if not isinstance(closed, bool):
                    raise _err(where, f"content[{j}]['closed'] must be true or false, got {closed!r}")
                chunks.append(Think(_thinking_text(f"{where} content[{j}]", chunk.get("thinking")), closed))
                continue
            if kind != "text":
                raise _err(
                    where,
                    f"content[{j}] has type {kind!r}; only text chunks ({{'type': 'text', 'text': '...'}}) "
                    "and thinking chunks are supported by this tokenizer",
                )
            text = chunk.get("text")
            if not isinstance(text, str):
                raise _err(where, f"content[{j}]['text'] must be a string, got {type(text).__name__}")
            chunks.append(text)
        return chunks, bool(content)
    raise _err(where, f"content must be a string or a list of chunks, got {type(content).__name__}")


def _reasoning_field(where: str, raw: Mapping[str, Any]) -> str | None:
    """``reasoning_content`` / ``reasoning`` of an assistant message (equal if both are sent)."""
    values = {k: raw[k] for k in ("reasoning_content", "reasoning") if raw.get(k) is not None}
    for key, value in values.items():
        if not isinstance(value, str):
            raise _err(where, f"{key} must be a string, got {type(value).__name__}")
    if len(set(values.values())) > 1:
        raise _err(where, "reasoning_content and reasoning differ; send one of them")
    return next(iter(values.values()), None)


def _parse_tool_call(where: str, call: Any) -> ToolCall:
    if not isinstance(call, Mapping):
        raise _err(
            where, "each tool call must be a dict {'id', 'type': 'function', 'function': {name, arguments}}"
        )
    kind = call.get("type", "function")
    if kind != "function":
        raise _err(where, f"tool call type {kind!r} is not supported; use 'function'")
    fn = call.get("function")
    if not isinstance(fn, Mapping):
        raise _err(where, "a tool call needs 'function': {'name': ..., 'arguments': ...}")
    name = fn.get("name")
    if not isinstance(name, str):
        raise _err(where, "a tool call's function needs a string 'name'")
    args = fn.get("arguments")
    if args is None:
        args = "{}"
    elif isinstance(args, Mapping):
        try:
            args = json.dumps(dict(args))
        except (TypeError, ValueError, RecursionError) as e:
            raise _err(where, f"tool call arguments of {name!r} are not JSON-serialisable ({e})") from None
    elif not isinstance(args, str):
        raise _err(where, f"tool call arguments must be a dict or a JSON string, got {type(args).__name__}")
    call_id = call.get("id")
    if call_id is None:
        call_id = NULL_ID
    if not isinstance(call_id, str):
        raise _err(where, f"tool call id must be a string, got {type(call_id).__name__}")
    return ToolCall(id=call_id, name=name, arguments=args)


def parse_message(index: int, raw: Any) -> Message:
    """Parse one request message dict (``"developer"`` is accepted as ``"system"``)."""
    where = f"messages[{index}]"
    if not isinstance(raw, Mapping):
        raise _err(
            where, f"must be a dict like {{'role': 'user', 'content': '...'}}, got {type(raw).__name__}"
        )
    role = raw.get("role")
    if role == "developer":
        role = "system"
    if role not in ROLES:
        raise _err(where, f"role {role!r} is unknown; use 'system', 'user', 'assistant' or 'tool'")
    where = f"messages[{index}] ({role})"
    raw_content = raw.get("content")
    if role != "assistant" and raw_content is None:
        raise _err(where, "needs 'content' (a string)")
    content, truthy = _content(where, raw_content, role)
    msg = Message(role=role, content=content, truthy=truthy)
    if role == "assistant":
        reasoning = _reasoning_field(where, raw)
        if reasoning is not None:
            if msg.has_thinking:
                raise _err(where, "has thinking chunks in content and a reasoning_content / reasoning field; "
                           "send the thinking once")
            rest = [] if content is None else [content] if isinstance(content, str) else content
            msg.content, msg.truthy = [Think(reasoning), *rest], True
        calls = raw.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise _err(where, f"tool_calls must be a list, got {type(calls).__name__}")
            msg.tool_calls = [_parse_tool_call(where, c) for c in calls]
        prefix = raw.get("prefix", False)
        if not isinstance(prefix, bool):
            raise _err(where, f"prefix must be true or false, got {prefix!r}")
        msg.prefix = prefix
    elif raw.get("tool_calls"):
        raise _err(where, "only assistant messages can carry tool_calls")
    if role == "tool":
        for key in ("tool_call_id", "name"):
            value = raw.get(key)
            if value is not None and not isinstance(value, str):
                raise _err(where, f"{key} must be a string, got {type(value).__name__}")
        msg.tool_call_id = raw.get("tool_call_id")
        msg.name = raw.get("name")
    return msg


def parse_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Validate chat-completions tools; return them in the form the templates print.

    Each becomes ``{"type": "function", "function": {"name", "description", "parameters"}}`` (missing
    description -> ``""``, missing parameters -> ``{}``, other keys such as ``strict`` dropped).
    """
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise ChatTemplateError(
            f"tools must be a list of {{'type': 'function', 'function': {{...}}}}, got {tools!r}"
        )
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise _err(
                where, "must be a dict {'type': 'function', 'function': {name, description, parameters}}"
            )
        if tool.get("type", "function") != "function":
            raise _err(where, f"type {tool.get('type')!r} is not supported; use 'function'")
        fn = tool.get("function")
        if not isinstance(fn, Mapping):
            raise _err(where, "needs 'function': {'name': ..., 'description': ..., 'parameters': {...}}")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise _err(
                where,
                f"function name {name!r} is invalid: use 1-64 characters from a-z, A-Z, 0-9, '_' and '-'",
            )
        description = fn.get("description")
        if description is None:
            description = ""
        if not isinstance(description, str):
            raise _err(where, "function description must be a string")
        params = fn.get("parameters")
        if params is None:
            params = {}
        check_schema(f"{where}.function.parameters", params)
        out.append(
            {"type": "function", "function": {"name": name, "description": description, "parameters": params}}
        )
    return out


# ---------------------------------------------------------------------------------------------------
# 2. validation
# ---------------------------------------------------------------------------------------------------
def _check_call_id(where: str, call_id: str | None, t: ChatTemplate, what: str) -> None:
    if t.call_ids is None:
        return
    if t.call_ids == "non_empty":
        if not call_id or call_id == NULL_ID:
            raise _err(
                where, f"{what} needs an id (any non-empty string other than 'null') for tokenizer {t.version}"
            )
        return
    if call_id is None or call_id == NULL_ID:
        raise _err(where, f"{what} needs an id of 9 characters from a-z, A-Z, 0-9 (e.g. 'aB3dE5fG7')")
    if not TOOL_CALL_ID_PATTERN.match(call_id):
        raise _err(where, f"{what} id {call_id!r} is invalid: use exactly 9 characters from a-z, A-Z, 0-9")


def validate(messages: list[Message], t: ChatTemplate) -> None:
    """Raise :class:`ChatTemplateError` where mistral-common's validator (test mode) would refuse."""
    if not messages:
        raise ChatTemplateError("messages is empty: send at least one user message")
    if len(messages) == 1 and messages[0].role not in ("user", "system"):
        raise ChatTemplateError(
            f"messages[0] ({messages[0].role}): a conversation must start with a user or system message"
        )
    last = messages[-1]
    if len(messages) > 1 and last.role == "assistant" and not last.prefix:
        raise ChatTemplateError(
            f"messages[{len(messages) - 1}] (assistant): the last message must be a user or tool message; "
            "to continue the assistant's text pass continue_final_message=True"
        )
    for i in range(1, len(messages)):
        prev, cur = messages[i - 1].role, messages[i].role
        if cur not in _ALLOWED_NEXT[prev]:
            raise ChatTemplateError(
                f"messages[{i}] ({cur}): a {cur} message cannot follow a {prev} message "
                f"(after {prev} come: {', '.join(_ALLOWED_NEXT[prev])})"
            )
    if t.results_by_id:
        _validate_results_by_id(messages)
    else:
        _validate_result_counts(messages)
    for i, m in enumerate(messages):
        where = f"messages[{i}] ({m.role})"
        if m.has_thinking and m.role not in t.thinking:
            if t.thinking:
                raise _err(where, f"holds a thinking chunk; tokenizer {t.version} takes thinking only in "
                           f"{' and '.join(t.thinking)} messages")
            raise _err(where, f"holds a thinking chunk; thinking needs a tokenizer of version v13 or newer "
                       f"(this one is {t.version})")
        if m.role == "assistant":
            has_calls = bool(m.tool_calls)
            if not t.text_and_calls and m.truthy == has_calls:
                what = "both content and tool_calls" if has_calls else "neither content nor tool_calls"
                raise _err(
                    where,
                    f"has {what}; with tokenizer {t.version} an assistant message carries exactly one of them",
                )
            for call in m.tool_calls or []:
                _check_call_id(where, call.id, t, f"tool call {call.name!r}")
                if not NAME_PATTERN.match(call.name):
                    raise _err(
                        where,
                        f"function name {call.name!r} is invalid: "
                        "use 1-64 characters from a-z, A-Z, 0-9, '_', '-'",
                    )
            if m.prefix and i != len(messages) - 1:
                raise _err(where, "only the last message can be an assistant prefix (prefix=True)")
        elif m.role == "tool":
            if m.name is not None and not NAME_PATTERN.match(m.name):
                raise _err(
                    where, f"name {m.name!r} is invalid: use 1-64 characters from a-z, A-Z, 0-9, '_', '-'"
                )
            _check_call_id(where, m.tool_call_id, t, "the tool result (tool_call_id)")


# Like mistral-common, the two pairing checks below skip the first message and let a conversation end with calls
# still unanswered.
def _validate_result_counts(messages: list[Message]) -> None:
    """Each assistant message's tool calls get as many tool messages as calls before the next assistant one."""
    expected = 0
    for i in range(1, len(messages)):
        m = messages[i]
        if m.role == "tool":
            expected -= 1
        elif m.role == "assistant":
            if expected != 0:
                raise ChatTemplateError(
                    f"messages[{i}] (assistant): the previous assistant tool calls got "
                    f"{'more' if expected < 0 else 'fewer'} tool results than calls; answer each call "
                    "with exactly one tool message"
                )
            if m.tool_calls is not None:
                expected = len(m.tool_calls)


def _validate_results_by_id(messages: list[Message]) -> None:
    """Each tool call is answered once, by a tool message with its id, before the next assistant message."""
    want: set[str | None] = set()
    seen: set[str | None] = set()
    for i in range(1, len(messages)):
        m = messages[i]
        where = f"messages[{i}] ({m.role})"
        if m.role == "tool":
            if m.tool_call_id in seen:
                raise _err(where, f"tool_call_id {m.tool_call_id!r} is answered twice")
            if m.tool_call_id not in want:
                raise _err(
                    where,
                    f"tool_call_id {m.tool_call_id!r} matches no call of the preceding assistant message",
                )
            seen.add(m.tool_call_id)
        elif m.role == "assistant":
            if len(want) != len(seen):
                raise _err(where, "the previous assistant tool calls were not all answered by tool messages")
            want.clear()
            seen.clear()
            for call in m.tool_calls or []:
                if call.id in want:
                    raise _err(where, f"tool call id {call.id!r} is used twice in this message")
                want.add(call.id)


# ---------------------------------------------------------------------------------------------------
# 3. normalisation
# ---------------------------------------------------------------------------------------------------
def normalize_json(content: str | None) -> str:
    """Re-serialise JSON text compactly as ``json.dumps(..., ensure_ascii=False)``; empty -> ``"{}"``.

    Text that is not JSON is returned unchanged.
    """
    if not content:
        return "{}"
    try:
        return json.dumps(json.loads(content), ensure_ascii=False)
    except (ValueError, RecursionError):
        return content


def _text(content: Content) -> str:
    """Content that can only be text here (thinking was refused by validate unless the row allows it)."""
    assert isinstance(content, str), content
    return content


def normalize(messages: list[Message], t: ChatTemplate) -> tuple[str | None, list[Turn]]:
    """Merge same-role runs into turns; for ``system_prompt="first"/"last"`` rows pull the system text out.

    Returns ``(system_prompt, turns)``; ``system_prompt`` is ``None`` for ``"block"`` rows (their system
    messages stay turns) and when there is no system text.
    """
    in_place = t.system_prompt == "block"
    system_prompt: str | None = None
    if not in_place:
        parts = [_text(join_content([m.content], t.join_chunks)) for m in messages if m.role == "system" and m.truthy]
        system_prompt = BLANK_LINE.join(parts) if parts else None

    turns: list[Turn] = []
    latest_call_ids: list[str] = []

    def flush(group: list[Message]) -> None:
        if not group:
            return
        role = group[0].role
        if role == "system":
            if in_place:
                turns.extend(Turn("system", join_content([m.content], t.join_chunks)) for m in group)
            return
        if role == "user":
            turns.append(Turn("user", join_content([m.content for m in group], t.join_chunks)))
            return
        if role == "assistant":
            calls = [
                ToolCall(c.id, c.name, normalize_json(c.arguments))
                for m in group
                for c in (m.tool_calls or [])
            ]
            turns.append(
                Turn(
                    "assistant",
                    join_content([m.content for m in group], t.join_chunks),
                    tool_calls=calls or None,
                    prefix=any(m.prefix for m in group),
                )
            )
            latest_call_ids.extend(c.id for c in calls)
            return
        texts = [_text(join_content([m.content], t.join_chunks)) for m in group]
        results = [
            Turn(
                "tool",
                normalize_json(text) if t.json_results else text,
                tool_call_id=m.tool_call_id,
                name=m.name,
            )
            for m, text in zip(group, texts)
        ]
        if t.results_by_id:  # results are put in the order of the calls they answer
            call_pos = {cid: k for k, cid in enumerate(latest_call_ids)}
            result_pos = {r.tool_call_id: k for k, r in enumerate(results)}
            results.sort(
                key=lambda r: (
                    call_pos.get(r.tool_call_id or NULL_ID, float("inf")),
                    result_pos[r.tool_call_id],
                )
            )
        turns.extend(results)
        latest_call_ids.clear()

    group: list[Message] = []
    for m in messages:
        if group and group[0].role != m.role:
            flush(group)
            group = []
        group.append(m)
    flush(group)
    # a system prompt that is not a block of its own needs a user message to go in front of
    if not turns or (not in_place and turns[0].role != "user"):
        turns.insert(0, Turn("user", ""))
    return system_prompt, turns


# ---------------------------------------------------------------------------------------------------
# 4. encoding
# ---------------------------------------------------------------------------------------------------
def model_settings(
    tok: Vocabulary, t: ChatTemplate, reasoning_effort: str | None, response_format: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """The model settings of a request (``None``: the row writes none); :class:`ChatTemplateError` naming
    ``reasoning_effort`` / ``response_format`` where mistral-common refuses them."""
    if reasoning_effort is not None and reasoning_effort not in REASONING_EFFORTS:
        raise _err("reasoning_effort", f"must be one of {REASONING_EFFORTS}, got {reasoning_effort!r}")
    response_schema(response_format)  # its shape is checked for every version
    if not t.model_settings:
        if reasoning_effort is not None:
            raise _err("reasoning_effort", f"tokenizer {t.version} has no model settings; reasoning_effort needs "
                       "a v15 tokenizer (send none, or load the model's own tokenizer file)")
        return None
    if tok.model_settings is None:
        raise ChatTemplateError(f"this {t.version} tokenizer file declares no model settings (tekken.json's "
                                "model_settings_builder), which the v15 template needs; load the model's own file")
    return tok.model_settings.build(reasoning_effort, response_format)


def encode_chat(
    tok: Vocabulary,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    safe_prompt: bool = False,
    continue_final_message: bool = False,
    reasoning_effort: str | None = None,
    response_format: Mapping[str, Any] | None = None,
) -> list[int]:
    """Encode a chat request with the template of ``tok.version``; see :meth:`Tokenizer.encode_chat`."""
    template = template_for(tok.version)
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ChatTemplateError("messages must be a list of dicts like {'role': 'user', 'content': '...'}")
    parsed = [parse_message(i, m) for i, m in enumerate(messages)]
    if safe_prompt:
        parsed.insert(0, Message(role="system", content=SAFE_PROMPT, truthy=True))
    if continue_final_message:
        if not parsed or parsed[-1].role != "assistant":
            raise ChatTemplateError(
                "continue_final_message=True needs the last message to be the assistant text to continue"
            )
        parsed[-1].prefix = True
    try:
        validate(parsed, template)
    except ChatTemplateError as e:
        if safe_prompt:
            raise ChatTemplateError(
                f"{e} (message indexes count the safe-prompt system message as 0)"
            ) from None
        raise
    tool_list = parse_tools(tools)
    settings = model_settings(tok, template, reasoning_effort, response_format)
    system_prompt, turns = normalize(parsed, template)
    return render(tok, template, system_prompt, turns, tool_list, settings)


# ---------------------------------------------------------------------------------------------------
# a model's own system prompt
# ---------------------------------------------------------------------------------------------------
def system_prompt_message(text: str) -> dict[str, Any]:
    """A system message from a checkpoint's system-prompt file (``SYSTEM_PROMPT.txt``).

    Reasoning models ship one whose ``[THINK]…[/THINK]`` shows the model how to think: that part becomes a
    thinking chunk between text chunks. Text without the markers is one plain string.
    """
    start, end = text.find("[THINK]"), text.find("[/THINK]")
    if start < 0 or end < start:
        return {"role": "system", "content": text}
    return {"role": "system", "content": [
        {"type": "text", "text": text[:start]},
        {"type": "thinking", "thinking": text[start + len("[THINK]") : end], "closed": True},
        {"type": "text", "text": text[end + len("[/THINK]") :]},
    ]}
