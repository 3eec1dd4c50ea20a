"""The attacks on the server (issue 19), each now a clear JSON 4xx / 5xx (or a correct answer) that leaves the server
serving: clients that hang up, huge stop lists and tool schemas, missing keys, foreign Host headers, non-JSON
bodies, idle sockets, malformed and oversized HTTP, deep JSON, huge integers, duplicate Content-Length; plus the
time and token budgets, the queue limit, CORS and the access log.  Loopback only."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import time

import pytest
from chat_models import (
    SP_V3,
    needs_tokenizer_files,
    one_torch_thread,  # noqa: F401 — a fixture, used through pytestmark
    tiny_model,
    tokenizer,
)

from mistral_ref.server import ChatServer, ServerOptions, is_loopback

openai = pytest.importorskip("openai")
inference = pytest.importorskip("azure.ai.inference")
from azure.core.credentials import AzureKeyCredential  # noqa: E402
from azure.core.exceptions import ClientAuthenticationError  # noqa: E402

pytestmark = [needs_tokenizer_files, pytest.mark.usefixtures("one_torch_thread")]

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def model_and_tok():
    tok = tokenizer(SP_V3)
    return tiny_model(tok, max_seq_len=4096), tok


@pytest.fixture(scope="module")
def served(model_and_tok):
    model, tok = model_and_tok
    server = ChatServer(model, tok, port=0, model_name="tiny", max_body_bytes=64 * 1024, max_connections=16,
                        header_timeout=1.0, body_timeout=1.0, max_tokens_limit=5000).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keyed(model_and_tok):
    model, tok = model_and_tok
    server = ChatServer(model, tok, port=0, api_key=KEY, cors_origins=("http://app.example",)).start()
    yield server
    server.stop()


def request(server, method, path, body=None, headers=None, host=None):
    """One HTTP request: (status, headers dict, parsed JSON body or None).  host: the Host header ("": none)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.putrequest(method, path, skip_host=True)
    host = f"127.0.0.1:{server.server_address[1]}" if host is None else host
    all_headers = {"Host": host or None, "Content-Type": "application/json"}
    all_headers.update(headers or {})
    for k, v in all_headers.items():
        if v is not None:
            conn.putheader(k, v)
    if data is not None:
        conn.putheader("Content-Length", str(len(data)))
    conn.endheaders(data)
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    headers = {k.lower(): v for k, v in resp.getheaders()}
    is_json = headers.get("content-type", "").startswith("application/json")
    return resp.status, headers, json.loads(payload) if payload and is_json else None


def raw(server, data: bytes, chunks: int = 1, wait: float = 5.0) -> bytes:
    """Send raw bytes (in `chunks` pieces, so a parser must wait for the rest) and read until the server closes
    (a server that answers before the rest is sent has closed the connection: the rest is not sent)."""
    sock = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=wait)
    step = -(-len(data) // chunks)
    for i in range(0, len(data), step):
        try:
            sock.sendall(data[i:i + step])
        except (BrokenPipeError, ConnectionResetError):
            break
        time.sleep(0.01 if chunks > 1 else 0)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    sock.close()
    return out


def json_error(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    assert b"content-type: application/json" in head.lower(), head
    return status, json.loads(body)


def still_serving(server, headers=None) -> None:
    status, _, r = request(server, "POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2},
                           headers)
    assert status == 200 and r["usage"]["completion_tokens"] == 2


def wait_for(predicate, timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


# ---- clients that go away ----------------------------------------------------------------------------------
def test_ten_hung_up_non_streaming_clients_do_not_delay_the_next_request(served):
    before = served.scheduler.stats["cancelled"]
    body = json.dumps({"messages": MESSAGES, "max_tokens": 4000, "ignore_eos": True}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    socks = [socket.create_connection(("127.0.0.1", served.server_address[1])) for _ in range(10)]
    for s in socks:
        s.sendall(head + body)
    time.sleep(0.05)
    for s in socks:
        s.close()  # hung up after 50 ms: 10 x 4000 tokens nobody will read
    t0 = time.monotonic()
    still_serving(served)
    assert time.monotonic() - t0 < 10
    assert wait_for(lambda: served.scheduler.stats["cancelled"] >= before + 10)  # all stopped, none run out
    assert wait_for(lambda: not served.scheduler.rows)


# ---- request limits ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def roomy(model_and_tok):
    """A server taking bodies of 8 MiB, with a token cap of 100 per request."""
    server = ChatServer(*model_and_tok, port=0, max_body_bytes=8 << 20, max_tokens_limit=100).start()
    yield server
    server.stop()


@pytest.mark.parametrize("body, field, words", [
    ({"stop": [f"s{i}" for i in range(300_000)]}, "stop", "300000 stop strings; this server accepts at most 16"),
    ({"stop": "x" * 1000}, "stop", "1000 characters; this server accepts at most 256"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": "d" * 70_000}}]}, "tools",
     "this server accepts at most 65536"),
    ({"max_tokens": 101}, "max_tokens", "over this server's limit of 100"),
])
def test_costly_fields_are_limited_and_named(roomy, body, field, words):
    status, _, err = request(roomy, "POST", "/v1/chat/completions", {"messages": MESSAGES, **body})
    assert status == 422 and err["error"]["param"] == field and words in err["message"], err
    still_serving(roomy)


def test_a_request_without_max_tokens_gets_the_servers_cap(roomy):
    status, _, r = request(roomy, "POST", "/v1/chat/completions", {"messages": MESSAGES, "ignore_eos": True})
    assert status == 200 and r["usage"]["completion_tokens"] == 100


@pytest.mark.parametrize("body, words", [
    (b'{"messages": [], "seed": 1' + b"1" * 5000 + b"}", "4300"),  # int() refuses > 4300 digits
    (b'{"messages": ' + b"[" * 980 + b"]" * 980 + b"}", "nested more than 64"),  # parses, then would overflow
    (b'{"messages": [], "temperature": NaN}', "NaN"),
    (b'{"messages": [' + b"[" * 5000 + b"]" * 5000 + b"]}", "nested too deeply"),
])
def test_bodies_that_broke_the_parser_get_a_json_400(served, body, words):
    status, _, err = request(served, "POST", "/v1/chat/completions", body)
    assert status == 400 and err["error"]["param"] == "body" and words in err["message"]
    still_serving(served)


def test_request_time_budget_ends_a_reply_with_length(model_and_tok):
    server = ChatServer(*model_and_tok, port=0, request_timeout=0.5).start()
    try:
        t0 = time.monotonic()
        status, _, r = request(server, "POST", "/v1/chat/completions",
                               {"messages": MESSAGES, "max_tokens": 4000, "ignore_eos": True})
        assert status == 200 and r["choices"][0]["finish_reason"] == "length"
        assert 0 < r["usage"]["completion_tokens"] < 4000 and time.monotonic() - t0 < 10
        assert server.scheduler.stats["timeout"] == 1
    finally:
        server.stop()


def test_a_full_queue_is_a_503_with_retry_after(model_and_tok):
    server = ChatServer(*model_and_tok, port=0, max_batch=1, max_queue=1).start()
    try:
        long = json.dumps({"messages": MESSAGES, "max_tokens": 4000, "ignore_eos": True}).encode()
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(long)}\r\n\r\n").encode()
        socks = []
        for want_rows, want_waiting in ((1, 0), (1, 1)):  # one decoding, one waiting: the queue is full
            socks.append(socket.create_connection(("127.0.0.1", server.server_address[1])))
            socks[-1].sendall(head + long)
            assert wait_for(lambda a=want_rows, b=want_waiting: (len(server.scheduler.rows), len(
                server.scheduler.waiting)) == (a, b))
        status, headers, err = request(server, "POST", "/v1/chat/completions", {"messages": MESSAGES})
        assert status == 503 and headers["retry-after"] == "5" and "busy" in err["message"]
        for s in socks:
            s.close()
        assert wait_for(lambda: not server.scheduler.busy)
        still_serving(server)
    finally:
        server.stop()


# ---- access ------------------------------------------------------------------------------------------------
def test_api_key_on_every_route_and_the_official_clients(keyed):
    port = keyed.server_address[1]
    for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("GET", "/info"), ("GET", "/openapi.json"),
                         ("POST", "/v1/chat/completions"), ("POST", "/chat/completions"), ("GET", "/nowhere")):
        body = {"messages": MESSAGES, "max_tokens": 1} if method == "POST" else None
        status, headers, err = request(keyed, method, path, body)
        assert status == 401 and err["error"]["param"] == "Authorization" and headers["www-authenticate"] == "Bearer"
        status, _, err = request(keyed, method, path, body, {"Authorization": "Bearer wrong"})
        assert status == 401 and "wrong API key" in err["message"]
        for auth in ({"Authorization": f"Bearer {KEY}"}, {"api-key": KEY}):
            assert request(keyed, method, path, body, auth)[0] == (404 if path == "/nowhere" else 200)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
    assert client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="nope", max_retries=0).models.list()
    azure = inference.ChatCompletionsClient(endpoint=f"http://127.0.0.1:{port}", credential=AzureKeyCredential(KEY))
    assert azure.complete(messages=MESSAGES, max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(ClientAuthenticationError):
        inference.ChatCompletionsClient(endpoint=f"http://127.0.0.1:{port}",
                                        credential=AzureKeyCredential("nope")).get_model_info()
    assert request(keyed, "GET", "/openapi.json", headers={"api-key": KEY})[2]["security"]


def test_serving_beyond_loopback_needs_a_key_or_insecure(model_and_tok, caplog):
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0")
    with pytest.raises(ValueError, match="without an API key.*--insecure"):
        ChatServer(*model_and_tok, host="0.0.0.0", port=0)
    for options in (dict(api_key=KEY), dict(insecure=True)):  # bound, never sent anything: no traffic leaves
        with caplog.at_level(logging.WARNING, logger="mistral_ref.server"):
            ChatServer(*model_and_tok, host="0.0.0.0", port=0, **options).stop()
        assert "reachable from other machines" in caplog.text or "WITHOUT an API key" in caplog.text
        caplog.clear()


def test_host_header_must_name_the_server_and_bodies_must_be_json(served):
    port = served.server_address[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
        status, _, err = request(served, "GET", "/v1/models", host=host)
        assert status == 400 and err["error"]["param"] == "Host" and "DNS rebinding" in err["message"]
    status, _, err = request(served, "GET", "/v1/models", host="")  # none at all: HTTP/1.1 requires one
    assert status == 400 and "Host" in err["message"]
    for host in (f"localhost:{port}", "127.0.0.1", f"[::1]:{port}", "LOCALHOST"):
        assert request(served, "GET", "/v1/models", host=host)[0] == 200
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):
        status, _, err = request(served, "POST", "/v1/chat/completions", {"messages": MESSAGES},
                                 {"Content-Type": kind})
        assert status == 415 and err["error"]["param"] == "Content-Type"
    assert request(served, "POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1},
                   {"Content-Type": "application/json; charset=utf-8"})[0] == 200


def test_cors_only_for_configured_origins(served, keyed):
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    status, headers, _ = request(keyed, "OPTIONS", "/v1/chat/completions", headers=preflight)
    assert status == 200 and headers["access-control-allow-origin"] == "http://app.example"
    status, headers, _ = request(keyed, "OPTIONS", "/v1/chat/completions", headers=dict(preflight,
                                                                                        Origin="http://evil.example"))
    assert status == 400 and "access-control-allow-origin" not in headers
    status, headers, err = request(served, "OPTIONS", "/v1/chat/completions", headers=preflight)
    assert status == 405 and "access-control-allow-origin" not in headers and err["object"] == "error"


# ---- connections and HTTP ------------------------------------------------------------------------------------
def test_idle_sockets_are_capped_and_closed(served):
    port = served.server_address[1]
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(40)]  # the cap is 16
    refused = 0
    for s in socks:
        s.settimeout(0.5)
        try:
            data = s.recv(4096)
        except TimeoutError:
            continue
        if data:
            status, err = json_error(data)
            assert status == 503 and "connections open" in err["message"]
            refused += 1
    assert refused >= 40 - 16
    t0 = time.monotonic()
    for s in socks:  # the others are closed once header_timeout (1 s) passes without a request
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except ConnectionResetError:
            pass
        s.close()
    assert time.monotonic() - t0 < 4
    status, err = json_error(raw(served, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1"))  # half a head
    assert status == 408
    still_serving(served)


def test_malformed_and_oversized_http_gets_json_errors(served):
    host = b"Host: 127.0.0.1\r\n"
    body = json.dumps({"messages": MESSAGES, "max_tokens": 1}).encode()
    cases = [
        # two Content-Length headers (equal ones, which h11 would merge)
        (b"POST /v1/chat/completions HTTP/1.1\r\n" + host + b"Content-Type: application/json\r\n"
         + b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n" % (len(body), len(body)) + body, 1, 400,
         "Content-Length"),
        (b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n" + host + b"\r\n", 1, 414, "8192"),  # URI too long
        (b"GET /" + b"a" * 40_000 + b" HTTP/1.1\r\n" + host + b"\r\n", 8, 414, "request line"),  # ... for the parser
        (b"GET /health HTTP/1.1\r\n" + host + b"X: " + b"a" * 20_000 + b"\r\n\r\n", 1, 431, "headers"),
        (b"GET /health HTTP/1.1\r\n" + host + (b"X: " + b"a" * 1000 + b"\r\n") * 40 + b"\r\n", 8, 431, "head"),
        (b"GET /health HTTP/1.1\r\n" + host + b"Transfer-Encoding: gzip\r\n\r\n", 1, 501, "Transfer-Encoding"),
        (b"NOT HTTP AT ALL\r\n\r\n", 1, 400, "refused"),
        (b"BREW /v1/chat/completions HTTP/1.1\r\n" + host + b"\r\n", 1, 405, "BREW is not allowed"),
        (b"OPTIONS /v1/chat/completions HTTP/1.1\r\n" + host + b"\r\n", 1, 405, "OPTIONS"),
        (b"GET /v1/chat/completions HTTP/1.1\r\n" + host + b"\r\n", 1, 405, "allowed: POST"),
        (b"POST /v1/chat/completions HTTP/1.1\r\n" + host + b"Content-Type: application/json\r\n"
         b"Content-Length: 10\r\n\r\n{", 1, 408, "did not arrive"),  # a body that never comes
    ]
    for data, chunks, status, words in cases:
        got, err = json_error(raw(served, data, chunks))
        assert got == status and words in err["message"], (data[:60], got, err)
        assert err["object"] == "error" and err["error"]["code"]
    head = raw(served, b"HEAD /v1/chat/completions HTTP/1.1\r\n" + host + b"Connection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405") and b"content-type: application/json" in head
    still_serving(served)


def test_oversized_bodies_are_refused_before_they_are_read(served):
    status, headers, err = request(served, "POST", "/v1/chat/completions", b"x" * (64 * 1024 + 1))
    assert status == 413 and "65536" in err["message"] and headers.get("connection") == "close"
    sock = socket.create_connection(("127.0.0.1", served.server_address[1]), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000000000\r\n\r\n")  # announces 1 GB, sends nothing
    response = b""
    while chunk := sock.recv(65536):
        response += chunk
    status, err = json_error(response)
    assert status == 413 and err["error"]["param"] == "body"
    sock.close()
    still_serving(served)


def test_every_request_gets_one_access_log_line(served, caplog):
    # Lines of an earlier test's requests may still arrive: look for this test's own lines by their unique path.
    def lines():
        return [r.getMessage() for r in caplog.records if r.name == "mistral_ref.server.access"]

    path = f"/nowhere-{time.monotonic_ns()}"
    with caplog.at_level(logging.INFO, logger="mistral_ref.server.access"):
        still_serving(served)
        assert wait_for(lambda: any("completion=2 end=length" in line for line in lines()), 5)
        request(served, "GET", path)
        assert wait_for(lambda: any(line.startswith(f"GET {path} ") for line in lines()), 5)
        time.sleep(0.2)  # a second line for the same request would arrive by now
    chat = [line for line in lines() if line.startswith("POST /v1/chat/completions 200 prompt=")]
    own = [line for line in lines() if line.startswith(f"GET {path} ")]
    assert chat and "completion=2 end=length" in chat[-1]
    assert len(own) == 1 and own[0].startswith(f"GET {path} 404 - ") and own[0].endswith("s")


def test_options_are_a_dataclass_with_safe_defaults():
    o = ServerOptions()
    assert o.api_key is None and not o.insecure and o.cors_origins == () and o.max_connections > 0
    assert o.max_stop and o.max_tools_bytes and o.request_timeout and o.header_timeout and o.body_timeout
