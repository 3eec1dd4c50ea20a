"""The pluggable moderation stage of api.chat_completion: a flagged prompt is a ContentFilterError before anything
is generated; a flagged reply stops with finish_reason "content_filter", the flagged text withheld (streaming too)."""

from __future__ import annotations

import pytest
from chat_models import (
    SP_V3,
    needs_tokenizer_files,
    one_torch_thread,  # noqa: F401 — a fixture, used through pytestmark
    tiny_model,
    tokenizer,
)

from mistral_ref.api import ContentFilterError, RequestError, chat_completion, prompt_text

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), needs_tokenizer_files]
MSGS = [{"role": "user", "content": "Tell me a story."}]


def test_a_flagged_prompt_is_a_content_filter_error():
    tok = tokenizer(SP_V3)
    seen = []

    def moderation(text):
        seen.append(text)
        return "forbidden" in text

    msgs = [{"role": "system", "content": "Be kind."},
            {"role": "user", "content": [{"type": "text", "text": "a forbidden word"}]}]
    with pytest.raises(ContentFilterError) as e:
        chat_completion(tiny_model(tok), tok, msgs, moderation=moderation, stream=True)
    assert isinstance(e.value, RequestError) and e.value.code == "content_filter" and e.value.field == "messages"
    assert seen == ["Be kind.\na forbidden word"] == [prompt_text(msgs)]


def test_a_flagged_reply_stops_with_content_filter_and_withholds_the_text():
    tok = tokenizer(SP_V3)
    model = tiny_model(tok)
    model.steer(tok.encode("Once upon a time there was a dragon.") + [tok.eos_id], len(tok.encode_chat(MSGS)))
    free = chat_completion(model, tok, MSGS, temperature=0, max_tokens=30)
    assert "dragon" in free["choices"][0]["message"]["content"] and free["choices"][0]["finish_reason"] == "stop"
    calls = []

    def moderation(text):
        calls.append(text)
        return "drag" in text

    out = chat_completion(model, tok, MSGS, temperature=0, max_tokens=30, moderation=moderation)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "content_filter"
    assert "drag" not in choice["message"]["content"]
    assert free["choices"][0]["message"]["content"].startswith(choice["message"]["content"])
    assert out["usage"]["completion_tokens"] < free["usage"]["completion_tokens"]  # generation stopped early
    assert len(calls) > 2  # prompt, then the answer as it grew
    chunks = list(chat_completion(model, tok, MSGS, temperature=0, max_tokens=30, moderation=moderation,
                                  stream=True))
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"


def test_nothing_flagged_changes_nothing():
    tok = tokenizer(SP_V3)
    model = tiny_model(tok)
    a = chat_completion(model, tok, MSGS, temperature=0, max_tokens=8)
    b = chat_completion(model, tok, MSGS, temperature=0, max_tokens=8, moderation=lambda text: False)
    assert a["choices"] == b["choices"] and a["usage"] == b["usage"]
