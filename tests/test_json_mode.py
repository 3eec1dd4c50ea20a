"""mistral_ref.json_mode: the byte-level JSON grammar agrees with json.loads; the vectorised token masks agree
with
the one-token-at-a-time check; constrained generation always yields JSON when it stops (SentencePiece and Tekken)."""

from __future__ import annotations

import json

import pytest
import torch
from chat_models import (
    SP_V3,
    TEKKEN_V3,
    needs_tokenizer_files,
    one_torch_thread,  # noqa: F401 — a fixture, used through pytestmark
    punctuation_bias,
    tiny_model,
    tokenizer,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from mistral_ref.api import chat_completion
from mistral_ref.generation import generate
from mistral_ref.json_mode import (
    JsonLogitsProcessor,
    advance,
    initial_state,
    is_complete_json,
    json_vocab,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def python_accepts(text: str, root: str) -> bool:
    """Strict JSON by the standard library (no NaN / Infinity), with the root restricted like the
    grammar's."""

    def refuse(name: str):
        raise ValueError(name)

    try:
        value = json.loads(text, parse_constant=refuse)
    except (ValueError, RecursionError):
        return False
    return root == "any" or isinstance(value, dict)


# ---- the grammar -------------------------------------------------------------------------------------------
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
layouts = st.sampled_from([{}, {"indent": 2}, {"separators": (",", ":")}, {"indent": "\t"}])


@settings(max_examples=60, deadline=None)
@given(doc=st.dictionaries(st.text(), values, max_size=4), layout=layouts, ascii_only=st.booleans())
def test_grammar_accepts_every_json_document_and_completes_only_at_its_end(doc, layout, ascii_only):
    text = json.dumps(doc, ensure_ascii=ascii_only, **layout)
    data = text.encode("utf-8")
    assert is_complete_json(" \n" + text + "\r\n\t")
    state = initial_state()
    for i, b in enumerate(data):  # byte by byte: every prefix is alive, only the whole document is complete
        assert not state.complete
        state = advance(state, bytes([b]))
        assert state is not None, (text, i)
    assert state.complete


JSONISH = st.text(alphabet='{}[]":,-+.0123456789eEtrufalsn \n\\/bu\x01é', max_size=24)


@settings(max_examples=200, deadline=None)
@given(text=JSONISH | st.builds(json.dumps, values).map(lambda s: s[:-1] + "," + s[-1:]))
def test_grammar_rejects_exactly_what_json_loads_rejects(text):
    for root in ("any", "object"):
        assert is_complete_json(text, root) == python_accepts(text, root), (text, root)


@settings(max_examples=150, deadline=None)
@given(raw=st.binary(max_size=8))
def test_strings_must_be_well_formed_utf8(raw):
    data = b'{"k": "' + raw + b'"}'
    state = advance(initial_state(), data)
    try:
        ok = python_accepts(data.decode("utf-8"), "object")
    except UnicodeDecodeError:
        ok = False
    assert (state is not None and state.complete) == ok


def test_examples_and_limits():
    assert is_complete_json('{"a": [1, -0.5e+3, true, false, null, "\\u00e9\\n", {}]}')
    assert not is_complete_json("[1, 2]") and is_complete_json("[1, 2]", root="any")
    assert is_complete_json("-12.5E3", root="any") and not is_complete_json("01", root="any")
    deep = "[" * 100 + "]" * 100  # deeper than the 62 levels the vectorised check keeps in one int64
    assert is_complete_json('{"a": ' + deep + "}")
    assert advance(initial_state(), b'{"a": ' + b"[" * 100 + b"]" * 101) is None
    with pytest.raises(ValueError, match="root"):
        initial_state("array")


# ---- token masks -------------------------------------------------------------------------------------------
PREFIXES = [
    b"",
    b" ",
    b"{",
    b'{"',
    b'{"ke',
    b'{"key"',
    b'{"key":',
    b'{"key": ',
    b'{"key": "v',
    b'{"key": "\\',
    b'{"key": "\\u0',
    b'{"key": "\xe6',
    b'{"key": "\xf0\x9f',
    b'{"key": -',
    b'{"key": 0',
    b'{"key": 12.',
    b'{"key": 1e',
    b'{"key": tr',
    b'{"key": [',
    b'{"key": [1',
    b'{"key": [1,',
    b'{"key": [{"a": {}}',
    b'{"key": {"a": [',
    b'{"a": 1}',
    b'{"a": 1} ',
    b'{"a": ' + b"[" * 70,
    b'{"a": ' + b'[{"b": ' * 35 + b"1",
]


def check_masks(tok, prefixes):
    vocab = json_vocab(tok)
    for prefix in prefixes:
        state = advance(initial_state(), prefix)
        assert state is not None, prefix
        mask = vocab.allowed(state)
        expected = torch.tensor([bool(b) and advance(state, b) is not None for b in vocab.token_bytes])
        assert torch.equal(mask, expected), prefix
        assert not mask[[i for i in tok.special_ids]].any()  # control tokens never; EOS is decided separately


@needs_tokenizer_files
def test_vectorised_masks_equal_the_scalar_check_sentencepiece():
    check_masks(tokenizer(SP_V3), PREFIXES)


@needs_tokenizer_files
def test_vectorised_masks_equal_the_scalar_check_tekken():
    check_masks(tokenizer(TEKKEN_V3), PREFIXES[::4] + PREFIXES[-2:])


@needs_tokenizer_files
def test_byte_fallback_pieces_complete_a_split_character():
    tok = tokenizer(SP_V3)
    vocab = json_vocab(tok)
    state = advance(initial_state(), b'{"k": "\xe6')  # the first byte of a 3-byte character
    mask = vocab.allowed(state)
    allowed = {vocab.token_bytes[i] for i in mask.nonzero()[:, 0].tolist()}
    assert allowed == {bytes([b]) for b in range(0x80, 0xC0)}  # exactly the <0x80>..<0xBF> pieces
    assert all(tok.id_to_piece(i).startswith("<0x") for i in mask.nonzero()[:, 0].tolist())


@needs_tokenizer_files
def test_processor_allows_eos_only_when_complete_and_never_specials():
    tok = tokenizer(SP_V3)
    for greedy in (False, True):
        proc = JsonLogitsProcessor(tok, greedy=greedy)
        script = tok.encode('{"a": 1}')
        generated = torch.zeros(1, 0, dtype=torch.long)
        for i, t in enumerate(script + [None]):
            logits = torch.zeros(1, tok.vocab_size)
            logits[0, tok.eos_id] = 10.0  # EOS is the model's favourite...
            out = proc(generated, logits)
            complete = i == len(script)
            assert (out[0, tok.eos_id] > float("-inf")) == complete  # ...allowed only once the object closes
            assert torch.isneginf(out[0, sorted(tok.special_ids - {tok.eos_id})]).all()
            if t is not None:
                generated = torch.cat([generated, torch.tensor([[t]])], 1)
        with pytest.raises(ValueError, match="once per step"):
            proc(torch.zeros(1, len(script) + 3, dtype=torch.long), torch.zeros(1, tok.vocab_size))


# ---- generation --------------------------------------------------------------------------------------------
def constrained_rows(tok, model, seed, rows, max_tokens, constrained=True):
    prompt = tok.encode_chat([{"role": "user", "content": "Answer in JSON."}])
    procs = [JsonLogitsProcessor(tok)] if constrained else []
    return generate(
        model,
        [prompt] * rows,
        max_tokens,
        temperature=1.0,
        seed=seed,
        eos_id=tok.eos_id,
        logits_processors=procs,
    )


@needs_tokenizer_files
@pytest.mark.parametrize("name, rows, seeds", [(SP_V3, 16, 2), (TEKKEN_V3, 8, 1)])
def test_every_stopped_generation_is_json_across_seeds(name, rows, seeds):
    tok = tokenizer(name)
    model = tiny_model(tok).steer(
        bias=punctuation_bias(tok, 8.0)
    )  # EOS and {}[]":, likely: JSON closes early
    stopped = invalid_without_grammar = 0
    for seed in range(seeds):
        for res in constrained_rows(tok, model, seed, rows, 16):
            if res.finish_reason == "stop":
                stopped += 1
                assert isinstance(json.loads(tok.decode(res.tokens)), dict), tok.decode(res.tokens)
        for res in constrained_rows(tok, model, seed, rows, 16, constrained=False):
            if res.finish_reason == "stop":
                invalid_without_grammar += not python_accepts(tok.decode(res.tokens), "object")
    assert stopped >= rows // 4  # the property was exercised, not vacuously true
    assert invalid_without_grammar >= rows // 4  # and the same model without the grammar does break it


@needs_tokenizer_files
@pytest.mark.parametrize("name", [SP_V3, TEKKEN_V3])
def test_json_mode_through_chat_completion(name):
    tok = tokenizer(name)
    model = tiny_model(tok).steer(bias=punctuation_bias(tok, 8.0))
    messages = [{"role": "user", "content": "Answer in JSON."}]
    finishes = []
    for seed in range(3):
        for stream in (False, True):
            out = chat_completion(
                model,
                tok,
                messages,
                temperature=1.0,
                seed=seed,
                max_tokens=16,
                stream=stream,
                response_format={"type": "json_object"},
            )
            if stream:
                chunks = list(out)
                content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
                finish = chunks[-1]["choices"][0]["finish_reason"]
            else:
                content, finish = out["choices"][0]["message"]["content"], out["choices"][0]["finish_reason"]
            finishes.append(finish)
            if finish == "stop":
                assert isinstance(json.loads(content), dict)
    assert "stop" in finishes


@needs_tokenizer_files
def test_greedy_lazy_path_equals_the_full_mask_argmax():
    tok = tokenizer(SP_V3)
    model = tiny_model(tok).steer(bias=punctuation_bias(tok, 8.0))
    prompt = tok.encode_chat([{"role": "user", "content": "JSON please"}])
    json_vocab(tok)._cache.clear()  # masks cached by earlier tests would take the lazy path's place
    lazy, full = JsonLogitsProcessor(tok, greedy=True), JsonLogitsProcessor(tok, greedy=False)
    (a,) = generate(model, [prompt], 30, temperature=0, eos_id=tok.eos_id, logits_processors=[lazy])
    (b,) = generate(model, [prompt], 30, temperature=0, eos_id=tok.eos_id, logits_processors=[full])
    assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
    assert lazy.lazy_checks > 0


@needs_tokenizer_files
def test_stop_strings_never_cut_the_json_document():
    tok = tokenizer(SP_V3)
    model = tiny_model(tok)
    messages = [{"role": "user", "content": "JSON please"}]
    script = tok.encode('{"a": "x}y"}\n\nmore') + [tok.eos_id]
    model.steer(script, len(tok.encode_chat(messages)))
    fmt = {"type": "json_object"}
    whole = chat_completion(model, tok, messages, temperature=0, max_tokens=20, stop="}", response_format=fmt)
    cut = chat_completion(model, tok, messages, temperature=0, max_tokens=20, stop="\n", response_format=fmt)
    free = chat_completion(model, tok, messages, temperature=0, max_tokens=20, stop="}")
    # "}" occurs inside the string and closes the object: never a complete document before it, so no cut
    assert json.loads(whole["choices"][0]["message"]["content"]) == {"a": "x}y"}
    assert (
        cut["choices"][0]["message"]["content"] == '{"a": "x}y"}'
        and cut["choices"][0]["finish_reason"] == "stop"
    )
    assert free["choices"][0]["message"]["content"] == '{"a": "x'  # without JSON mode the stop string cuts
