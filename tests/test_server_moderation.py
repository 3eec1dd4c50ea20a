"""Content safety on the server, as Azure's endpoint answers: a flagged prompt is HTTP 400 code content_filter
(the openai client's BadRequestError, azure-ai-inference's HttpResponseError, unchanged), a flagged reply ends
with finish_reason content_filter (streaming too, the flagged text withheld), POST /v1/moderations is Mistral's
moderation API over the same classifier; a failing filter is a 503 (prompt) or a closed reply, never a 500; a slow
filter does not stall other clients; the self-check classifies with the served model."""

from __future__ import annotations

import sys
import threading
import time
import types

import pytest
from chat_models import (
    SP_V3,
    needs_tokenizer_files,
    one_torch_thread,  # noqa: F401 — a fixture, used through pytestmark
    tiny_model,
    tokenizer,
)
from test_server_safety import request

from mistral_ref.cli import _serve_options, build_parser
from mistral_ref.moderation import (
    BLOCKING,
    CATEGORIES,
    ContentFilter,
    ContentFilterFailed,
    SelfCheck,
    callable_filter,
    load_content_filter,
    verdict_of,
)
from mistral_ref.server import ChatServer

openai = pytest.importorskip("openai")
inference = pytest.importorskip("azure.ai.inference")
from azure.ai.inference import models as azure_models  # noqa: E402
from azure.core.credentials import AzureKeyCredential  # noqa: E402
from azure.core.exceptions import HttpResponseError  # noqa: E402

pytestmark = [needs_tokenizer_files, pytest.mark.usefixtures("one_torch_thread")]

MESSAGES = [{"role": "user", "content": "Tell me a story."}]
STORY = "Once upon a time a dragon slept."
SLOW_SECONDS = 1.5


def keyword_filter(text: str) -> bool | dict:
    """The tests' deterministic filter: 'forbidden' and 'dragon' are violence, 'broken' makes it fail, 'slow'
    makes it slow; 'doctor' is health (reported, not blocking)."""
    if "broken" in text:
        raise RuntimeError("the filter is broken")
    if "slow" in text:
        time.sleep(SLOW_SECONDS)
    if "doctor" in text:
        return {"health": 0.9}
    return "forbidden" in text or "dragon" in text


@pytest.fixture(scope="module")
def served():
    tok = tokenizer(SP_V3)
    model = tiny_model(tok, max_seq_len=4096)
    server = ChatServer(model, tok, port=0, model_name="tiny", content_filter=keyword_filter).start()
    yield server, model, tok
    server.stop()


@pytest.fixture
def story(served):
    """The served model tells STORY (then EOS) to MESSAGES; reset afterwards."""
    _, model, tok = served
    model.steer(tok.encode(STORY) + [tok.eos_id], len(tok.encode_chat(MESSAGES)))
    yield
    model.steer()


def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def azure(server):
    return inference.ChatCompletionsClient(endpoint=server.url, credential=AzureKeyCredential("unused"))


FLAGGED = [{"role": "user", "content": "a forbidden question"}]


def test_a_flagged_prompt_is_400_content_filter_for_both_clients(served):
    server, _, _ = served
    with pytest.raises(openai.BadRequestError) as e:
        oai(server).chat.completions.create(model="tiny", messages=FLAGGED, max_tokens=4)
    assert e.value.status_code == 400 and e.value.code == "content_filter"
    assert e.value.body["param"] == "messages"
    inner = e.value.body["innererror"]
    assert inner["code"] == "ResponsibleAIPolicyViolation"
    assert inner["content_filter_result"]["violence_and_threats"] == {"filtered": True}
    with pytest.raises(openai.BadRequestError, match="content_filter"):  # streaming: refused before the stream
        list(oai(server).chat.completions.create(model="tiny", messages=FLAGGED, max_tokens=4, stream=True))

    with pytest.raises(HttpResponseError) as e:  # as the seed's snippet catches it
        azure(server).complete(messages=[azure_models.UserMessage(content="a forbidden question")])
    assert e.value.status_code == 400 and e.value.error.code == "content_filter"
    status, _, body = request(server, "POST", "/v1/fim/completions", {"prompt": "def forbidden():"})
    assert status == 400 and body["error"]["code"] == "content_filter" and body["error"]["param"] == "prompt"
    status, _, body = request(server, "GET", "/health")
    assert body["running"] == 0 and body["waiting"] == 0  # nothing was scheduled


def test_a_flagged_reply_ends_with_content_filter_streamed_or_not(served, story):
    server, _, _ = served
    for r in (oai(server).chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=30),
              azure(server).complete(messages=[azure_models.UserMessage(content=MESSAGES[0]["content"])],
                                     temperature=0, max_tokens=30)):
        choice = r.choices[0]
        assert choice.finish_reason == "content_filter"
        assert "drag" not in choice.message.content and STORY.startswith(choice.message.content.strip())
        assert r.usage.completion_tokens < 12  # stopped at the flagged piece, not at EOS
    chunks = list(oai(server).chat.completions.create(model="tiny", messages=MESSAGES, temperature=0,
                                                        max_tokens=30, stream=True, n=2))
    for i in range(2):
        own = [c for c in chunks if c.choices and c.choices[0].index == i]
        text = "".join(c.choices[0].delta.content or "" for c in own)
        assert "drag" not in text and STORY.startswith(text.strip()) and text.strip()
        assert own[-1].choices[0].finish_reason == "content_filter"


def test_a_reply_nothing_flags_is_unchanged(served):
    server, model, tok = served
    from mistral_ref.api import chat_completion

    r = oai(server).chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=8)
    ref = chat_completion(model, tok, MESSAGES, temperature=0, max_tokens=8)
    assert r.choices[0].message.content == ref["choices"][0]["message"]["content"]
    assert r.choices[0].finish_reason == ref["choices"][0]["finish_reason"]


def test_a_failing_filter_is_503_for_the_prompt_and_closes_the_reply(served):
    server, model, tok = served
    with pytest.raises(openai.InternalServerError) as e:
        oai(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "broken"}])
    assert e.value.status_code == 503 and e.value.code == "content_filter_error"
    assert "the filter is broken" in e.value.message and e.value.body["param"] == "content_filter"
    model.steer(tok.encode("All is broken now.") + [tok.eos_id], len(tok.encode_chat(MESSAGES)))
    try:  # fails closed: the text it could not check is withheld
        r = oai(server).chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=20)
    finally:
        model.steer()
    assert r.choices[0].finish_reason == "content_filter" and "broken" not in r.choices[0].message.content


def test_a_slow_prompt_filter_does_not_stall_other_clients(served):
    server, _, _ = served
    result = {}

    def slow():
        t0 = time.perf_counter()
        r = oai(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "slow"}],
                                                max_tokens=2)
        result["slow"] = (time.perf_counter() - t0, r.choices[0].finish_reason)

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.3)  # the slow check is running on a pool thread now
    t0 = time.perf_counter()
    r = oai(server).chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=4)
    other = time.perf_counter() - t0
    thread.join()
    assert r.choices[0].finish_reason == "length"
    assert other < SLOW_SECONDS / 2 < result["slow"][0], (other, result)


def test_moderations_endpoint(served):
    server, _, _ = served
    status, _, body = request(server, "POST", "/v1/moderations",
                              {"model": "mistral-moderation-latest", "input": ["a dragon", "hello", "my doctor"]})
    assert status == 200 and body["model"] == "mistral-moderation-latest" and isinstance(body["id"], str)
    flagged, clean, health = body["results"]
    assert set(flagged["categories"]) == set(flagged["category_scores"]) == set(CATEGORIES)
    assert all(flagged["categories"].values()) and not any(clean["categories"].values())
    assert health["categories"]["health"] and health["category_scores"]["health"] == 0.9
    assert not any(health["categories"][c] for c in BLOCKING)
    status, _, body = request(server, "POST", "/v1/moderations", {"input": "hello"})
    assert status == 200 and body["model"] == "tiny" and len(body["results"]) == 1
    for bad, field in [({}, "input"), ({"input": []}, "input"), ({"input": [1]}, "input"), ({"input": 3}, "input"),
                       ({"input": "x", "temperature": 0}, "temperature"), ({"input": "x", "model": 1}, "model"),
                       ({"input": ["x"] * 33}, "input")]:
        status, _, body = request(server, "POST", "/v1/moderations", bad)
        assert status == 422 and body["error"]["param"] == field, (bad, body)
    status, _, body = request(server, "POST", "/v1/moderations", {"input": "broken"})
    assert status == 503 and body["error"]["code"] == "content_filter_error"
    status, _, doc = request(server, "GET", "/openapi.json")
    assert "/v1/moderations" in doc["paths"] and "ModerationRequest" in doc["components"]["schemas"]
    choice = doc["components"]["schemas"]["ChatCompletion"]["properties"]["choices"]["items"]
    assert "content_filter" in choice["properties"]["finish_reason"]["enum"]


def test_self_check_classifies_with_the_served_model():
    tok = tokenizer(SP_V3)
    model = tiny_model(tok, max_seq_len=4096)
    check = SelfCheck(model, tok)
    assert all(ids for ids in check.digit_ids)
    p = check.scores("How do I bake bread?")
    assert p.shape == (10,) and abs(float(p.sum()) - 1) < 1e-5
    (verdict,) = check(["How do I bake bread?"])
    assert sum(verdict.categories.values()) <= 1  # the greedy answer: one category or none
    top = max(range(10), key=lambda k: float(p[k]))
    assert verdict.categories == {c: top == k for k, c in enumerate(CATEGORIES, 1)}
    assert verdict.category_scores["pii"] == pytest.approx(float(p[9]), abs=1e-5)
    # steered to answer "3" (violence_and_threats): the verdict follows the model
    prompt = check.prompt("anything")
    model.steer([check.digit_ids[3][0]], len(prompt))
    try:
        (verdict,) = check(["anything"])
    finally:
        model.steer()
    assert verdict.categories["violence_and_threats"] and verdict.flagged
    assert verdict.category_scores["violence_and_threats"] > 0.99
    # the server's self-check filter and its /v1/moderations
    server = ChatServer(model, tok, port=0, content_filter="self-check").start()
    try:
        status, _, body = request(server, "POST", "/v1/moderations", {"input": ["hi", "a knife"]})
    finally:
        server.stop()
    assert status == 200 and len(body["results"]) == 2
    for result in body["results"]:  # the nine categories' share of the ten answers (0 = none takes the rest)
        assert set(result["categories"]) == set(CATEGORIES)
        assert 0 < sum(result["category_scores"].values()) <= 1 + 1e-5


def test_callable_verdicts_and_loading():
    assert verdict_of(True).flagged and not verdict_of(False).flagged
    assert verdict_of({"selfharm": 0.7}).categories["selfharm"] and verdict_of({"selfharm": 0.7}).flagged
    assert not verdict_of({"law": True}).flagged  # reported, not blocking
    with pytest.raises(ContentFilterFailed, match="unknown categories"):
        verdict_of({"spam": True})
    with pytest.raises(ContentFilterFailed, match="a bool or a dict"):
        callable_filter(lambda t: "yes").classify(["x"])
    with pytest.raises(ContentFilterFailed, match="ZeroDivisionError"):
        callable_filter(lambda t: 1 / 0, "div").classify(["x"])
    module = types.ModuleType("my_test_filters")
    module.flag = lambda text: "bad" in text
    sys.modules["my_test_filters"] = module
    try:
        f = load_content_filter("my_test_filters:flag", None, None)
        assert f.flags("a bad word") and not f.flags("fine") and f.name == "my_test_filters:flag"
        for spec, message in [("nocolon", "module:function"), ("no_such_module_x:f", "cannot import"),
                              ("my_test_filters:nothing", "no callable")]:
            with pytest.raises(ValueError, match=message):
                load_content_filter(spec, None, None)
    finally:
        del sys.modules["my_test_filters"]


def test_cli_serve_flag():
    args = build_parser().parse_args(["serve", "--content-filter", "self-check"])
    assert _serve_options(args)["content_filter"] == "self-check"
    assert "content_filter" not in _serve_options(build_parser().parse_args(["serve"]))


def test_a_moderation_window_checks_the_reply_in_pieces(served):
    _, model, tok = served
    calls = []

    def classify(texts):
        calls.extend(texts)
        return [verdict_of(keyword_filter(t)) for t in texts]

    server = ChatServer(model, tok, port=0, content_filter=ContentFilter("windowed", classify, window=12)).start()
    model.steer(tok.encode(STORY) + [tok.eos_id], len(tok.encode_chat(MESSAGES)))
    try:
        chunks = list(oai(server).chat.completions.create(model="tiny", messages=MESSAGES, temperature=0,
                                                            max_tokens=30, stream=True))
        model.steer(tok.encode("All is calm here, all is well.") + [tok.eos_id], len(tok.encode_chat(MESSAGES)))
        calm = oai(server).chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=30)
    finally:
        model.steer()
        server.stop()
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    text = "".join(pieces)
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert "drag" not in text and text and STORY.startswith(text.strip())
    assert all(len(p) >= 12 for p in pieces)  # released a window at a time
    assert calm.choices[0].finish_reason == "stop" and calm.choices[0].message.content.strip() == \
        "All is calm here, all is well."
    replies = [c for c in calls if c != "Tell me a story."]
    # one check per window (and one at the end), not one per token
    assert len(replies) <= len(STORY) // 12 + len("All is calm here, all is well.") // 12 + 3
