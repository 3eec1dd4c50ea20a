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
V13  tools before the first ``[INST]``, calls ``[TOOL_CALLS]name[ARGS]{…}``, results ``[TOOL_RESULTS]…``;
     thinking chunks of assistant and system messages as ``[THINK]…[/THINK]``
V15  as V13, thinking in assistant messages only, ``[MODEL_SETTINGS]{"reasoning_effort": …}[/MODEL_SETTINGS]``
     after the tools; the text chunks of one message are joined with nothing (not a blank line)

Every conversation starts with exactly one BOS; finished assistant turns end with EOS. A new version is a new
row; a new feature is a new field whose default keeps the existing rows as they are (``thinking``,
``model_settings``, ``join_chunks``, ``fim``).

Fill-in-the-middle (:func:`render_fim`, every row with ``fim``): ``<s>[SUFFIX]suffix[PREFIX]prompt``, the model
writing the middle; the suffix is encoded without SentencePiece's leading space. (No version of mistral-common
1.13.1 writes ``[MIDDLE]``, although the vocabularies define it.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

from .errors import ChatTemplateError
from .settings import ModelSettingsSpec

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
    """Trailing spaces of the assistant text are removed (when it is plain text: never in a list of chunks that
    holds a thinking chunk)."""
    thinking: tuple[str, ...] = ()
    """Roles whose content may hold thinking chunks, written ``[THINK]text[/THINK]`` (no ``[/THINK]`` when the
    chunk is not closed); empty: thinking chunks are refused."""
    model_settings: bool = False
    """``[MODEL_SETTINGS]{json}[/MODEL_SETTINGS]`` follows the tools (same user message); the tokenizer file says
    which settings the model takes (:class:`~.settings.ModelSettingsSpec`). False: ``reasoning_effort`` is
    refused."""
    join_chunks: str = "\n\n"
    """Joins the text chunks of one message (same-role messages are always joined with a blank line)."""
    fim: bool = True
    """Fill-in-the-middle requests can be encoded (:func:`render_fim`)."""

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
        if not set(self.thinking) <= {"system", "assistant"}:
            raise ValueError(f"ChatTemplate {self.version}: thinking={self.thinking!r} names roles other than "
                             "'system' and 'assistant'")

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
#: both = text_and_calls, drop = drop_old_tools, inst = inst_as_text, strip = strip_text); the later fields
#: (thinking, model_settings, join_chunks, fim) by name where a row differs from their defaults.
TEMPLATES: dict[str, ChatTemplate] = {t.version: t for t in (
    #            version system   tools    tool_call       tool_result   call_ids     by_id  both   drop   inst   strip
    ChatTemplate("v1",  "first", None,    None,           None,         None,        False, False, False, True,  False,
                 fim=False),
    ChatTemplate("v2",  "last",  "last",  "json",         "name_json",  None,        False, False, True,  False, True),
    ChatTemplate("v3",  "last",  "last",  "json_id",      "id_json",    "9_alnum",   False, False, False, False, True),
    ChatTemplate("v7",  "block", "last",  "json_id",      "id_content", "9_alnum",   False, True,  False, False, True),
    ChatTemplate("v11", "block", "last",  "name_id_args", "id_content", "9_alnum",   True,  True,  False, False, True),
    ChatTemplate("v13", "block", "first", "name_args",    "content",    "non_empty", True,  True,  False, False, True,
                 thinking=("system", "assistant")),
    ChatTemplate("v15", "block", "first", "name_args",    "content",    "non_empty", True,  True,  False, False, True,
                 thinking=("assistant",), model_settings=True, join_chunks=""),
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
    model_settings: ModelSettingsSpec | None

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


@dataclass(frozen=True)
class Think:
    """A thinking chunk: ``[THINK]text[/THINK]``, or ``[THINK]text`` while the thinking goes on (not closed)."""

    text: str
    closed: bool = True


Content = str | list[str | Think]
"""A message's content after normalisation: plain text, or chunks (text pieces and thinking) when it holds
thinking. Plain text and a list of text chunks are written differently (assistant text is stripped only when
plain), so the distinction is kept, as mistral-common keeps it."""


@dataclass
class Turn:
    """A normalised message (same-role runs merged): what :func:`render` writes."""

    role: str
    content: Content
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
    try:
        return json.dumps(value, ensure_ascii=False)
    except (ValueError, RecursionError) as e:  # nested past the recursion limit, a circular reference
        raise ChatTemplateError(f"a tool definition or tool call cannot be written as JSON ({e})") from None


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

    def content(self, content: Content) -> list[int]:
        """Plain text, or chunks: text pieces as they are, thinking as ``[THINK]…[/THINK]``."""
        if isinstance(content, str):
            return self.enc(content)
        out: list[int] = []
        for piece in content:
            if isinstance(piece, Think):
                out += [self.sid("[THINK]"), *self.enc(piece.text)]
                if piece.closed:
                    out.append(self.sid("[/THINK]"))
            else:
                out += self.enc(piece)
        return out

    def user(
        self,
        turn: Turn,
        is_first: bool,
        is_last: bool,
        system_prompt: str | None,
        tools: list[dict[str, Any]] | None,
        settings: dict[str, Any] | None,
    ) -> list[int]:
        text = turn.content
        assert isinstance(text, str)  # user messages hold no thinking (chat.parse_message refuses it)
        if system_prompt and _at(self.t.system_prompt, is_first, is_last):
            text = system_prompt + BLANK_LINE + text
        if self.t.inst_as_text:
            return self.enc(f"[INST] {text} [/INST]")
        out = []
        if _at(self.t.tools, is_first, is_last):
            if tools:
                out = [self.sid("[AVAILABLE_TOOLS]"), *self.enc(_dumps(tools)), self.sid("[/AVAILABLE_TOOLS]")]
            if settings:
                out += [self.sid("[MODEL_SETTINGS]"), *self.enc(_dumps(settings)), self.sid("[/MODEL_SETTINGS]")]
        return [*out, self.sid("[INST]"), *self.enc(text), self.sid("[/INST]")]

    def system(self, turn: Turn) -> list[int]:
        return [self.sid("[SYSTEM_PROMPT]"), *self.content(turn.content), self.sid("[/SYSTEM_PROMPT]")]

    def assistant(self, where: str, turn: Turn, before_last_user: bool) -> list[int]:
        t, calls = self.t, turn.tool_calls
        if calls and t.tool_call is None:
            raise ChatTemplateError(
                f"{where}: tool calls need a tokenizer of version v2 or newer (this one is {t.version})"
            )
        if not calls and not turn.content:
            needs = "content" if t.tool_call is None else "content or tool_calls"
            raise ChatTemplateError(f"{where}: an assistant message needs {needs}")
        if calls and turn.content and not t.text_and_calls:
            raise ChatTemplateError(
                f"{where}: merged consecutive assistant messages have both content and tool_calls, which "
                f"tokenizer {t.version} cannot encode; send them as one kind"
            )
        if calls and t.drop_old_tools and before_last_user:
            return []
        content = turn.content
        if isinstance(content, str) and t.strip_text:
            content = content.rstrip(" ")
        out = self.content(content) if content else []
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
        text = turn.content
        assert isinstance(text, str)  # tool messages hold no thinking (chat.parse_message refuses it)
        if t.tool_result == "name_json":
            body = self.enc(_dumps([{"name": turn.name, "content": parse_json(text)}]))
        elif t.tool_result == "id_json":
            body = self.enc(_dumps({"content": parse_json(text), "call_id": turn.tool_call_id}))
        elif t.tool_result == "id_content":
            body = [*self.enc(turn.tool_call_id or ""), self.sid("[TOOL_CONTENT]"), *self.enc(text)]
        else:  # "content"
            body = self.enc(text)
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
    settings: dict[str, Any] | None = None,
) -> list[int]:
    """Token ids of a validated, normalised conversation: BOS, then each turn as ``template`` says.

    ``system_prompt`` is the joined system text of ``system_prompt="first"/"last"`` rows (``None`` for ``"block"``
    rows, whose system messages are turns); ``tools`` are in their printed form (:func:`.chat.parse_tools`);
    ``settings`` the built model settings of ``model_settings`` rows (:meth:`.settings.ModelSettingsSpec.build`),
    written after the tools.
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
            out += w.user(turn, i == first_user, i == last_user, system_prompt, tools, settings)
        elif turn.role == "assistant":
            out += w.assistant(where, turn, i < last_user)
        elif turn.role == "tool":
            out += w.tool_result(where, turn, i < last_user)
        else:
            out += w.system(turn)
    return out


def render_fim(tok: Vocabulary, template: ChatTemplate, prompt: str, suffix: str | None) -> list[int]:
    """Fill-in-the-middle: ``<s>[SUFFIX]suffix[PREFIX]prompt``; the model generates the middle next.

    The suffix is encoded behind a throw-away character whose two tokens are then dropped, which removes the
    space SentencePiece puts in front of an encoded text (mistral-common's rule, kept token for token: on Tekken,
    which adds no space, the same two tokens are dropped).
    """
    if not template.fim:
        raise ChatTemplateError(f"tokenizer {template.version} has no fill-in-the-middle (it needs v2 or newer)")
    for name, value in (("prompt", prompt), ("suffix", suffix)):
        if value is not None and not isinstance(value, str):
            raise ChatTemplateError(f"{name} must be a string, got {type(value).__name__}")
    if not (tok.has_special("[SUFFIX]") and tok.has_special("[PREFIX]")):
        raise ChatTemplateError(
            f"this {tok.kind} vocabulary ({tok.version}) has no [SUFFIX] / [PREFIX] tokens, so it cannot encode "
            "fill-in-the-middle (mistral-common writes <unk> in their place)"
        )
    suffix_ids = tok.encode("\u263a" + suffix)[2:] if suffix else []  # "☺" + suffix
    return [tok.bos_id, tok.special_id("[SUFFIX]"), *suffix_ids, tok.special_id("[PREFIX]"), *tok.encode(prompt)]
