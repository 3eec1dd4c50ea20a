"""Streaming detokenizers (SentencePieceStreamDecoder, TekkenStreamDecoder): deltas concatenate to decode(all ids)."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistral_ref.tokenizer import Tokenizer, TokenizerError, load_tokenizer, mistral_common_data_dir
from mistral_ref.tokenizer.sentencepiece import sentencepiece_bytes_to_text

DATA = mistral_common_data_dir()
pytestmark = pytest.mark.skipif(DATA is None, reason="the mistral-common wheel ships the tokenizer files")
NAMES = ["tokenizer.model.v1", "mistral_instruct_tokenizer_241114.model.v7", "tekken_240718.json"]


@pytest.fixture(scope="module")
def toks() -> dict[str, Tokenizer]:
    assert DATA is not None
    return {name: load_tokenizer(DATA / name) for name in NAMES}


def _interesting_ids(tok: Tokenizer) -> list[int]:
    """Ids that exercise the corner cases: specials, <unk>, byte pieces / partial UTF-8, leading spaces."""
    ids = [0, 1, 2, 3, 4, 5, 10, 17, 18]
    for text in ["€", "é", "🙂", "中", "▁", " ", "  ", "\n", "Hello", " world", "①", "\u0301", "x"]:
        ids += tok.encode(text)
    if tok.kind == "tekken":
        ids += list(range(1000 + 0x80, 1000 + 0x100, 7)) + [
            1000 + 0xE2,
            1000 + 0x82,
            1000 + 0xAC,
            1000 + 0xF0,
        ]
    else:
        byte = tok.encode("①")[1] - 0xE2  # id of <0x00>
        ids += [
            byte + b for b in (0x20, 0x41, 0x80, 0x82, 0x9F, 0xAC, 0xC0, 0xE0, 0xE2, 0xED, 0xF0, 0xF4, 0xFF)
        ]
    return sorted(set(ids))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("policy", ["ignore", "keep"])
def test_stream_equals_decode(name: str, policy: str, toks: dict[str, Tokenizer]) -> None:
    tok = toks[name]
    pool = _interesting_ids(tok)
    strategy = st.lists(st.one_of(st.sampled_from(pool), st.integers(0, tok.vocab_size - 1)), max_size=40)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(strategy)
    def check(ids: list[int]) -> None:
        dec = tok.stream_decoder(policy)  # type: ignore[arg-type]
        deltas = [dec.feed(t) for t in ids]
        out = "".join(deltas) + dec.flush()
        assert out == tok.decode(ids, policy)  # type: ignore[arg-type]
        if tok.kind == "sentencepiece" and policy == "ignore":
            assert out == tok._sp.decode(ids)  # type: ignore[attr-defined]  # the library itself
        if policy == "keep":  # names of specials removed -> the "ignore" text (SentencePiece and Tekken)
            dec2 = tok.stream_decoder("ignore")
            assert "".join(dec2.feed(t) for t in ids) + dec2.flush() == tok.decode(ids)

    check()


@pytest.mark.parametrize("name", NAMES)
def test_partial_utf8_is_held_back(name: str, toks: dict[str, Tokenizer]) -> None:
    tok = toks[name]
    text = "a🙂b€"
    ids = tok.encode(text)
    dec = tok.stream_decoder()
    deltas = [dec.feed(t) for t in ids]
    assert "".join(deltas) + dec.flush() == text
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("name", NAMES)
def test_stream_of_generated_text_and_reuse(name: str, toks: dict[str, Tokenizer]) -> None:
    tok = toks[name]
    text = "  Bonjour 👋🏽 le monde,\n\tnaïve café 中文 — done.  "
    ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
    dec = tok.stream_decoder()
    first = dec.feed_many(ids) + dec.flush()
    assert first == tok.decode(ids) == text
    assert dec.feed_many(ids) + dec.flush() == first  # flush starts a fresh sequence


@pytest.mark.parametrize("name", NAMES)
def test_stream_raise_policy_and_bad_ids(name: str, toks: dict[str, Tokenizer]) -> None:
    tok = toks[name]
    dec = tok.stream_decoder("raise")
    assert dec.feed_many(tok.encode("ok")) == tok.decode(tok.encode("ok"))
    with pytest.raises(TokenizerError, match="special"):
        dec.feed(tok.eos_id)
    for bad in (-1, tok.vocab_size):
        with pytest.raises(TokenizerError, match="out of range"):
            tok.stream_decoder().feed(bad)
    with pytest.raises(TokenizerError):
        tok.stream_decoder("loud")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", NAMES)
def test_stream_cost_is_constant_per_token(name: str, toks: dict[str, Tokenizer]) -> None:
    tok = toks[name]
    ids = tok.encode("Streaming text with émojis 🙂 and 中文 characters. " * 1500)

    def run(n: int) -> float:  # CPU time of this process: robust to other load on the machine
        best = float("inf")
        for _ in range(5):
            dec = tok.stream_decoder()
            t0 = time.process_time()
            for t in ids[:n]:
                dec.feed(t)
            best = min(best, time.process_time() - t0)
        return best

    small, big = run(len(ids) // 10), run(len(ids))
    assert big / max(small, 1e-4) < 30, (small, big)  # re-decoding everything each step would be ~100x


def test_sentencepiece_byte_rule() -> None:
    """One U+FFFD per stray byte (SentencePiece), incomplete characters wait unless final."""
    buf = bytearray(b"\xe2\x82")
    assert sentencepiece_bytes_to_text(buf, final=False) == "" and buf == b"\xe2\x82"
    assert sentencepiece_bytes_to_text(buf, final=True) == "\ufffd\ufffd" and not buf
    buf = bytearray(b"\xf0\x9fA\xed\xa0\x80\xc0\xaf\xe2\x82\xac")
    assert sentencepiece_bytes_to_text(buf, final=False) == "\ufffd\ufffdA" + "\ufffd" * 5 + "€"
