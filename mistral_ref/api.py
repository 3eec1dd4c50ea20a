"""Chat and fill-in-the-middle completions as the Mistral API defines them, on a local model.

    chat_completion(model, tokenizer, messages, temperature=0, max_tokens=64)
        -> {"id", "object": "chat.completion", "created", "model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content", "tool_calls"},
                         "finish_reason": "stop" | "length" | "tool_calls", "logprobs"}],
            "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}
    fim_completion(model, tokenizer, prompt, suffix=None, max_tokens=64)
        -> the same shape, the generated middle as the message content (no tool_calls, no logprobs)

A request goes through three steps:

1. :func:`parse_request` validates the parameters into a :class:`ChatRequest`, with the types, ranges, defaults
   and names declared in request_spec.REQUEST (the table the sampler and the OpenAPI schema use too); every
   problem is a :class:`RequestError` whose ``field`` names the offending parameter.
2. :func:`prepare` encodes the conversation with the tokenizer's chat template (tools included), checks it fits
   the context, and decides the constraints: ``tool_choice="any"`` forces the first token to be
   ``[TOOL_CALLS]``, ``"none"`` forbids it, ``response_format`` ``json_object`` / ``json_schema`` adds the
   grammar of the schema (grammar.py, llguidance).
3. :func:`run` generates with ``generation.generate_stream`` — the one sampling path — and turns its events into
   a response, or into ``chat.completion.chunk`` dicts when streaming.  Stop strings are matched here on the
   content text (never inside a tool call); text is released as soon as no stop string can claim it.

Reasoning: a model that thinks (``[THINK]…[/THINK]``, v13+ tokenizers) gets its thinking back apart from the
answer: the message content is then a list of the Mistral API's content chunks, ``{"type": "thinking",
"thinking": [{"type": "text", "text": ...}], "closed": bool}`` and ``{"type": "text", "text": ...}``, in the
order generated (a plain string when it did not think).  Streamed, a thinking delta is ``{"content": [{"type":
"thinking", "thinking": [...], "closed": bool}]}`` (``[THINK]`` opens one with no text, ``[/THINK]`` sends
``closed: true``) and answer deltas stay strings.  Stop strings and logprobs concern the answer only.
``reasoning_effort`` goes into v15's model settings (refused by older tokenizers, and by v15 models whose file
does not list the value); ``prompt_mode="reasoning"`` puts the model's reasoning system prompt (its
``SYSTEM_PROMPT.txt``, or ``reasoning_prompt=``) before the request's messages.

Fill-in-the-middle (:func:`fim_completion`, fields in request_spec.FIM_REQUEST): the prompt is
``tokenizer.encode_fim(prompt, suffix)``; the middle is decoded as the continuation of the prompt's text;
``min_tokens`` keeps the EOS from being generated before that many tokens.

Counting: ``prompt_tokens`` is the length of the encoded prompt; ``completion_tokens`` counts every token the
model produced, the EOS that ended generation included.  ``logprobs`` (an extra parameter) are the raw model's
log-probabilities of the content tokens, in the OpenAI format ``{"content": [{"token", "logprob", "bytes",
"top_logprobs"}]}``.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mistral_ref.generation import StopStrings, generate_stream
from mistral_ref.grammar import (
    AfterToken,
    GrammarError,
    GrammarLogitsProcessor,
    json_schema_grammar,
    tool_call_grammar,
)
from mistral_ref.request_spec import (
    FIELDS,
    FIM_FIELDS,
    FIM_REQUEST,
    REQUEST,
    Field,
    FieldError,
    check,
    check_nesting_and_integers,
    type_name,
)
from mistral_ref.sampling import SamplingParams
from mistral_ref.tokenizer import ChatTemplateError, find_system_prompt, system_prompt_message, thinking_chunk
from mistral_ref.tokenizer.settings import response_schema

DEFAULT_MAX_TOKENS = 512  # used when max_tokens is not given and the model declares no context length
TOOL_CHOICES = ("auto", "none", "any", "required")
#: Every parameter a request may carry: the fields of the request spec (request_spec.REQUEST).
REQUEST_FIELDS = tuple(FIELDS)


class RequestError(ValueError):
    """A chat-completions request that cannot be served; ``field`` names the parameter at fault."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class ContextLengthError(RequestError):
    """The prompt, or the prompt plus max_tokens, does not fit in the model's context."""


class ContentFilterError(RequestError):
    """The moderation stage flagged the prompt (a server answers HTTP 400 ``{"error": {"code": "content_filter"}}``)."""

    code = "content_filter"


#: A moderation stage: called with text (the prompt's text, then the reply's text so far), True = filter it.
Moderation = Callable[[str], bool]


# ---- 1. the request ----------------------------------------------------------------------------------------
@dataclass
class ChatRequest:
    """A validated chat-completions request (field names and defaults of request_spec.REQUEST).

    tool_choice is normalised to "auto" | "none" | "any" ("required" is "any"; a named function is "any" with
    ``tools`` narrowed to it).  seed is ``seed`` or ``random_seed``, max_tokens ``max_tokens`` or
    ``max_completion_tokens``.  response_format: the json_object / json_schema request (None: text); grammar: its
    compiled llguidance grammar; n: how many choices.
    """

    messages: list[Any]
    model: str | None = None
    temperature: float = FIELDS["temperature"].default
    top_p: float = FIELDS["top_p"].default
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = FIELDS["presence_penalty"].default
    frequency_penalty: float = FIELDS["frequency_penalty"].default
    seed: int | None = None
    response_format: dict[str, Any] | None = None  # json_object / json_schema (None: text)
    grammar: str | None = None  # the llguidance grammar the reply must follow (compiled from response_format)
    tools: list[Any] | None = None
    tool_choice: str = FIELDS["tool_choice"].default
    parallel_tool_calls: bool = FIELDS["parallel_tool_calls"].default
    safe_prompt: bool = FIELDS["safe_prompt"].default
    stream: bool = FIELDS["stream"].default
    ignore_eos: bool = FIELDS["ignore_eos"].default
    logprobs: bool = FIELDS["logprobs"].default
    top_logprobs: int = FIELDS["top_logprobs"].default
    n: int = FIELDS["n"].default
    reasoning_effort: str | None = None
    prompt_mode: str | None = None

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.presence_penalty, self.frequency_penalty,
                              self.seed)

    @property
    def json_mode(self) -> bool:
        """True when the reply must be JSON (response_format json_object or json_schema)."""
        return self.response_format is not None


def _stop(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("stop",
                           f"must be a non-empty string or a list of non-empty strings, got {value!r}")
    return stops


def _response_format(value: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(response_format, grammar): None, None for text; the format and its compiled grammar for json_object
    (any JSON object) and json_schema (the schema's documents).  A RequestError naming response_format for a
    malformed value, or response_format.json_schema.schema for a schema feature the grammar engine lacks."""
    try:
        schema = response_schema(value)
    except ChatTemplateError as e:
        raise RequestError("response_format", str(e).removeprefix("response_format: ")) from None
    if schema is None:
        return None, None
    kind = value["type"]
    try:
        grammar = json_schema_grammar(None if kind == "json_object" else schema)
    except GrammarError as e:
        raise RequestError("response_format.json_schema.schema", f"is not supported: {e}") from None
    return dict(value), grammar


def _tools(value: Any) -> list[Any] | None:
    if not isinstance(value, list):
        raise RequestError("tools", f"must be a list of tools, got {type_name(value)}")
    return value or None


def _tool_choice(value: Any, tools: list[Any] | None) -> tuple[str, list[Any] | None]:
    if isinstance(value, str):
        if value not in TOOL_CHOICES:
            raise RequestError("tool_choice",
                               f"must be one of {TOOL_CHOICES} or a named function, got {value!r}")
        choice = "any" if value == "required" else value
    elif isinstance(value, Mapping) and isinstance(value.get("function"), Mapping):
        name = value["function"].get("name")
        named = [t for t in tools or [] if isinstance(t, Mapping) and isinstance(t.get("function"), Mapping)
                 and t["function"].get("name") == name]
        if not named:
            raise RequestError("tool_choice", f"names the function {name!r}, which is not in tools")
        return "any", named
    else:
        raise RequestError("tool_choice", "must be 'auto', 'none', 'any', 'required' or "
                           f"{{'type': 'function', 'function': {{'name': ...}}}}, got {value!r}")
    if choice == "any" and not tools:
        raise RequestError("tool_choice", f"{value!r} needs a non-empty tools list")
    return choice, tools


def _stream_options(value: Any) -> None:
    if not isinstance(value, Mapping) or not set(value) <= {"include_usage"}:
        raise RequestError("stream_options", f"must be {{'include_usage': bool}}, got {value!r}")
    if "include_usage" in value and not isinstance(value["include_usage"], bool):
        raise RequestError("stream_options.include_usage",
                           f"must be true or false, got {type_name(value['include_usage'])} "
                           f"{value['include_usage']!r}")


def _present(body: Any, fields: Mapping[str, Field], required: str, what: str) -> dict[str, Any]:
    """A request body's fields, nulls dropped (null means "the default"); unknown names and a missing required
    field are refused."""
    if not isinstance(body, Mapping):
        raise RequestError("body", f"must be a JSON object, got {type_name(body)}")
    try:  # before anything walks it: bodies nested too deep or holding integers too long to print
        check_nesting_and_integers(body)
    except FieldError as e:
        raise RequestError(e.field, e.problem) from None
    body = {k: v for k, v in body.items() if v is not None}
    for name in body:
        if name not in fields:
            raise RequestError(name, "unknown parameter")
    if required not in body:
        raise RequestError(required, f"is required ({what})")
    return body


def _scalars(body: Mapping[str, Any], table: tuple[Field, ...], fields: Mapping[str, Field]) -> dict[str, Any]:
    """Each field's value checked (type, range, choices) in the table's order; aliases folded into their field."""
    try:
        values = {f.name: check(f.name, body[f.name], fields) for f in table if f.name in body}
    except FieldError as e:
        raise RequestError(e.field, e.problem) from None
    for f in table:  # an alias (random_seed) stands for its field (seed); both may be given if they agree
        if f.alias_of is not None and f.name in values:
            value = values.pop(f.name)
            if values.setdefault(f.alias_of, value) != value:
                raise RequestError(f.name, f"{f.alias_of}={values[f.alias_of]} and {f.name}={value} disagree")
    return values


def parse_request(body: Mapping[str, Any]) -> ChatRequest:
    """Validate a request body (the JSON object of POST /v1/chat/completions) into a ChatRequest.

    The fields, their types, ranges and defaults are request_spec.REQUEST's; ``null`` means "the default" for
    every optional field.  Raises RequestError naming the field for a missing or mistyped field, a value out
    of range, an unknown field, or an unsupported option (n > 1, json_schema).
    """
    body = _present(body, FIELDS, "messages", "a list of {'role': ..., 'content': ...}")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages", f"must be a non-empty list of messages, got {type_name(messages)}")
    values = _scalars(body, REQUEST, FIELDS)

    # the structured fields; user, metadata and prediction are accepted and ignored
    del values["messages"]
    values.pop("user", None)
    for name in ("metadata", "prediction"):
        if name in values and not isinstance(values.pop(name), Mapping):
            raise RequestError(name, f"must be an object, got {type_name(body[name])}")
    stop = _stop(values.pop("stop")) if "stop" in values else []
    response_format, grammar = _response_format(values.pop("response_format", None))
    tools = _tools(values.pop("tools")) if "tools" in values else None
    tool_choice, tools = _tool_choice(values.pop("tool_choice", FIELDS["tool_choice"].default), tools)
    if "stream_options" in values:
        _stream_options(values.pop("stream_options"))
    req = ChatRequest(messages, stop=stop, response_format=response_format, grammar=grammar, tools=tools,
                      tool_choice=tool_choice, **values)

    # rules across fields
    if req.top_logprobs and not req.logprobs:
        raise RequestError("top_logprobs", "needs logprobs=true")
    if req.json_mode and req.tool_choice == "any":
        raise RequestError("response_format", f"{req.response_format['type']} cannot be combined with tool_choice "
                           "'any' / 'required': the reply must then be a tool call, not JSON content")
    return req


# ---- 2. the prompt and the constraints ---------------------------------------------------------------------
@dataclass
class Prepared:
    """A request ready to run: its prompt ids, token budget and constraints."""

    request: ChatRequest
    prompt_ids: list[int]
    max_tokens: int
    model_name: str
    tool_calls_id: int | None  # [TOOL_CALLS] of this vocabulary (None: v1, no tool calling)
    force_tool_call: bool
    forbid_tool_call: bool
    min_tokens: int = 0  # EOS is not generated before this many tokens (fill in the middle)
    continue_text: bool = False  # the output's text continues the prompt's (fill in the middle)
    tool_grammar: str | None = None  # the grammar of what follows [TOOL_CALLS] (names, arguments, how many calls)
    moderation: Moderation | None = None  # the reply's text is checked as it is released (finish "content_filter")
    moderation_window: int = 0  # answer characters held back between two moderation checks (0: check every release)


#: Request fields a ChatTemplateError may be about (its message starts with the name); otherwise "messages".
_TEMPLATE_FIELDS = ("tools", "reasoning_effort", "response_format")


def reasoning_system_message(tokenizer: Any, reasoning_prompt: str | None = None) -> dict[str, Any]:
    """The system message ``prompt_mode="reasoning"`` puts first: `reasoning_prompt`, else the SYSTEM_PROMPT.txt
    next to the tokenizer file; a RequestError naming prompt_mode when there is neither."""
    text = reasoning_prompt if reasoning_prompt is not None else find_system_prompt(tokenizer)
    if text is None:
        raise RequestError("prompt_mode", "'reasoning' needs the model's reasoning system prompt, and there is "
                           "no SYSTEM_PROMPT.txt next to its tokenizer file (pass reasoning_prompt=... to "
                           "chat_completion, or leave prompt_mode out)")
    return system_prompt_message(text)


def _token_budget(n: int, requested: int | None, max_context: int | None, what: str) -> int:
    """max_tokens for a prompt of n tokens: `requested`, or what the context leaves; ContextLengthError (naming
    `what` or max_tokens) when they do not fit."""
    if max_context is not None and n >= max_context:
        raise ContextLengthError(what, f"the prompt is {n} tokens long; the model's context is {max_context} "
                                 "tokens, which leaves no room for a completion: shorten the "
                                 f"{'conversation' if what == 'messages' else what}")
    if requested is None:
        return max_context - n if max_context is not None else DEFAULT_MAX_TOKENS
    if max_context is not None and n + requested > max_context:
        raise ContextLengthError("max_tokens", f"{requested} tokens after a prompt of {n} tokens exceed "
                                 f"the model's context of {max_context} tokens (at most {max_context - n} fit)")
    return requested


def prepare(tokenizer: Any, request: ChatRequest, max_context: int | None = None,
            model_name: str = "mistral-ref", reasoning_prompt: str | None = None) -> Prepared:
    """Encode `request` with the chat template and size its token budget.

    max_context: the model's context length in tokens (prompt + completion); None = no limit known.  A prompt
    that does not fit, or max_tokens beyond what is left, is a RequestError naming messages / max_tokens.
    reasoning_prompt: the system prompt of ``prompt_mode="reasoning"`` (default: the checkpoint's
    SYSTEM_PROMPT.txt, see :func:`reasoning_system_message`).
    """
    req = request
    tools = req.tools if req.tool_choice != "none" else None
    messages = req.messages
    if req.prompt_mode == "reasoning":
        messages = [reasoning_system_message(tokenizer, reasoning_prompt), *messages]
    try:
        prompt = tokenizer.encode_chat(messages, tools=tools, safe_prompt=req.safe_prompt,
                                       continue_final_message=_ends_with_prefix(req.messages),
                                       reasoning_effort=req.reasoning_effort,
                                       response_format=req.response_format)
    except ChatTemplateError as e:
        at = [f for f in _TEMPLATE_FIELDS if str(e).startswith(f)]
        raise RequestError(at[0] if at else "messages", str(e)) from None
    max_tokens = _token_budget(len(prompt), req.max_tokens, max_context, "messages")
    marker = tokenizer.special_id("[TOOL_CALLS]") if tokenizer.has_special("[TOOL_CALLS]") else None
    if req.tool_choice == "any" and marker is None:
        raise RequestError("tool_choice", f"this tokenizer ({tokenizer.version}) has no tool calling")
    return Prepared(req, prompt, max_tokens, req.model or model_name, marker,
                    force_tool_call=req.tool_choice == "any",
                    # no tools offered (or tool_choice "none"): a call could only name a function that doesn't exist
                    forbid_tool_call=marker is not None and (req.tool_choice == "none" or not req.tools),
                    tool_grammar=_tool_grammar(tokenizer, req, tools) if marker is not None and tools else None)


def _tool_grammar(tokenizer: Any, req: ChatRequest, tools: list[Any]) -> str | None:
    """The grammar a tool call follows: with tool_choice "any" / "required" / named, every call names a declared
    (or the named) function with arguments valid against its parameters schema; with "auto", only when a tool is
    ``strict`` (its arguments are constrained, the others' are any JSON object) or ``parallel_tool_calls`` is
    false (at most one call).  None: calls are not constrained."""
    forced = req.tool_choice == "any"
    strict = any(isinstance(t.get("function"), Mapping) and t["function"].get("strict") for t in tools)
    if not (forced or strict or not req.parallel_tool_calls):
        return None
    try:
        return tool_call_grammar(tokenizer, tools, parallel=req.parallel_tool_calls, strict_only=not forced)
    except GrammarError as e:
        raise RequestError("tools", str(e)) from None


def context_length(model: Any, max_context: int | None = None) -> int | None:
    """The context a request must fit in: `max_context`, capped at the model's declared ``args.max_seq_len``
    (generation refuses to go beyond it); None when neither is known."""
    declared = getattr(model.args, "max_seq_len", None)
    known = [c for c in (max_context, declared) if c is not None]
    return min(known) if known else None


def _ends_with_prefix(messages: list[Any]) -> bool:
    last = messages[-1]
    return isinstance(last, Mapping) and last.get("role") == "assistant" and last.get("prefix") is True


def _only_first(token_id: int):
    """A logits processor: the first generated token must be `token_id`."""
    def proc(generated: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if generated.shape[1] == 0:
            keep = logits[:, token_id].clone()
            logits.fill_(float("-inf"))
            logits[:, token_id] = keep
        return logits
    return proc


def _never(token_id: int):
    """A logits processor: `token_id` is never generated."""
    def proc(generated: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        logits[:, token_id] = float("-inf")
        return logits
    return proc


# ---- 3. running --------------------------------------------------------------------------------------------
def _token_entry(tokenizer: Any, token_id: int, logprob: float) -> dict[str, Any]:
    data = tokenizer.id_to_bytes(token_id)
    special = tokenizer.is_special(token_id)
    text = tokenizer.id_to_piece(token_id) if special else data.decode("utf-8", "replace")
    return {"token": text, "logprob": logprob, "bytes": list(data)}


def _logprob_entry(tokenizer: Any, event: Any) -> dict[str, Any]:
    entry = _token_entry(tokenizer, event.token_id, event.logprob)
    entry["top_logprobs"] = [_token_entry(tokenizer, t, lp) for t, lp in (event.top_logprobs or [])]
    return entry


@dataclass
class _Outcome:
    """What the event loop accumulated; filled in as the stream goes.

    pieces: the reply in order, ``["text", str]`` and ``["thinking", str, closed]`` entries.
    """

    pieces: list[list[Any]] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str = "length"
    completion_tokens: int = 0
    logprobs: list[dict[str, Any]] = field(default_factory=list)

    def add(self, kind: str, text: str, closed: bool = False) -> None:
        """Append text to the last piece of this kind, or start one (a thinking piece once closed is done)."""
        last = self.pieces[-1] if self.pieces else None
        if last is not None and last[0] == kind and not (kind == "thinking" and last[2]):
            last[1] += text
            if kind == "thinking":
                last[2] = closed
        else:
            self.pieces.append([kind, text, closed] if kind == "thinking" else [kind, text])

    @property
    def text(self) -> str:
        """The answer: every text piece, thinking left out."""
        return "".join(p[1] for p in self.pieces if p[0] == "text")

    def content(self) -> str | list[dict[str, Any]] | None:
        """The message content: the answer (None if blank next to tool calls), or chunks when the model thought."""
        if not any(p[0] == "thinking" for p in self.pieces):
            return None if self.tool_calls and not self.text.strip() else self.text
        chunks = []
        for p in self.pieces:
            if p[0] == "thinking":
                chunks.append(thinking_chunk(p[1], p[2]))
            elif p[1] and not (self.tool_calls and not p[1].strip()):  # as tokenizer.parse_assistant words it
                chunks.append({"type": "text", "text": p[1]})
        return chunks


@dataclass(frozen=True)
class _Delta:
    """A piece of the reply as it is released: answer text (with the logprob entries of its tokens) or thinking."""

    kind: str  # "text" | "thinking"
    text: str
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    closed: bool = False  # thinking: [/THINK] came


def _think_ids(tokenizer: Any) -> tuple[int | None, int | None]:
    if tokenizer.has_special("[THINK]") and tokenizer.has_special("[/THINK]"):
        return tokenizer.special_id("[THINK]"), tokenizer.special_id("[/THINK]")
    return None, None


def _usage(n_prompt: int, *outs: _Outcome) -> dict[str, int]:
    m = sum(out.completion_tokens for out in outs)  # the prompt is read once, whatever the number of choices
    return {"prompt_tokens": n_prompt, "completion_tokens": m, "total_tokens": n_prompt + m}


def _delta_content(d: _Delta) -> str | list[dict[str, Any]]:
    """A streamed delta's content: the answer's text as a string, thinking as a one-chunk list."""
    if d.kind == "text":
        return d.text
    return [{"type": "thinking", "thinking": [{"type": "text", "text": d.text}] if d.text else [],
             "closed": d.closed}]


def generation_kwargs(tokenizer: Any, job: Prepared, index: int = 0) -> dict[str, Any]:
    """The keyword arguments of ``generation.generate_stream`` (and of ``scheduler.Job``) that run `job`: its
    sampling parameters, EOS handling, logprobs and constraints (tool_choice, structured outputs, tool-call
    grammars, min_tokens) as logits processors.  index: the choice (choice i samples with seed + i, so the n
    choices of a seeded request differ and are reproducible)."""
    req = job.request
    processors = []
    if job.force_tool_call:
        processors.append(_only_first(job.tool_calls_id))
    if job.forbid_tool_call:
        processors.append(_never(job.tool_calls_id))
    if req.grammar is not None:
        processors.append(GrammarLogitsProcessor(tokenizer, req.grammar))
    if job.tool_grammar is not None:
        grammar = job.tool_grammar
        processors.append(AfterToken(job.tool_calls_id, lambda: GrammarLogitsProcessor(tokenizer, grammar)))
    if job.min_tokens:
        processors.append(_no_stop_before(job.min_tokens, tokenizer.eos_id))
    s = req.sampling
    seed = s.seed + index if s.seed is not None else None
    return dict(temperature=s.temperature, top_p=s.top_p, presence_penalty=s.presence_penalty,
                frequency_penalty=s.frequency_penalty, seed=seed, ignore_eos=req.ignore_eos,
                logprobs=req.logprobs, top_logprobs=req.top_logprobs, logits_processors=processors)


class ChatReply:
    """One reply, built event by event from generation's StreamEvents (the push form the server's scheduler feeds;
    :func:`run` feeds it from ``generate_stream``).

    ``push(event)`` takes the next event and returns what can be sent now: with ``stream`` the
    ``chat.completion.chunk`` dicts (the first call also gives the opening role chunk), else nothing.  ``done``
    turns True once the reply needs no more tokens (the closing event arrived, or a stop string matched: stop
    generating then).  ``finish()`` returns the rest: with ``stream`` the tool-call chunk (if any) and the last chunk
    with finish_reason and usage, else ``[the chat.completion dict]``.  ``usage`` is available after finish().

    Stop strings are matched on the answer's text (never inside a tool call or a thought); text is released as soon
    as no stop string can claim it.  Inside ``[THINK]…[/THINK]`` text is thinking: no stop strings, no logprobs, no
    tool calls.  Text decoded after ``[TOOL_CALLS]`` is parsed as tool calls at the end, and shown as content only
    if it does not parse.
    """

    def __init__(self, tokenizer: Any, job: Prepared, cid: str | None = None, created: int | None = None,
                 index: int = 0, last: bool = True):
        self.tokenizer, self.job = tokenizer, job
        self.id = cid or uuid.uuid4().hex
        self.created = int(time.time()) if created is None else created
        self.index, self.last = index, last  # the choice; last: its final chunk carries the usage (n choices)
        self.out = _Outcome()
        self.done = False
        # a structured reply ends where its grammar does (only EOS may follow the document): stop strings would
        # only ever cut it, so they do not apply to it
        self._stop = StopStrings([] if job.request.grammar is not None else job.request.stop)
        self._think_open, self._think_close = _think_ids(tokenizer)
        self._ids: list[int] = []
        self._in_tool_call = self._in_think = False
        self._tail = ""  # text decoded after [TOOL_CALLS]
        self._pending_lp: list[dict[str, Any]] = []
        self._opened = False
        self._filtered = False
        self._held = ""  # answer text waiting for the moderation window to fill

    # ---- events -> deltas (answer text with its logprob entries, or thinking) ----
    def _think(self, text: str, closed: bool = False) -> _Delta:
        self.out.add("thinking", text, closed)
        return _Delta("thinking", text, closed=closed)

    def _answer(self, text: str, final: bool = False) -> _Delta | None:
        """The answer's next text, or None when the moderation stage flags the answer with it (then that text is
        withheld, generation stops and finish_reason is "content_filter") or holds it: with a moderation window,
        text is held until ``moderation_window`` characters wait (or `final`: the answer ends or pauses for a
        thought or a tool call), then checked and released at once."""
        moderation = self.job.moderation
        if moderation is not None:
            self._held += text
            if not final and len(self._held) < self.job.moderation_window:
                return None
            text, self._held = self._held, ""
            if text and moderation(self.out.text + text):
                self.out.finish_reason, self.out.tool_calls, self.done = "content_filter", [], True
                self._filtered = True
                return None
        self.out.add("text", text)
        delta, self._pending_lp = _Delta("text", text, self._pending_lp), []
        return delta

    def _content(self, ev: Any) -> list[_Delta]:
        out, req = self.out, self.job.request
        if self.done:
            return []
        if ev.token_id is None:  # the closing event
            self.done = True
            out.finish_reason = ev.finish_reason
            if isinstance(ev.stop_reason, int):
                out.completion_tokens += 1  # the stop token (EOS) was generated too
            if self._in_tool_call:
                self._tail += ev.text
                return []
            if self._in_think:
                return [self._think(ev.text)] if ev.text else []
            text, matched = self._stop.push(ev.text)
            if matched is None:
                text += self._stop.flush()
            else:
                out.finish_reason = "stop"
            return [self._answer(text, final=True)] if text or self._pending_lp or self._held else []
        self._ids.append(ev.token_id)
        out.completion_tokens += 1
        if self._in_think:  # ev.text: the thought's text (at [/THINK], its held-back bytes)
            if ev.token_id == self._think_close:
                self._in_think = False
                return [self._think(ev.text, closed=True)]
            return [self._think(ev.text)] if ev.text else []
        if ev.token_id == self.job.tool_calls_id:
            self._in_tool_call = True
            self._tail += ev.text
            return [self._answer("", final=True)] if self._held else []  # the answer before the call
        if self._in_tool_call:
            self._tail += ev.text
            return []
        if ev.token_id == self._think_open:  # the answer so far is released whole: stops do not span thoughts
            text, matched = self._stop.push(ev.text)
            if matched is None:
                text += self._stop.flush()
            deltas = [self._answer(text, final=True)] if text or self._pending_lp or self._held else []
            if matched is not None:
                out.finish_reason = "stop"
                self.done = True
                return deltas
            self._in_think = True
            return deltas + [self._think("")]
        if req.logprobs:
            self._pending_lp.append(_logprob_entry(self.tokenizer, ev))
        text, matched = self._stop.push(ev.text)
        deltas = [self._answer(text, final=matched is not None)] if text or matched is not None else []
        if matched is not None:
            out.finish_reason = "stop"
            self.done = True
        return deltas

    def _tool_calls(self) -> list[_Delta]:
        """After the last event: parse the tool calls; malformed tool-call syntax is content after all."""
        out, req = self.out, self.job.request
        if not self._in_tool_call:
            return []
        rng = random.Random(req.seed) if req.seed is not None else None
        parsed = self.tokenizer.parse_assistant(self._ids, rng=rng)
        if parsed["tool_calls"]:
            out.tool_calls = parsed["tool_calls"] if req.parallel_tool_calls else parsed["tool_calls"][:1]
            out.finish_reason = "tool_calls"
        elif self._tail:
            return [self._answer(self._tail, final=True)]
        return []

    # ---- deltas -> the response ----
    def _chunk(self, delta: dict[str, Any], finish: str | None = None,
               lps: list | None = None) -> dict[str, Any]:
        want_lp = self.job.request.logprobs
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.job.model_name,
                "choices": [{"index": self.index, "delta": delta, "finish_reason": finish,
                             "logprobs": {"content": lps} if want_lp and lps is not None else None}]}

    def _emit(self, deltas: list[_Delta]) -> list[dict[str, Any]]:
        if not self.job.request.stream:
            for d in deltas:
                self.out.logprobs.extend(d.logprobs)
            return []
        chunks = [] if self._opened else [self._chunk({"role": "assistant", "content": ""})]
        self._opened = True
        return chunks + [self._chunk({"content": _delta_content(d)}, lps=d.logprobs if d.kind == "text" else None)
                         for d in deltas]

    def start(self) -> list[dict[str, Any]]:
        """What can be sent before any token: the opening role chunk when streaming."""
        return self._emit([])

    def push(self, ev: Any) -> list[dict[str, Any]]:
        if self._filtered:
            return []
        deltas = [d for d in self._content(ev) if d is not None]
        if self._filtered:
            self.out.finish_reason = "content_filter"
        return self._emit(deltas)

    @property
    def usage(self) -> dict[str, int]:
        return _usage(len(self.job.prompt_ids), self.out)

    def finish(self) -> list[dict[str, Any]]:
        out = self.out
        tail = [] if self._filtered else self._emit([d for d in self._tool_calls() if d is not None])
        if self._filtered:
            out.finish_reason, out.tool_calls = "content_filter", []
        if self.job.request.stream:
            if out.tool_calls:
                tail.append(self._chunk({"tool_calls": [dict(call, index=i) for i, call in enumerate(out.tool_calls)]}))
            last = self._chunk({}, out.finish_reason)
            if self.last:
                last["usage"] = self.usage
            return tail + [last]
        return [{
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.job.model_name,
            "choices": [{
                "index": self.index,
                "message": {"role": "assistant", "content": out.content(), "tool_calls": out.tool_calls or None},
                "finish_reason": out.finish_reason,
                "logprobs": {"content": out.logprobs} if self.job.request.logprobs else None,
            }],
            "usage": self.usage,
        }]


def _replies(model: Any, tokenizer: Any, job: Prepared, reply: ChatReply) -> Iterator[dict[str, Any]]:
    """Run generation for `reply`: yield what it releases, event by event, then its last parts."""
    yield from reply.start()
    kwargs = generation_kwargs(tokenizer, job, reply.index)
    stream = generate_stream(model, tokenizer, job.prompt_ids, job.max_tokens, **kwargs)
    try:
        for ev in stream:
            yield from reply.push(ev)
            if reply.done:
                break
    finally:
        stream.close()
    yield from reply.finish()


def _choices(model: Any, tokenizer: Any, job: Prepared) -> Iterator[dict[str, Any]]:
    """The n choices one after the other (choice i with seed + i), streamed: each chunk names its choice; the
    very last chunk carries the usage of them all (the prompt counted once)."""
    cid, created, n = uuid.uuid4().hex, int(time.time()), job.request.n
    replies = [ChatReply(tokenizer, job, cid, created, index=i, last=i == n - 1) for i in range(n)]
    for reply in replies:
        for chunk in _replies(model, tokenizer, job, reply):
            if "usage" in chunk:
                chunk["usage"] = _usage(len(job.prompt_ids), *(r.out for r in replies))
            yield chunk


def prompt_text(messages: Sequence[Any]) -> str:
    """The text of a conversation for a moderation stage: every string content and text chunk, one per line."""
    parts = []
    for m in messages:
        content = m.get("content") if isinstance(m, Mapping) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [c["text"] for c in content if isinstance(c, Mapping) and isinstance(c.get("text"), str)]
    return "\n".join(parts)


def check_prompt(messages: Sequence[Any], moderation: Moderation | None) -> None:
    """ContentFilterError (field "messages") when `moderation` flags the conversation's text."""
    if moderation is not None and moderation(prompt_text(messages)):
        raise ContentFilterError("messages", "the prompt was filtered by the moderation stage (content_filter)")


def run(model: Any, tokenizer: Any, job: Prepared) -> dict[str, Any] | Iterator[dict[str, Any]]:
    """Generate for a prepared request: a chat.completion dict, or (job.request.stream) an iterator of chunks.
    With n > 1 the choices are generated one after the other (choice i with seed + i)."""
    if job.request.stream:
        return _choices(model, tokenizer, job)
    cid, created = uuid.uuid4().hex, int(time.time())
    replies = [ChatReply(tokenizer, job, cid, created, index=i) for i in range(job.request.n)]
    responses = [list(_replies(model, tokenizer, job, reply))[-1] for reply in replies]
    response = responses[0]
    response["choices"] = [r["choices"][0] for r in responses]
    response["usage"] = _usage(len(job.prompt_ids), *(reply.out for reply in replies))
    return response


def chat_completion(model: Any, tokenizer: Any, messages: Sequence[Mapping[str, Any]], *,
                    model_name: str = "mistral-ref", max_context: int | None = None,
                    reasoning_prompt: str | None = None, moderation: Moderation | None = None,
                    **params: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
    """A chat completion shaped exactly like the Mistral API's response (see the module docstring).

    model: a mistral_ref Transformer; tokenizer: its mistral_ref Tokenizer (the chat template comes from its
    version); messages: [{"role": "system" | "user" | "assistant" | "tool", "content": ...}, ...] (content: a
    string or a list of text / thinking chunks).
    params: the API's parameters — temperature (default 0.7), top_p, max_tokens (or max_completion_tokens), stop
    (str or list), presence_penalty, frequency_penalty, seed / random_seed, response_format ({"type": "text" |
    "json_object" | "json_schema", ...}), tools (``"strict": true`` functions get constrained arguments),
    tool_choice ("auto" | "none" | "any" | "required" | a named function), parallel_tool_calls, safe_prompt,
    n (choices, 1 to 16), stream, reasoning_effort ("none" ... "max", v15 models), prompt_mode ("reasoning"),
    metadata and prediction (accepted, ignored), and the extras ignore_eos, logprobs, top_logprobs.  An
    assistant message last with ``"prefix": true`` is continued.
    model_name: the "model" reported in the response (a request's ``model`` parameter wins);
    max_context: context length in tokens (default and cap: the model's ``args.max_seq_len``, if it declares one).
    reasoning_prompt: the system prompt ``prompt_mode="reasoning"`` uses (default: the SYSTEM_PROMPT.txt next to
    the tokenizer file).
    moderation: a content-safety stage, ``moderation(text) -> bool`` (True: filter).  It sees the prompt's text
    first (flagged: ContentFilterError, ``.code == "content_filter"``), then the answer so far each time text is
    about to be released (flagged: that text is withheld, generation stops, finish_reason "content_filter",
    streaming too).  Thinking and tool-call arguments are not checked.

    returns: a "chat.completion" dict, or with stream=True an iterator of "chat.completion.chunk" dicts
    (finish_reason null until the last chunk, which also carries usage).  The request is validated and encoded
    before this returns, so a bad request raises RequestError (a ValueError naming the field) right away.
    """
    if isinstance(messages, tuple):
        messages = list(messages)
    request = parse_request({"messages": messages, **params})
    check_prompt(request.messages, moderation)
    job = prepare(tokenizer, request, context_length(model, max_context), model_name, reasoning_prompt)
    job.moderation = moderation
    return run(model, tokenizer, job)


# ---- fill in the middle ------------------------------------------------------------------------------------
@dataclass
class FimRequest:
    """A validated fill-in-the-middle request (field names and defaults of request_spec.FIM_REQUEST)."""

    prompt: str
    suffix: str | None = None
    model: str | None = None
    temperature: float = FIM_FIELDS["temperature"].default
    top_p: float = FIM_FIELDS["top_p"].default
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = FIM_FIELDS["stream"].default

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, seed=self.seed)


def parse_fim_request(body: Mapping[str, Any]) -> FimRequest:
    """Validate a request body (the JSON object of POST /v1/fim/completions) into a FimRequest; RequestError
    naming the field otherwise (types, ranges and names of request_spec.FIM_REQUEST)."""
    body = _present(body, FIM_FIELDS, "prompt", "the text before the gap")
    values = _scalars(body, FIM_REQUEST, FIM_FIELDS)
    stop = _stop(values.pop("stop")) if "stop" in values else []
    req = FimRequest(stop=stop, **values)
    if req.max_tokens is not None and req.min_tokens > req.max_tokens:
        raise RequestError("min_tokens", f"{req.min_tokens} is more than max_tokens={req.max_tokens}")
    return req


def _no_stop_before(min_tokens: int, stop_id: int):
    """A logits processor: `stop_id` (EOS) cannot be generated before `min_tokens` tokens."""
    def proc(generated: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if generated.shape[1] < min_tokens:
            logits[:, stop_id] = float("-inf")
        return logits
    return proc


def prepare_fim(tokenizer: Any, req: FimRequest, max_context: int | None = None,
                model_name: str = "mistral-ref") -> Prepared:
    """A fill-in-the-middle request ready to run (what the server schedules): its prompt ids
    (``tokenizer.encode_fim``), token budget, min_tokens and stop strings, as a Prepared job whose output text
    continues the prompt's."""
    try:
        ids = tokenizer.encode_fim(req.prompt, req.suffix)
    except ChatTemplateError as e:
        raise RequestError("prompt", str(e)) from None
    max_tokens = _token_budget(len(ids), req.max_tokens, max_context, "prompt")
    if req.min_tokens > max_tokens:
        raise RequestError("min_tokens", f"{req.min_tokens} is more than the {max_tokens} tokens the context "
                           "leaves after the prompt")
    request = ChatRequest(messages=[], model=req.model, temperature=req.temperature, top_p=req.top_p,
                          max_tokens=req.max_tokens, stop=req.stop, seed=req.seed, stream=req.stream)
    return Prepared(request, ids, max_tokens, req.model or model_name, None, False, False,
                    min_tokens=req.min_tokens, continue_text=True)


def fim_completion(model: Any, tokenizer: Any, prompt: str, suffix: str | None = None, *,
                   model_name: str = "mistral-ref", max_context: int | None = None,
                   **params: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
    """A fill-in-the-middle completion shaped like the Mistral API's (POST /v1/fim/completions).

    prompt: the text before the gap; suffix: the text after it (None: the model continues the prompt).
    params: max_tokens, min_tokens (EOS is not generated before that many tokens), stop (str or list),
    temperature (default 0.7), top_p, seed / random_seed, stream, model.
    Other arguments as in :func:`chat_completion`.

    returns: ``{"id", "object": "chat.completion", "created", "model", "choices": [{"index": 0, "message":
    {"role": "assistant", "content": middle, "tool_calls": None}, "finish_reason": "stop" | "length"}],
    "usage"}``, or with stream=True an iterator of "chat.completion.chunk" dicts whose deltas carry the middle.
    A bad request raises RequestError naming the field before anything is generated.
    """
    req = parse_fim_request({"prompt": prompt, "suffix": suffix, **params})
    job = prepare_fim(tokenizer, req, context_length(model, max_context), model_name)
    ids, max_tokens, s = job.prompt_ids, job.max_tokens, req.sampling
    events = generate_stream(  # validated here, before the first event
        model, tokenizer, ids, max_tokens, stop=req.stop, temperature=s.temperature, top_p=s.top_p, seed=s.seed,
        logits_processors=[_no_stop_before(req.min_tokens, tokenizer.eos_id)] if req.min_tokens else (),
        continue_prompt_text=True)
    cid, created, name = uuid.uuid4().hex, int(time.time()), req.model or model_name
    if req.stream:
        return _fim_chunks(events, len(ids), cid, created, name)
    out = _Outcome()
    for _ in _fim_text(events, out):
        pass
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text, "tool_calls": None},
                     "finish_reason": out.finish_reason}],
        "usage": _usage(len(ids), out),
    }


def _fim_text(events: Iterator[Any], out: _Outcome) -> Iterator[str]:
    """The middle's text deltas (stop strings already applied by generate_stream), counting into `out`."""
    try:
        for ev in events:
            if ev.token_id is not None:
                out.completion_tokens += 1
            else:
                out.finish_reason = ev.finish_reason
                out.completion_tokens += isinstance(ev.stop_reason, int)  # the EOS counts too
            if ev.text:
                out.add("text", ev.text)
                yield ev.text
    finally:
        events.close()


def _fim_chunks(events: Iterator[Any], n_prompt: int, cid: str, created: int,
                name: str) -> Iterator[dict[str, Any]]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    out = _Outcome()
    yield chunk({"role": "assistant", "content": ""})
    for text in _fim_text(events, out):
        yield chunk({"content": text})
    last = chunk({}, out.finish_reason)
    last["usage"] = _usage(n_prompt, out)
    yield last
