"""A local HTTP endpoint for chat completions that the official clients use unchanged: Starlette on uvicorn.

    POST /v1/chat/completions   the Mistral chat API (what the `openai` and `mistralai` clients call)
    POST /chat/completions      the Azure AI model inference API (azure-ai-inference's ChatCompletionsClient)
    POST /v1/fim/completions    the Mistral fill-in-the-middle API
    POST /v1/moderations        the Mistral moderation API, over the content filter (moderation.py)
    GET  /info                  Azure's model info: {"model_name", "model_type", "model_provider_name"}
    GET  /v1/models             the served model, as the Mistral / OpenAI model list (also GET /models)
    GET  /health                {"status": "ok", ...} with the scheduler's queue and batch
    GET  /openapi.json          an OpenAPI 3.1 description of all of the above

Streaming responses are data-only server-sent events (``data: {chunk}\\n\\n`` ... ``data: [DONE]\\n\\n``).  Every
error, at every layer (the HTTP parser included), is JSON ``{"object": "error", "message", "error": {"message",
"type", "param", "code"}}`` whose message says what is wrong and whose ``param`` names the field or header at
fault: 400 malformed JSON / an over-long prompt / a refused Host header, 401 a missing or wrong API key, 404 / 405
an unknown route or method, 408 a client too slow to send its request, 413 a body over ``max_body_bytes``, 414 a
URI over ``max_uri_bytes``, 415 a body that is not application/json, 422 an unknown or mistyped field, or a field
over a limit (stop strings, tools), 431 headers over ``max_header_bytes``, 503 a full queue or too many
connections (with Retry-After), or a content filter that failed (code ``content_filter_error``).

Generation: the request is validated and encoded on a worker thread of the event loop's pool, then handed to the
scheduler (scheduler.py): continuous batching of up to ``max_batch`` requests in one KV cache on one model thread;
the event loop never runs the model.  A client that disconnects, streaming or not, has its generation stopped
at the scheduler's next step; every request has a wall-clock budget (``request_timeout``: it then ends with
finish_reason "length") and a token budget (``max_tokens_limit``, per choice).  A request for ``n`` choices is n
scheduler jobs (choice i samples with seed + i, as api.chat_completion): n may be at most ``max_batch`` (422 naming
n beyond), the n jobs are queued together or not at all and count n against ``max_queue``; streamed, each chunk
names its choice's index and the last one carries the usage of all (the prompt counted once).

Content safety (``content_filter``: "self-check", "module:function" or a callable; moderation.py): a prompt the
filter flags is answered 400 ``{"error": {"code": "content_filter", "innererror": {...}}}`` (Azure's shape) before
anything is scheduled (checked on a pool thread); a reply the filter flags stops with finish_reason
"content_filter", the flagged text withheld (checked on the model thread each time text is about to be released,
streaming too).  A filter that fails: 503 ``content_filter_error`` for the prompt; the reply fails closed
(finish_reason "content_filter").  The self-check's forward passes run under the engine's lock, between two
scheduler steps: the event loop never runs the model.

Safe by default: with an API key (``api_key``) every route wants ``Authorization: Bearer KEY`` or Azure's
``api-key: KEY`` header; binding beyond the loopback interface without a key is refused unless ``insecure``; on
loopback the Host header must name this machine (DNS rebinding); POST bodies must be application/json; no CORS
headers unless ``cors_origins`` are given.  Connections: at most ``max_connections`` at once, a request's head
must arrive within ``header_timeout`` s and its body within ``body_timeout`` s, an idle keep-alive connection is
closed after ``keep_alive_timeout`` s; these are enforced by uvicorn's options and :class:`HttpProtocol`.

The Azure route follows that API's ``extra-parameters`` header: parameters outside its standard set (e.g.
``safe_mode``, ``logprobs``, ``random_seed``, sent by the client's ``model_extras``) are an error unless the
header is ``pass-through`` (they are then passed to the model; ``safe_mode`` is Mistral's ``safe_prompt``) or
``drop``.  The request's fields, their ranges and the Azure standard set are request_spec's, like the OpenAPI
schema, and every body goes through api.parse_request: there is one spec.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import ipaddress
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import h11
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from mistral_ref.api import (
    ChatReply,
    ContextLengthError,
    Prepared,
    RequestError,
    context_length,
    generation_kwargs,
    parse_fim_request,
    parse_request,
    prepare,
    prepare_fim,
    prompt_text,
)
from mistral_ref.generation import text_events
from mistral_ref.moderation import (
    CATEGORIES,
    ContentFilter,
    ContentFilterFailed,
    Verdict,
    callable_filter,
    load_content_filter,
    self_check,
)
from mistral_ref.request_spec import (
    AZURE_ALIASES,
    AZURE_FIELDS,
    AZURE_IGNORED,
    COMPONENTS,
    fim_request_schema,
    request_schema,
)
from mistral_ref.sampling import GenerationParamError
from mistral_ref.scheduler import Job, Scheduler, SchedulerBusy, Token
from mistral_ref.server_options import API_KEY_ENV, DEFAULT_MAX_BODY_BYTES, ServerOptions

log = logging.getLogger("mistral_ref.server")
access_log = logging.getLogger("mistral_ref.server.access")



class HttpError(Exception):
    """An error response: status, message and the field or header at fault (None when no single one is); code:
    the error's code (default: the status's phrase, e.g. "unprocessable_entity"); extra: more members of the
    error object (a content-filter refusal's ``innererror``)."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None,
                 code: str | None = None, extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers or {}
        self.code, self.extra = code, extra or {}


def error_body(status: int, message: str, field: str | None = None, code: str | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON body of every error: the Mistral / OpenAI error shape."""
    code = code or HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    kind = "invalid_request_error" if status < 500 else "server_error"
    detail = {"message": message, "type": kind, "param": field, "code": code, **(extra or {})}
    return {"object": "error", "message": message, "error": detail}


def error_response(err: HttpError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.field, err.code, err.extra), err.status,
                        headers=err.headers)


def content_filter_error(verdict: Verdict | None, field: str) -> HttpError:
    """HTTP 400 ``{"error": {"code": "content_filter", ...}}``, as Azure's content safety answers a filtered
    prompt (with its ``innererror.content_filter_result``: each category's ``filtered``)."""
    result = {c: {"filtered": bool(verdict is not None and verdict.categories[c])} for c in CATEGORIES}
    return HttpError(400, "the prompt was filtered by the server's content filter (content_filter): rephrase it",
                     field, code="content_filter",
                     extra={"innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": result}})


def filter_failed_error(exc: ContentFilterFailed) -> HttpError:
    """HTTP 503 (code content_filter_error): the content filter itself failed, so nothing could be checked."""
    return HttpError(503, f"{exc}; the request was not served", "content_filter", code="content_filter_error")


# ---- the model worker ----------------------------------------------------------------------------------------
class Engine:
    """The scheduler and the one thread that runs it: all generation happens there.  ``lock`` is held for each
    step; a content filter's self-check takes it around its forward pass (between two steps, or at once on the
    model thread itself)."""

    def __init__(self, model: Any, options: ServerOptions, lock: threading.RLock | None = None):
        self.scheduler = Scheduler(model, max_batch=options.max_batch, kv_cache_bytes=options.kv_cache_bytes,
                                   prefill_tokens=options.prefill_tokens, max_waiting=options.max_queue)
        self.lock = lock or threading.RLock()
        self._stopping = False
        self.thread = threading.Thread(target=self._loop, name="mistral-ref-model-worker", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self._stopping:
            try:
                with self.lock:
                    stepped = self.scheduler.step()
                if not stepped:
                    self.scheduler.wait_for_work(0.5)
            except Exception:  # noqa: BLE001 — the scheduler fails jobs, not itself; if it did, keep serving
                log.exception("scheduler step failed")
                time.sleep(0.1)

    def stop(self) -> None:
        self._stopping = True
        self.thread.join(timeout=30)


_END = object()


class Generation:
    """One request's generation: its n choices (one scheduler job and one api.ChatReply each, choice i sampling
    with seed + i) and the asyncio queue through which their chunks reach the request's event loop: lists of
    chunk dicts, then an Exception or the end marker.  Each choice's :class:`Choice` is its job's sink (called on
    the model thread), which turns tokens into chunks there (generation.TextEvents, api.ChatReply).

    Streaming, chunks of the choices interleave, each naming its choice's index; the last chunk of the choice that
    ends last carries the usage of them all (the prompt counted once).  Not streaming, one chat.completion with
    the n choices in order is posted when the last one ends."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tokenizer: Any, replies: list[ChatReply]):
        self.loop, self.replies = loop, replies
        self.reply = replies[0]
        self.choices = [Choice(self, tokenizer, reply) for reply in replies]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.reason: str | None = None  # how the scheduler ended it (the last choice's reason)
        self.jobs: list[Job] = []
        self._finals: list[dict[str, Any] | None] = [None] * len(replies)
        self._left = len(replies)
        self._lock = threading.Lock()  # choices end on the model thread, cancellations come from anywhere

    @property
    def usage(self) -> dict[str, int]:
        """prompt_tokens (once), completion_tokens of all the choices, total_tokens."""
        u = [r.usage for r in self.replies]
        n_prompt, m = u[0]["prompt_tokens"], sum(x["completion_tokens"] for x in u)
        return {"prompt_tokens": n_prompt, "completion_tokens": m, "total_tokens": n_prompt + m}

    def cancel(self) -> None:
        """Stop every choice's job at the scheduler's next step (a no-op for those that ended)."""
        for job in self.jobs:
            job.cancel()

    def _post(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _ended(self, index: int, reason: str, chunks: list[dict[str, Any]]) -> None:
        """Choice `index` ended with these final chunks: post them (the response, once all ended)."""
        stream = self.reply.job.request.stream
        with self._lock:
            if reason != "cancelled" and not stream:
                self._finals[index] = chunks[0]
            self._left -= 1
            last = self._left == 0
        if self.reason != "cancelled":  # one cancelled choice: the client is gone
            self.reason = reason
        if reason == "cancelled":  # nobody is waiting for a cancelled reply
            chunks = []
        elif stream:
            if last:
                chunks[-1]["usage"] = self.usage
        else:
            chunks = []
            if last and self.reason != "cancelled":
                response = self._finals[0]
                response["choices"] = [f["choices"][0] for f in self._finals]
                response["usage"] = self.usage
                chunks = [response]
        if chunks:
            self._post(chunks)
        if last:
            self._post(_END)

    def _failed(self, exc: BaseException) -> None:
        self.reason = "error"
        self._post(exc)
        self.cancel()  # the other choices are not wanted any more

    async def items(self):
        """The chunks as they come; raises the generation's exception, if any."""
        while (item := await self.queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            for chunk in item:
                yield chunk


class Choice:
    """One choice of a Generation: the scheduler's sink for its job."""

    def __init__(self, gen: Generation, tokenizer: Any, reply: ChatReply):
        self.gen, self.reply = gen, reply
        job = reply.job  # (fill in the middle: the output's text continues the prompt's)
        self.text = text_events(tokenizer, prompt=job.prompt_ids if job.continue_text else None)

    def token(self, token: Token) -> bool:
        chunks = []
        for ev in self.text.push(token.id, token.stopped, token.logprob, token.top_logprobs):
            chunks += self.reply.push(ev)
        if chunks:
            self.gen._post(chunks)
        return not self.reply.done

    def end(self, reason: str) -> None:
        chunks = []
        if reason != "cancelled":
            chunks = [] if self.reply.done else self.reply.push(self.text.end())
            chunks += self.reply.finish()
        self.gen._ended(self.reply.index, reason, chunks)

    def error(self, exc: BaseException) -> None:
        self.gen._failed(exc)


async def _until_disconnect(receive: Callable[[], Awaitable[dict]], gen: Generation) -> None:
    """Cancel `gen` when the client goes away (uvicorn reports http.disconnect once the body has been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    gen.cancel()


def _generation_error(exc: BaseException) -> HttpError:
    if isinstance(exc, SchedulerBusy):
        return HttpError(503, str(exc), headers={"Retry-After": "5"})
    if isinstance(exc, GenerationParamError):  # messages start with the parameter's name
        return HttpError(400, f"generation refused the request: {exc}", str(exc).split()[0].rstrip(":"))
    return HttpError(500, f"generation failed: {type(exc).__name__}: {exc}")


class StreamResponse:
    """Server-sent events of a generation, watching for the client leaving (which cancels the job)."""

    def __init__(self, gen: Generation):
        self.gen = gen

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        watcher = asyncio.ensure_future(_until_disconnect(receive, self.gen))
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            try:
                async for chunk in self.gen.items():
                    data = f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            except Exception as e:  # noqa: BLE001 — the status line is sent: report it as an event
                err = _generation_error(e)
                error = error_body(err.status, err.message, err.field, err.code, err.extra)
                body = f"data: {json.dumps(error)}\n\n".encode()
                await send({"type": "http.response.body", "body": body, "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        finally:
            watcher.cancel()
            self.gen.cancel()  # a no-op if it ended; stops it if this response was cut short


# ---- the application -------------------------------------------------------------------------------------
class ChatApp:
    """The routes and their handlers; ``app`` is the ASGI application (Starlette, wrapped in the access log,
    the Host / URI / API-key guard and, when configured, CORS)."""

    def __init__(self, model: Any, tokenizer: Any, options: ServerOptions, engine: Engine, host: str = "127.0.0.1",
                 content_filter: ContentFilter | None = None):
        self.tokenizer, self.options, self.engine = tokenizer, options, engine
        self.max_context = context_length(model, options.max_context)
        self.created = int(time.time())
        self.model, self.content_filter = model, content_filter
        self._self_check: ContentFilter | None = None  # what /v1/moderations uses without a filter (built once)
        self.allowed_hosts = _allowed_hosts(host, options.allowed_hosts)
        # The routes.  A generation endpoint is one entry: its parser turns a body into a Prepared job and a reply
        # (see _chat, _fim); and one path in openapi_document.
        routes = [
            Route("/v1/chat/completions", self.completion(self._chat), methods=["POST"]),
            Route("/v1/fim/completions", self.completion(self._fim), methods=["POST"]),
            Route("/chat/completions", self.completion(self._azure_chat), methods=["POST"]),
            Route("/v1/moderations", self.moderations, methods=["POST"]),
            Route("/info", self.info, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
        ]
        handlers = {HttpError: _http_error, HTTPException: _http_exception, Exception: _crash}
        app = Starlette(routes=routes, exception_handlers=handlers)
        app = Guard(app, self.allowed_hosts, options)
        if options.cors_origins:
            app = CORSMiddleware(app, allow_origins=list(options.cors_origins), allow_methods=["GET", "POST"],
                                 allow_headers=["authorization", "api-key", "content-type", "extra-parameters"])
        self.app = AccessLog(app)

    # ---- GET routes ----
    async def info(self, request: Request) -> Response:
        return JSONResponse({"model_name": self.options.model_name, "model_type": "chat-completions",
                             "model_provider_name": "MistralAI"})

    async def models(self, request: Request) -> Response:
        tools = self.tokenizer.has_special("[TOOL_CALLS]")
        fim = self.tokenizer.has_special("[SUFFIX]") and self.tokenizer.has_special("[PREFIX]")
        card = {
            "id": self.options.model_name, "object": "model", "created": self.created, "owned_by": "mistral-ref",
            "max_context_length": self.max_context, "type": "base",
            "capabilities": {"completion_chat": True, "function_calling": tools, "completion_fim": fim,
                             "fine_tuning": False, "vision": False},
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self, request: Request) -> Response:
        s = self.engine.scheduler
        cache = s.cache  # read once: the model thread may release it meanwhile
        return JSONResponse({"status": "ok", "model": self.options.model_name, "running": len(s.rows),
                             "waiting": len(s.waiting), "max_batch": s.max_batch,
                             "kv_cache_bytes": cache.nbytes() if cache is not None else 0})

    async def openapi(self, request: Request) -> Response:
        o = self.options
        return JSONResponse(openapi_document(o.model_name, o.api_key is not None, o.max_moderation_inputs))

    # ---- generation routes ----
    def completion(self, parse: Callable[[Any, Any], Prepared]):
        """The endpoint of a generation route: read the body, then (on a pool thread) parse(body, headers) -> a
        prepared job (api.Prepared); check its prompt with the content filter; schedule its n choices; answer
        with their replies (api.ChatReply), streamed or whole."""

        async def endpoint(request: Request) -> Response:
            body = await self._read_body(request)
            loop = asyncio.get_running_loop()
            gen = await run_in_threadpool(self._submit, parse, body, request.headers, loop)
            request.scope["mistral_ref.generation"] = gen  # for the access log
            if gen.reply.job.request.stream:
                return StreamResponse(gen)
            watcher = asyncio.ensure_future(_until_disconnect(request.receive, gen))
            try:
                chunks = [chunk async for chunk in gen.items()]
            except Exception as e:  # noqa: BLE001 — mapped to its status
                raise _generation_error(e) from None
            finally:
                watcher.cancel()
            if gen.reason == "cancelled":
                return Response(status_code=499)  # the client is gone: nobody reads this
            (response,) = chunks
            return JSONResponse(response)

        return endpoint

    def _submit(self, parse: Callable, body: bytes, headers: Any, loop: asyncio.AbstractEventLoop) -> Generation:
        """Parse, validate, encode, check and schedule a request (on a pool thread: encoding a long prompt and
        the content filter take time)."""
        job = parse(self._json(body), headers)
        o = self.options
        if job.request.max_tokens is None:
            job = dataclasses.replace(job, max_tokens=min(job.max_tokens, o.max_tokens_limit))
        elif job.max_tokens > o.max_tokens_limit:
            raise HttpError(422, f"max_tokens: {job.max_tokens} is over this server's limit of "
                            f"{o.max_tokens_limit} tokens per request", "max_tokens")
        n = job.request.n
        if n > o.max_batch:  # the n choices decode together: one batch row each
            raise HttpError(422, f"n: {n} choices need {n} batch rows; this server decodes at most {o.max_batch} "
                            "together", "n")
        if self.content_filter is not None:
            self._check_prompt(job)
            job.moderation, job.moderation_window = self._moderate_reply, self.content_filter.window
        cid, created = uuid.uuid4().hex, int(time.time())
        replies = [ChatReply(self.tokenizer, job, cid, created, index=i, last=False) for i in range(n)]
        gen = Generation(loop, self.tokenizer, replies)
        gen.jobs = [Job(job.prompt_ids, job.max_tokens, choice, eos_id=self.tokenizer.eos_id,
                        timeout=o.request_timeout, **generation_kwargs(self.tokenizer, job, i))
                    for i, choice in enumerate(gen.choices)]
        for j in gen.jobs[1:]:
            j.prompt_of = gen.jobs[0]  # the prompt is prefilled once, its cache row copied (scheduler.py)
        for reply in replies:
            opening = reply.start()  # the role chunk of a stream, queued before any token can be
            if opening:
                gen._post(opening)
        try:
            self.engine.scheduler.submit_all(gen.jobs)
        except (SchedulerBusy, GenerationParamError) as e:
            raise _generation_error(e) from None
        return gen

    # ---- content safety ----
    def _check_prompt(self, job: Prepared) -> None:
        """The content filter on the prompt's text (a chat's messages, a FIM's prompt and suffix): 400
        content_filter if flagged, 503 if the filter failed."""
        text = prompt_text(job.request.messages) if job.request.messages else self.tokenizer.decode(job.prompt_ids)
        try:
            (verdict,) = self.content_filter.classify([text])
        except ContentFilterFailed as e:
            log.error("%s", e)
            raise filter_failed_error(e) from None
        if verdict.flagged:
            raise content_filter_error(verdict, "messages" if job.request.messages else "prompt")

    def _moderate_reply(self, text: str) -> bool:
        """The moderation stage of every reply (api.ChatReply calls it, on the model thread, before releasing
        text): flagged, or the filter failed (it fails closed: the text is withheld, finish content_filter)."""
        try:
            return self.content_filter.flags(text)
        except ContentFilterFailed as e:
            log.error("%s (the reply is stopped with finish_reason content_filter)", e)
            return True

    def _classify(self, texts: list[str]) -> list[Verdict]:
        if self.content_filter is None and self._self_check is None:
            self._self_check = self_check(self.model, self.tokenizer, self.engine.lock)
        return (self.content_filter or self._self_check).classify(texts)

    async def moderations(self, request: Request) -> Response:
        """POST /v1/moderations: ``{"model"?, "input": str | [str]}`` -> ``{"id", "model", "results":
        [{"categories", "category_scores"}]}`` (Mistral's moderation API) from the content filter (self-check
        when the server has none)."""
        body = self._json(await self._read_body(request))
        if not isinstance(body, dict):
            raise HttpError(422, f"the body must be a JSON object, got {type(body).__name__}", "body")
        unknown = [k for k in body if k not in ("model", "input")]
        if unknown:
            raise HttpError(422, f"{unknown[0]}: unknown parameter (POST /v1/moderations takes model and input)",
                            unknown[0])
        if "input" not in body:
            raise HttpError(422, "input: is required (a string or a list of strings)", "input")
        texts = body["input"]
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise HttpError(422, f"input: must be a string or a non-empty list of strings, got {body['input']!r}"[:300],
                            "input")
        limit = self.options.max_moderation_inputs
        if len(texts) > limit:
            raise HttpError(422, f"input: {len(texts)} texts; this server classifies at most {limit} per request",
                            "input")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise HttpError(422, f"model: must be a string, got {type(model).__name__}", "model")
        try:
            verdicts = await run_in_threadpool(self._classify, texts)
        except ContentFilterFailed as e:
            log.error("%s", e)
            raise filter_failed_error(e) from None
        return JSONResponse({"id": uuid.uuid4().hex, "model": model or self.options.model_name,
                             "results": [v.result() for v in verdicts]})

    def _chat(self, body: Any, headers: Any) -> Prepared:
        if not isinstance(body, dict):
            raise HttpError(422, f"the body must be a JSON object, got {type(body).__name__}", "body")
        try:
            request = parse_request(body)
            self._check_limits(request)
            return prepare(self.tokenizer, request, self.max_context, self.options.model_name)
        except RequestError as e:
            raise HttpError(400 if isinstance(e, ContextLengthError) else 422, str(e), e.field) from None

    def _fim(self, body: Any, headers: Any) -> Prepared:
        """POST /v1/fim/completions: the Mistral FIM API (request_spec.FIM_REQUEST); the reply has the chat shape."""
        if not isinstance(body, dict):
            raise HttpError(422, f"the body must be a JSON object, got {type(body).__name__}", "body")
        try:
            request = parse_fim_request(body)
            self._check_limits(request)
            return prepare_fim(self.tokenizer, request, self.max_context, self.options.model_name)
        except RequestError as e:
            raise HttpError(400 if isinstance(e, ContextLengthError) else 422, str(e), e.field) from None

    def _azure_chat(self, body: Any, headers: Any) -> Prepared:
        if not isinstance(body, dict):
            raise HttpError(422, f"the body must be a JSON object, got {type(body).__name__}", "body")
        mode = headers.get("extra-parameters", "error").strip().lower()
        if mode not in ("error", "drop", "pass-through"):
            raise HttpError(400, f"extra-parameters must be 'error', 'drop' or 'pass-through', got {mode!r}",
                            "extra-parameters")
        extras = [k for k in body if k not in AZURE_FIELDS]
        if extras and mode == "error":
            raise HttpError(400, f"extra parameters {extras} are not allowed when extra-parameters is not set or "
                            "set to 'error'; set the header extra-parameters: pass-through to pass them to the "
                            "model", extras[0])
        dropped = set(AZURE_IGNORED) | (set(extras) if mode == "drop" else set())
        return self._chat({AZURE_ALIASES.get(k, k): v for k, v in body.items() if k not in dropped}, headers)

    def _check_limits(self, request: Any) -> None:
        """The server's limits on what costs per token or per request beyond the prompt (422 naming the field)."""
        o = self.options
        if len(request.stop) > o.max_stop:
            raise HttpError(422, f"stop: {len(request.stop)} stop strings; this server accepts at most {o.max_stop}",
                            "stop")
        longest = max(map(len, request.stop), default=0)
        if longest > o.max_stop_chars:
            raise HttpError(422, f"stop: a stop string of {longest} characters; this server accepts at most "
                            f"{o.max_stop_chars}", "stop")
        if getattr(request, "tools", None):  # (a FIM request has none)
            size = len(json.dumps(request.tools, ensure_ascii=False).encode())
            if size > o.max_tools_bytes:
                raise HttpError(422, f"tools: the tool definitions are {size} bytes of JSON; this server accepts "
                                f"at most {o.max_tools_bytes}", "tools")

    # ---- the body ----
    async def _read_body(self, request: Request) -> bytes:
        o = self.options
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise HttpError(415, f"the body must be JSON sent as Content-Type: application/json, got "
                            f"{kind or 'no Content-Type'!r}", "Content-Type")
        close = {"Connection": "close"}  # the rest of the body is not read: the connection cannot be reused
        declared = request.headers.get("content-length")
        if declared is not None and int(declared) > o.max_body_bytes:  # h11 has checked it is an integer
            raise HttpError(413, f"the request body is {declared} bytes; this server accepts at most "
                            f"{o.max_body_bytes} bytes", "body", close)
        chunks: list[bytes] = []

        async def read() -> None:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > o.max_body_bytes:
                    raise HttpError(413, f"the request body is over {o.max_body_bytes} bytes, the most this server "
                                    "accepts", "body", close)
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), o.body_timeout)
        except asyncio.TimeoutError:
            raise HttpError(408, f"the request body did not arrive within {o.body_timeout:g} s", "body",
                            close) from None
        except ClientDisconnect:
            raise HttpError(400, "the client closed the connection before sending its whole body", "body") from None
        return b"".join(chunks)

    def _json(self, raw: bytes) -> Any:
        def no_constant(name: str) -> None:
            raise ValueError(f"{name} is not JSON")

        try:
            value = json.loads(raw.decode("utf-8"), parse_constant=no_constant)
        except UnicodeDecodeError as e:
            raise HttpError(400, f"the body is not UTF-8 ({e})", "body") from None
        except json.JSONDecodeError as e:
            raise HttpError(400, f"the body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                            "body") from None
        except RecursionError:
            raise HttpError(400, "the body's JSON is nested too deeply to parse", "body") from None
        except ValueError as e:  # an integer of > 4300 digits, NaN / Infinity
            raise HttpError(400, f"the body's JSON has a value this server refuses: {e}", "body") from None
        if _too_deep(value, self.options.max_json_depth):
            raise HttpError(400, f"the body's JSON is nested more than {self.options.max_json_depth} levels deep",
                            "body")
        return value


def _too_deep(value: Any, limit: int) -> bool:
    """Whether `value` nests lists / objects more than `limit` levels (iteratively: no recursion to overflow)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                return True
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    """Starlette's own 404 / 405, as JSON errors."""
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}; see GET /openapi.json"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})"
    else:
        message = str(exc.detail)
    return JSONResponse(error_body(exc.status_code, message), exc.status_code, headers=exc.headers)


async def _http_error(request: Request, exc: HttpError) -> Response:
    return error_response(exc)


async def _crash(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error in %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}: {exc}"), 500)


# ---- middleware: access log, guard ----------------------------------------------------------------------------
class AccessLog:
    """One log line per request (logger mistral_ref.server.access): method, path, status, tokens, seconds."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            gen = scope.get("mistral_ref.generation")
            tokens = "-"
            if gen is not None:
                u = gen.usage
                tokens = f"prompt={u['prompt_tokens']} completion={u['completion_tokens']} end={gen.reason}"
            access_log.info("%s %s %s %s %.3fs", scope["method"], scope["path"][:200], status[0] or "-", tokens,
                            time.perf_counter() - start)


class Guard:
    """Checks every request before routing: URI length (414), header size (431), Host header (400: DNS
    rebinding), API key (401)."""

    def __init__(self, app: Any, allowed_hosts: frozenset[str] | None, options: ServerOptions):
        self.app, self.allowed_hosts, self.options = app, allowed_hosts, options
        self.key = options.api_key.encode() if options.api_key else None

    def check(self, scope: dict) -> None:
        o = self.options
        uri = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b""))
        if uri > o.max_uri_bytes:
            raise HttpError(414, f"the URI is {uri} bytes long; this server accepts at most {o.max_uri_bytes}",
                            "uri")
        size = sum(len(k) + len(v) + 4 for k, v in scope["headers"])  # "name: value\r\n"
        if size > o.max_header_bytes:  # (h11 refuses a head it has to wait for beyond this; see HttpProtocol)
            raise HttpError(431, f"the request's headers are {size} bytes; this server accepts at most "
                            f"{o.max_header_bytes}", "headers")
        headers = dict(scope["headers"])  # lower-case names; a repeated header keeps its last value
        if self.allowed_hosts is not None:
            host = headers.get(b"host", b"").decode("latin-1")
            if _host_name(host) not in self.allowed_hosts:
                raise HttpError(400, f"Host: {host!r} does not name this server (it accepts "
                                f"{sorted(self.allowed_hosts)}); a page must not reach a local server through a "
                                "name of its own (DNS rebinding)", "Host")
        if self.key is not None:
            auth = headers.get(b"authorization", b"")
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"api-key", b"").strip()
            if not given or not hmac.compare_digest(given, self.key):
                why = "a wrong API key" if given else "no API key"
                raise HttpError(401, f"{why}: send Authorization: Bearer KEY (or the api-key header)",
                                "Authorization", {"WWW-Authenticate": "Bearer"})

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            try:
                self.check(scope)
            except HttpError as e:
                return await error_response(e)(scope, receive, send)
        await self.app(scope, receive, send)


def _host_name(host: str) -> str:
    """The name of a Host header value, without the port: 'localhost:8000' -> 'localhost', '[::1]:80' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    """Whether binding to `host` keeps the server on this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None)
        except socket.gaierror:
            return False
        return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def _allowed_hosts(host: str, allowed: tuple[str, ...] | None) -> frozenset[str] | None:
    if allowed is not None:
        return None if "*" in allowed else frozenset(_host_name(h) for h in allowed)
    if is_loopback(host):
        return frozenset({"localhost", "127.0.0.1", "::1", _host_name(host)})
    return None


# ---- the HTTP/1.1 protocol ----------------------------------------------------------------------------------
class _Connection(h11.Connection):
    """h11's connection, also refusing a request head with two Content-Length headers (h11 merges equal ones)
    and keeping the head's first bytes to tell a too-long request line (414) from too-long headers (431)."""

    def __init__(self, max_head: int, on_head: Callable[[], None]):
        super().__init__(h11.SERVER, max_incomplete_event_size=max_head)
        self.max_head, self.on_head = max_head, on_head
        self.head = b""  # bytes received while waiting for a request head
        self.refusal: h11.RemoteProtocolError | None = None

    def receive_data(self, data: bytes) -> None:
        if self.their_state is h11.IDLE and len(self.head) <= self.max_head:
            self.head += data[: self.max_head + 1 - len(self.head)]
        super().receive_data(data)

    def next_event(self) -> Any:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as e:
            self.refusal = e
            raise
        if isinstance(event, h11.Request):
            head, self.head = self.head.split(b"\r\n\r\n", 1)[0], b""
            self.on_head()
            names = [line.split(b":", 1)[0].strip().lower() for line in head.split(b"\r\n")[1:]]
            if names.count(b"content-length") > 1:
                self.refusal = h11.RemoteProtocolError("the request has more than one Content-Length header")
                raise self.refusal
        return event


class HttpProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol (h11) with this server's connection rules: at most ``max_connections`` at once
    (503 beyond), the request head within ``header_timeout`` s (408), and JSON errors for what the parser
    refuses (400, 414 URI too long, 431 headers too large, 501) instead of uvicorn's plain text."""

    def __init__(self, *args: Any, options: ServerOptions, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.options = options
        self.conn = _Connection(options.max_header_bytes, self._head_received)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.options.max_connections:
            self._refuse(503, f"this server has {self.options.max_connections} connections open, its limit; "
                         "retry later", retry_after=True)
            return
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._head_timer is None:
            self._arm_head_timer()  # a keep-alive connection starts its next request
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_received()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.options.header_timeout, self._head_timeout)

    def _head_received(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self.conn.head:
                self._refuse(408, f"the request head did not arrive within {self.options.header_timeout:g} s")
            else:
                self.transport.close()

    def send_400_response(self, msg: str) -> None:  # uvicorn calls this when h11 refuses the request
        err = self.conn.refusal
        status, message = (err.error_status_hint, str(err)) if err is not None else (400, msg)
        limit = self.options.max_header_bytes
        if status == 431:
            if b"\r\n" not in self.conn.head[:limit]:
                status, message = 414, f"the request line is longer than {limit} bytes"
            else:
                message = f"the request head (request line and headers) is longer than {limit} bytes"
        self._refuse(status, f"the HTTP request was refused: {message}")

    def _refuse(self, status: int, message: str, retry_after: bool = False) -> None:
        """Answer with a JSON error and close the connection, outside the HTTP state machine."""
        body = json.dumps(error_body(status, message, None)).encode()
        head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n"
                + ("retry-after: 5\r\n" if retry_after else "") + "\r\n").encode()
        self._head_received()
        self.transport.write(head + body)
        self.transport.close()


# ---- the server --------------------------------------------------------------------------------------------
def check_exposure(host: str, options: ServerOptions) -> None:
    """Refuse to serve beyond loopback without an API key (unless insecure); warn about what is exposed."""
    if is_loopback(host):
        return
    if options.api_key:
        log.warning("serving on %s: reachable from other machines; every request needs the API key", host)
    elif options.insecure:
        log.warning("serving on %s WITHOUT an API key (--insecure): anyone who can reach this address can use "
                    "the model", host)
    else:
        raise ValueError(f"refusing to serve on {host} (beyond this machine) without an API key: set --api-key or "
                         f"{API_KEY_ENV}, serve on 127.0.0.1, or pass --insecure")


class ChatServer:
    """The server: the model worker, the ASGI app and uvicorn on a socket bound at construction.

    options: a ServerOptions, or its fields as keywords (``ChatServer(model, tok, port=0, model_name="m")``).
    Use :meth:`start` / :meth:`stop` to serve on a background thread (tests, notebooks) or :meth:`serve_forever`.
    """

    def __init__(self, model: Any, tokenizer: Any, host: str = "127.0.0.1", port: int = 8000,
                 options: ServerOptions | None = None, **fields: Any):
        self.options = options = dataclasses.replace(options or ServerOptions(), **fields)
        check_exposure(host, options)
        lock = threading.RLock()  # the model's: scheduler steps and self-check forward passes take it
        spec = options.content_filter  # loaded first: a bad spec is a ValueError before anything starts
        if spec is None or isinstance(spec, ContentFilter):
            content_filter = spec
        elif isinstance(spec, str):
            content_filter = load_content_filter(spec, model, tokenizer, lock)
        else:
            content_filter = callable_filter(spec)
        self.socket = _bind(host, port)
        self.engine = Engine(model, options, lock)
        self.chat_app = ChatApp(model, tokenizer, options, self.engine, host, content_filter)
        config = uvicorn.Config(
            self.chat_app.app, http=functools.partial(HttpProtocol, options=options), ws="none", lifespan="off",
            log_config=None, access_log=False, server_header=False, headers=[("server", "mistral-ref")],
            timeout_keep_alive=options.keep_alive_timeout, h11_max_incomplete_event_size=options.max_header_bytes,
            timeout_graceful_shutdown=5)
        self.uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def server_address(self) -> tuple[str, int]:
        return self.socket.getsockname()[:2]

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    @property
    def scheduler(self) -> Scheduler:
        return self.engine.scheduler

    def serve_forever(self) -> None:
        """Serve on this thread until interrupted (Ctrl-C: uvicorn finishes open requests for up to 5 s)."""
        try:
            self.uvicorn.run(sockets=[self.socket])
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it caught, once it has shut down
            pass
        finally:
            self.engine.stop()

    def start(self) -> ChatServer:
        """Serve on a background thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.socket]},
                                        name="mistral-ref-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.engine.stop()
        self.socket.close()


def _bind(host: str, port: int) -> socket.socket:
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
    return sock


def serve(model: Any, tokenizer: Any, host: str = "127.0.0.1", port: int = 8000, model_name: str = "mistral-ref",
          max_context: int | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, **options: Any) -> None:
    """Serve chat completions until interrupted (Ctrl-C).  See the module docstring for the routes; `options`
    are ServerOptions fields.  The API key defaults to the environment variable MISTRAL_REF_API_KEY."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    options.setdefault("api_key", os.environ.get(API_KEY_ENV) or None)
    server = ChatServer(model, tokenizer, host, port, model_name=model_name, max_context=max_context,
                        max_body_bytes=max_body_bytes, **options)
    o = server.options
    content_filter = o.content_filter if isinstance(o.content_filter, str) else "on" if o.content_filter else "off"
    print(f"mistral-ref: serving {model_name} on {server.url} (POST /v1/chat/completions, POST /chat/completions, "
          f"POST /v1/fim/completions, POST /v1/moderations, GET /info, GET /v1/models, GET /health, "
          f"GET /openapi.json); API key {'required' if o.api_key else 'off'}; "
          f"content filter {content_filter}; "
          f"up to {o.max_batch} requests decoding together; Ctrl-C stops", flush=True)
    server.serve_forever()


# ---- OpenAPI -----------------------------------------------------------------------------------------------
def openapi_document(model_name: str = "mistral-ref", api_key: bool = False,
                     max_moderation_inputs: int = 32) -> dict[str, Any]:
    """The OpenAPI 3.1 document served at GET /openapi.json; the request schema is request_spec's.  api_key: the
    server wants a key (the document then declares the two ways to send it); max_moderation_inputs: texts per
    /v1/moderations request."""
    def error(what: str) -> dict[str, Any]:
        schema = {"$ref": "#/components/schemas/Error"}
        return {"description": what, "content": {"application/json": {"schema": schema}}}

    errors = {
        "400": error("malformed JSON, a prompt too long for the context, a refused Host header; a prompt the "
                     "content filter flagged (code content_filter)"),
        "401": error("a missing or wrong API key"),
        "408": error("the body did not arrive in time"),
        "413": error("a body over the size limit"),
        "415": error("a body that is not application/json"),
        "422": error("an unknown or invalid field, or one over a limit; param names it"),
        "503": error("the queue is full: retry after Retry-After seconds; or the content filter failed (code "
                     "content_filter_error)"),
    }
    chat = {
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}},
        "responses": {
            "200": {
                "description": "a chat.completion, or with stream=true server-sent chat.completion.chunk events "
                               "ending with data: [DONE]",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletion"}},
                            "text/event-stream": {"schema": {"type": "string"}}},
            },
            **errors,
        },
    }
    choice = {
        "type": "object",
        "properties": {
            "index": {"type": "integer"},
            "message": {"type": "object", "properties": {
                "role": {"const": "assistant"},
                "content": {"type": ["string", "null"]},
                "tool_calls": {"type": ["array", "null"], "items": {"$ref": "#/components/schemas/ToolCall"}},
            }},
            "finish_reason": {"enum": ["stop", "length", "tool_calls", "content_filter"]},
            "logprobs": {"type": ["object", "null"]},
        },
    }

    def get(summary: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
        ok = {"description": summary}
        if schema is not None:
            ok["content"] = {"application/json": {"schema": schema}}
        return {"get": {"summary": summary, "responses": {"200": ok, "401": errors["401"]}}}

    info = {"type": "object", "properties": {"model_name": {"type": "string"},
                                             "model_type": {"const": "chat-completions"},
                                             "model_provider_name": {"const": "MistralAI"}}}
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": f"mistral-ref chat completions ({model_name})", "version": "1.0.0",
                 "description": "The Mistral chat-completions API and the Azure AI model inference API, served "
                                "locally by mistral-ref."},
        "paths": {
            "/v1/chat/completions": {"post": {"summary": "Chat completion (Mistral API)", **chat}},
            "/chat/completions": {"post": {
                "summary": "Chat completion (Azure AI model inference API)",
                "parameters": [
                    {"name": "api-version", "in": "query", "schema": {"type": "string"}},
                    {"name": "extra-parameters", "in": "header",
                     "schema": {"enum": ["error", "drop", "pass-through"], "default": "error"}},
                ],
                **chat,
            }},
            "/v1/fim/completions": {"post": {
                "summary": "Fill-in-the-middle completion (Mistral API; the response has the chat completion's "
                           "shape)",
                **chat,
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/FIMCompletionRequest"}}}},
            }},
            "/v1/moderations": {"post": {
                "summary": "Moderation (Mistral API): the server's content filter (self-check without one)",
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ModerationRequest"}}}},
                "responses": {
                    "200": {"description": "one result per input text", "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ModerationResponse"}}}},
                    **{k: v for k, v in errors.items() if k != "400"},
                    "400": error("malformed JSON"),
                },
            }},
            "/info": get("Model info (Azure AI model inference API)", info),
            "/v1/models": get("List models"),
            "/models": get("List models"),
            "/health": get("Liveness, with the scheduler's running and waiting requests"),
            "/openapi.json": get("This document"),
        },
        "components": {
            "schemas": {
                "ChatCompletionRequest": request_schema(),
                "FIMCompletionRequest": fim_request_schema(),
                **COMPONENTS,
                "ChatCompletion": {"type": "object", "properties": {
                    "id": {"type": "string"},
                    "object": {"const": "chat.completion"},
                    "created": {"type": "integer"},
                    "model": {"type": "string"},
                    "choices": {"type": "array", "items": choice},
                    "usage": {"type": "object", "properties": {
                        k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")}},
                }},
                "ModerationRequest": {
                    "type": "object", "required": ["input"], "additionalProperties": False,
                    "properties": {
                        "model": {"type": "string"},
                        "input": {"oneOf": [{"type": "string"},
                                            {"type": "array", "items": {"type": "string"}, "minItems": 1,
                                             "maxItems": max_moderation_inputs}]},
                    }},
                "ModerationResponse": {"type": "object", "properties": {
                    "id": {"type": "string"}, "model": {"type": "string"},
                    "results": {"type": "array", "items": {"type": "object", "properties": {
                        "categories": {"type": "object", "properties": {c: {"type": "boolean"} for c in CATEGORIES}},
                        "category_scores": {"type": "object",
                                            "properties": {c: {"type": "number"} for c in CATEGORIES}},
                    }}},
                }},
                "Error": {"type": "object", "properties": {
                    "object": {"const": "error"},
                    "message": {"type": "string"},
                    "error": {"type": "object", "properties": {
                        "message": {"type": "string"}, "type": {"type": "string"},
                        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}},
                }},
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "api-key": {"type": "apiKey", "in": "header", "name": "api-key"}},
        },
    }
    if api_key:
        doc["security"] = [{"bearer": []}, {"api-key": []}]
    return doc
