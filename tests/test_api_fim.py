"""mistral_ref.api.fim_completion: the Mistral FIM API's response on a local model, equal to generating from
tokenizer.encode_fim; min_tokens, stop strings, streaming, and errors that name the field."""

from __future__ import annotations

import pytest
import torch
from chat_models import (
    SP_V3,
    TEKKEN_V3,
    needs_tokenizer_files,
    one_torch_thread,  # noqa: F401 — a fixture, used through pytestmark
    tiny_model,
    tokenizer,
)

from mistral_ref.api import ContextLengthError, RequestError, fim_completion, parse_fim_request
from mistral_ref.generation import generate, generate_stream
from mistral_ref.request_spec import FIM_FIELDS, FIM_REQUEST, fim_request_schema

pytestmark = [needs_tokenizer_files, pytest.mark.usefixtures("one_torch_thread")]

PROMPT = "def add(a, b):\n    return"
SUFFIX = "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def sp():
    tok = tokenizer(SP_V3)
    return tiny_model(tok), tok


def test_response_shape_and_greedy_equals_generate(sp):
    model, tok = sp
    r = fim_completion(model, tok, PROMPT, SUFFIX, temperature=0, max_tokens=10, model_name="codestral-tiny")
    assert set(r) == {"id", "object", "created", "model", "choices", "usage"}
    assert r["object"] == "chat.completion" and r["model"] == "codestral-tiny"
    (choice,) = r["choices"]
    assert set(choice) == {"index", "message", "finish_reason"} and choice["index"] == 0
    assert choice["message"]["role"] == "assistant" and choice["message"]["tool_calls"] is None

    ids = tok.encode_fim(PROMPT, SUFFIX)
    (ref,) = generate(model, [ids], 10, temperature=0, eos_id=tok.eos_id)
    middle = "".join(e.text for e in generate_stream(model, tok, ids, 10, temperature=0, continue_prompt_text=True))
    assert choice["message"]["content"] == middle
    assert choice["finish_reason"] == ref.finish_reason
    n = len(ref.tokens) + (ref.stop_token_id is not None)
    assert r["usage"] == {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}


def test_the_middle_continues_the_prompts_text():
    """SentencePiece: a generated piece starting with a space keeps it (it follows the prompt's text)."""
    tok = tokenizer(SP_V3)
    model = tiny_model(tok)
    ids = tok.encode_fim(PROMPT, SUFFIX)
    model.steer([*tok.encode(" a + b")[1:], tok.eos_id], len(ids))  # "▁a", "▁+", "▁b": drop the lone "▁"
    try:
        r = fim_completion(model, tok, PROMPT, SUFFIX, temperature=0, max_tokens=10)
    finally:
        model.steer()
    assert r["choices"][0]["message"]["content"] == " a + b" and r["choices"][0]["finish_reason"] == "stop"


def test_stream_matches_non_stream(sp):
    model, tok = sp
    kw = dict(temperature=0.9, seed=3, max_tokens=12)
    r = fim_completion(model, tok, PROMPT, SUFFIX, **kw)
    chunks = list(fim_completion(model, tok, PROMPT, SUFFIX, stream=True, **kw))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == r["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == r["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == r["usage"]


def test_min_tokens_keeps_eos_away(sp):
    model, tok = sp
    bias = torch.zeros(tok.vocab_size)
    bias[tok.eos_id] = 100.0  # EOS is always the most likely token
    model.steer(bias=bias)
    try:
        r = fim_completion(model, tok, PROMPT, SUFFIX, temperature=0, max_tokens=20)
        assert r["usage"]["completion_tokens"] == 1 and r["choices"][0]["message"]["content"] == ""
        for k in (1, 5):
            r = fim_completion(model, tok, PROMPT, SUFFIX, temperature=0.7, seed=k, max_tokens=20, min_tokens=k)
            assert r["usage"]["completion_tokens"] == k + 1 and r["choices"][0]["finish_reason"] == "stop"
            assert r["choices"][0]["message"]["content"]
        r = fim_completion(model, tok, PROMPT, SUFFIX, temperature=0, max_tokens=6, min_tokens=6)
        assert r["usage"]["completion_tokens"] == 6 and r["choices"][0]["finish_reason"] == "length"
    finally:
        model.steer()


def test_stop_strings_cut_the_middle(sp):
    model, tok = sp
    ids = tok.encode_fim(PROMPT, SUFFIX)
    model.steer([*tok.encode(" a + b\nprint")[1:], tok.eos_id], len(ids))
    try:
        r = fim_completion(model, tok, PROMPT, SUFFIX, temperature=0, max_tokens=20, stop=["\n"])
    finally:
        model.steer()
    assert r["choices"][0]["message"]["content"] == " a + b" and r["choices"][0]["finish_reason"] == "stop"


def test_without_suffix_and_on_tekken():
    tok = tokenizer(TEKKEN_V3)
    model = tiny_model(tok)
    r = fim_completion(model, tok, PROMPT, temperature=0, max_tokens=3)
    assert r["usage"]["prompt_tokens"] == len(tok.encode_fim(PROMPT))


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"prompt": None}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"suffix": ["x"]}, "suffix"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"stop": ""}, "stop"),
        ({"seed": 1, "random_seed": 2}, "random_seed"),
        ({"tools": []}, "tools"),
        ({"messages": []}, "messages"),
    ],
)
def test_bad_parameters_name_the_field(sp, params, field):
    model, tok = sp
    body = {"prompt": PROMPT, **params}
    with pytest.raises(RequestError) as e:
        fim_completion(model, tok, **body)
    assert e.value.field == field and str(e.value).startswith(field)


def test_a_tokenizer_without_fim_and_the_context():
    v1 = tokenizer("tokenizer.model.v1")
    with pytest.raises(RequestError, match="no fill-in-the-middle") as e:
        fim_completion(tiny_model(v1), v1, PROMPT)
    assert e.value.field == "prompt"
    tok = tokenizer(SP_V3)
    model = tiny_model(tok)
    n = len(tok.encode_fim(PROMPT, SUFFIX))
    with pytest.raises(ContextLengthError) as e:
        fim_completion(model, tok, PROMPT, SUFFIX, max_context=n)
    assert e.value.field == "prompt"
    with pytest.raises(RequestError) as e:
        fim_completion(model, tok, PROMPT, SUFFIX, max_context=n + 3, min_tokens=4)
    assert e.value.field == "min_tokens"
    r = fim_completion(model, tok, PROMPT, SUFFIX, max_context=n + 3, temperature=0, min_tokens=3)
    assert r["usage"]["completion_tokens"] == 3  # max_tokens defaults to what the context leaves


def test_the_fim_request_spec():
    schema = fim_request_schema()
    assert schema["required"] == ["prompt"] and schema["additionalProperties"] is False
    assert list(schema["properties"]) == [f.name for f in FIM_REQUEST]
    assert {"prompt", "suffix", "max_tokens", "min_tokens", "stop", "temperature", "top_p", "seed", "random_seed",
            "stream", "model"} == set(FIM_FIELDS)
    assert schema["properties"]["min_tokens"]["minimum"] == 0
    req = parse_fim_request({"prompt": "x", "random_seed": 7, "stop": "\n", "suffix": None})
    assert (req.seed, req.stop, req.suffix, req.min_tokens, req.temperature) == (7, ["\n"], None, 0, 0.7)
