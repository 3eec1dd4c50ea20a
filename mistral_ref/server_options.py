"""The server's options, plain data (no torch, no web framework): the CLI states their defaults in its help
without importing the server.  See mistral_ref.server for what each one guards against."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_BODY_BYTES = 4 << 20
#: The environment variable that `mistral-ref serve` and server.serve() read the API key from.
API_KEY_ENV = "MISTRAL_REF_API_KEY"


@dataclass
class ServerOptions:
    """Everything a server can be told (the CLI's ``serve`` flags); the defaults are safe for a local server.

    Access: api_key (None: no key; then only a loopback address may be served unless insecure); allowed_hosts:
    the names the Host header may carry (None: localhost / 127.0.0.1 / ::1 and the bound address when serving on
    loopback, any name otherwise; "*": any); cors_origins: origins a browser page may call from (none: no CORS).
    Requests: max_body_bytes, max_uri_bytes, max_header_bytes (the whole request head), max_json_depth (nesting),
    max_stop (stop strings) of at most max_stop_chars characters, max_tools_bytes (the tools as JSON),
    max_tokens_limit (max_tokens cap; a request without max_tokens gets what the context leaves, at most this),
    request_timeout (s, queue + generation).
    Connections: max_connections, header_timeout and body_timeout (s to send the head / the body),
    keep_alive_timeout (s an idle connection stays open).
    Batching (scheduler.Scheduler): max_batch (1 = one request at a time), max_queue (waiting requests beyond
    which new ones get 503), kv_cache_bytes (None: half the memory available at start), prefill_tokens.
    A request's n choices are n jobs: n is at most max_batch (422 beyond), and they count n against max_queue.
    Content safety (moderation.py): content_filter, "self-check", "module:function" or a callable
    ``text -> bool | {category: bool | float}`` (None: no filter; POST /v1/moderations then uses self-check);
    max_moderation_inputs: texts per /v1/moderations request.
    """

    model_name: str = "mistral-ref"
    max_context: int | None = None
    api_key: str | None = None
    insecure: bool = False
    allowed_hosts: tuple[str, ...] | None = None
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_uri_bytes: int = 8 << 10
    max_header_bytes: int = 16 << 10
    max_json_depth: int = 64
    max_stop: int = 16
    max_stop_chars: int = 256
    max_tools_bytes: int = 64 << 10
    max_tokens_limit: int = 4096
    request_timeout: float = 600.0
    max_connections: int = 256
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: int = 5
    max_batch: int = 32
    max_queue: int = 256
    kv_cache_bytes: int | None = None
    prefill_tokens: int = 512
    content_filter: str | Callable[[str], Any] | None = None
    max_moderation_inputs: int = 32
