"""Fill-in-the-middle (Tokenizer.encode_fim): token-identical to mistral-common's encode_fim on every tokenizer file
its wheel ships and on the v11/v13/v15 files built from the Nemo vocabulary."""

from __future__ import annotations

from pathlib import Path

import pytest
from chat_oracle import DATA, MODERN_SPECIALS, V15_BUILDER, V15_SPECIALS, build_tekken

from mistral_ref.tokenizer import TEMPLATES, ChatTemplateError, Tokenizer, load_tokenizer

pytestmark = pytest.mark.skipif(DATA is None, reason="the mistral-common wheel ships the tokenizer files")

SHIPPED = sorted(p.name for p in DATA.iterdir() if p.is_file()) if DATA is not None else []
BUILT = {"tekken-v11": ("v11", MODERN_SPECIALS, None), "tekken-v13": ("v13", MODERN_SPECIALS, None),
         "tekken-v15": ("v15", V15_SPECIALS, V15_BUILDER)}

CASES = [
    ("def add(a, b):\n    return", "\n\nprint(add(1, 2))\n"),
    ("def add(a, b):\n    return", None),
    ("", "suffix only"),
    ("prompt only", ""),
    ("", None),
    ("   indented", "   indented suffix"),
    ("x = ", "def"),  # a suffix starting with a letter merges with the throw-away character on Tekken
    ("# café ☺", "☺☺ 你好"),
    ("a\r\n", "\tb"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    assert DATA is not None
    tmp = tmp_path_factory.mktemp("tekken")
    out = {name: DATA / name for name in SHIPPED}
    out.update({name: build_tekken(tmp, *spec, name=name) for name, spec in BUILT.items()})
    return out


def test_the_wheel_ships_the_files_we_expect() -> None:
    assert {"tokenizer.model.v1", "tekken_240718.json", "mistral_instruct_tokenizer_241114.model.v7m1"} <= set(
        SHIPPED
    )


@pytest.mark.oracle
@pytest.mark.parametrize("name", [*SHIPPED, *BUILT])
def test_encode_fim_matches_mistral_common(name: str, files: dict[str, Path]) -> None:
    from mistral_common.protocol.fim.request import FIMRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tok = load_tokenizer(files[name])
    mt = MistralTokenizer.from_file(str(files[name]))
    for prompt, suffix in CASES:
        if not TEMPLATES[tok.version].fim:  # v1: both refuse
            with pytest.raises(Exception):  # noqa: B017
                mt.encode_fim(FIMRequest(prompt=prompt, suffix=suffix))
            with pytest.raises(ChatTemplateError, match="no fill-in-the-middle"):
                tok.encode_fim(prompt, suffix)
            continue
        want = mt.encode_fim(FIMRequest(prompt=prompt, suffix=suffix)).tokens
        if not tok.has_special("[SUFFIX]"):
            # the v2 vocabulary has no [SUFFIX] / [PREFIX]: mistral-common writes <unk> in their place, we refuse
            assert want[1] == tok.unk_id and want.count(tok.unk_id) == 2
            with pytest.raises(ChatTemplateError, match=r"no \[SUFFIX\] / \[PREFIX\]"):
                tok.encode_fim(prompt, suffix)
            continue
        assert tok.encode_fim(prompt, suffix) == want, (prompt, suffix)


def test_fim_layout() -> None:
    assert DATA is not None
    tok: Tokenizer = load_tokenizer(DATA / "mistral_instruct_tokenizer_240323.model.v3")
    ids = tok.encode_fim("def f(x):\n    return", "\nprint(f(2))")
    assert tok.decode(ids, "keep") == "<s>[SUFFIX]\nprint(f(2))[PREFIX] def f(x):\n    return"
    assert ids[:2] == [tok.bos_id, tok.special_id("[SUFFIX]")] and tok.special_id("[MIDDLE]") not in ids
    assert tok.encode_fim("x") == [tok.bos_id, tok.special_id("[SUFFIX]"), tok.special_id("[PREFIX]"),
                                   *tok.encode("x")]
    with pytest.raises(ChatTemplateError, match="suffix must be a string"):
        tok.encode_fim("x", 3)  # type: ignore[arg-type]
