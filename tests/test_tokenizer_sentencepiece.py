"""SentencePiece tokenizers (mistral_ref.tokenizer.sentencepiece): pieces, bytes, spaces, versions."""

from __future__ import annotations

import pytest

from mistral_ref.tokenizer import SentencePieceTokenizer, load_tokenizer, mistral_common_data_dir
from mistral_ref.tokenizer.sentencepiece import version_from_filename

DATA = mistral_common_data_dir()
pytestmark = pytest.mark.skipif(DATA is None, reason="the mistral-common wheel ships the tokenizer files")


@pytest.fixture(scope="module")
def v3() -> SentencePieceTokenizer:
    assert DATA is not None
    tok = load_tokenizer(DATA / "mistral_instruct_tokenizer_240323.model.v3")
    assert isinstance(tok, SentencePieceTokenizer)
    return tok


def test_byte_pieces_and_spaces(v3: SentencePieceTokenizer) -> None:
    ids = v3.encode("①")  # no piece for it: byte fallback <0xE2><0x91><0xA0>
    assert [v3.id_to_piece(t) for t in ids] == ["▁", "<0xE2>", "<0x91>", "<0xA0>"]
    assert [v3.id_to_bytes(t) for t in ids] == [b" ", b"\xe2", b"\x91", b"\xa0"]
    hello = v3.encode("Hello")[0]
    assert v3.id_to_piece(hello) == "▁Hello" and v3.id_to_bytes(hello) == b" Hello"
    assert v3.id_to_bytes(v3.unk_id) == " \u2047 ".encode()
    assert v3.id_to_bytes(v3.special_id("[INST]")) == b""


def test_leading_space_rules(v3: SentencePieceTokenizer) -> None:
    hello, world = v3.encode("Hello")[0], v3.encode("world")[0]
    inst = v3.special_id("[INST]")
    assert v3.decode([hello, world]) == "Hello world"  # first visible piece loses its dummy-prefix space
    assert v3.decode([v3.bos_id, inst, hello]) == "Hello"  # control tokens are invisible
    assert v3.decode([hello, inst, hello]) == "Hello Hello"
    assert v3.decode([v3.unk_id, hello]) == " \u2047  Hello"  # <unk> counts as the first piece
    assert v3.decode(v3.encode("  two spaces")) == "  two spaces"


def test_user_defined_pieces_are_not_special(v3: SentencePieceTokenizer) -> None:
    # v3/v7 define [REFERENCE_DOC_n] as user-defined pieces: SentencePiece matches them in text (as in
    # mistral-common), but they are ordinary tokens, not control tokens.
    ids = v3.encode("[REFERENCE_DOC_3]")
    assert v3.id_to_piece(ids[-1]) == "[REFERENCE_DOC_3]" and not v3.is_special(ids[-1])


def test_u2581_cannot_round_trip(v3: SentencePieceTokenizer) -> None:
    # SentencePiece writes spaces as U+2581, so a literal U+2581 in text comes back as a space.
    assert v3.decode(v3.encode("a\u2581b")) == "a b"


def test_lone_surrogates(v3: SentencePieceTokenizer) -> None:
    assert v3.decode(v3.encode("x\udc00y")) == "x\ufffdy"
    with pytest.raises(TypeError):
        v3.encode(b"bytes")  # type: ignore[arg-type]


def test_version_from_filename() -> None:
    assert version_from_filename("tokenizer.model.v3") == "v3"
    assert version_from_filename("/x/mistral_instruct_tokenizer_241114.model.v7m1") == "v7"
    assert version_from_filename("tokenizer.model") is None
    assert version_from_filename("tekken.json") is None
