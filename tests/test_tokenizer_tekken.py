"""Tekken tokenizers (mistral_ref.tokenizer.tekken): file fields, special tokens, id offsets."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import tiktoken

from mistral_ref.tokenizer import (
    LEGACY_SPECIAL_TOKENS,
    TekkenTokenizer,
    TokenizerError,
    load_tokenizer,
    mistral_common_data_dir,
    write_tekken_file,
)

DATA = mistral_common_data_dir()
pytestmark = pytest.mark.skipif(DATA is None, reason="the mistral-common wheel ships the tokenizer files")


@pytest.fixture(scope="module")
def nemo_data() -> dict[str, Any]:
    assert DATA is not None
    return json.loads((DATA / "tekken_240718.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def nemo(nemo_data: dict[str, Any]) -> TekkenTokenizer:
    return TekkenTokenizer(nemo_data)


def test_legacy_special_tokens(nemo: TekkenTokenizer) -> None:
    assert [nemo.id_to_piece(i) for i in range(20)] == list(LEGACY_SPECIAL_TOKENS)
    assert nemo.id_to_piece(20) == "<SPECIAL_20>" and nemo.id_to_piece(999) == "<SPECIAL_999>"
    assert nemo.pad_id == 11 and nemo.special_id("[SYSTEM_PROMPT]") == 17
    assert nemo.is_special(999) and not nemo.is_special(1000) and not nemo.is_special(-1)


def test_ids_are_ranks_plus_num_special(nemo_data: dict[str, Any], nemo: TekkenTokenizer) -> None:
    # The plain tiktoken encoding over unshifted ranks gives the same merges: ids differ by exactly 1000.
    inner = 131072 - 1000
    ranks = {base64.b64decode(v["token_bytes"]): v["rank"] for v in nemo_data["vocab"][:inner]}
    plain = tiktoken.Encoding(
        "plain", pat_str=nemo_data["config"]["pattern"], mergeable_ranks=ranks, special_tokens={}
    )
    for text in ["Hello world", "ça va? 你好 🙂", "x" * 300, "  \n\t 123456 "]:
        assert nemo.encode(text) == [t + 1000 for t in plain.encode_ordinary(text)]
    assert nemo.id_to_bytes(1000 + ord("A")) == b"A"  # ranks 0..255 are the single bytes
    assert nemo.id_to_bytes(nemo.bos_id) == b""
    assert nemo.id_to_piece(1000 + 0xE2) == "\ufffd"  # a lone lead byte


def test_explicit_special_token_list(tmp_path: Path, nemo_data: dict[str, Any]) -> None:
    names = [*LEGACY_SPECIAL_TOKENS, "[ARGS]", "[CALL_ID]"]
    tok = load_tokenizer(write_tekken_file(nemo_data, tmp_path / "tekken.json", "v11", names))
    assert isinstance(tok, TekkenTokenizer)
    assert (tok.version, tok.special_id("[ARGS]"), tok.special_id("[CALL_ID]")) == ("v11", 20, 21)
    assert tok.special_id("<SPECIAL_22>") == 22 and tok.encode("hi") == TekkenTokenizer(nemo_data).encode(
        "hi"
    )


def test_file_errors(nemo_data: dict[str, Any]) -> None:
    def variant(**config: Any) -> dict[str, Any]:
        return {**nemo_data, "config": {**nemo_data["config"], **config}}

    with pytest.raises(TokenizerError, match="must list their special_tokens"):
        TekkenTokenizer(variant(version="v13"))
    with pytest.raises(TokenizerError, match="unsupported tekken version"):
        TekkenTokenizer(variant(version="v99"))
    with pytest.raises(TokenizerError, match="has rank"):
        TekkenTokenizer({**variant(version="v11"), "special_tokens": [{"rank": 5, "token_str": "<unk>"}]})
    with pytest.raises(TokenizerError, match="not unique"):
        listed = [{"rank": i, "token_str": "<s>"} for i in range(2)]
        TekkenTokenizer({**variant(version="v11"), "special_tokens": listed})
    with pytest.raises(TokenizerError, match="needs"):
        TekkenTokenizer({**nemo_data, "vocab": nemo_data["vocab"][:1000]})
    with pytest.raises(TokenizerError, match="missing or malformed"):
        TekkenTokenizer({"vocab": []})
