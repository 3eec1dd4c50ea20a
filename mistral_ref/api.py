"""Chat completions as the Mistral API defines them, on a local model.

    chat_completion(model, tokenizer, messages, temperature=0, max_tokens=64)
        -> {"id", "object": "chat.completion", "created", "model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content", "tool_calls"},
                         "finish_reason": "stop" | "length" | "tool_calls", "logprobs"}],
            "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}

A request goes through three steps:

1. :func:`parse_request` validates the parameters into a :class:`ChatRequest`, with the types, ranges, defaults
   and names declared in request_spec.REQUEST (the table the sampler and the OpenAPI schema use too); every
   problem is a :class:`RequestError` whose ``field`` names the offending parameter.
2. :func:`prepare` encodes the conversation with the tokenizer's chat template (tools included), checks it fits
   the context, and decides the constraints: ``tool_choice="any"`` forces the first token to be
   ``[TOOL_CALLS]``, ``"none"`` forbids it, ``response_format={"type": "json_object"}`` adds the JSON grammar
   (json_mode.py).
3. :func:`run` generates with ``generation.generate_stream`` — the one sampling path — and turns its events into
   a response, or into ``chat.completion.chunk`` dicts when streaming, through :class:`ChatReply` (the push
   form, which the server feeds from its scheduler).  Stop strings are matched there on the content text (never
   inside a tool call); text is released as soon as no stop string can claim it.

Counting: ``prompt_tokens`` is the length of the encoded prompt; ``completion_tokens`` counts every token the
model produced, the EOS that ended generation included.  ``logprobs`` (an extra parameter) are the raw model's
log-probabilities of the content tokens, in the OpenAI format ``{"content": [{"token", "logprob", "bytes",
"top_logprobs"}]}``.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mistral_ref.generation import StopStrings, generate_stream
from mistral_ref.json_mode import JsonLogitsProcessor, advance, initial_state
from mistral_ref.request_spec import FIELDS, REQUEST, FieldError, check, type_name
from mistral_ref.sampling import SamplingParams
from mistral_ref.tokenizer import ChatTemplateError

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


# ---- 1. the request ----------------------------------------------------------------------------------------
@dataclass
class ChatRequest:
    """A validated chat-completions request (field names and defaults of request_spec.REQUEST).

    tool_choice is normalised to "auto" | "none" | "any" ("required" is "any"; a named function is "any" with
    ``tools`` narrowed to it).  seed is ``seed`` or ``random_seed``.  json_mode: response_format json_object.
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
    json_mode: bool = False
    tools: list[Any] | None = None
    tool_choice: str = FIELDS["tool_choice"].default
    parallel_tool_calls: bool = FIELDS["parallel_tool_calls"].default
    safe_prompt: bool = FIELDS["safe_prompt"].default
    stream: bool = FIELDS["stream"].default
    ignore_eos: bool = FIELDS["ignore_eos"].default
    logprobs: bool = FIELDS["logprobs"].default
    top_logprobs: int = FIELDS["top_logprobs"].default

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.presence_penalty, self.frequency_penalty,
                              self.seed)


def _stop(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("stop",
                           f"must be a non-empty string or a list of non-empty strings, got {value!r}")
    return stops


def _response_format(value: Any) -> bool:
    if not isinstance(value, Mapping) or value.get("type") not in ("text", "json_object"):
        kind = value.get("type") if isinstance(value, Mapping) else None
        extra = " (json_schema is not supported)" if kind == "json_schema" else ""
        raise RequestError("response_format",
                           f"must be {{'type': 'text'}} or {{'type': 'json_object'}}{extra}, got {value!r}")
    return value["type"] == "json_object"


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


def parse_request(body: Mapping[str, Any]) -> ChatRequest:
    """Validate a request body (the JSON object of POST /v1/chat/completions) into a ChatRequest.

    The fields, their types, ranges and defaults are request_spec.REQUEST's; ``null`` means "the default" for
    every optional field.  Raises RequestError naming the field for a missing or mistyped field, a value out
    of range, an unknown field, or an unsupported option (n > 1, json_schema).
    """
    if not isinstance(body, Mapping):
        raise RequestError("body", f"must be a JSON object, got {type_name(body)}")
    body = {k: v for k, v in body.items() if v is not None}
    for name in body:
        if name not in FIELDS:
            raise RequestError(name, "unknown parameter")
    if "messages" not in body:
        raise RequestError("messages", "is required (a list of {'role': ..., 'content': ...})")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages", f"must be a non-empty list of messages, got {type_name(messages)}")
    try:  # the scalar fields' types and ranges, in the spec's order
        values = {f.name: check(f.name, body[f.name]) for f in REQUEST if f.name in body}
    except FieldError as e:
        raise RequestError(e.field, e.problem) from None
    for f in REQUEST:  # an alias (random_seed) stands for its field (seed); both may be given if they agree
        if f.alias_of is not None and f.name in values:
            value = values.pop(f.name)
            if values.setdefault(f.alias_of, value) != value:
                raise RequestError(f.name, f"{f.alias_of}={values[f.alias_of]} and {f.name}={value} disagree")

    # the structured fields; n and user have nothing left to do (n is 1, user is ignored)
    del values["messages"]
    values.pop("n", None)
    values.pop("user", None)
    stop = _stop(values.pop("stop")) if "stop" in values else []
    json_mode = _response_format(values.pop("response_format")) if "response_format" in values else False
    tools = _tools(values.pop("tools")) if "tools" in values else None
    tool_choice, tools = _tool_choice(values.pop("tool_choice", FIELDS["tool_choice"].default), tools)
    if "stream_options" in values:
        _stream_options(values.pop("stream_options"))
    req = ChatRequest(messages, stop=stop, json_mode=json_mode, tools=tools, tool_choice=tool_choice, **values)

    # rules across fields
    if req.top_logprobs and not req.logprobs:
        raise RequestError("top_logprobs", "needs logprobs=true")
    if req.json_mode and req.tool_choice == "any":
        raise RequestError("response_format", "json_object cannot be combined with tool_choice 'any' / "
                           "'required': the reply must then be a tool call, not JSON content")
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


def prepare(tokenizer: Any, request: ChatRequest, max_context: int | None = None,
            model_name: str = "mistral-ref") -> Prepared:
    """Encode `request` with the chat template and size its token budget.

    max_context: the model's context length in tokens (prompt + completion); None = no limit known.  A prompt
    that does not fit, or max_tokens beyond what is left, is a RequestError naming messages / max_tokens.
    """
    req = request
    tools = req.tools if req.tool_choice != "none" else None
    try:
        prompt = tokenizer.encode_chat(req.messages, tools=tools, safe_prompt=req.safe_prompt,
                                       continue_final_message=_ends_with_prefix(req.messages))
    except ChatTemplateError as e:
        raise RequestError("tools" if str(e).startswith("tools") else "messages", str(e)) from None
    n = len(prompt)
    if max_context is not None and n >= max_context:
        raise ContextLengthError("messages", f"the prompt is {n} tokens long; the model's context is "
                                 f"{max_context} tokens, which leaves no room for a completion: shorten the "
                                 "conversation")
    if req.max_tokens is None:
        max_tokens = max_context - n if max_context is not None else DEFAULT_MAX_TOKENS
    else:
        max_tokens = req.max_tokens
        if max_context is not None and n + max_tokens > max_context:
            raise ContextLengthError("max_tokens", f"{max_tokens} tokens after a prompt of {n} tokens exceed "
                                     f"the model's context of {max_context} tokens (at most "
                                     f"{max_context - n} fit)")
    marker = tokenizer.special_id("[TOOL_CALLS]") if tokenizer.has_special("[TOOL_CALLS]") else None
    if req.tool_choice == "any" and marker is None:
        raise RequestError("tool_choice", f"this tokenizer ({tokenizer.version}) has no tool calling")
    return Prepared(req, prompt, max_tokens, req.model or model_name, marker,
                    force_tool_call=req.tool_choice == "any",
                    # no tools offered (or tool_choice "none"): a call could only name a function that doesn't exist
                    forbid_tool_call=marker is not None and (req.tool_choice == "none" or not req.tools))


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
class _ContentStop:
    """Stop strings on the content text (generate.StopStrings).  In JSON mode a stop string counts only once
    the JSON document is complete, so it can never cut the document: text up to the completion is released as
    is, and only what follows it goes through the matcher."""

    def __init__(self, stop: list[str], json_mode: bool):
        self.matcher = StopStrings(stop)
        self.json_state = initial_state() if json_mode and stop else None

    def push(self, delta: str) -> tuple[str, str | None]:
        head = ""
        if self.json_state is not None:
            for k, ch in enumerate(delta):
                state = advance(self.json_state, ch.encode("utf-8"))
                if state is None:  # cannot happen under the grammar; keep the text, never match
                    return delta, None
                self.json_state = state
                if state.complete:
                    head, delta = delta[: k + 1], delta[k + 1:]
                    self.json_state = None
                    break
            else:
                return delta, None
        text, matched = self.matcher.push(delta)
        return head + text, matched

    def flush(self) -> str:
        return self.matcher.flush()


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
    """What the reply accumulated; filled in as the events come."""

    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str = "length"
    completion_tokens: int = 0
    logprobs: list[dict[str, Any]] = field(default_factory=list)


def generation_kwargs(tokenizer: Any, job: Prepared) -> dict[str, Any]:
    """The keyword arguments of ``generation.generate_stream`` (and of ``scheduler.Job``) that run `job`: its
    sampling parameters, EOS handling, logprobs and constraints (tool_choice, JSON mode) as logits processors."""
    req = job.request
    processors = []
    if job.force_tool_call:
        processors.append(_only_first(job.tool_calls_id))
    if job.forbid_tool_call:
        processors.append(_never(job.tool_calls_id))
    if req.json_mode:
        processors.append(JsonLogitsProcessor(tokenizer, greedy=req.sampling.greedy))
    s = req.sampling
    return dict(temperature=s.temperature, top_p=s.top_p, presence_penalty=s.presence_penalty,
                frequency_penalty=s.frequency_penalty, seed=s.seed, ignore_eos=req.ignore_eos,
                logprobs=req.logprobs, top_logprobs=req.top_logprobs, logits_processors=processors)


class ChatReply:
    """One reply, built event by event from generation's StreamEvents (the push form of :func:`run`).

    ``push(event)`` takes the next event of ``generate_stream`` (or of the server's scheduler, through
    ``generation.TextEvents``) and returns what can be sent now: with ``stream`` the ``chat.completion.chunk``
    dicts (the first call also gives the opening role chunk), else nothing.  ``done`` turns True once the reply
    needs no more tokens (the closing event arrived, or a stop string matched: stop generating then).
    ``finish()`` returns the rest: with ``stream`` the tool-call chunk (if any) and the last chunk with
    finish_reason and usage, else ``[the chat.completion dict]``.  ``usage`` is available after finish().

    Stop strings are matched here on the content text (never inside a tool call); text is released as soon as
    no stop string can claim it.  Text decoded after ``[TOOL_CALLS]`` is parsed as tool calls at the end, and
    shown as content only if it does not parse.
    """

    def __init__(self, tokenizer: Any, job: Prepared, cid: str | None = None, created: int | None = None):
        self.tokenizer, self.job = tokenizer, job
        self.id = cid or uuid.uuid4().hex
        self.created = int(time.time()) if created is None else created
        self.out = _Outcome()
        self.done = False
        self._stop = _ContentStop(job.request.stop, job.request.json_mode)
        self._ids: list[int] = []
        self._in_tool_call = False
        self._tail = ""  # text decoded after [TOOL_CALLS]
        self._pending_lp: list[dict[str, Any]] = []
        self._opened = False

    # ---- events -> content deltas (text, logprob entries) ----
    def _content(self, ev: Any) -> list[tuple[str, list[dict[str, Any]]]]:
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
            text, matched = self._stop.push(ev.text)
            if matched is None:
                text += self._stop.flush()
            else:
                out.finish_reason = "stop"
            if text or self._pending_lp:
                out.content += text
                return [(text, self._pending_lp)]
            return []
        self._ids.append(ev.token_id)
        out.completion_tokens += 1
        if ev.token_id == self.job.tool_calls_id:
            self._in_tool_call = True
        if self._in_tool_call:
            self._tail += ev.text
            return []
        if req.logprobs:
            self._pending_lp.append(_logprob_entry(self.tokenizer, ev))
        text, matched = self._stop.push(ev.text)
        deltas = []
        if text or matched is not None:
            out.content += text
            deltas.append((text, self._pending_lp))
            self._pending_lp = []
        if matched is not None:
            out.finish_reason = "stop"
            self.done = True
        return deltas

    def _tool_calls(self) -> list[tuple[str, list[dict[str, Any]]]]:
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
            out.content += self._tail
            return [(self._tail, [])]
        return []

    # ---- content deltas -> the response ----
    def _chunk(self, delta: dict[str, Any], finish: str | None = None,
               lps: list | None = None) -> dict[str, Any]:
        want_lp = self.job.request.logprobs
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.job.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                             "logprobs": {"content": lps} if want_lp and lps is not None else None}]}

    def _emit(self, deltas: list[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
        if not self.job.request.stream:
            for _, lps in deltas:
                self.out.logprobs.extend(lps)
            return []
        chunks = [] if self._opened else [self._chunk({"role": "assistant", "content": ""})]
        self._opened = True
        return chunks + [self._chunk({"content": text}, lps=lps) for text, lps in deltas]

    def start(self) -> list[dict[str, Any]]:
        """What can be sent before any token: the opening role chunk when streaming."""
        return self._emit([])

    def push(self, ev: Any) -> list[dict[str, Any]]:
        return self._emit(self._content(ev))

    @property
    def usage(self) -> dict[str, int]:
        n, m = len(self.job.prompt_ids), self.out.completion_tokens
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}

    def finish(self) -> list[dict[str, Any]]:
        out = self.out
        tail = self._emit(self._tool_calls())
        if self.job.request.stream:
            if out.tool_calls:
                tail.append(self._chunk({"tool_calls": [dict(call, index=i) for i, call in enumerate(out.tool_calls)]}))
            last = self._chunk({}, out.finish_reason)
            last["usage"] = self.usage
            return tail + [last]
        content: str | None = out.content
        if out.tool_calls and not content.strip():
            content = None
        return [{
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.job.model_name,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "tool_calls": out.tool_calls or None},
                "finish_reason": out.finish_reason,
                "logprobs": {"content": out.logprobs} if self.job.request.logprobs else None,
            }],
            "usage": self.usage,
        }]


def _replies(model: Any, tokenizer: Any, job: Prepared, reply: ChatReply) -> Iterator[dict[str, Any]]:
    """Run generation for `reply`: yield what it releases, event by event, then its last parts."""
    yield from reply.start()
    stream = generate_stream(model, tokenizer, job.prompt_ids, job.max_tokens, **generation_kwargs(tokenizer, job))
    try:
        for ev in stream:
            yield from reply.push(ev)
            if reply.done:
                break
    finally:
        stream.close()
    yield from reply.finish()


def run(model: Any, tokenizer: Any, job: Prepared) -> dict[str, Any] | Iterator[dict[str, Any]]:
    """Generate for a prepared request: a chat.completion dict, or (job.request.stream) an iterator of chunks."""
    replies = _replies(model, tokenizer, job, ChatReply(tokenizer, job))
    if job.request.stream:
        return replies
    (response,) = replies
    return response


def chat_completion(model: Any, tokenizer: Any, messages: Sequence[Mapping[str, Any]], *,
                    model_name: str = "mistral-ref", max_context: int | None = None,
                    **params: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
    """A chat completion shaped exactly like the Mistral API's response (see the module docstring).

    model: a mistral_ref Transformer; tokenizer: its mistral_ref Tokenizer (the chat template comes from its
    version); messages: [{"role": "system" | "user" | "assistant" | "tool", "content": ...}, ...].
    params: the API's parameters — temperature (default 0.7), top_p, max_tokens, stop (str or list),
    presence_penalty, frequency_penalty, seed / random_seed, response_format ({"type": "text" |
    "json_object"}), tools, tool_choice ("auto" | "none" | "any" | "required" | a named function),
    parallel_tool_calls, safe_prompt, n (1 only), stream, and the extras ignore_eos, logprobs, top_logprobs.
    model_name: the "model" reported in the response (a request's ``model`` parameter wins);
    max_context: context length in tokens (default and cap: the model's ``args.max_seq_len``, if it declares one).

    returns: a "chat.completion" dict, or with stream=True an iterator of "chat.completion.chunk" dicts
    (finish_reason null until the last chunk, which also carries usage).  The request is validated and encoded
    before this returns, so a bad request raises RequestError (a ValueError naming the field) right away.
    """
    if isinstance(messages, tuple):
        messages = list(messages)
    request = parse_request({"messages": messages, **params})
    job = prepare(tokenizer, request, context_length(model, max_context), model_name)
    return run(model, tokenizer, job)
