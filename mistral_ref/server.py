"""A local HTTP endpoint for chat completions that the official clients use unchanged (standard library only).

    POST /v1/chat/completions   the Mistral chat API (what the `openai` and `mistralai` clients call)
    POST /chat/completions      the Azure AI model inference API (azure-ai-inference's ChatCompletionsClient)
    GET  /info                  Azure's model info: {"model_name", "model_type", "model_provider_name"}
    GET  /v1/models             the served model, as the Mistral / OpenAI model list
    GET  /openapi.json          an OpenAPI 3.1 description of all of the above

Streaming responses are data-only server-sent events (``data: {chunk}\\n\\n`` ... ``data: [DONE]\\n\\n``).
Errors are JSON ``{"object": "error", "message", "error": {"message", "type", "param", "code"}}`` with a 4xx
status whose message names the field: 400 malformed JSON / over-long prompt, 422 an unknown or mistyped field
or a bad role, 413 a body over ``max_body_bytes``, 404 / 405 an unknown route or method.

Concurrency: a ThreadingHTTPServer reads and validates requests on one thread each (tokenising the prompt
there too); generation happens on one model worker thread that takes requests from a FIFO queue, one at a
time.  A streaming handler that finds its client gone (a failed write) cancels its request: the worker stops
that generation at the next token and moves on, so a disconnecting client never wedges the server.

The Azure route follows that API's ``extra-parameters`` header: parameters outside its standard set (e.g.
``safe_mode``, ``logprobs``, ``random_seed``, sent by the client's ``model_extras``) are an error unless the
header is ``pass-through`` (they are then passed to the model; ``safe_mode`` is Mistral's ``safe_prompt``) or ``drop``.
The request's fields, their ranges and the Azure standard set are request_spec's, like the OpenAPI schema.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from mistral_ref.api import (
    ContextLengthError,
    RequestError,
    context_length,
    parse_request,
    prepare,
    run,
)
from mistral_ref.request_spec import AZURE_ALIASES, AZURE_FIELDS, AZURE_IGNORED, COMPONENTS, request_schema

log = logging.getLogger("mistral_ref.server")

DEFAULT_MAX_BODY_BYTES = 4 << 20


class HttpError(Exception):
    """An error response: status, message and the field at fault (None when no single field is)."""

    def __init__(self, status: int, message: str, field: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field
        self.code = code or HTTPStatus(status).phrase.lower().replace(" ", "_")


# ---- the model worker --------------------------------------------------------------------------------------
_DONE = object()


@dataclass
class Ticket:
    """One queued request: the worker puts results (a response dict, chunks, then _DONE, or an exception)."""

    job: Any
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


class ModelWorker:
    """Runs one generation at a time on its own thread, taking Tickets from a FIFO queue."""

    def __init__(self, model: Any, tokenizer: Any, max_queue: int = 256):
        self.model, self.tokenizer = model, tokenizer
        self.queue: queue.Queue[Ticket | None] = queue.Queue(maxsize=max_queue)
        self.served = self.cancelled = 0  # requests finished / stopped early because their client left
        self.thread = threading.Thread(target=self._loop, name="mistral-ref-model-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Any) -> Ticket:
        ticket = Ticket(job)
        try:
            self.queue.put_nowait(ticket)
        except queue.Full:
            raise HttpError(503, "the server is busy (request queue full); retry later") from None
        return ticket

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=30)

    def _loop(self) -> None:
        while (ticket := self.queue.get()) is not None:
            if ticket.cancelled.is_set():
                continue
            try:
                result = run(self.model, self.tokenizer, ticket.job)
                if isinstance(result, dict):
                    ticket.out.put(result)
                    continue
                try:
                    for chunk in result:
                        if ticket.cancelled.is_set():
                            log.info("client went away: generation stopped")
                            self.cancelled += 1
                            break
                        ticket.out.put(chunk)
                finally:
                    result.close()
                ticket.out.put(_DONE)
            except Exception as e:  # noqa: BLE001 — reported to the waiting handler, the worker lives on
                log.exception("generation failed")
                ticket.out.put(e)
            finally:
                self.served += 1


# ---- HTTP -------------------------------------------------------------------------------------------------
class ChatServer(ThreadingHTTPServer):
    """The HTTP server: a ThreadingHTTPServer holding the model worker and the serving options."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # listen() backlog; socketserver's default of 5 resets bursts of connections

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        host: str = "127.0.0.1",
        port: int = 8000,
        model_name: str = "mistral-ref",
        max_context: int | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_queue: int = 256,
    ):
        super().__init__((host, port), ChatHandler)
        self.model_name = model_name
        self.max_context = context_length(model, max_context)
        self.max_body_bytes = max_body_bytes
        self.tokenizer = tokenizer
        self.created = int(time.time())
        self.worker = ModelWorker(model, tokenizer, max_queue)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ChatServer:
        """Serve on a background thread (for tests and notebooks); stop with :meth:`stop`."""
        self._thread = threading.Thread(target=self.serve_forever, name="mistral-ref-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.worker.stop()


class ChatHandler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"  # keep-alive for clients that pool connections
    timeout = 60  # seconds a client may stall mid-request before its handler thread gives up
    server_version = "mistral-ref"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 — the base class's name
        log.debug("%s - %s", self.address_string(), format % args)

    # ---- responses ----
    def _send_json(self, status: int, payload: Any) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_error_json(self, err: HttpError) -> None:
        kind = "invalid_request_error" if err.status < 500 else "server_error"
        detail = {"message": err.message, "type": kind, "param": err.field, "code": err.code}
        self._send_json(err.status, {"object": "error", "message": err.message, "error": detail})

    def _route(self, method: str) -> None:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        routes = {
            ("GET", "/info"): self._info,
            ("GET", "/v1/models"): self._models,
            ("GET", "/models"): self._models,
            ("GET", "/openapi.json"): self._openapi,
            ("POST", "/v1/chat/completions"): lambda: self._chat(azure=False),
            ("POST", "/chat/completions"): lambda: self._chat(azure=True),
        }
        try:
            handler = routes.get((method, path))
            if handler is None:
                if any(p == path for _, p in routes):
                    raise HttpError(405, f"{method} is not allowed on {path}")
                raise HttpError(404, f"no route {method} {path}; see GET /openapi.json")
            handler()
        except HttpError as e:
            if method != "GET" and not getattr(self, "_body_read", False):
                self.close_connection = True  # the unread body would be taken for the next request
            self._send_error_json(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802 — the base class's naming
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def do_PUT(self) -> None:  # noqa: N802 — unsupported methods get a JSON 405 from _route, not an HTML 501
        self._route("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._route("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._route("PATCH")

    # ---- GET routes ----
    def _info(self) -> None:
        self._send_json(
            200,
            {
                "model_name": self.server.model_name,
                "model_type": "chat-completions",
                "model_provider_name": "MistralAI",
            },
        )

    def _models(self) -> None:
        s = self.server
        tools = s.tokenizer.has_special("[TOOL_CALLS]")
        card = {
            "id": s.model_name,
            "object": "model",
            "created": s.created,
            "owned_by": "mistral-ref",
            "max_context_length": s.max_context,
            "type": "base",
            "capabilities": {
                "completion_chat": True,
                "function_calling": tools,
                "completion_fim": False,
                "fine_tuning": False,
                "vision": False,
            },
        }
        self._send_json(200, {"object": "list", "data": [card]})

    def _openapi(self) -> None:
        self._send_json(200, openapi_document(self.server.model_name))

    # ---- POST /v1/chat/completions and /chat/completions ----
    def _read_body(self) -> Any:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise HttpError(
                411, "send the body with a Content-Length (chunked transfer encoding is not supported)"
            )
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise HttpError(400, "Content-Length must be an integer", "Content-Length") from None
        if length > self.server.max_body_bytes:
            raise HttpError(
                413,
                f"the request body is {length} bytes; this server accepts at most "
                f"{self.server.max_body_bytes} bytes",
                "body",
            )
        raw = self.rfile.read(length) if length > 0 else b""
        self._body_read = True
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise HttpError(400, f"the body is not UTF-8 ({e})", "body") from None
        except json.JSONDecodeError as e:
            raise HttpError(
                400, f"the body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", "body"
            ) from None
        except RecursionError:
            raise HttpError(400, "the body's JSON is nested too deeply to parse", "body") from None

    def _azure_body(self, body: dict[str, Any]) -> dict[str, Any]:
        mode = self.headers.get("extra-parameters", "error").strip().lower()
        if mode not in ("error", "drop", "pass-through"):
            raise HttpError(
                400,
                f"extra-parameters must be 'error', 'drop' or 'pass-through', got {mode!r}",
                "extra-parameters",
            )
        extras = [k for k in body if k not in AZURE_FIELDS]
        if extras and mode == "error":
            raise HttpError(
                400,
                f"extra parameters {extras} are not allowed when extra-parameters is not set or "
                "set to 'error'; set the header extra-parameters: pass-through to pass them to the "
                "model",
                extras[0],
            )
        dropped = set(AZURE_IGNORED) | (set(extras) if mode == "drop" else set())
        return {AZURE_ALIASES.get(k, k): v for k, v in body.items() if k not in dropped}

    def _chat(self, azure: bool) -> None:
        self._body_read = False
        body = self._read_body()
        if not isinstance(body, dict):
            raise HttpError(422, f"the body must be a JSON object, got {type(body).__name__}", "body")
        if azure:
            body = self._azure_body(body)
        try:
            request = parse_request(body)
            job = prepare(self.server.tokenizer, request, self.server.max_context, self.server.model_name)
        except RequestError as e:
            raise HttpError(400 if isinstance(e, ContextLengthError) else 422, str(e), e.field) from None
        ticket = self.server.worker.submit(job)
        if request.stream:
            self._stream(ticket)
            return
        result = ticket.out.get()
        if isinstance(result, ValueError):  # a generation parameter the model refuses (GenerationParamError)
            raise HttpError(400, f"generation refused the request: {result}")
        if isinstance(result, Exception):
            raise HttpError(500, f"generation failed: {type(result).__name__}: {result}")
        self._send_json(200, result)

    def _stream(self, ticket: Ticket) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.end_headers()
        self.close_connection = True
        try:
            for item in _items(ticket):
                if isinstance(item, Exception):
                    err = {
                        "object": "error",
                        "message": f"generation failed: {item}",
                        "error": {"message": str(item), "type": "server_error", "param": None, "code": None},
                    }
                    self.wfile.write(f"data: {json.dumps(err)}\n\n".encode())
                    break
                self.wfile.write(f"data: {json.dumps(item, ensure_ascii=False)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError:  # BrokenPipeError, ConnectionResetError, a timeout: the client is gone
            ticket.cancelled.set()
            log.info("client disconnected mid-stream; request cancelled")


def _items(ticket: Ticket) -> Iterator[Any]:
    while (item := ticket.out.get()) is not _DONE:
        yield item
        if isinstance(item, Exception):
            return


# ---- OpenAPI -----------------------------------------------------------------------------------------------
def openapi_document(model_name: str = "mistral-ref") -> dict[str, Any]:
    """The OpenAPI 3.1 document served at GET /openapi.json; the request schema is request_spec's."""
    error = {
        "description": "a bad request; the message names the field",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    chat = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}
            },
        },
        "responses": {
            "200": {
                "description": "a chat.completion, or with stream=true server-sent chat.completion.chunk "
                "events ending with data: [DONE]",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletion"}},
                    "text/event-stream": {"schema": {"type": "string"}},
                },
            },
            "400": error,
            "413": error,
            "422": error,
        },
    }
    choice = {
        "type": "object",
        "properties": {
            "index": {"type": "integer"},
            "message": {
                "type": "object",
                "properties": {
                    "role": {"const": "assistant"},
                    "content": {"type": ["string", "null"]},
                    "tool_calls": {
                        "type": ["array", "null"],
                        "items": {"$ref": "#/components/schemas/ToolCall"},
                    },
                },
            },
            "finish_reason": {"enum": ["stop", "length", "tool_calls"]},
            "logprobs": {"type": ["object", "null"]},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": f"mistral-ref chat completions ({model_name})",
            "version": "1.0.0",
            "description": "The Mistral chat-completions API and the Azure AI model inference API, served "
            "locally by mistral-ref.",
        },
        "paths": {
            "/v1/chat/completions": {"post": {"summary": "Chat completion (Mistral API)", **chat}},
            "/chat/completions": {
                "post": {
                    "summary": "Chat completion (Azure AI model inference API)",
                    "parameters": [
                        {"name": "api-version", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "extra-parameters",
                            "in": "header",
                            "schema": {"enum": ["error", "drop", "pass-through"], "default": "error"},
                        },
                    ],
                    **chat,
                }
            },
            "/info": {
                "get": {
                    "summary": "Model info (Azure AI model inference API)",
                    "responses": {
                        "200": {
                            "description": "the served model",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "properties": {
                                            "model_name": {"type": "string"},
                                            "model_type": {"const": "chat-completions"},
                                            "model_provider_name": {"const": "MistralAI"},
                                        },
                                    }
                                }
                            },
                        }
                    },
                }
            },
            "/v1/models": {
                "get": {"summary": "List models", "responses": {"200": {"description": "the model list"}}}
            },
            "/openapi.json": {
                "get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI"}}}
            },
        },
        "components": {
            "schemas": {
                "ChatCompletionRequest": request_schema(),
                **COMPONENTS,
                "ChatCompletion": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "object": {"const": "chat.completion"},
                        "created": {"type": "integer"},
                        "model": {"type": "string"},
                        "choices": {"type": "array", "items": choice},
                        "usage": {
                            "type": "object",
                            "properties": {
                                k: {"type": "integer"}
                                for k in ("prompt_tokens", "completion_tokens", "total_tokens")
                            },
                        },
                    },
                },
                "Error": {
                    "type": "object",
                    "properties": {
                        "object": {"const": "error"},
                        "message": {"type": "string"},
                        "error": {
                            "type": "object",
                            "properties": {
                                "message": {"type": "string"},
                                "type": {"type": "string"},
                                "param": {"type": ["string", "null"]},
                                "code": {"type": ["string", "null"]},
                            },
                        },
                    },
                },
            }
        },
    }


def serve(
    model: Any,
    tokenizer: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str = "mistral-ref",
    max_context: int | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> None:
    """Serve chat completions until interrupted (Ctrl-C).  See the module docstring for the routes."""
    server = ChatServer(model, tokenizer, host, port, model_name, max_context, max_body_bytes)
    print(
        f"mistral-ref: serving {model_name} on {server.url} (POST /v1/chat/completions, "
        "POST /chat/completions, GET /info, GET /v1/models, GET /openapi.json); Ctrl-C stops",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.worker.stop()
