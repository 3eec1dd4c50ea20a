"""The OpenAI request fields issue 20 added to the chat API: n, max_completion_tokens, assistant prefix,
metadata and prediction (accepted, ignored)."""

from __future__ import annotations

import pytest
from chat_models import (
    SP_V3,
    needs_tokenizer_files,
    one_torch_thread,  # noqa: F401 — a fixture, used through pytestmark
    tiny_model,
    tokenizer,
)

from mistral_ref.api import RequestError, chat_completion, parse_request
from mistral_ref.request_spec import MAX_CHOICES

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), needs_tokenizer_files]
MSGS = [{"role": "user", "content": "Say something."}]


def test_n_choices_count_the_prompt_once_and_differ_by_seed():
    tok = tokenizer(SP_V3)
    model = tiny_model(tok)
    one = chat_completion(model, tok, MSGS, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True)
    three = chat_completion(model, tok, MSGS, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True, n=3)
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert three["choices"][0]["message"] == one["choices"][0]["message"]  # choice 0 is the n=1 reply
    assert len({c["message"]["content"] for c in three["choices"]}) > 1  # seed + i: different samples
    assert three["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    assert three["usage"]["completion_tokens"] == 18
    chunks = list(chat_completion(model, tok, MSGS, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True, n=3,
                                  stream=True))
    for i, c in enumerate(three["choices"]):
        mine = [k["choices"][0] for k in chunks if k["choices"][0]["index"] == i]
        assert "".join(d["delta"].get("content", "") for d in mine) == c["message"]["content"]
        assert mine[-1]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == three["usage"] and all("usage" not in k for k in chunks[:-1])


def test_n_out_of_range_is_a_request_error():
    for n in (0, MAX_CHOICES + 1, 2.5):
        with pytest.raises(RequestError) as e:
            parse_request({"messages": MSGS, "n": n})
        assert e.value.field == "n"


def test_max_completion_tokens_is_max_tokens():
    assert parse_request({"messages": MSGS, "max_completion_tokens": 7}).max_tokens == 7
    assert parse_request({"messages": MSGS, "max_completion_tokens": 7, "max_tokens": 7}).max_tokens == 7
    with pytest.raises(RequestError, match="disagree") as e:
        parse_request({"messages": MSGS, "max_completion_tokens": 7, "max_tokens": 8})
    assert e.value.field == "max_completion_tokens"
    with pytest.raises(RequestError) as e:
        parse_request({"messages": MSGS, "max_completion_tokens": 0})
    assert e.value.field == "max_completion_tokens"
    tok = tokenizer(SP_V3)
    out = chat_completion(tiny_model(tok), tok, MSGS, max_completion_tokens=3, ignore_eos=True, temperature=0)
    assert out["usage"]["completion_tokens"] == 3


def test_metadata_and_prediction_are_accepted_and_ignored():
    tok = tokenizer(SP_V3)
    model = tiny_model(tok)
    plain = chat_completion(model, tok, MSGS, temperature=0, max_tokens=5)
    extra = chat_completion(model, tok, MSGS, temperature=0, max_tokens=5, metadata={"user": "x"},
                            prediction={"type": "content", "content": "something else"})
    assert extra["choices"] == plain["choices"]
    for name in ("metadata", "prediction"):
        with pytest.raises(RequestError) as e:
            parse_request({"messages": MSGS, name: "tags"})
        assert e.value.field == name


def test_assistant_prefix_is_continued():
    tok = tokenizer(SP_V3)
    model = tiny_model(tok)
    msgs = [*MSGS, {"role": "assistant", "content": "Once upon", "prefix": True}]
    prompt = tok.encode_chat(msgs, continue_final_message=True)
    model.steer(tok.encode(" a time") [1:] + [tok.eos_id], len(prompt))
    out = chat_completion(model, tok, msgs, temperature=0, max_tokens=10)
    assert out["usage"]["prompt_tokens"] == len(prompt)  # the prefix is in the prompt, not closed by </s>
    assert prompt[-1] != tok.eos_id
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["message"]["content"].strip() == "a time"
