"""The chat template of every Mistral instruct version: one table row per version, and the encoder reading it.

:data:`TEMPLATES` holds one :class:`ChatTemplate` per version; :func:`render` writes a validated, normalised
conversation (:mod:`.chat` does those steps) as token ids, reading nothing but the row. What the rows give
(``tok.decode(ids, "keep")``; ``{…}`` is JSON):

V1   ``<s>[INST] system⏎⏎first user [/INST] answer</s> [INST] user [/INST]`` ("[INST]" is text here)
V2   ``<s>[INST]user[/INST][TOOL_CALLS][{"name", "arguments"}]</s>[TOOL_RESULTS][{"name", "content"}][/TOOL_RESULTS]
     answer</s>[AVAILABLE_TOOLS][…][/AVAILABLE_TOOLS][INST]system⏎⏎last user[/INST]``; tool calls and results
     before the last user message are left out
V3   as V2, calls ``[{"name", "arguments", "id"}]``, results ``{"content", "call_id"}``, all kept
V7   ``[SYSTEM_PROMPT]system[/SYSTEM_PROMPT]`` where it was sent, results ``[TOOL_RESULTS]id[TOOL_CONTENT]…``
V11  calls ``[TOOL_CALLS]name[CALL_ID]id[ARGS]{…}``
V13  tools before the first ``[INST]``, calls ``[TOOL_CALLS]name[ARGS]{…}``, results ``[TOOL_RESULTS]…``

Every conversation starts with exactly one BOS; finished assistant turns end with EOS. A new version is a new
row; a new feature (thinking, fill-in-the-middle) is a new field whose default keeps the existing rows as they are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

from .errors import ChatTemplateError

Position = Literal["first", "last"]  # of the user messages
SystemPrompt = Literal["first", "last", "block"]
ToolCallFormat = Literal["json", "json_id", "name_id_args", "name_args"]
ToolResultFormat = Literal["name_json", "id_json", "id_content", "content"]
CallIdRule = Literal["9_alnum", "non_empty"]


@dataclass(frozen=True)
class ChatTemplate:
    """How one instruct version writes a conversation (one row of :data:`TEMPLATES`)."""

    version: str
    system_prompt: SystemPrompt
    """``"first"`` / ``"last"``: the system messages, joined by a blank line, go in front of the text of the first /
    last user message; ``"block"``: each one is a ``[SYSTEM_PROMPT]…[/SYSTEM_PROMPT]`` block where it was sent."""
    tools: Position | None
    """``[AVAILABLE_TOOLS][…][/AVAILABLE_TOOLS]`` goes right before the first / last user message; ``None``: tools
    are not written."""
    tool_call: ToolCallFormat | None
    """After the assistant text: ``"json"`` ``[TOOL_CALLS][{"name", "arguments"}, …]``, ``"json_id"`` the same
    with ``"id"``, ``"name_id_args"`` ``[TOOL_CALLS]name[CALL_ID]id[ARGS]{…}`` per call, ``"name_args"`` the
    same without the id. ``None``: tool calls are refused."""
    tool_result: ToolResultFormat | None
    """``[TOOL_RESULTS]…[/TOOL_RESULTS]`` around ``"name_json"`` ``[{"name", "content"}]``, ``"id_json"``
    ``{"content", "call_id"}``, ``"id_content"`` ``id[TOOL_CONTENT]content`` or ``"content"``. ``None``: tool
    messages are refused."""
    call_ids: CallIdRule | None
    """Ids accepted for tool calls and ``tool_call_id`` of results: ``"9_alnum"`` exactly 9 of a-z A-Z 0-9,
    ``"non_empty"`` any string but ``""`` and ``"null"``; ``None``: not checked."""
    results_by_id: bool
    """Tool results are matched to the calls by id and written in the order of the calls (else only counted)."""
    text_and_calls: bool
    """An assistant message may carry text and tool calls together (else exactly one of the two)."""
    drop_old_tools: bool
    """Tool calls and tool results before the last user message are left out."""
    inst_as_text: bool
    """``[INST] … [/INST]`` is written as text: the v1 vocabulary has no such control tokens."""
    strip_text: bool
    """Trailing spaces of the assistant text are removed."""

    def __post_init__(self) -> None:
        allowed = {
            "system_prompt": get_args(SystemPrompt),
            "tools": (*get_args(Position), None),
            "tool_call": (*get_args(ToolCallFormat), None),
            "tool_result": (*get_args(ToolResultFormat), None),
            "call_ids": (*get_args(CallIdRule), None),
        }
        for name, values in allowed.items():
            if getattr(self, name) not in values:
                raise ValueError(f"ChatTemplate {self.version}: {name}={getattr(self, name)!r} is not one of {values}")

    @property
    def calls_carry_ids(self) -> bool:
        """Tool calls are written with their id."""
        return self.tool_call in ("json_id", "name_id_args")

    @property
    def json_results(self) -> bool:
        """Tool results are written as JSON (their content is parsed as JSON when it is JSON)."""
        return self.tool_result in ("name_json", "id_json")


# fmt: off
#: One row per version; the columns are the fields of ChatTemplate, in order (flags: by_id = results_by_id,
#: both = text_and_calls, drop = drop_old_tools, inst = inst_as_text, strip = strip_text).
TEMPLATES: dict[str, ChatTemplate] = {t.version: t for t in (
    #            version system   tools    tool_call       tool_result   call_ids     by_id  both   drop   inst   strip
    ChatTemplate("v1",  "first", None,    None,           None,         None,        False, False, False, True,  False),
    ChatTemplate("v2",  "last",  "last",  "json",         "name_json",  None,        False, False, True,  False, True),
    ChatTemplate("v3",  "last",  "last",  "json_id",      "id_json",    "9_alnum",   False, False, False, False, True),
    ChatTemplate("v7",  "block", "last",  "json_id",      "id_content", "9_alnum",   False, True,  False, False, True),
    ChatTemplate("v11", "block", "last",  "name_id_args", "id_content", "9_alnum",   True,  True,  False, False, True),
    ChatTemplate("v13", "block", "first", "name_args",    "content",    "non_empty", True,  True,  False, False, True),
)}
# fmt: on

#: Instruct/template versions, oldest first.
VERSIONS = tuple(TEMPLATES)

NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # function names
TOOL_CALL_ID_PATTERN = re.compile(r"^[a-zA-Z0-9]{9}$")  # call_ids="9_alnum"
NULL_ID = "null"  # mistral-common's placeholder for a tool call without id
BLANK_LINE = "\n\n"  # joins merged messages and the system prompt


def template_for(version: str) -> ChatTemplate:
    """The row of ``version`` (``"v3"``); :class:`ChatTemplateError` if there is none."""
    try:
        return TEMPLATES[version]
    except KeyError:
        raise ChatTemplateError(f"no chat template for version {version!r}; known: {VERSIONS}") from None


class Vocabulary(Protocol):
    """What the templates use of a tokenizer (:class:`~mistral_ref.tokenizer.Tokenizer` has it all)."""

    kind: str
    version: str

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def has_special(self, name: str) -> bool: ...

    def special_id(self, name: str) -> int: ...


# ---------------------------------------------------------------------------------------------------
# the encoder
# ---------------------------------------------------------------------------------------------------
@dataclass
class ToolCall:
    """One function call of an assistant message; ``arguments`` is a JSON string."""

    id: str
    name: str
    arguments: str


@dataclass
class Turn:
    """A normalised message (same-role runs merged): what :func:`render` writes."""

    role: str
    text: str
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    prefix: bool = False


def parse_json(content: str) -> Any:
    """``json.loads(content)``, or ``content`` itself when it is not JSON."""
    try:
        return json.loads(content)
    except (ValueError, RecursionError):
        return content


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _at(position: str | None, is_first: bool, is_last: bool) -> bool:
    """Whether a user message that is first / last is at ``position`` ("first", "last" or None)."""
    return (position == "first" and is_first) or (position == "last" and is_last)


class _Writer:
    """Writes the turns of one conversation with the rules of one row."""

    def __init__(self, tok: Vocabulary, t: ChatTemplate) -> None:
        self.tok, self.t, self.enc = tok, t, tok.encode

    def sid(self, name: str) -> int:
        if not self.tok.has_special(name):
            raise ChatTemplateError(
                f"this {self.tok.kind} tokenizer (version {self.tok.version}) has no {name} token, which the "
                f"{self.t.version} chat template needs; load the tokenizer file that matches the model"
            )
        return self.tok.special_id(name)

    def user(
        self, turn: Turn, is_first: bool, is_last: bool, system_prompt: str | None, tools: list[dict[str, Any]] | None
    ) -> list[int]:
        text = turn.text
        if system_prompt and _at(self.t.system_prompt, is_first, is_last):
            text = system_prompt + BLANK_LINE + text
        if self.t.inst_as_text:
            return self.enc(f"[INST] {text} [/INST]")
        out = []
        if tools and _at(self.t.tools, is_first, is_last):
            out = [self.sid("[AVAILABLE_TOOLS]"), *self.enc(_dumps(tools)), self.sid("[/AVAILABLE_TOOLS]")]
        return [*out, self.sid("[INST]"), *self.enc(text), self.sid("[/INST]")]

    def system(self, turn: Turn) -> list[int]:
        return [self.sid("[SYSTEM_PROMPT]"), *self.enc(turn.text), self.sid("[/SYSTEM_PROMPT]")]

    def assistant(self, where: str, turn: Turn, before_last_user: bool) -> list[int]:
        t, calls = self.t, turn.tool_calls
        if calls and t.tool_call is None:
            raise ChatTemplateError(
                f"{where}: tool calls need a tokenizer of version v2 or newer (this one is {t.version})"
            )
        if not calls and not turn.text:
            needs = "content" if t.tool_call is None else "content or tool_calls"
            raise ChatTemplateError(f"{where}: an assistant message needs {needs}")
        if calls and turn.text and not t.text_and_calls:
            raise ChatTemplateError(
                f"{where}: merged consecutive assistant messages have both content and tool_calls, which "
                f"tokenizer {t.version} cannot encode; send them as one kind"
            )
        if calls and t.drop_old_tools and before_last_user:
            return []
        text = turn.text.rstrip(" ") if t.strip_text else turn.text
        out = self.enc(text) if text else []
        if calls:
            out += self.tool_calls(calls)
        if not turn.prefix:
            out.append(self.tok.eos_id)
        return out

    def tool_calls(self, calls: list[ToolCall]) -> list[int]:
        def written_id(c: ToolCall) -> bool:
            return self.t.calls_carry_ids and bool(c.id) and c.id != NULL_ID

        if self.t.tool_call in ("json", "json_id"):
            items = []
            for c in calls:
                item: dict[str, Any] = {"name": c.name, "arguments": parse_json(c.arguments)}
                if written_id(c):
                    item["id"] = c.id
                items.append(item)
            return [self.sid("[TOOL_CALLS]"), *self.enc(_dumps(items))]
        out: list[int] = []  # "name_id_args", "name_args": one [TOOL_CALLS] per call
        for c in calls:
            out += [self.sid("[TOOL_CALLS]"), *self.enc(c.name)]
            if written_id(c):
                out += [self.sid("[CALL_ID]"), *self.enc(c.id)]
            out += [self.sid("[ARGS]"), *self.enc(_dumps(parse_json(c.arguments)))]
        return out

    def tool_result(self, where: str, turn: Turn, before_last_user: bool) -> list[int]:
        t = self.t
        if t.tool_result is None:
            raise ChatTemplateError(
                f"{where}: tool messages need a tokenizer of version v2 or newer (this one is {t.version})"
            )
        if t.drop_old_tools and before_last_user:
            return []
        if t.tool_result == "name_json":
            body = self.enc(_dumps([{"name": turn.name, "content": parse_json(turn.text)}]))
        elif t.tool_result == "id_json":
            body = self.enc(_dumps({"content": parse_json(turn.text), "call_id": turn.tool_call_id}))
        elif t.tool_result == "id_content":
            body = [*self.enc(turn.tool_call_id or ""), self.sid("[TOOL_CONTENT]"), *self.enc(turn.text)]
        else:  # "content"
            body = self.enc(turn.text)
        return [self.sid("[TOOL_RESULTS]"), *body, self.sid("[/TOOL_RESULTS]")]


def _check_one_result_per_call_turn(turns: list[Turn], last_user: int, version: str) -> None:
    """A ``name_json`` result does not say which call it answers, so a tool-call turn may have only one."""
    has_calls, count = False, 0
    for turn in turns[max(last_user, 0) :]:
        if turn.role == "assistant":
            has_calls, count = bool(turn.tool_calls), 0
        elif turn.role == "tool":
            if has_calls:
                count += 1
                if count > 1:
                    raise ChatTemplateError(
                        f"tokenizer {version} cannot encode several tool results for one assistant turn; "
                        "make one call per assistant message or use a v3+ tokenizer"
                    )
        else:
            has_calls, count = False, 0


def render(
    tok: Vocabulary,
    template: ChatTemplate,
    system_prompt: str | None,
    turns: list[Turn],
    tools: list[dict[str, Any]] | None,
) -> list[int]:
    """Token ids of a validated, normalised conversation: BOS, then each turn as ``template`` says.

    ``system_prompt`` is the joined system text of ``system_prompt="first"/"last"`` rows (``None`` for ``"block"``
    rows, whose system messages are turns); ``tools`` are in their printed form (:func:`.chat.parse_tools`).
    """
    users = [i for i, turn in enumerate(turns) if turn.role == "user"]
    first_user, last_user = (users[0], users[-1]) if users else (-1, -1)
    if template.tool_result == "name_json":
        _check_one_result_per_call_turn(turns, last_user, template.version)
    w = _Writer(tok, template)
    out = [tok.bos_id]
    for i, turn in enumerate(turns):
        where = f"turn {i} ({turn.role}, after merging same-role messages)"
        if turn.role == "user":
            out += w.user(turn, i == first_user, i == last_user, system_prompt, tools)
        elif turn.role == "assistant":
            out += w.assistant(where, turn, i < last_user)
        elif turn.role == "tool":
            out += w.tool_result(where, turn, i < last_user)
        else:
            out += w.system(turn)
    return out
