"""`mistral-ref chat` with reasoning models: --prompt-mode, --reasoning-effort, thinking shown on stderr."""

from __future__ import annotations

import copy
import io

import pytest
from chat_models import needs_tokenizer_files, one_torch_thread, tiny_model  # noqa: F401 — fixture via pytestmark
from chat_oracle import MODERN_SPECIALS, V15_BUILDER, V15_SPECIALS, build_tekken

from mistral_ref import cli
from mistral_ref.cli import main
from mistral_ref.tokenizer import load_tokenizer, system_prompt_message

pytestmark = [needs_tokenizer_files, pytest.mark.usefixtures("one_torch_thread")]

QUESTION = "What is 2 + 2?"
PROMPT = "Think first.[THINK]Scratch work.[/THINK]Then answer."


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    out = {}
    for version, specials, builder in (("v13", MODERN_SPECIALS, None), ("v15", V15_SPECIALS, V15_BUILDER)):
        d = tmp_path_factory.mktemp(version)
        tok = load_tokenizer(build_tekken(d, version, specials, builder))
        (d / "SYSTEM_PROMPT.txt").write_text(PROMPT, encoding="utf-8")
        out[version] = tiny_model(tok), tok
    return out


def chat(monkeypatch, model, tok, *flags: str) -> int:
    monkeypatch.setattr(cli, "load_for_cli", lambda checkpoint, dtype: (model, tok, "tiny"))
    monkeypatch.setattr("sys.stdin", io.StringIO(QUESTION + "\n"))
    return main(["chat", "--temperature", "0", "--max-tokens", "20", "--threads", "1", *flags])


def test_prompt_mode_reasoning_and_thinking_on_stderr(models, monkeypatch, capsys):
    model, tok = models["v13"]
    messages = [system_prompt_message(PROMPT), {"role": "user", "content": QUESTION}]
    script = [tok.special_id("[THINK]"), *tok.encode("Two and two."), tok.special_id("[/THINK]"),
              *tok.encode("Four."), tok.eos_id]
    model.steer(script, len(tok.encode_chat(messages)))  # plays only if the prompt starts with SYSTEM_PROMPT.txt
    try:
        assert chat(monkeypatch, model, tok, "--prompt-mode", "reasoning") == 0
    finally:
        model.steer()
    out = capsys.readouterr()
    assert out.out.splitlines() == ["Four."]
    assert "Two and two.\n" in out.err


def test_reasoning_effort_reaches_the_v15_prompt(models, monkeypatch, capsys):
    model, tok = models["v15"]
    messages = [{"role": "user", "content": QUESTION}]
    model.steer([*tok.encode("High."), tok.eos_id], len(tok.encode_chat(messages, reasoning_effort="high")))
    try:
        assert chat(monkeypatch, model, tok, "--reasoning-effort", "high") == 0
    finally:
        model.steer()
    assert capsys.readouterr().out.splitlines() == ["High."]


@pytest.mark.parametrize(
    ("version", "flags", "message"),
    [
        ("v13", ["--reasoning-effort", "high"], "needs a v15 tokenizer"),
        ("v15", ["--reasoning-effort", "low"], r"accepts ['none', 'high']"),
        ("v15", ["--reasoning-effort", "lots"], "must be one of"),
        ("v13-elsewhere", ["--prompt-mode", "reasoning"], "no SYSTEM_PROMPT.txt"),
    ],
)
def test_bad_reasoning_flags_are_reported_before_the_first_turn(models, monkeypatch, capsys, version, flags, message):
    model, tok = models[version.split("-")[0]]
    if version.endswith("elsewhere"):
        tok = copy.copy(tok)
        tok.path = None  # loaded from memory: no checkpoint directory to look in
    assert chat(monkeypatch, model, tok, *flags) == 2
    out = capsys.readouterr()
    assert message in out.err and out.out == ""
