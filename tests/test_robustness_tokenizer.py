"""Pathological text and corrupt tokenizer files: tokens or a TokenizerError, never a panic or a hang.

tiktoken's regex engine gives up on a run of about a million spaces (``\\s+(?!\\S)`` runs out of backtracking
stack) and tiktoken then panics with pyo3's PanicException, which is a BaseException: it kills the calling
thread.  TekkenTokenizer.encode cuts long white-space runs out of the text and byte-pair-encodes them itself;
these tests check the ids stay identical to tiktoken's (and mistral-common's) wherever those succeed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from mistral_ref.tokenizer import TekkenTokenizer, TokenizerError, load_tokenizer, mistral_common_data_dir
from mistral_ref.tokenizer.tekken import LONG_SPACE_RUN, MAX_SPECIAL_TOKENS, TEKKEN_PATTERN, _split_long_space_runs

DATA = mistral_common_data_dir()
pytestmark = pytest.mark.skipif(DATA is None, reason="the mistral-common wheel ships the tokenizer files")

# Rust's \s (Unicode White_Space) includes these; U+001F is not white space there (it is in Python).
WHITE = [" ", "\t", "\n", "\r", "\x0b", "\xa0", "\u3000", "\u2028"]
EDGES = ["", "a", "A", "1", "!", "!!", "é", "😀", "/", "x\n", "\r\n", "Hello", "\x1f", "'s"]


@pytest.fixture(scope="module")
def tekken_data() -> dict[str, Any]:
    assert DATA is not None
    return json.loads((DATA / "tekken_240911.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tekken(tekken_data: dict[str, Any]) -> TekkenTokenizer:
    return TekkenTokenizer(tekken_data)


@pytest.fixture(scope="module")
def mistral_common_tekken():
    tekken_module = pytest.importorskip("mistral_common.tokens.tokenizers.tekken")
    assert DATA is not None
    return tekken_module.Tekkenizer.from_file(str(DATA / "tekken_240911.json"))


@pytest.fixture(scope="module")
def spm():
    assert DATA is not None
    return load_tokenizer(DATA / "mistral_instruct_tokenizer_240323.model.v3")


def plain_tiktoken(tok: TekkenTokenizer, text: str) -> list[int]:
    """The regex-split encoding with no special handling (what mistral-common computes)."""
    return tok._model.encode_ordinary(text)


def test_published_files_use_the_pattern_the_split_is_derived_from(tekken_data: dict[str, Any]) -> None:
    assert DATA is not None
    for name in ("tekken_240718.json", "tekken_240911.json"):
        assert json.loads((DATA / name).read_text(encoding="utf-8"))["config"]["pattern"] == TEKKEN_PATTERN


@pytest.mark.parametrize("n", [LONG_SPACE_RUN - 1, LONG_SPACE_RUN, 10_000, 100_000])
@pytest.mark.parametrize("white", [" ", "\t", "\u3000", " \t"])
@pytest.mark.parametrize("before, after", [("", ""), ("Hello", "world"), ("x!\n\n", "1"), ("\n", "\n"),
                                           ("a", " \n b"), ("'", "😀")])
def test_long_runs_encode_exactly_as_tiktoken(tekken: TekkenTokenizer, n: int, white: str, before: str,
                                              after: str) -> None:
    text = before + (white * n)[:n] + after
    assert tekken.encode(text) == plain_tiktoken(tekken, text)
    used = any(is_one for _, is_one in _split_long_space_runs(text))
    # the special path is what was compared (unless a line break follows the run: then the regex takes it all)
    assert used == (n >= LONG_SPACE_RUN and not after[:1].isspace())


def test_random_mixtures_encode_exactly_as_tiktoken(tekken: TekkenTokenizer) -> None:
    rng = random.Random(0)
    used = 0
    for _ in range(60):
        pieces = []
        for _ in range(rng.randint(1, 3)):
            pieces.append(rng.choice(EDGES))
            n = rng.choice([4095, 4096, 4097, 9000])
            kind = rng.random()
            if kind < 0.4:  # one character
                run = rng.choice(WHITE) * n
            elif kind < 0.8:  # a mix without line breaks
                run = "".join(rng.choice(WHITE[:2] + WHITE[4:]) for _ in range(n))
            else:  # a mix with line breaks
                run = "".join(rng.choice(WHITE) for _ in range(n))
            if rng.random() < 0.3:
                run = rng.choice(["\n", "\r\n", " \n", "\n\n"]) + run
            if rng.random() < 0.3:
                run += rng.choice(["\n", " \n", "\r", "\x1f"])
            pieces.append(run)
        pieces.append(rng.choice(EDGES))
        text = "".join(pieces)
        assert tekken.encode(text) == plain_tiktoken(tekken, text), [p[:3] for p in pieces]
        used += any(is_one for _, is_one in _split_long_space_runs(text))
    assert used >= 20


@pytest.mark.oracle
@pytest.mark.parametrize("text", [" " * 10_000, "a" + "\t" * 30_000 + "b", "x\n" + " " * 100_000 + "!",
                                  "\u3000" * 50_000, "1" + " \n" * 5 + " " * 20_000 + "\n"])
def test_long_runs_match_mistral_common(tekken: TekkenTokenizer, mistral_common_tekken, text: str) -> None:
    assert tekken.encode(text, bos=True) == mistral_common_tekken.encode(text, bos=True, eos=False)


@pytest.mark.parametrize("text", [" " * 1_000_000, "\n" + " " * 1_000_000 + "x", "\t" * 1_200_000,
                                  "a" + "\u3000 " * 600_000 + "b"])
def test_runs_of_a_million_spaces_give_tokens(tekken: TekkenTokenizer, spm, text: str) -> None:
    for tok in (tekken, spm):
        ids = tok.encode(text)
        assert ids and tok.decode(ids) == text


@pytest.mark.parametrize("char", ["a", "1", "\n", "!", "中", "😀", "/", "\u0301", "\x00"])
def test_long_runs_of_other_characters_give_tokens(tekken: TekkenTokenizer, spm, char: str) -> None:
    text = char * 300_000
    for tok in (tekken, spm):
        ids = tok.encode(text)
        assert ids and tok.decode(ids) == text


def test_a_panic_of_tiktoken_becomes_a_tokenizer_error(tekken_data: dict[str, Any]) -> None:
    # Another pattern (same matches, different text) takes the plain path, which panics on 1M spaces.
    data = {**tekken_data, "config": {**tekken_data["config"], "pattern": f"(?:{TEKKEN_PATTERN})"}}
    tok = TekkenTokenizer(data)
    assert tok.encode("Hello  world") == TekkenTokenizer(tekken_data).encode("Hello  world")
    with pytest.raises(TokenizerError, match="tiktoken failed on a text of 1000000 characters"):
        tok.encode(" " * 1_000_000)


class PanicException(BaseException):  # named like pyo3's, which cannot be imported
    pass


class Interrupt(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("raised, expected", [(PanicException, TokenizerError), (ValueError, TokenizerError),
                                              (Interrupt, Interrupt)])
def test_regex_failures_become_tokenizer_errors_and_nothing_else(tekken: TekkenTokenizer, monkeypatch,
                                                                 raised: type, expected: type) -> None:
    class FailingModel:
        def encode_ordinary(self, text: str) -> list[int]:
            raise raised("regex failed")

    monkeypatch.setattr(tekken, "_model", FailingModel())  # undone after the test
    with pytest.raises(expected):
        tekken.encode("x")


# ---- corrupt tekken files: refused before anything of their size is built ----------------------------------
@pytest.mark.parametrize("field, value, words", [
    ("default_vocab_size", 10**9, "default_vocab_size=1000000000"),
    ("default_num_special_tokens", 10**9, "default_num_special_tokens=1000000000"),
    ("default_num_special_tokens", MAX_SPECIAL_TOKENS + 1, "default_num_special_tokens"),
    ("default_num_special_tokens", -1, "default_num_special_tokens=-1"),
    ("default_vocab_size", 1000 + 256, "default_vocab_size=1256"),
    ("default_vocab_size", "many", "default_vocab_size"),
])
def test_absurd_vocab_counts_are_refused(tmp_path: Path, tekken_data: dict[str, Any], field: str, value: Any,
                                         words: str) -> None:
    data = {**tekken_data, "config": {**tekken_data["config"], field: value}}
    with pytest.raises(TokenizerError, match=words):
        TekkenTokenizer(data, tmp_path / "tekken.json")


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"config": ' + "1" * 5000 + "}"])
def test_unreadable_tekken_json_is_a_tokenizer_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "tekken.json"
    path.write_text(text)
    with pytest.raises(TokenizerError, match="cannot read tekken json"):
        TekkenTokenizer.from_file(path)
