"""The tokenizer API (mistral_ref.tokenizer, .base, .files): loading, encode/decode parity, specials."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistral_ref.tokenizer import (
    SentencePieceTokenizer,
    TekkenTokenizer,
    Tokenizer,
    TokenizerError,
    find_tokenizer_file,
    load_tokenizer,
    mistral_common_data_dir,
)

DATA = mistral_common_data_dir()
pytestmark = pytest.mark.skipif(DATA is None, reason="the mistral-common wheel ships the tokenizer files")

FILES = {
    "tokenizer.model.v1": ("sentencepiece", "v1", 32000),
    "mistral_instruct_tokenizer_240216.model.v2": ("sentencepiece", "v2", 32768),
    "mistral_instruct_tokenizer_240323.model.v3": ("sentencepiece", "v3", 32768),
    "mistral_instruct_tokenizer_241114.model.v7": ("sentencepiece", "v7", 32768),
    "mistral_instruct_tokenizer_241114.model.v7m1": ("sentencepiece", "v7", 32768),
    "tekken_240718.json": ("tekken", "v3", 131072),
    "tekken_240911.json": ("tekken", "v3", 131072),
}

CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Le cœur a ses raisons que la raison ne connaît point. Ça va, l'été ?",
    "Größenwahn: Übermäßige Straßenbahnhaltestellen in Köln.",
    "¿Qué tal? ¡Mañana será otro día, señor Muñoz!",
    "Nel mezzo del cammin di nostra vita mi ritrovai per una selva oscura.",
    "हिन्दी भारत की एक राजभाषा है। नमस्ते!",
    "اللغة العربية جميلة جداً، أليس كذلك؟",
    "我能吞下玻璃而不伤身体。你好，世界！",
    "മലയാളം ഒരു ദ്രാവിഡ ഭാഷയാണ്.",
    "Emoji: 😀 👍🏽 👩‍👩‍👧‍👦 🇫🇷 ❤️ 🧑🏿‍🚀",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot",
    '<html><body><p class="x">Hi &amp; bye</p></body></html>',
    "0 1 12 123 1234 12345 123456 3.14159 -2.5e-10 1,000,000 0x1F",
    "   leading spaces",
    "trailing spaces   ",
    "many     internal      spaces\t\ttabs\n\n\nnewlines\r\nwindows\r\n",
    " ",
    "",
    "\n",
    "text with [INST] and [/INST] and </s> and <s> and [TOOL_CALLS] [SYSTEM_PROMPT] <unk>",
    "combining: e\u0301 a\u0300 n\u0303; lone mark \u0301 at start; zero width\u200bjoiner\u200d.",
    "math ∑_{i=1}^n x_i² ≤ ∞, arrows → ⇒ ↔, box ┌─┐",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "Ω≈ç√∫˜µ≤≥÷ åß∂ƒ©˙∆˚¬…æ œ∑´®†¥¨ˆøπ“‘",
]


@pytest.fixture(scope="module")
def toks() -> dict[str, Tokenizer]:
    assert DATA is not None
    return {name: load_tokenizer(DATA / name) for name in FILES}


@pytest.fixture(scope="module")
def oracles() -> dict:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    assert DATA is not None
    return {name: MistralTokenizer.from_file(str(DATA / name)).instruct_tokenizer.tokenizer for name in FILES}


def test_import_does_not_pull_torch_or_mistral_common() -> None:
    code = (
        "import sys, mistral_ref.tokenizer as t; t.load_tokenizer; "
        "bad = [m for m in ('torch', 'mistral_common', 'numpy') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_lazy_package_exports_tokenizer() -> None:
    import mistral_ref

    assert mistral_ref.load_tokenizer is load_tokenizer
    assert mistral_ref.Tokenizer is Tokenizer


@pytest.mark.parametrize("name", list(FILES))
def test_load_kind_version_vocab(name: str, toks: dict[str, Tokenizer]) -> None:
    kind, version, n = FILES[name]
    tok = toks[name]
    assert (tok.kind, tok.version, tok.vocab_size) == (kind, version, n)
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (1, 2, 0)
    assert tok.pad_id == (11 if kind == "tekken" else None)
    assert tok.is_special(tok.bos_id) and tok.is_special(tok.eos_id)
    assert not tok.is_special(tok.encode("hello")[0])
    assert tok.special_id("</s>") == 2
    if version != "v1":
        assert tok.special_id("[INST]") == 3 and tok.special_id("[/INST]") == 4
        assert tok.has_special("[TOOL_CALLS]")
    else:
        assert not tok.has_special("[INST]")
    with pytest.raises(TokenizerError, match="no special token"):
        tok.special_id("[NOT_A_TOKEN]")
    assert name in repr(tok)


def test_special_id_sets(toks: dict[str, Tokenizer]) -> None:
    v3 = toks["mistral_instruct_tokenizer_240323.model.v3"]
    assert len(v3.special_ids) == 750 and 0 not in v3.special_ids  # <unk> is not a control piece
    assert v3.special_id("[SUFFIX]") == 13
    v7 = toks["mistral_instruct_tokenizer_241114.model.v7"]
    assert [v7.special_id(n) for n in ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]")] == [
        16,
        17,
        18,
    ]
    tk = toks["tekken_240718.json"]
    assert tk.special_ids == frozenset(range(1000)) and tk.num_special_tokens == 1000
    assert tk.special_id("[TOOL_CONTENT]") == 19 and tk.special_id("<SPECIAL_20>") == 20
    assert tk.special_id("<SPECIAL_999>") == 999


@pytest.mark.oracle
@pytest.mark.parametrize("name", list(FILES))
def test_encode_decode_match_mistral_common(name: str, toks: dict[str, Tokenizer], oracles: dict) -> None:
    tok, ref = toks[name], oracles[name]
    for text in CORPUS:
        for bos, eos in ((False, False), (True, False), (True, True)):
            ids = tok.encode(text, bos=bos, eos=eos)
            assert ids == ref.encode(text, bos=bos, eos=eos), text
        assert tok.decode(ids) == ref.decode(ids)
        body = tok.encode(text)
        assert tok.decode(body, "raise") == ref.decode(body, special_token_policy="raise")
        if (
            tok.kind == "tekken"
        ):  # mistral-common's SentencePiece "keep" prints raw pieces ("▁Hello"), see below
            assert tok.decode(ids, "keep") == ref.decode(ids, special_token_policy="keep")


@pytest.mark.oracle
@pytest.mark.parametrize("name", list(FILES))
def test_decode_arbitrary_ids_matches_mistral_common(
    name: str, toks: dict[str, Tokenizer], oracles: dict
) -> None:
    import random

    tok, ref = toks[name], oracles[name]
    rng = random.Random(7)
    pool = list(range(0, 40)) + list(range(tok.vocab_size - 50, tok.vocab_size))
    byte_ids = [tok.encode("é🙂")[-1], *tok.encode("€")] + list(
        range(1000, 1256) if tok.kind == "tekken" else []
    )
    for _ in range(150):
        ids = [
            rng.choice(pool)
            if rng.random() < 0.3
            else rng.choice(byte_ids)
            if rng.random() < 0.3
            else rng.randrange(tok.vocab_size)
            for _ in range(rng.randint(0, 30))
        ]
        assert tok.decode(ids) == ref.decode(ids), ids
        if tok.kind == "tekken":
            assert tok.decode(ids, "keep") == ref.decode(ids, special_token_policy="keep"), ids
        for t in ids[:3]:
            assert tok.id_to_piece(t) == ref.id_to_piece(t)


@pytest.mark.parametrize("name", list(FILES))
def test_decode_policies(name: str, toks: dict[str, Tokenizer]) -> None:
    tok = toks[name]
    body = tok.encode("Hello world")
    ids = [tok.bos_id, *body, tok.eos_id]
    assert tok.decode(ids) == "Hello world" == tok.decode(body, "raise")
    assert tok.decode(ids, "keep") == "<s>Hello world</s>"
    with pytest.raises(TokenizerError, match="special"):
        tok.decode(ids, "raise")
    with pytest.raises(TokenizerError, match="special must be one of"):
        tok.decode(ids, "drop")  # type: ignore[arg-type]
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([-1])


@pytest.mark.parametrize("name", list(FILES))
def test_text_never_becomes_control_tokens(name: str, toks: dict[str, Tokenizer]) -> None:
    tok = toks[name]
    text = (
        " ".join(tok.special_tokens)
        if tok.kind == "sentencepiece"
        else " ".join(list(tok.special_tokens)[:40])
    )
    ids = tok.encode(text)
    assert not any(tok.is_special(t) for t in ids)
    assert tok.decode(ids) == text


def _roundtrip_strategy(kind: str) -> st.SearchStrategy[str]:
    # SentencePiece writes spaces as U+2581 and so cannot give that character back (mistral-common neither).
    excluded = "\u2581" if kind == "sentencepiece" else ""
    return st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=excluded), max_size=60)


@pytest.mark.parametrize(
    "name", ["tokenizer.model.v1", "mistral_instruct_tokenizer_240323.model.v3", "tekken_240718.json"]
)
def test_roundtrip_any_unicode(name: str, toks: dict[str, Tokenizer]) -> None:
    tok = toks[name]

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(_roundtrip_strategy(tok.kind))
    def check(s: str) -> None:
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert tok.decode(tok.encode(s, bos=True, eos=True)) == s

    check()
    for s in ["\r\n", "\u0301", "🇫🇷👩🏽‍🔬", "中文 ഹലോ", "\x00\x01\x7f", "  \t  "]:
        assert tok.decode(tok.encode(s)) == s


@pytest.mark.parametrize("name", ["tokenizer.model.v1", "tekken_240718.json"])
def test_lone_surrogates_become_replacement_characters(name: str, toks: dict[str, Tokenizer]) -> None:
    tok = toks[name]
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"


@pytest.mark.parametrize("name", ["mistral_instruct_tokenizer_240323.model.v3", "tekken_240718.json"])
def test_encode_time_is_linear_in_run_length(name: str, toks: dict[str, Tokenizer]) -> None:
    tok = toks[name]

    def best(text: str) -> float:
        times = []
        for _ in range(5):
            t0 = time.process_time()  # CPU time: robust to other load on the machine
            tok.encode(text)
            times.append(time.process_time() - t0)
        return min(times)

    for ch in "a ", "1":
        for c in ch:
            small, big = best(c * 1_000), best(c * 10_000)
            # linear: ~10x; quadratic BPE on one pre-token would be ~100x. Generous bound for noisy machines.
            assert big / max(small, 1e-4) < 40, (repr(c), small, big)


@pytest.mark.parametrize("name", list(FILES))
def test_id_to_bytes_concatenates_to_decoded_text(name: str, toks: dict[str, Tokenizer]) -> None:
    tok = toks[name]
    for text in CORPUS:
        ids = tok.encode(text, bos=True, eos=True)
        joined = b"".join(tok.id_to_bytes(t) for t in ids)
        expected = tok.decode(ids).encode("utf-8")
        if tok.kind == "sentencepiece" and text:
            expected = b" " + expected  # the dummy-prefix space SentencePiece drops at sequence start
        assert joined == expected, text
    assert tok.id_to_bytes(tok.bos_id) == b""
    table = tok.token_bytes_table()
    assert len(table) == tok.vocab_size and table[tok.eos_id] == b""
    assert table[ids[1]] == tok.id_to_bytes(ids[1])


def test_load_from_checkpoint_directory(tmp_path: Path) -> None:
    assert DATA is not None
    native = tmp_path / "native"
    native.mkdir()
    (native / "params.json").write_text("{}")
    (native / "tokenizer.model.v3").symlink_to(DATA / "mistral_instruct_tokenizer_240323.model.v3")
    tok = load_tokenizer(native)
    assert (tok.kind, tok.version) == ("sentencepiece", "v3")
    assert find_tokenizer_file(native).name == "tokenizer.model.v3"

    nemo = tmp_path / "nemo"
    nemo.mkdir()
    (nemo / "tekken.json").symlink_to(DATA / "tekken_240718.json")
    (nemo / "tokenizer.model.v3").symlink_to(DATA / "mistral_instruct_tokenizer_240323.model.v3")
    assert find_tokenizer_file(nemo).name == "tekken.json"

    for src, version in [("tokenizer.model.v1", "v1"), ("mistral_instruct_tokenizer_240216.model.v2", "v2"),
                         ("mistral_instruct_tokenizer_240323.model.v3", "v3"),
                         ("mistral_instruct_tokenizer_241114.model.v7", "v7")]:  # fmt: skip
        hf = tmp_path / f"hf-{version}"
        hf.mkdir()
        (hf / "config.json").write_text("{}")
        (hf / "tokenizer.model").symlink_to(DATA / src)  # HF layout: version inferred from control pieces
        assert load_tokenizer(hf).version == version
    assert load_tokenizer(DATA / "mistral_instruct_tokenizer_241114.model.v7m1").version == "v7"
    assert load_tokenizer(DATA / "tokenizer.model.v1", version="v2").version == "v2"


def test_load_errors(tmp_path: Path) -> None:
    assert DATA is not None
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model.v3")
    with pytest.raises(TokenizerError, match="no tokenizer in"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "tekken_bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read"):
        load_tokenizer(bad)
    with pytest.raises(TokenizerError, match="missing or malformed"):
        TekkenTokenizer({"config": {}, "vocab": []})
    junk = tmp_path / "junk.model.v3"
    junk.write_bytes(b"\x00\x01garbage")
    with pytest.raises(TokenizerError, match="SentencePiece"):
        load_tokenizer(junk)
    with pytest.raises(TokenizerError, match="versions"):
        SentencePieceTokenizer(DATA / "tokenizer.model.v1", version="v11")
    other = tmp_path / "vocab.txt"
    other.write_text("x")
    with pytest.raises(TokenizerError, match="unrecognised"):
        load_tokenizer(other)
