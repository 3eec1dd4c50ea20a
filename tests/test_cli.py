"""The command line: info prints the family table with published parameter counts; demo runs end to end."""

import subprocess
import sys

import pytest

from mistral_ref.cli import family_table, main


def test_family_table_has_every_preset_and_published_counts():
    table = family_table()
    for name in ("mistral-7b-v0.1", "mixtral-8x7b", "mixtral-8x22b", "mistral-nemo-12b", "mistral-large-2407"):
        assert f"| {name} |" in table
    assert "| 46.70B | 12.88B |" in table  # Mixtral-8x7B: 46.7B total, 12.9B active
    assert "| 140.63B | 39.16B |" in table  # Mixtral-8x22B: 141B / 39B


def test_info_command(capsys):
    assert main(["info"]) == 0
    assert "mistral-nemo-12b" in capsys.readouterr().out


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "mistral_ref", "info"], capture_output=True, text=True, check=True)
    assert "mixtral-8x22b" in out.stdout


def test_errors_are_reported_not_raised(tmp_path, capsys):
    # converting a directory that holds no checkpoint is a clear one-line error, exit code 2
    assert main(["convert", str(tmp_path), str(tmp_path / "out"), "--to", "hf"]) == 2
    assert "error" in capsys.readouterr().err


# ---- chat / generate / serve (issue 5) --------------------------------------------------------------------------
def _checkpoint(tmp_path_factory):
    import shutil

    from chat_models import DATA, SP_V3, tiny_model, tokenizer

    from mistral_ref.checkpoint import save_checkpoint

    if DATA is None:
        pytest.skip("the mistral-common wheel ships the tokenizer files")
    tok = tokenizer(SP_V3)
    path = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(tiny_model(tok, max_seq_len=512), path)
    shutil.copy(DATA / SP_V3, path / "tokenizer.model.v3")  # a temporary copy of the test asset
    return path, tok


def test_generate_command_streams_the_greedy_completion(tmp_path_factory, capsys):
    from mistral_ref.checkpoint import load_model
    from mistral_ref.generate import generate

    path, tok = _checkpoint(tmp_path_factory)
    assert main(["generate", str(path), "--prompt", "Once upon a time", "--max-tokens", "6", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    (ref,) = generate(load_model(path), [tok.encode("Once upon a time", bos=True)], 6, temperature=0,
                      eos_id=tok.eos_id)
    assert out.out == tok.decode(ref.tokens) + "\n"
    assert "6 tokens" in out.err and "finish: length" in out.err


def test_chat_command_reads_turns_and_streams_replies(tmp_path_factory, capsys, monkeypatch):
    import io

    from mistral_ref.api import chat_completion
    from mistral_ref.checkpoint import load_model

    path, tok = _checkpoint(tmp_path_factory)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n/reset\nSecond question\n"))
    assert main(["chat", str(path), "--temperature", "0", "--max-tokens", "5", "--system", "Be brief."]) == 0
    out = capsys.readouterr()
    model = load_model(path)
    expected = [chat_completion(model, tok, [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": q}], temperature=0, max_tokens=5)
                ["choices"][0]["message"]["content"] for q in ("Hello there", "Second question")]
    assert out.out.splitlines() == expected  # /reset: the second question is asked on a fresh conversation
    assert "[conversation cleared]" in out.err


def test_chat_without_checkpoint_uses_the_embedded_model_or_says_why_not(capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    code = main(["chat", "--max-tokens", "3"])
    err = capsys.readouterr().err
    if code == 0:
        assert "[using the embedded model" in err
    else:
        assert code == 2 and "embedded model" in err


@pytest.mark.slow
def test_serve_command_answers_http(tmp_path_factory):
    import json
    import signal
    import urllib.request

    path, _ = _checkpoint(tmp_path_factory)
    proc = subprocess.Popen([sys.executable, "-m", "mistral_ref", "serve", str(path), "--port", "0",
                             "--model-name", "cli-test"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(proc.stderr.read())
        url = line.split(" on ")[1].split()[0]
        with urllib.request.urlopen(url + "/info", timeout=60) as resp:
            assert json.loads(resp.read())["model_name"] == "cli-test"
        req = urllib.request.Request(url + "/v1/chat/completions", method="POST",
                                     data=json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 2}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert json.loads(resp.read())["usage"]["completion_tokens"] == 2
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
